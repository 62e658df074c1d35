"""The image store: the on-disk format every stage reads and ingestion writes.

Layout of a store directory::

    STORE/store.json                 index: size, classes, published shards (atomic rename)
    STORE/shards/<id>.images.npy     uint8 (N, H, W, 3)
    STORE/shards/<id>.labels.npy     int64 (N,), -1 = unlabeled

Shards are immutable. Appending a batch writes new shard files first and then replaces
`store.json` atomically, so a reader (or a crash) never sees half a batch: files not listed
in the index are invisible and are swept on the next write. One store holds one split
(e.g. `data/store/train`, `data/store/test`).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sslflow.ssl_models.errors import EngineError

INDEX = "store.json"
FORMAT = "sslflow-image-store"
VERSION = 1


class StoreError(EngineError, ValueError):
    """A store is missing, malformed, or cannot take the data it was given."""


@dataclass(frozen=True)
class Shard:
    id: str
    count: int

    def images_path(self, root: Path) -> Path:
        return root / "shards" / f"{self.id}.images.npy"

    def labels_path(self, root: Path) -> Path:
        return root / "shards" / f"{self.id}.labels.npy"


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ImageStore:
    """A directory of uint8 image shards with integer labels and class names."""

    def __init__(self, root: Path, height: int, width: int, classes: list[str], shards: list[Shard]):
        self.root = root
        self.height = height
        self.width = width
        self.classes = classes
        self.shards = shards

    # ----------------------------------------------------------------------------- open/create
    @staticmethod
    def is_store(path: str | os.PathLike) -> bool:
        return (Path(path) / INDEX).is_file()

    @classmethod
    def open(cls, path: str | os.PathLike) -> ImageStore:
        root = Path(path)
        index = root / INDEX
        if not index.is_file():
            raise StoreError(f"{root} is not an image store (no {INDEX})")
        try:
            meta = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{index} is corrupt: {e}") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise StoreError(f"{index}: unsupported store format {meta.get('format')!r} v{meta.get('version')}")
        shards = [Shard(s["id"], int(s["count"])) for s in meta["shards"]]
        return cls(root, int(meta["height"]), int(meta["width"]), list(meta["classes"]), shards)

    @classmethod
    def create(cls, path: str | os.PathLike, height: int, width: int) -> ImageStore:
        """An empty store (published, so it can be opened at once)."""
        root = Path(path)
        if cls.is_store(root):
            raise StoreError(f"{root} already holds a store")
        (root / "shards").mkdir(parents=True, exist_ok=True)
        store = cls(root, height, width, [], [])
        store._publish(store.shards, store.classes)
        return store

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, height: int, width: int) -> ImageStore:
        if cls.is_store(path):
            store = cls.open(path)
            if (store.height, store.width) != (height, width):
                raise StoreError(
                    f"{path} holds {store.height}x{store.width} images, not {height}x{width}"
                )
            return store
        return cls.create(path, height, width)

    # ----------------------------------------------------------------------------- properties
    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def nbytes(self) -> int:
        return len(self) * self.height * self.width * 3

    def labels(self) -> np.ndarray:
        """All labels in store order (int64, -1 = unlabeled)."""
        parts = [np.load(s.labels_path(self.root)) for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def images(self) -> np.ndarray:
        """All images in store order, (N, H, W, 3) uint8, in host memory."""
        parts = [np.load(s.images_path(self.root)) for s in self.shards]
        if not parts:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        return np.concatenate(parts)

    def num_labeled(self) -> int:
        return int((self.labels() >= 0).sum())

    # ----------------------------------------------------------------------------- writing
    def write_shard(self, images: np.ndarray, labels: np.ndarray) -> Shard:
        """Write a shard's files without publishing it; pass the result to `publish`."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.height, self.width, 3):
            raise StoreError(
                f"expected uint8 images of shape (N, {self.height}, {self.width}, 3), "
                f"got {images.dtype} {images.shape}"
            )
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise StoreError(f"{len(images)} images but labels of shape {labels.shape}")
        if len(labels) and labels.min() < -1:
            raise StoreError("labels must be -1 (unlabeled) or a class index")
        shard = Shard(uuid.uuid4().hex[:12], len(images))
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(shard.images_path(self.root), np.ascontiguousarray(images))
        _atomic_save_npy(shard.labels_path(self.root), labels)
        return shard

    def publish(self, new_shards: Sequence[Shard], classes: Sequence[str]) -> None:
        """Make `new_shards` part of the store in one atomic index update."""
        if list(classes[: len(self.classes)]) != self.classes:
            raise StoreError("class names can only be appended, never reordered")
        self._publish(self.shards + list(new_shards), list(classes))
        self._sweep_unpublished()

    def add(self, images: np.ndarray, label_names: Sequence[str | None]) -> Shard:
        """Append one batch: label names (None = unlabeled) are mapped to class indices."""
        classes = list(self.classes)
        for name in label_names:
            if name is not None and name not in classes:
                classes.append(name)
        lookup = {c: i for i, c in enumerate(classes)}
        labels = np.array([-1 if n is None else lookup[n] for n in label_names], dtype=np.int64)
        shard = self.write_shard(images, labels)
        self.publish([shard], classes)
        return shard

    def _publish(self, shards: list[Shard], classes: list[str]) -> None:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "height": self.height,
            "width": self.width,
            "classes": classes,
            "count": sum(s.count for s in shards),
            "shards": [{"id": s.id, "count": s.count} for s in shards],
        }
        _atomic_write_json(self.root / INDEX, meta)
        self.shards, self.classes = shards, classes

    def _sweep_unpublished(self) -> None:
        """Remove shard files a crashed writer left behind (never listed in the index)."""
        keep = {p.name for s in self.shards for p in (s.images_path(self.root), s.labels_path(self.root))}
        for f in (self.root / "shards").iterdir():
            if f.name not in keep:
                f.unlink(missing_ok=True)


# --------------------------------------------------------------------------------- reading
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: a pure function of (seed, epoch), so resume is exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class DeviceBatches:
    """Shuffled uint8 (B, H, W, 3) batches on the training device.

    Resident mode (the store fits in `max_resident_bytes`): the whole store is copied to the
    device once and each batch is one gather. Streaming mode: shards are visited in a
    permuted order and shuffled within, each copied over from pinned host memory.
    The order of every epoch depends only on (seed, epoch); `start_batch` skips ahead on resume.

    Data parallel (`world_size` > 1): `batch_size` is the global batch. Every rank walks the
    same global order and yields its own contiguous slice of each global batch, rows
    [rank * B / world, (rank + 1) * B / world), so the ranks' images are disjoint, together
    they are exactly the single-process batch, and a position (epoch, batch) means the same
    thing for any number of ranks (resume with another N).
    """

    def __init__(self, store: ImageStore, batch_size: int, device: torch.device, seed: int,
                 drop_last: bool = True, max_resident_bytes: int | None = None, *,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(store) == 0:
            raise StoreError(f"{store.root} is empty")
        if drop_last and len(store) < batch_size:
            raise StoreError(f"{store.root} has {len(store)} images, fewer than one batch of {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} (global) is not divisible by {world_size} ranks")
        if world_size > 1 and not drop_last:
            raise ValueError("a last, partial batch cannot be split evenly over ranks: use drop_last")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.store, self.batch_size, self.device, self.seed = store, batch_size, device, seed
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        budget = max_resident_bytes if max_resident_bytes is not None else _default_budget(device)
        self.resident = store.nbytes <= budget
        self._images: torch.Tensor | None = None
        if self.resident:
            self._images = torch.from_numpy(store.images()).to(device)

    def __len__(self) -> int:
        n = len(self.store)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """This rank's part of global batches `start_batch`, ... of epoch `epoch`."""
        if self.resident:
            assert self._images is not None
            order = epoch_permutation(len(self.store), self.seed, epoch).to(self.device)
            for b in range(start_batch, len(self)):
                lo = self._local_start(b)
                yield self._images[order[lo:lo + self.local_batch_size]]
        else:
            yield from self._stream(epoch, start_batch)

    def _local_start(self, batch: int) -> int:
        """Index of this rank's first row of global batch `batch` in the epoch's order."""
        return batch * self.batch_size + self.rank * self.local_batch_size

    def _stream(self, epoch: int, start_batch: int) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        shard_order = torch.randperm(len(self.store.shards), generator=g).tolist()
        pin = self.device.type == "cuda"
        carry: torch.Tensor | None = None
        produced = 0
        for si in shard_order:
            shard = self.store.shards[si]
            perm = torch.randperm(shard.count, generator=g)
            chunk = torch.from_numpy(np.load(shard.images_path(self.store.root)))[perm]
            if carry is not None:
                chunk = torch.cat([carry, chunk])
            full = len(chunk) // self.batch_size
            for b in range(full):
                if produced >= start_batch:
                    lo = self._local_start(b)
                    batch = chunk[lo:lo + self.local_batch_size]
                    yield (batch.pin_memory() if pin else batch).to(self.device, non_blocking=pin)
                produced += 1
            carry = chunk[full * self.batch_size:]
        if not self.drop_last and carry is not None and len(carry) and produced >= start_batch:
            yield carry.to(self.device)


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return 8 << 30
