"""The image store: the on-disk format every stage reads and ingestion writes.

Layout of a store directory::

    STORE/store.json                 index: size, classes, published shards (atomic rename)
    STORE/shards/<id>.images.npy     uint8 (N, H, W, 3)
    STORE/shards/<id>.labels.npy     int64 (N,), -1 = unlabeled

Shards are immutable. Appending a batch writes new shard files first and then replaces
`store.json` atomically, so a reader (or a crash) never sees half a batch: files not listed
in the index are invisible and are swept on the next write. One store holds one split
(e.g. `data/store/train`, `data/store/test`).

Writers: one at a time per store, by a lock held in the store itself (`StoreLock`), from the
first shard written to the publication; the sweep runs only under that lock, so it can only
remove files of a writer that is gone. The index records every shard's shape and sha256, so
`verify()` finds a lost or damaged shard and `repair()` drops it from the index.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import queue
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslflow.ssl_models.atomic import write_atomic
from sslflow.ssl_models.errors import EngineError

INDEX = "store.json"
FORMAT = "sslflow-image-store"
VERSION = 2  # 2 records each shard's shape and sha256; version 1 stores are read as they are
WRITER_LOCK = ".sslflow-writer.lock"  # in the store; DVC ignores `.sslflow-*.lock` (.dvcignore)


class StoreError(EngineError, ValueError):
    """A store is missing, malformed, or cannot take the data it was given."""


class StoreBusy(StoreError):
    """Another process holds the store's writer lock."""


class StoreLock:
    """An exclusive lock held in a file of the store: an open-file-description record lock.

    Why in the store: a lock in the temporary directory is not shared by processes with
    different `TMPDIR`s or systemd's `PrivateTmp`, nor by hosts; a lock on a file of the store
    is shared by all of them. Why this kind (Linux `F_OFD_SETLK`, `flock` elsewhere): record
    locks are arbitrated by NFSv4 servers, which expire the lease of a client that died; unlike
    classic POSIX locks they belong to the open file, not the process, so two writers in one
    process exclude each other and closing another descriptor of the file releases nothing. The
    kernel releases the lock when its holder exits, kill -9 included: a leftover file is never
    a stale lock, and no timeout can let two writers in. The file stays empty (its hash never
    changes the data version).
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                _try_lock(fd)
                self._fd = fd
                return
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                os.close(fd)
                raise StoreBusy(f"another process is writing to {self.what} (it holds {self.path}); "
                                f"waited {wait_s:g} s: retry when it is done")
            time.sleep(0.2)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor of the open file releases its lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(fd: int) -> None:
    """An exclusive, non-blocking lock of the whole file owned by the open file description."""
    if hasattr(fcntl, "F_OFD_SETLK"):  # Linux: struct flock {type, whence, start, len, pid = 0}
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


@dataclass(frozen=True)
class Shard:
    id: str
    count: int
    sha256: str = ""  # of the images file (empty in version 1 stores)
    labels_sha256: str = ""

    def images_path(self, root: Path) -> Path:
        return root / "shards" / f"{self.id}.images.npy"

    def labels_path(self, root: Path) -> Path:
        return root / "shards" / f"{self.id}.labels.npy"


def _atomic_write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1).encode())


def _atomic_save_npy(path: Path, array: np.ndarray) -> str:
    """Write `array` as .npy atomically; returns the file's sha256."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getbuffer()
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class ImageStore:
    """A directory of uint8 image shards with integer labels and class names."""

    def __init__(self, root: Path, height: int, width: int, classes: list[str], shards: list[Shard]):
        self.root = root
        self.height = height
        self.width = width
        self.classes = classes
        self.shards = shards
        self._lock = StoreLock(Path(root) / WRITER_LOCK, f"image store {root}")

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
            if meta.get("format") != FORMAT or meta.get("version") not in (1, VERSION):
                raise StoreError(f"{index}: unsupported store format {meta.get('format')!r} v{meta.get('version')}")
            shards = [Shard(s["id"], int(s["count"]), s.get("sha256", ""), s.get("labels_sha256", ""))
                      for s in meta["shards"]]
            return cls(root, int(meta["height"]), int(meta["width"]), list(meta["classes"]), shards)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{index} is corrupt: {type(e).__name__}: {e}"[:300]) from None

    @classmethod
    def create(cls, path: str | os.PathLike, height: int, width: int) -> ImageStore:
        """An empty store (published, so it can be opened at once)."""
        root = Path(path)
        if cls.is_store(root):
            raise StoreError(f"{root} already holds a store")
        (root / "shards").mkdir(parents=True, exist_ok=True)
        store = cls(root, height, width, [], [])
        with store.writing():
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
        parts = [self._load(s.labels_path(self.root)) for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def images(self) -> np.ndarray:
        """All images in store order, (N, H, W, 3) uint8, in host memory."""
        parts = [self._load(s.images_path(self.root)) for s in self.shards]
        if not parts:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        return np.concatenate(parts)

    def _load(self, path: Path) -> np.ndarray:
        try:
            return np.load(path)
        except FileNotFoundError:
            raise StoreError(f"{path.name} of store {self.root} is missing: run `sslflow validate --store "
                             f"{self.root.parent} --split {self.root.name}` (and --repair)") from None
        except (ValueError, OSError, EOFError) as e:
            raise StoreError(f"{path} is damaged ({type(e).__name__}): run `sslflow validate --repair`") from None

    def num_labeled(self) -> int:
        return int((self.labels() >= 0).sum())

    # ----------------------------------------------------------------------------- writing
    @contextmanager
    def writing(self, wait_s: float = 0.0) -> Iterator[ImageStore]:
        """Hold this store's writer lock (see `StoreLock`) for a batch: from its first shard
        to its publication. Re-entrant for this object. Re-reads the index once the lock is
        held, so a batch always appends to what the previous writer published."""
        if self._lock.held:
            yield self
            return
        self._lock.acquire(wait_s)
        try:
            if self.is_store(self.root):
                current = ImageStore.open(self.root)
                self.shards, self.classes = current.shards, current.classes
            yield self
        finally:
            self._lock.release()

    def write_shard(self, images: np.ndarray, labels: np.ndarray) -> Shard:
        """Write a shard's files without publishing it (under `writing()`); pass it to `publish`."""
        if not self._lock.held:
            raise StoreError(f"writing to {self.root} needs its writer lock: use `with store.writing():`")
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
        shard_id = uuid.uuid4().hex[:12]
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        probe = Shard(shard_id, len(images))
        images_sha = _atomic_save_npy(probe.images_path(self.root), np.ascontiguousarray(images))
        labels_sha = _atomic_save_npy(probe.labels_path(self.root), labels)
        return Shard(shard_id, len(images), images_sha, labels_sha)

    def publish(self, new_shards: Sequence[Shard], classes: Sequence[str]) -> None:
        """Make `new_shards` part of the store in one atomic index update (under `writing()`)."""
        if not self._lock.held:
            raise StoreError(f"publishing to {self.root} needs its writer lock: use `with store.writing():`")
        if list(classes[: len(self.classes)]) != self.classes:
            raise StoreError("class names can only be appended, never reordered")
        self._publish(self.shards + list(new_shards), list(classes))
        self._sweep_unpublished()

    def add(self, images: np.ndarray, label_names: Sequence[str | None]) -> Shard:
        """Append one batch: label names (None = unlabeled) are mapped to class indices."""
        with self.writing():
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
        missing = [p.name for s in shards for p in (s.images_path(self.root), s.labels_path(self.root))
                   if not p.is_file()]
        if missing:  # never publish an index that names files that are not there
            raise StoreError(f"cannot publish {self.root}: shard files missing ({', '.join(missing[:3])})")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "height": self.height,
            "width": self.width,
            "classes": classes,
            "count": sum(s.count for s in shards),
            "shards": [{"id": s.id, "count": s.count, "sha256": s.sha256, "labels_sha256": s.labels_sha256}
                       for s in shards],
        }
        _atomic_write_json(self.root / INDEX, meta)
        self.shards, self.classes = shards, classes

    def _sweep_unpublished(self) -> None:
        """Remove shard files no published index names: only under the writer lock, so they
        belong to a writer that is gone (killed before it published)."""
        assert self._lock.held
        keep = {p.name for s in self.shards for p in (s.images_path(self.root), s.labels_path(self.root))}
        for f in (self.root / "shards").iterdir():
            if f.name not in keep:
                f.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------- integrity
    def verify(self, checksums: bool = True) -> list[str]:
        """What is wrong with the published shards: missing files, a shape or count that is not the
        index's, a sha256 that differs (one line each; empty = sound). Reads every byte with
        `checksums`."""
        problems = []
        for s in self.shards:
            for path, expected, shape in ((s.images_path(self.root), s.sha256, (s.count, self.height, self.width, 3)),
                                          (s.labels_path(self.root), s.labels_sha256, (s.count,))):
                if not path.is_file():
                    problems.append(f"{path} is missing")
                    continue
                try:
                    header = np.load(path, mmap_mode="r")
                    if tuple(header.shape) != shape:
                        problems.append(f"{path} holds shape {tuple(header.shape)}, the index says {shape}")
                        continue
                except (ValueError, OSError, EOFError) as e:
                    problems.append(f"{path} is unreadable ({type(e).__name__})")
                    continue
                if checksums and expected and file_sha256(path) != expected:
                    problems.append(f"{path} does not match its recorded sha256")
        return problems

    def repair(self) -> list[Shard]:
        """Drop from the index every shard whose files are missing or damaged; returns them."""
        with self.writing():
            bad = [s for s in self.shards if ImageStore(self.root, self.height, self.width, self.classes, [s]).verify()]
            if bad:
                self._publish([s for s in self.shards if s not in bad], self.classes)
                self._sweep_unpublished()
            return bad


# --------------------------------------------------------------------------------- reading
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: a pure function of (seed, epoch), so resume is exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class DeviceBatches:
    """Shuffled uint8 (B, H, W, 3) batches on the training device.

    Batch `b` of epoch `e` is always the rows `epoch_permutation(n, seed, e)[b*B:(b+1)*B]` of the
    store, however they reach the device, so the epoch order depends only on (seed, epoch),
    `start_batch` skips ahead on resume, and the mode is no part of a run's state: a run
    checkpointed in one mode resumes bit for bit in the other.

    Resident mode (the store fits in `max_resident_bytes`; default a quarter of the GPU's memory,
    8 GiB on the CPU): the whole store is copied to the device once, shard by shard, and each
    batch is one gather. Streaming mode (it does not fit): a background thread reads each
    batch's rows from the shard files (`_ShardRows`: positional reads, grouped by shard and
    sorted, so nothing else of a shard enters this process's memory) into a ring of `prefetch`
    host buffers; on CUDA the ring is pinned and each batch crosses with an asynchronous copy on
    a side stream, issued one batch ahead; on the CPU the filled buffer is the batch. Host memory
    stays at `prefetch` batches (plus the one in use) whatever the size of the store.

    Data parallel (`world_size` > 1): `batch_size` is the global batch. Every rank walks the
    same global order and yields its own contiguous slice of each global batch, rows
    [rank * B / world, (rank + 1) * B / world), so the ranks' images are disjoint, together
    they are exactly the single-process batch, and a position (epoch, batch) means the same
    thing for any number of ranks (resume with another N). A streaming rank reads its slice only.
    """

    def __init__(self, store: ImageStore, batch_size: int, device: torch.device, seed: int,
                 drop_last: bool = True, max_resident_bytes: int | None = None, *,
                 rank: int = 0, world_size: int = 1, prefetch: int = 4) -> None:
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
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1 batch, got {prefetch}")
        self.store, self.batch_size, self.device, self.seed = store, batch_size, device, seed
        self.drop_last, self.prefetch = drop_last, prefetch
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        budget = max_resident_bytes if max_resident_bytes is not None else default_device_budget(device)
        self.resident = store.nbytes <= budget
        self._images = _load_resident(store, device) if self.resident else None
        self._rings: list[list[torch.Tensor]] = []  # idle pinned rings (CUDA streaming), reused

    def __len__(self) -> int:
        n = len(self.store)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """This rank's part of global batches `start_batch`, ... of epoch `epoch`."""
        order = epoch_permutation(len(self.store), self.seed, epoch)
        if self.resident:
            assert self._images is not None
            order = order.to(self.device)
            for b in range(start_batch, len(self)):  # index_select: one row copy each (10x a[idx] on CPU)
                yield torch.index_select(self._images, 0, self._rows(order, b))
        else:
            yield from self._stream(order, start_batch)

    def _local_start(self, batch: int) -> int:
        """Index of this rank's first row of global batch `batch` in the epoch's order."""
        return batch * self.batch_size + self.rank * self.local_batch_size

    def _rows(self, order: torch.Tensor, batch: int) -> torch.Tensor:
        """Store indices of this rank's rows of global batch `batch`, in the epoch's order."""
        lo = self._local_start(batch)
        return order[lo:lo + self.local_batch_size]

    # ------------------------------------------------------------------------------ streaming
    def _stream(self, order: torch.Tensor, start_batch: int) -> Iterator[torch.Tensor]:
        """The resident mode's batches, read by `_read_ahead` in a thread; the ring's slots go
        back to the reader through `free` (on CUDA with the event of the copy that reads them)."""
        cuda = self.device.type == "cuda"
        ring = self._take_ring() if cuda else None
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        for slot in range(self.prefetch):
            free.put((slot, None))
        stop = threading.Event()
        copy_stream = torch.cuda.Stream(self.device) if cuda else None
        reader = threading.Thread(target=self._read_ahead, args=(order, start_batch, ring, free, ready, stop),
                                  name="sslflow-store-reader", daemon=True)
        reader.start()
        try:
            pending: tuple[torch.Tensor, Any] | None = None
            for _ in range(start_batch, len(self)):
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                slot, host = item
                if copy_stream is None:  # CPU: the filled buffer is the batch, the slot is free again
                    free.put((slot, None))
                    yield host if self.device.type == "cpu" else host.to(self.device)
                    continue
                with torch.cuda.stream(copy_stream):  # issued before the previous batch is yielded
                    batch = host.to(self.device, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(copy_stream)
                free.put((slot, copied))  # the reader refills the slot once the copy is done
                if pending is not None:
                    yield self._arrived(*pending)
                pending = (batch, copied)
            if pending is not None:
                yield self._arrived(*pending)
        finally:
            stop.set()
            free.put((None, None))  # wakes a reader that waits for a slot
            reader.join()
            if ring is not None:
                assert copy_stream is not None
                copy_stream.synchronize()  # no copy still reads the ring when it is reused
                self._rings.append(ring)

    def _arrived(self, batch: torch.Tensor, copied: Any) -> torch.Tensor:
        """`batch` for the consumer's stream: its work waits for the copy, and the allocator
        does not reuse the memory (allocated on the copy stream) before that work is done."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(copied)
        batch.record_stream(stream)
        return batch

    def _take_ring(self) -> list[torch.Tensor]:
        if self._rings:
            return self._rings.pop()
        shape = (self.local_batch_size, self.store.height, self.store.width, 3)
        return [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in range(self.prefetch)]

    def _read_ahead(self, order: torch.Tensor, start_batch: int, ring: list[torch.Tensor] | None,
                    free: queue.Queue, ready: queue.Queue, stop: threading.Event) -> None:
        """The reader thread: fills a free slot with the next batch, hands it over in `ready`;
        an error is handed over instead and raised in the consumer."""
        rows = _ShardRows(self.store)
        try:
            for b in range(start_batch, len(self)):
                slot, copied = free.get()
                if stop.is_set():
                    return
                index = self._rows(order, b).numpy()
                if ring is not None:
                    if copied is not None:
                        copied.synchronize()  # the previous copy out of this slot has finished
                    host = ring[slot][:len(index)]
                else:
                    host = torch.empty((len(index), self.store.height, self.store.width, 3), dtype=torch.uint8)
                rows.read(index, host.numpy())
                ready.put((slot, host))
        except BaseException as e:  # re-raised in the consumer's thread
            ready.put(e)
        finally:
            rows.close()


class _ShardRows:
    """Reads store rows by global index straight into a caller's buffer.

    Why positional reads (`os.preadv`) rather than memory maps: the bytes go from the page cache
    into the buffer and nowhere else, so the process's resident memory does not grow with the
    pages of the shards it has touched (a mapped page counts in RSS until it is unmapped). A
    batch's rows are grouped by shard and sorted within it (one call per run of consecutive rows,
    up to IOV_MAX buffers), while each lands in its own slot of the buffer, in the epoch's order.
    Where `os.preadv` is missing the rows are copied out of read-only memory maps.
    """

    MAX_OPEN = 64  # files kept open (least recently used closed first)

    def __init__(self, store: ImageStore) -> None:
        self.store = store
        self.row_bytes = store.height * store.width * 3
        self.starts = np.concatenate([[0], np.cumsum([s.count for s in store.shards])]).astype(np.int64)
        self._open: OrderedDict[int, tuple[int, int] | np.ndarray] = OrderedDict()

    def read(self, index: np.ndarray, out: np.ndarray) -> None:
        """`out[i] = store image index[i]` for every i; `out` is a C-contiguous uint8 array."""
        if not out.flags.c_contiguous or out.shape[0] != len(index):
            raise ValueError("rows are read into a C-contiguous buffer of one row per index")
        if not len(index):
            return
        shard = np.searchsorted(self.starts, index, side="right") - 1
        local = index - self.starts[shard]
        by_place = np.lexsort((local, shard))  # by shard, then by row in the shard
        shard, local = shard[by_place], local[by_place]
        breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(local) != 1)) + 1
        flat = out.reshape(len(out), self.row_bytes)
        for run in np.split(np.arange(len(index)), breaks):
            s, first = int(shard[run[0]]), int(local[run[0]])
            dest = by_place[run]
            source = self._source(s)
            if isinstance(source, np.ndarray):  # memory-map fallback
                flat[dest] = source[first:first + len(run)].reshape(len(run), self.row_bytes)
            else:
                fd, offset = source
                _pread_into(fd, [flat[d] for d in dest], offset + first * self.row_bytes,
                            self.store.shards[s].images_path(self.store.root))

    def _source(self, s: int) -> tuple[int, int] | np.ndarray:
        """(open fd, offset of the rows) of shard `s`, or its memory map without `os.preadv`."""
        source = self._open.pop(s, None)
        if source is None:
            shard = self.store.shards[s]
            path = shard.images_path(self.store.root)
            mapped = _map_shard(path, (shard.count, self.store.height, self.store.width, 3), self.store.root)
            if hasattr(os, "preadv"):
                source = (os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), int(mapped.offset))
                del mapped  # only its header was read
            else:
                source = mapped
            while len(self._open) >= self.MAX_OPEN:
                self._close(self._open.popitem(last=False)[1])
        self._open[s] = source  # most recently used last
        return source

    @staticmethod
    def _close(source: tuple[int, int] | np.ndarray) -> None:
        if isinstance(source, tuple):
            os.close(source[0])

    def close(self) -> None:
        while self._open:
            self._close(self._open.popitem()[1])


_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 16


def _pread_into(fd: int, buffers: list[np.ndarray], offset: int, path: Path) -> None:
    """Fill `buffers` (one contiguous byte range of the file from `offset`) completely."""
    views = [memoryview(b).cast("B") for b in buffers]
    i = 0
    while i < len(views):
        n = os.preadv(fd, views[i:i + _IOV_MAX], offset)
        if n <= 0:
            raise StoreError(f"{path} is shorter than its index says: run `sslflow validate --repair`")
        offset += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:  # a short read ended inside views[i]
            views[i] = views[i][n:]


def _map_shard(path: Path, shape: tuple[int, ...], root: Path) -> np.ndarray:
    """A shard's images as a read-only memory map, checked against the index (nothing is read
    but the header until rows are touched)."""
    try:
        mapped = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise StoreError(f"{path.name} of store {root} is missing: run `sslflow validate --store "
                         f"{root.parent} --split {root.name}` (and --repair)") from None
    except (ValueError, OSError, EOFError) as e:
        raise StoreError(f"{path} is damaged ({type(e).__name__}): run `sslflow validate --repair`") from None
    if mapped.dtype != np.uint8 or tuple(mapped.shape) != shape or not mapped.flags.c_contiguous:
        raise StoreError(f"{path} holds {mapped.dtype} {tuple(mapped.shape)}, the index says uint8 {shape}: "
                         "run `sslflow validate --repair`")
    return mapped


def _load_resident(store: ImageStore, device: torch.device, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """The whole store as one (N, H, W, 3) tensor on `device`, filled from memory-mapped shards a
    chunk at a time: on CUDA the host holds one chunk, on the CPU the tensor itself."""
    images = torch.empty((len(store), store.height, store.width, 3), dtype=torch.uint8, device=device)
    rows = max(1, chunk_bytes // (store.height * store.width * 3))
    lo = 0
    for shard in store.shards:
        if not shard.count:
            continue
        mapped = _map_shard(shard.images_path(store.root), (shard.count, store.height, store.width, 3), store.root)
        for a in range(0, shard.count, rows):
            part = mapped[a:a + rows]
            target = images[lo + a:lo + a + len(part)]
            if device.type == "cpu":
                target.numpy()[...] = part
            else:
                target.copy_(torch.from_numpy(np.array(part)))
        del mapped
        lo += shard.count
    return images


def default_device_budget(device: torch.device) -> int:
    """The largest store kept resident when no budget is set: a quarter of the GPU's memory
    (the rest is the model's, the views' and the allocator's), 8 GiB on any other device."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return 8 << 30
