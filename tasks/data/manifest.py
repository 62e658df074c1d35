"""The manifest: one Parquet row per stored image, saying where it came from.

It lives inside the split store it describes (`STORE/<split>/manifest.parquet`), so DVC
versions it together with the pixels and `dvc checkout` restores both as one unit.

Commit protocol: a batch's rows name the shard that holds each image (`shard`,
`shard_index`). Ingestion writes the shard files, then this file (atomic replace), and only
then publishes the store index. The index is the single commit point: `read` keeps only rows
whose shard the index lists, so rows of a batch that crashed before publishing (or failed
validation) are invisible and are dropped by the next write.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pandas as pd

from sslflow.ssl_models.store import ImageStore
from sslflow.tasks.data.decode import Accepted

MANIFEST = "manifest.parquet"
DTYPES: dict[str, str] = {
    "path": "string",  # relative to the source root (folder) or a synthetic name (demo, torchvision)
    "source": "string",  # the --source it came from
    "sha256": "string",  # of the file bytes (of mode + size + pixels for in-memory sources)
    "bytes": "int64",
    "format": "string",  # JPEG, PNG, ... ; raw for in-memory sources
    "width": "int64",  # original size, as displayed (after EXIF orientation)
    "height": "int64",
    "mode": "string",  # original Pillow mode
    "orientation": "int64",  # EXIF orientation tag (1 = none)
    "label": "string",  # class name, <NA> when unlabeled
    "split": "string",
    "batch_id": "string",
    "shard": "string",  # shard id in the store index
    "shard_index": "int64",  # row within the shard
    "ingested_at": "datetime64[us, UTC]",
}
REQUIRED = tuple(c for c in DTYPES if c != "label")


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in DTYPES.items()})


def batch_frame(records: Sequence[Accepted], placement: Sequence[tuple[str, int]], *, source: str,
                split: str, batch_id: str, ingested_at: datetime) -> pd.DataFrame:
    """Rows for a batch; `placement[i]` is the (shard id, row) where `records[i]` was written."""
    if not records:
        return empty()
    df = pd.DataFrame({
        "path": [r.rel for r in records],
        "source": source,
        "sha256": [r.sha256 for r in records],
        "bytes": [r.nbytes for r in records],
        "format": [r.format for r in records],
        "width": [r.width for r in records],
        "height": [r.height for r in records],
        "mode": [r.mode for r in records],
        "orientation": [r.orientation for r in records],
        "label": [r.label for r in records],
        "split": split,
        "batch_id": batch_id,
        "shard": [s for s, _ in placement],
        "shard_index": [i for _, i in placement],
        "ingested_at": pd.Timestamp(ingested_at),
    })
    return df.astype(DTYPES)


def read(split_dir: Path, store: ImageStore | None = None) -> pd.DataFrame:
    """Published rows in store order (the order of `ImageStore.images()`)."""
    path = Path(split_dir) / MANIFEST
    if store is None:
        if not ImageStore.is_store(split_dir):
            return empty()
        store = ImageStore.open(split_dir)
    if not path.is_file():
        return empty()
    df = pd.read_parquet(path)
    missing = set(DTYPES) - set(df.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}")
    position = {s.id: i for i, s in enumerate(store.shards)}
    df = df[df["shard"].isin(list(position))]
    order = df["shard"].map(position).astype("int64") * (1 << 32) + df["shard_index"]
    return df.assign(_order=order.to_numpy()).sort_values("_order").drop(columns="_order") \
        .reset_index(drop=True)[list(DTYPES)].astype(DTYPES)


def write(split_dir: Path, df: pd.DataFrame) -> None:
    """Replace the manifest atomically (a reader sees the old or the new file, never half)."""
    path = Path(split_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
    try:
        df[list(DTYPES)].astype(DTYPES).to_parquet(tmp, index=False)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def split_stores(store_root: Path) -> list[Path]:
    """The split stores (`train`, `test`, ...) under a store root."""
    if not Path(store_root).is_dir():
        return []
    return sorted(p for p in Path(store_root).iterdir() if p.is_dir() and ImageStore.is_store(p))


def known_hashes(store_root: Path) -> dict[str, str]:
    """sha256 -> split for every published image under `store_root` (all splits), so a file
    already in `test` never enters `train` (no leakage across splits)."""
    known: dict[str, str] = {}
    for split_dir in split_stores(store_root):
        for sha in read(split_dir)["sha256"]:
            known.setdefault(str(sha), split_dir.name)
    return known
