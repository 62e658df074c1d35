"""The splits of a store root (`<store>/train`, `<store>/test`): are they there, how many images."""

from __future__ import annotations

from pathlib import Path

from sslflow.core.errors import UserError
from sslflow.ssl_models.store import ImageStore


def train_image_count(store_root: str | Path) -> int:
    """Images published in `store_root/train` (0 when the split does not exist yet)."""
    split = Path(store_root) / "train"
    if not ImageStore.is_store(split):
        return 0
    return len(ImageStore.open(split))


def require_images(split_dir: str | Path) -> int:
    """The number of images in a published split; a one-line `UserError` when there are none."""
    split_dir = Path(split_dir)
    if not ImageStore.is_store(split_dir):
        raise UserError(f"image store {split_dir} does not exist: ingest images first "
                        "(sslflow ingest --source ... --store ... or sslflow run)")
    n = len(ImageStore.open(split_dir))
    if n == 0:
        raise UserError(f"image store {split_dir} is empty: ingest images first")
    return n
