"""`sslflow embed`: a table of embeddings for a folder of images or a store, resumable.

Output: one Parquet file, one row per image: `path` (relative to the folder, or the manifest's
path in a store), `sha256` (of the file bytes; of mode, size and pixels for in-memory sources),
`split` (the store split; null for a folder), `label` (class name or null) and `embedding`
(fixed-size list of float32, the encoder's pooled features). The file's metadata names the
model and a fingerprint of its weights.

Resumable: rows are written every `part_rows` images as Parquet parts, each atomically
(`ssl_models.atomic`), in `<out>.parts/`; at the end the old table, the parts and nothing else
become `<out>` in one atomic replace and the parts go. A run that is killed keeps its parts; the
next run with the same `--out` skips every (split, path) already in `<out>` or a part, and
refuses an `--out` written by other weights (the fingerprint differs). Bad files are quarantined
exactly as ingest does (`tasks.data.decode`: same reasons), listed in `<out>.quarantine.json`.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sslflow.core.errors import UserError
from sslflow.ssl_models.atomic import remove_stale_temporaries, write_atomic
from sslflow.ssl_models.store import ImageStore
from sslflow.tasks.data import manifest
from sslflow.tasks.data.decode import Accepted, DecodeOptions, Rejected, decode_files
from sslflow.tasks.data.sources import scan_folder
from sslflow.tasks.serving.encoder import ImageEncoder, embed_images

COLUMNS = ("path", "sha256", "split", "label", "embedding")
META_MODEL, META_FINGERPRINT = b"sslflow.model", b"sslflow.fingerprint"


@dataclass
class EmbedSummary:
    out: str
    source: str
    model: str
    fingerprint: str
    feature_dim: int
    rows: int = 0  # in the table at the end
    embedded: int = 0  # by this run
    skipped: int = 0  # already in the table or a part (resumed)
    quarantined: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 1)}


@dataclass
class _Item:
    path: str
    sha256: str
    split: str | None
    label: str | None
    image: np.ndarray  # uint8 (H, W, 3)


# ------------------------------------------------------------------------------------ sources
def _store_dirs(source: Path) -> list[Path]:
    if ImageStore.is_store(source):
        return [source]
    splits = manifest.split_stores(source)
    if splits:
        return splits
    return []


def _store_items(split_dir: Path, done: set[tuple[str | None, str]]) -> tuple[int, Iterator[_Item]]:
    """(rows to do, their items) of one split store in store order, shard by shard (bounded memory)."""
    store = ImageStore.open(split_dir)
    rows = manifest.read(split_dir, store)
    split = split_dir.name
    if len(rows) != len(store):  # a store written without ingest: synthetic paths, pixel hashes
        rows = None
    labels = store.labels()
    todo = sum((split, _row_path(rows, split, i)) not in done for i in range(len(store)))

    def items() -> Iterator[_Item]:
        i = 0
        for shard in store.shards:
            pixels = np.load(shard.images_path(store.root), mmap_mode="r")
            for j in range(shard.count):
                path = _row_path(rows, split, i)
                if (split, path) not in done:
                    img = np.asarray(pixels[j])
                    sha = str(rows["sha256"].iat[i]) if rows is not None else hashlib.sha256(img.tobytes()).hexdigest()
                    y = int(labels[i])
                    yield _Item(path, sha, split, store.classes[y] if 0 <= y < len(store.classes) else None, img)
                i += 1

    return todo, items()


def _row_path(rows: Any, split: str, i: int) -> str:
    return str(rows["path"].iat[i]) if rows is not None else f"{split}/{i:07d}"


def _folder_items(folder: Path, opts: DecodeOptions, done: set[tuple[str | None, str]], workers: int,
                  rejected: list[Rejected]) -> tuple[int, Iterator[_Item]]:
    scan = scan_folder(folder)
    rejected.extend(scan.rejected)
    tasks = [t for t in scan.tasks if (None, t.rel) not in done]

    def items() -> Iterator[_Item]:
        for outcome in decode_files(tasks, opts, (), workers):
            if isinstance(outcome, Accepted):
                yield _Item(outcome.rel, outcome.sha256, None, outcome.label, outcome.image)
            elif isinstance(outcome, Rejected):
                rejected.append(outcome)

    return len(tasks), items()


# ------------------------------------------------------------------------------------ the table
def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _quarantine_file(out: Path) -> Path:
    return out.with_name(out.stem + ".quarantine.json")


def _read_done(out: Path, fingerprint: str) -> set[tuple[str | None, str]]:
    import pyarrow.parquet as pq

    done: set[tuple[str | None, str]] = set()
    files = ([out] if out.is_file() else []) + sorted(_parts_dir(out).glob("part-*.parquet"))
    for f in files:
        try:
            table = pq.read_table(f, columns=["path", "split"])
            meta = pq.read_schema(f).metadata or {}
        except Exception as e:
            raise UserError(f"{f} is not a readable embeddings table ({type(e).__name__}); delete it or choose "
                            "another --out") from None
        if meta.get(META_FINGERPRINT, b"").decode() != fingerprint:
            raise UserError(f"{f} holds embeddings of other weights ({meta.get(META_MODEL, b'?').decode()}); "
                            "choose another --out, or delete it to start over")
        done.update(zip(table.column("split").to_pylist(), table.column("path").to_pylist(), strict=True))
    return done


def _table(items: list[_Item], embeddings: np.ndarray, model: str, fingerprint: str) -> Any:
    import pyarrow as pa

    dim = embeddings.shape[1]
    flat = pa.array(np.ascontiguousarray(embeddings, np.float32).reshape(-1), pa.float32())
    table = pa.table({
        "path": pa.array([it.path for it in items], pa.string()),
        "sha256": pa.array([it.sha256 for it in items], pa.string()),
        "split": pa.array([it.split for it in items], pa.string()),
        "label": pa.array([it.label for it in items], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    })
    return table.replace_schema_metadata({META_MODEL: model.encode(), META_FINGERPRINT: fingerprint.encode()})


def _write_table(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(path, buf.getbuffer())


def _merge(out: Path) -> int:
    """`<out>` + every part -> `<out>` (one atomic replace), then the parts go; the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(_parts_dir(out).glob("part-*.parquet"))
    tables = ([pq.read_table(out)] if out.is_file() else []) + [pq.read_table(p) for p in parts]
    if not tables:
        return 0
    if parts:
        merged = pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)
        _write_table(merged, out)
    shutil.rmtree(_parts_dir(out), ignore_errors=True)
    return sum(t.num_rows for t in tables)


# ------------------------------------------------------------------------------------ embed
def embed_source(encoder: ImageEncoder, meta: dict[str, Any], source: str | Path, out: str | Path, *,
                 ingest: Any, batch_size: int = 256, device: str = "cpu", workers: int = 0,
                 part_rows: int = 8192, progress: bool | None = None, log_every: int = 50,
                 log: Callable[[str], None] | None = None) -> EmbedSummary:
    """Embed every image of `source` (a folder, a split store, or a store root with splits) into
    the table `out` (see the module docstring). `ingest` is the `ingest` settings section (the
    decoding limits of folders); `progress` None = a bar when stderr is a terminal, else one line
    every `log_every` batches."""
    log = log or (lambda msg: print(f"embed: {msg}", file=sys.stderr))
    source, out = Path(source), Path(out)
    if not source.exists():
        raise UserError(f"--source {source} does not exist (an image folder or a store)")
    if out.suffix != ".parquet":
        raise UserError(f"--out {out}: name a .parquet file")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    remove_stale_temporaries(_parts_dir(out))
    model, fingerprint = str(meta.get("model_ref", "")), str(meta["fingerprint"])
    done = _read_done(out, fingerprint)
    summary = EmbedSummary(str(out), str(source), model, fingerprint, encoder.feature_dim, skipped=len(done))
    rejected: list[Rejected] = []
    stores = _store_dirs(source)
    if stores:
        jobs = [_store_items(d, done) for d in stores]
    elif source.is_dir():
        jobs = [_folder_items(source, DecodeOptions.of(ingest, encoder.image_size), done, workers, rejected)]
    else:
        raise UserError(f"--source {source} is neither an image folder nor an image store")
    total = sum(n for n, _ in jobs)
    t0 = time.perf_counter()
    bar = _progress(total, progress, log, log_every, batch_size)
    part = len(list(_parts_dir(out).glob("part-*.parquet")))
    pending: list[_Item] = []

    def flush() -> None:
        nonlocal pending, part
        if not pending:
            return
        emb = embed_images(encoder, [it.image for it in pending], batch_size, device, progress=bar)
        part += 1
        _write_table(_table(pending, emb, model, fingerprint), _parts_dir(out) / f"part-{part:06d}.parquet")
        summary.embedded += len(pending)
        pending = []

    try:
        for _, items in jobs:
            for item in items:
                pending.append(item)
                if len(pending) >= part_rows:
                    flush()
        flush()
    finally:
        getattr(bar, "close", lambda: None)()
    summary.seconds = time.perf_counter() - t0
    summary.rows = _merge(out)
    summary.quarantined = _write_quarantine(out, rejected)
    log(f"{summary.embedded} embedded, {summary.skipped} already there, {len(summary.quarantined)} quarantined, "
        f"{summary.rows} rows in {out} ({summary.images_per_s:.0f} images/s)")
    return summary


def _write_quarantine(out: Path, rejected: list[Rejected]) -> list[dict[str, str]]:
    path = _quarantine_file(out)
    old = json.loads(path.read_text()) if path.is_file() else []
    rows = {r["path"]: r for r in old}
    rows.update({r.rel: {"path": r.rel, "reason": r.reason, "detail": r.detail} for r in rejected})
    if rows:
        write_atomic(path, json.dumps(sorted(rows.values(), key=lambda r: r["path"]), indent=1).encode())
    return [{"path": r.rel, "reason": r.reason, "detail": r.detail} for r in rejected]


def _progress(total: int, progress: bool | None, log: Callable[[str], None], every: int,
              batch_size: int) -> Callable[[int], None]:
    """A tqdm bar on a terminal, else a callback logging one line every `every` batches."""
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="embed", dynamic_ncols=True)
        return _Bar(bar)
    state = {"n": 0, "batches": 0, "t0": time.perf_counter()}

    def update(n: int) -> None:
        state["n"] += n
        state["batches"] += 1
        if state["batches"] % every == 0 or state["n"] >= total:
            rate = state["n"] / max(time.perf_counter() - state["t0"], 1e-9)
            log(f"{state['n']}/{total} images ({rate:.0f} images/s)")

    return update


class _Bar:
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
