"""A store, or an image folder turned into one through the same ingest path as everything else.

Commands that take `--data`/`--train`/`--test` accept either. A folder (`<class>/*.jpg` are
labeled, `*.jpg` at the top are not) is ingested into `<cache>/<folder name>-store/images`
with the project's `ingest` and `validate` settings: bad files are quarantined with a reason,
duplicates dropped, the batch validated, no DVC. Ingesting is incremental, so a second call
only hashes the files and adds what is new.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslflow.ssl_models.store import ImageStore, StoreError

SPLIT = "images"


def open_images(path: str | Path, cache_dir: str | Path, settings: Any = None, *, update: bool = True) -> ImageStore:
    """A store as it is, or the store an image folder becomes (see the module docstring).

    `update=False` opens an existing folder cache without scanning the folder again (DDP ranks
    other than rank 0, after rank 0 updated it).
    """
    path = Path(path)
    if ImageStore.is_store(path):
        return ImageStore.open(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    if not path.is_dir():
        raise StoreError(f"{path} is neither an image store nor an image folder")
    root = Path(cache_dir) / f"{path.resolve().name}-store"
    if update or not ImageStore.is_store(root / SPLIT):
        from sslflow.tasks.data.ingest import ingest

        ingest(str(path), root, SPLIT, settings=settings, reports_dir=root / "reports", dvc=False,
               log=lambda msg: None)
    if not ImageStore.is_store(root / SPLIT):
        raise StoreError(f"{path} holds no images (<class>/*.jpg or *.jpg)")
    return ImageStore.open(root / SPLIT)
