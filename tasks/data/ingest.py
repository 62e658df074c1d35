"""The ingest step as a plain function: source -> new batch in the split store, or nothing.

Order of work, so that nothing partial is ever visible:

1. scan the source and decode in worker processes; files whose sha256 is already anywhere
   under the store root (any split) are not even decoded; duplicates within the batch are
   dropped here; bad files are quarantined with a reason;
2. write the new images as unpublished shard files (invisible to readers);
3. validate scan + batch + resulting manifest with Great Expectations; on failure delete the
   unpublished shards and raise `ValidationFailed`: the store is byte-for-byte unchanged;
4. write the manifest (atomic replace; rows of unpublished shards are ignored by readers),
   then publish the store index: the single commit point;
5. version the store root with DVC (`dvc add`, `dvc push`) or compute the same hash.

A run that finds nothing new publishes nothing and keeps the data version. A lock per store
root keeps two scheduled runs from interleaving.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sslflow.core.errors import UserError
from sslflow.core.settings import Settings, load_settings
from sslflow.ssl_models.store import ImageStore, Shard, StoreError, StoreLock
from sslflow.tasks.data import manifest
from sslflow.tasks.data.decode import Accepted, DecodeOptions, Duplicate, Outcome, Rejected
from sslflow.tasks.data.sources import Source, open_source
from sslflow.tasks.data.validate import ValidationFailed, validate
from sslflow.tasks.data.versioning import Tracker, VersionInfo, dir_hash, version_store

SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NO_PIXELS = np.zeros((0, 0, 3), np.uint8)


# ------------------------------------------------------------------------------------ summary
@dataclass
class IngestSummary:
    batch_id: str
    status: str  # published | unchanged | failed
    source: str
    split: str
    store: str
    size: int
    scanned: int = 0  # accepted + duplicates + quarantined + ignored
    accepted: int = 0  # new images in this batch (= new_images)
    converted: dict[str, int] = field(default_factory=dict)  # by original mode
    exif_rotated: int = 0
    resized: int = 0
    duplicates: int = 0
    duplicates_in_batch: int = 0
    duplicates_in_store: int = 0  # of those, in this split or another one
    duplicates_in_other_splits: int = 0
    quarantined: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    new_classes: list[str] = field(default_factory=list)
    total_in_store: int = 0  # images in this split after the run
    store_counts: dict[str, int] = field(default_factory=dict)
    data_version: str | None = None
    previous_data_version: str | None = None
    versioning: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    report: str | None = None
    started_at: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def new_images(self) -> int:
        return self.accepted

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "new_images": self.accepted}


# ------------------------------------------------------------------------------------ batch
class BatchBuilder:
    """Turns outcomes into unpublished shards + manifest rows, deduplicating as they come."""

    def __init__(self, store: ImageStore, classes: list[str], shard_images: int) -> None:
        self.store, self.classes, self.shard_images = store, classes, shard_images
        self.scan_rows: list[tuple[str, str, str | None]] = []
        self.records: list[Accepted] = []  # pixels dropped once written
        self.placement: list[tuple[str, int]] = []
        self.stored_shapes: list[tuple[int, ...]] = []
        self.shards: list[Shard] = []
        self.rejected: list[Rejected] = []
        self.dup_batch = self.dup_store = self.dup_other = 0
        self._pending: list[Accepted] = []
        self._seen: set[str] = set()

    def add(self, outcome: Outcome, known: dict[str, str], split: str) -> None:
        if isinstance(outcome, Rejected):
            self.rejected.append(outcome)
            self.scan_rows.append((outcome.rel, "quarantined", outcome.reason))
        elif isinstance(outcome, Duplicate) or outcome.sha256 in self._seen:
            self.scan_rows.append((outcome.rel, "duplicate", None))
            if outcome.sha256 in known:
                self.dup_store += 1
                self.dup_other += known[outcome.sha256] != split
            else:
                self.dup_batch += 1
        else:
            self._seen.add(outcome.sha256)
            self.scan_rows.append((outcome.rel, "accepted", None))
            self._pending.append(outcome)
            if len(self._pending) >= self.shard_images:
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        for r in self._pending:
            if r.label is not None and r.label not in self.classes:
                self.classes.append(r.label)
        lookup = {c: i for i, c in enumerate(self.classes)}
        images = np.stack([r.image for r in self._pending])
        labels = np.array([-1 if r.label is None else lookup[r.label] for r in self._pending], np.int64)
        shard = self.store.write_shard(images, labels)
        self.shards.append(shard)
        for i, r in enumerate(self._pending):
            self.stored_shapes.append(r.image.shape)
            self.placement.append((shard.id, i))
            self.records.append(dataclasses.replace(r, image=_NO_PIXELS))
        self._pending = []

    def discard(self) -> None:
        """Delete the unpublished shard files (validation failed)."""
        for s in self.shards:
            s.images_path(self.store.root).unlink(missing_ok=True)
            s.labels_path(self.store.root).unlink(missing_ok=True)

    def scan_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.scan_rows, columns=["path", "status", "reason"]).astype("string")

    def batch_frame(self) -> pd.DataFrame:
        shapes = np.array([s if len(s) == 3 else (0, 0, 0) for s in self.stored_shapes], np.int64)
        shapes = shapes.reshape(-1, 3)
        return pd.DataFrame({
            "path": pd.array([r.rel for r in self.records], dtype="string"),
            "sha256": pd.array([r.sha256 for r in self.records], dtype="string"),
            "stored_height": shapes[:, 0], "stored_width": shapes[:, 1], "stored_channels": shapes[:, 2],
        })


# ------------------------------------------------------------------------------------ ingest
def ingest(source: str, store_root: str | Path, split: str = "train", size: int | None = None, *,
           settings: Settings | None = None, reports_dir: str | Path = "reports",
           dvc: bool | None = None, push: bool | None = None, workers: int | None = None,
           log: Callable[[str], None] | None = None) -> IngestSummary:
    """Add what is new in `source` to `store_root/split` as one validated, versioned batch.

    `settings` None = the project's (`load_settings()`); its `ingest`, `validate` and `versioning`
    sections apply; `dvc`/`push`/`workers` None = as there. Raises `ValidationFailed` (store untouched),
    `UserError` or `StoreError` for input the user must fix.
    """
    params = settings or load_settings()
    cfg = params.ingest
    log = log or (lambda msg: print(f"ingest: {msg}", file=sys.stderr))
    if not SPLIT_NAME.match(split):
        raise UserError(f"--split must be a simple name like train or test; got {split!r}")
    vcfg = params.versioning
    if dvc is not None:
        vcfg = dataclasses.replace(vcfg, dvc=("auto" if vcfg.dvc == "off" else vcfg.dvc) if dvc else "off")
    store_root, reports_dir = Path(store_root), Path(reports_dir)
    started = datetime.now(timezone.utc)
    batch_id = started.strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
    clock = _Clock()
    root_existed = store_root.exists()
    src = open_source(source, split, torchvision_root=Path(cfg.torchvision_root), demo_seed=cfg.demo_seed,
                      demo_per_class={"train": cfg.demo_train_per_class, "test": cfg.demo_test_per_class})
    tracker = Tracker.for_store(store_root, vcfg)  # before anything is written: a DVC problem is one line
    with ingest_lock(store_root, cfg.lock_wait_s):
        previous = _previous_version(tracker, store_root)
        split_dir = store_root / split
        store, existed = _open_split(split_dir, size or cfg.size, explicit_size=size is not None, log=log)
        with store.writing():  # one writer per split, from the first shard to the publication
            opts = DecodeOptions.of(cfg, store.height)
            old_rows = manifest.read(split_dir, store) if existed else manifest.empty()
            known = manifest.known_hashes(store_root)
            declared = list(cfg.classes or src.classes)
            builder = BatchBuilder(store, list(store.classes) + [c for c in declared if c not in store.classes],
                                   cfg.shard_images)
            summary = IngestSummary(batch_id, "failed", source, split, str(split_dir), store.height,
                                    previous_data_version=previous, started_at=started.isoformat())
            try:
                for outcome in _progress(src.outcomes(opts, known, workers if workers is not None else cfg.workers,
                                                      cfg.chunk_size), log):
                    builder.add(outcome, known, split)
                builder.flush()
                clock.lap("decode")
                new_rows = manifest.batch_frame(builder.records, builder.placement, source=source, split=split,
                                                batch_id=batch_id, ingested_at=started)
                combined = pd.concat([old_rows, new_rows], ignore_index=True) if len(old_rows) else new_rows
                known_classes = _known_classes(cfg.classes or src.classes, store.classes, params.validate)
                result = validate(manifest=combined, split=split, limits=opts, cfg=params.validate,
                                  classes=known_classes, reports_dir=reports_dir, scan=builder.scan_frame(),
                                  batch=builder.batch_frame())
                clock.lap("validate")
            except BaseException:
                _undo(builder, split_dir, existed, store_root, root_existed)
                raise
            _fill_counts(summary, builder, src, store, store_root)
            summary.validation = result.to_dict()
            if not result.success:
                _undo(builder, split_dir, existed, store_root, root_existed)
                summary.data_version = previous
                _write_reports(summary, reports_dir, clock)
                raise ValidationFailed(result, prefix=f"batch {batch_id} of {source} was not added: ")
            if builder.records:
                summary.new_classes = builder.classes[len(store.classes):]
                manifest.write(split_dir, combined)
                store.publish(builder.shards, builder.classes)
                clock.lap("publish")
            summary.status = "published" if builder.records else "unchanged"
            if not builder.records and not existed:  # nothing new for a split that did not exist: leave none
                shutil.rmtree(split_dir, ignore_errors=True)
            summary.total_in_store = len(store)
            summary.store_counts = _store_counts(store_root)
            store_root.mkdir(parents=True, exist_ok=True)
            try:
                info: VersionInfo = version_store(store_root, tracker, vcfg.push if push is None else push)
            except UserError as e:  # the batch is in; only its version record lags
                info = VersionInfo(dir_hash(store_root), "sslflow", error=str(e))
            clock.lap("version")
            summary.data_version, summary.versioning = info.data_version, info.to_dict()
    _write_reports(summary, reports_dir, clock)
    log(f"{summary.status}: {summary.accepted} new, {summary.duplicates} duplicates, "
        f"{len(summary.quarantined)} quarantined, {summary.total_in_store} in {split_dir} "
        f"(version {summary.data_version}) in {summary.seconds.get('total', 0):.1f} s")
    return summary


def _open_split(split_dir: Path, side: int, explicit_size: bool, log: Callable[[str], None] = print
                ) -> tuple[ImageStore, bool]:
    """The split store, or an unpublished in-memory one (created on disk at publish). All the
    splits of a store root hold one image size: a new split takes its siblings' (an encoder is
    evaluated at the size it was trained at), and an explicit other size is refused."""
    if ImageStore.is_store(split_dir):
        store = ImageStore.open(split_dir)
        if explicit_size and (store.height, store.width) != (side, side):
            raise StoreError(f"{split_dir} holds {store.height}x{store.width} images, not {side}x{side}")
        if store.height != store.width:
            raise StoreError(f"{split_dir} holds {store.height}x{store.width} images; ingest needs square ones")
        return store, True
    siblings = {(s.height, s.width): p.name for p in manifest.split_stores(split_dir.parent)
                if (s := ImageStore.open(p))}
    if siblings and (side, side) not in siblings:
        (h, w), name = next(iter(siblings.items()))
        if explicit_size or len(siblings) > 1:
            raise StoreError(f"{split_dir.parent}/{name} holds {h}x{w} images: every split of a store has one size, "
                             f"not {side}x{side} (ingest into another store root for another size)")
        log(f"the {name} split holds {h}x{w} images: {split_dir.name} gets the same size (not ingest.size {side})")
        side = h
    return ImageStore(split_dir, side, side, [], []), False


def _known_classes(declared: Iterable[str], store_classes: list[str], cfg: Any) -> list[str] | None:
    declared = list(declared)
    if declared:
        return list(dict.fromkeys([*store_classes, *declared]))
    if store_classes and not cfg.allow_new_classes:
        return list(store_classes)
    return None


def _fill_counts(summary: IngestSummary, b: BatchBuilder, src: Source, store: ImageStore, root: Path) -> None:
    summary.accepted = len(b.records)
    summary.converted = dict(sorted(Counter(r.mode for r in b.records if r.mode != "RGB").items()))
    summary.exif_rotated = sum(r.orientation != 1 for r in b.records)
    summary.resized = sum((r.width, r.height) != (store.width, store.height) for r in b.records)
    summary.duplicates_in_batch, summary.duplicates_in_store = b.dup_batch, b.dup_store
    summary.duplicates_in_other_splits = b.dup_other
    summary.duplicates = b.dup_batch + b.dup_store
    summary.quarantined = [{"path": r.rel, "reason": r.reason, "detail": r.detail} for r in b.rejected]
    summary.ignored = list(src.ignored)
    summary.scanned = len(b.scan_rows) + len(summary.ignored)
    summary.total_in_store = len(store)
    summary.store_counts = _store_counts(root)


def _store_counts(store_root: Path) -> dict[str, int]:
    return {p.name: len(ImageStore.open(p)) for p in manifest.split_stores(store_root)}


def _previous_version(tracker: Tracker | None, store_root: Path) -> str | None:
    if tracker is not None:
        return tracker.recorded_version()
    return dir_hash(store_root) if store_root.is_dir() else None


def _undo(builder: BatchBuilder, split_dir: Path, existed: bool, store_root: Path, root_existed: bool) -> None:
    builder.discard()
    if not existed and split_dir.is_dir():
        shutil.rmtree(split_dir, ignore_errors=True)
    if not root_existed:  # only what this run created: the root with nothing but its lock file
        with suppress(OSError):
            (store_root / INGEST_LOCK).unlink(missing_ok=True)
            store_root.rmdir()


def _progress(outcomes: Iterator[Outcome], log: Callable[[str], None], every_s: float = 10.0) -> Iterator[Outcome]:
    """Pass outcomes through, logging a count every `every_s` seconds for long runs."""
    last, n = time.monotonic(), 0
    for n, o in enumerate(outcomes, 1):
        yield o
        if time.monotonic() - last > every_s:
            last = time.monotonic()
            log(f"{n} files processed")


class _Clock:
    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> dict[str, float]:
        return {**self.laps, "total": round(time.perf_counter() - self.t0, 3)}


def _write_reports(summary: IngestSummary, reports_dir: Path, clock: _Clock) -> None:
    """`reports/ingest/<split>.json` (latest, a stable path) + `batches/<batch_id>.json`."""
    summary.seconds = clock.total()
    latest = reports_dir / "ingest" / f"{summary.split}.json"
    summary.report = str(latest)
    text = json.dumps(summary.to_dict(), indent=1, ensure_ascii=False)
    for path in (latest, reports_dir / "ingest" / "batches" / f"{summary.batch_id}.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


INGEST_LOCK = ".sslflow-ingest.lock"


@contextmanager
def ingest_lock(store_root: Path, wait_s: float) -> Iterator[None]:
    """One ingest per store root at a time, across processes, `TMPDIR`s, `PrivateTmp` services and
    hosts sharing the filesystem: a record lock held in the store root itself (`StoreLock`; the
    kernel frees it when its holder dies). Another ingest waits up to `wait_s` seconds, then
    stops with one line (`StoreBusy`) and changes nothing."""
    store_root = Path(store_root)
    created = [p for p in (store_root, *store_root.parents) if not p.exists()]  # deepest first
    lock = StoreLock(store_root / INGEST_LOCK, f"store {store_root}")
    lock.acquire(wait_s)
    try:
        yield
    except BaseException:
        if created:  # a first ingest that failed leaves no directory behind
            (store_root / INGEST_LOCK).unlink(missing_ok=True)
            for directory in created:
                with suppress(OSError):
                    directory.rmdir()  # only if empty
        raise
    finally:
        lock.release()
