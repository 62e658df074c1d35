"""Shared fixtures: small generated image stores and fast parameters for a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from services import native_stack, postgres_service, postgres_url, stack  # noqa: F401 (fixtures for all tests)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parent.parent
CIFAR10_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"

# A narrow ResNet-18 on 16x16 images: a training step takes milliseconds on a CPU.
FAST = [
    "device=cpu",
    "pretrain.width=8",
    "pretrain.epochs=2",
    "pretrain.batch_size=32",
    "pretrain.optimizer=sgd",
    "pretrain.lr=0.1",
    "pretrain.warmup_epochs=1",
    "pretrain.proj_hidden_dim=64",
    "pretrain.proj_dim=32",
    "pretrain.pred_hidden_dim=64",
    "pretrain.dino_out_dim=64",
    "pretrain.queue_size=64",
    "pretrain.checkpoint_every=0",
    "pretrain.log_every=1",
    "pretrain.eval_every=1",
    "augment.local_crops=2",
    "augment.local_size=8",
    "eval.linear_epochs=5",
    "eval.finetune_epochs=1",
    "eval.batch_size=64",
]


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors on 2 shared cores: intra-op threads only add contention (several times
    slower). Per module, with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fast_params(*overrides: str):
    from sslflow.params import load_params

    return load_params(overrides=[*FAST, *overrides])


@pytest.fixture(scope="session")
def demo_stores(tmp_path_factory) -> dict[str, Path]:
    """Labeled demo train (16/class) and test (8/class) stores of 16x16 images."""
    from ssl_models.store import ImageStore
    from tasks.demo import CLASSES, generate_demo

    root = tmp_path_factory.mktemp("stores")
    out = {}
    for split, n, seed in (("train", 16, 0), ("test", 8, 1)):
        images, labels = generate_demo(n, size=16, seed=seed)
        store = ImageStore.create(root / split, 16, 16)
        store.add(images, [CLASSES[i] for i in labels])
        out[split] = root / split
    return out


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    """The shared CIFAR-10 JPEGs, extracted once per session (skipped when absent)."""
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR10_ARCHIVE}")
    import tarfile

    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(CIFAR10_ARCHIVE) as tar:
        tar.extractall(root, filter="data")
    return root / "cifar10"


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
