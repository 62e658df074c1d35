"""Images larger than 32 px (issue 15): the CPU memory layout (the channels_last crash), the stem
at 32 / 96 / 224 px, store size vs view sizes, the demo source at any size, grayscale sources."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import BIN, FAST, fast_params
from sslflow.ssl_models.augment import BatchAugment, model_layout
from sslflow.ssl_models.backbones import SSLResNet, build_backbone
from sslflow.ssl_models.backbones.base import input_layout
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.methods.base import Batch
from sslflow.ssl_models.store import ImageStore
from sslflow.ssl_models.views import ViewSpec
from sslflow.tasks.data.demo import CLASSES, generate_demo

pytestmark = pytest.mark.usefixtures("single_thread")


def _store(root, n_per_class: int, size: int) -> ImageStore:
    images, labels = generate_demo(n_per_class, size=size, seed=0)
    store = ImageStore.create(root, size, size)
    store.add(images, [CLASSES[i] for i in labels])
    return store


# ------------------------------------------------------------------------------------ layout
def test_the_cpu_gets_contiguous_network_inputs():
    """channels_last only where it pays (CUDA); the CPU path is NCHW everywhere a network reads."""
    assert model_layout(torch.device("cpu")) == torch.contiguous_format
    assert model_layout(torch.device("cuda")) == torch.channels_last
    images = torch.from_numpy(generate_demo(1, size=24)[0])
    views = BatchAugment([ViewSpec(size=20, scale=(0.5, 1.0))] * 2, (0.5,) * 3, (0.25,) * 3)(
        images, torch.Generator().manual_seed(0))
    assert all(v.is_contiguous() for v in views)
    assert Batch(views, images, (0.5,) * 3, (0.25,) * 3).raw().is_contiguous()
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous() and input_layout(x).is_contiguous()


def test_backbones_turn_channels_last_cpu_inputs_into_nchw():
    """A caller handing a channels_last tensor to the backbone on the CPU (user code, a method's own
    tensors) gets the same features, computed on NCHW."""
    net = SSLResNet("resnet18", width=8, cifar_stem=True, image_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), net(x))


@pytest.mark.slow
def test_narrow_resnet_on_96px_channels_last_case_trains_in_a_subprocess(tmp_path):
    """The issue's crash: `sslflow pretrain` on a 96 px store, width 8 (CIFAR stem forced, the
    failing configuration), one thread: glibc aborted inside loss.backward() in 3 of 3 runs
    while the CPU got channels_last views. In a subprocess, so a native crash fails the test
    instead of killing pytest."""
    _store(tmp_path / "store", n_per_class=2, size=96)  # 20 images: one step of 16
    settings = [*FAST, "backbone.resnet.stem=cifar", "pretrain.batch_size=16", "pretrain.epochs=1",
                "pretrain.eval_every=0", "pretrain.export=false", "augment.local_crops=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / "sslflow"), "pretrain", "--data", str(tmp_path / "store"),
                           "--out", str(tmp_path / "run"), "--no-progress",
                           *[a for s in settings for a in ("--set", s)]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "corrupted" not in proc.stderr and (tmp_path / "run" / "encoder.pt").is_file()


# ------------------------------------------------------------------------------------ stem
@pytest.mark.parametrize(("size", "cifar", "side"), [(32, True, 4), (96, False, 3), (224, False, 7)])
def test_the_stem_follows_the_image_size(size, cifar, side):
    """auto stem: CIFAR (no downsampling) up to 64 px, the standard /4 stem above, so a 224 px
    image costs what it costs in torchvision (a 7x7 last map), not 16x that."""
    net = build_backbone(fast_params().backbone, size).eval()
    assert net.cifar_stem is cifar and net.metadata()["image_size"] == size
    with torch.no_grad():
        maps = net.forward_features(torch.zeros(1, 3, size, size))
    assert maps.shape[-2:] == (side, side)


# ------------------------------------------------------------------------------------ sizes
def test_views_larger_than_the_stored_images_are_refused_before_loading(tmp_path):
    from sslflow.ssl_models.train import Pretrainer

    store = _store(tmp_path / "store", n_per_class=4, size=16)
    for key in ("augment.global_size=24", "augment.local_size=32"):
        params = fast_params(key, "pretrain.method=dino")
        with pytest.raises(ConfigError, match=r"larger than the stored 16 px images") as e:
            Pretrainer(store, params, tmp_path / "run")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_smaller_global_views_than_the_store_train(tmp_path):
    """Store 24 px, global views 16 px, local 8 px: separate sizes, the backbone built for 16."""
    from sslflow.ssl_models.train import Pretrainer

    store = _store(tmp_path / "store", n_per_class=4, size=24)
    params = fast_params("pretrain.method=simclr", "augment.global_size=16", "pretrain.epochs=1",
                         "pretrain.export=false", "pretrain.eval_every=0")
    trainer = Pretrainer(store, params, tmp_path / "run", progress_bar=False)
    assert trainer.method.backbone.image_size == 16
    views = trainer.make_batch(next(trainer.batches.epoch(0))).views
    assert {tuple(v.shape[-2:]) for v in views} == {(16, 16)}
    assert np.isfinite(trainer.fit().metrics["final_loss"])


# ------------------------------------------------------------------------------------ ingest
def test_demo_source_generates_at_the_ingest_size():
    """`--source demo --set ingest.size=96`: the demo images are drawn at 96 px (not upsampled from
    32), so tests and the quickstart exercise the large-image path on the CPU."""
    from sslflow.core.settings import load_settings
    from sslflow.tasks.data.decode import Accepted, DecodeOptions
    from sslflow.tasks.data.sources import open_source

    cfg = load_settings([], ["ingest.size=96", "ingest.demo_train_per_class=1"]).ingest
    src = open_source("demo", "train", demo_per_class={"train": cfg.demo_train_per_class}, demo_seed=0,
                      torchvision_root=Path("unused"))
    outcomes = list(src.outcomes(DecodeOptions.of(cfg), (), 1, 16))
    assert len(outcomes) == len(CLASSES) and all(isinstance(o, Accepted) for o in outcomes)
    assert {(o.width, o.height, o.image.shape) for o in outcomes} == {(96, 96, (96, 96, 3))}


def test_grayscale_sources_are_stored_replicated_and_train(tmp_path):
    """Grayscale files (8-bit L, 16-bit I;16) are stored as 3 equal channels: one store format, one
    network stem, any pretrained RGB encoder applies; hue and saturation jitter are the identity on
    them, brightness / contrast / blur / crops do the work (docs/data.md)."""
    from PIL import Image

    from sslflow.core.settings import load_settings
    from sslflow.ssl_models.train import Pretrainer
    from sslflow.tasks.data.ingest import ingest

    rng = np.random.default_rng(0)
    folder = tmp_path / "xray"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8), "L").save(folder / cls / f"{i}.png")
    Image.fromarray(rng.integers(0, 65536, (24, 24), dtype=np.uint16)).save(folder / "a" / "deep.png")
    settings = load_settings([], [*FAST, "ingest.size=16", "versioning.dvc=off", "pretrain.epochs=1",
                                  "pretrain.batch_size=8", "pretrain.eval_every=0", "pretrain.export=false"])
    summary = ingest(str(folder), tmp_path / "store", "train", settings=settings, reports_dir=tmp_path / "r",
                     log=lambda m: None)
    assert summary.accepted == 21 and summary.converted == {"I;16": 1, "L": 20}
    store = ImageStore.open(tmp_path / "store" / "train")
    images = store.images()
    assert images.shape[1:] == (16, 16, 3)
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    result = Pretrainer(store, settings, tmp_path / "run", progress_bar=False).fit()
    assert np.isfinite(result.metrics["final_loss"])


def test_profiles_for_96_and_224_px_load_and_check():
    """params/profiles/*96*/*224*: ResNet-50 at 96 px (STL-10-like) and ResNet-50 / ViT-S/16 at 224
    px (ImageNet-like) load, pass every check, and build their backbone with the standard stem."""
    from sslflow.core.settings import load_settings

    profiles = sorted((Path(__file__).resolve().parents[2] / "params" / "profiles").glob("*[0-9]px*.yaml"))
    names = {p.stem for p in profiles}
    assert {"stl10-96px-simclr-resnet50", "imagenet-224px-simclr-resnet50", "imagenet-224px-dino-vits16"} <= names
    from sslflow.ssl_models.train import method_views

    for path in profiles:
        settings = load_settings([path], ["device=cpu"])
        stored, view = settings.ingest.size, settings.augment.global_size
        assert view == (96 if "96px" in path.stem else 224) and view <= stored
        assert max(v.size for v in method_views(settings, stored)) <= stored
        if settings.backbone.family == "resnet":
            assert settings.backbone.family_config.resolved_stem(view) == "imagenet"
        else:
            assert view % settings.backbone.family_config.patch_size == 0

if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
