"""CIFAR-10 for the benchmarks: the shared JPEG archive, ingested once into stores (cached).

The JPEGs go through `sslflow ingest` like any folder of images (decode, dedupe, validation),
so the benchmarks measure the path users take. The archive is never downloaded: it is
`../shared/datasets/cifar10-jpeg.tar.gz` beside the checkout.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import numpy as np

from sslflow.core.settings import load_settings
from sslflow.ssl_models.store import ImageStore
from sslflow.tasks.data.ingest import ingest

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def extract(cache: Path) -> Path:
    """`cache/cifar10/{train,test}/<class>/*.jpg`, extracted once."""
    root = cache / "cifar10"
    if not (root / "test").is_dir():
        if not ARCHIVE.is_file():
            sys.exit(f"CIFAR-10 archive not found at {ARCHIVE}")
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(cache, filter="data")
    return root


def cifar10_stores(cache: Path, subset: int | None = None, size: int = 32) -> dict[str, Path]:
    """{"train", "test"} store paths under `cache/store` (optionally a random `subset` of each)."""
    folders = extract(cache)
    settings = load_settings([], [f"ingest.size={size}", "versioning.dvc=off", "validate.class_balance_tolerance=1"])
    root = cache / f"store-{size}"
    out = {}
    for split in ("train", "test"):
        if not ImageStore.is_store(root / split):
            ingest(str(folders / split), root, split, settings=settings, reports_dir=cache / "reports",
                   log=lambda m, s=split: print(f"ingest {s}: {m}", flush=True))
        out[split] = root / split
        if subset:
            small = cache / f"store-{size}-{subset}" / split
            if not ImageStore.is_store(small):
                src = ImageStore.open(root / split)
                keep = np.sort(np.random.default_rng(0).permutation(len(src))[:subset])
                images, labels = src.images()[keep], src.labels()[keep]
                ImageStore.create(small, src.height, src.width).add(images, [src.classes[i] for i in labels])
            out[split] = small
    return out
