"""The evidence `retrain` decides with: drift of the new images, near-duplicates, what to label next.

    ev = drift_evidence(settings, store_root, trained_images=40, model_ref="models:/ssl-encoder@champion")
    ev.result.drifted, ev.result.p_value               # MMD permutation test (tasks/serving/drift.py)
    dups = scan_near_duplicates(settings, "data/incoming", store_root, model_ref)
    run_id = log_retrain_decision(settings, info, ev)  # MLflow: tags, drift map, score history

The store only grows (shards are appended), so "the new images" are the train split's rows from
index `trained_images` (what the last completed training was trained on) to the end, and the
reference is a seeded sample of the rows before it: both embedded by the champion. No Prefect
here; the retrain flow composes these.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sslflow.ssl_models.store import ImageStore
from sslflow.tasks.serving.drift import DriftResult, class_shares, cluster_shares, mmd_test, pca_2d

DECISION_KIND = "retrain-decision"  # the `sslflow.kind` tag of the MLflow run each decision logs


@dataclass
class DriftEvidence:
    result: DriftResult
    classes: list[dict[str, Any]] = field(default_factory=list)
    reference: np.ndarray | None = None  # the embeddings (for the map; not serialised)
    new: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.result.to_dict(), "classes": self.classes}


def load_champion(settings: Any, model_ref: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The encoder `retrain` judges new data with (default `models:/<model_name>@champion`)."""
    from sslflow.tasks.serving.encoder import load_encoder_for_embedding
    from sslflow.tasks.tracking.backend import resolve_tracking_uri, scoped_tracking_uri
    from sslflow.tasks.tracking.run import outages_as_one_line

    ref = model_ref or f"models:/{settings.tracking.model_name}@champion"
    uri = resolve_tracking_uri(settings)
    with scoped_tracking_uri(uri), outages_as_one_line(uri, f"loading {ref}"):
        return load_encoder_for_embedding(ref)


def gather(store: ImageStore, indices: np.ndarray) -> np.ndarray:
    """Rows `indices` (sorted) of a store, reading only their shards (memory-mapped)."""
    out = np.zeros((len(indices), store.height, store.width, 3), np.uint8)
    start = 0
    for shard in store.shards:
        lo, hi = np.searchsorted(indices, [start, start + shard.count])
        if hi > lo:
            pixels = np.load(shard.images_path(store.root), mmap_mode="r")
            out[lo:hi] = pixels[indices[lo:hi] - start]
        start += shard.count
    return out


def drift_evidence(settings: Any, store_root: str | Path, trained_images: int, *, encoder: Any = None,
                   model_ref: str | None = None, device: str = "cpu") -> DriftEvidence | None:
    """The drift test of the train split's rows after `trained_images` against a seeded sample of
    the rows before (`pipeline.drift_reference_images`, the new ones capped at the same number).
    None when there are fewer than 2 of either."""
    pp = settings.pipeline
    store = ImageStore.open(Path(store_root) / "train")
    total = len(store)
    trained = max(0, min(int(trained_images), total))
    if trained < 2 or total - trained < 2:
        return None
    if encoder is None:
        encoder, _ = load_champion(settings, model_ref)
    rng = np.random.default_rng(settings.seed)
    cap = pp.drift_reference_images
    ref_idx = np.sort(rng.choice(trained, min(cap, trained), replace=False))
    new_idx = np.arange(trained, total)
    if len(new_idx) > cap:
        new_idx = np.sort(rng.choice(new_idx, cap, replace=False))
    from sslflow.tasks.serving.encoder import embed_images

    ref = embed_images(encoder, gather(store, ref_idx), 256, device)
    new = embed_images(encoder, gather(store, new_idx), 256, device)
    result = mmd_test(ref, new, permutations=pp.drift_permutations, level=pp.drift_level, seed=settings.seed,
                      device=device)
    clusters = cluster_shares(ref, new, k=min(pp.drift_clusters, len(ref)), seed=settings.seed, device=device)
    labels = store.labels()
    names = lambda idx: [store.classes[y] if 0 <= y < len(store.classes) else None for y in labels[idx]]  # noqa: E731
    classes = class_shares(names(ref_idx), names(new_idx)) if (labels[new_idx] >= 0).any() else []
    result = DriftResult(**{**result.to_dict(), "clusters": clusters})
    return DriftEvidence(result, classes, ref, new)


# ------------------------------------------------------------------------------------ near-duplicates
def scan_near_duplicates(settings: Any, incoming: str | Path, store_root: str | Path, *, encoder: Any,
                         meta: dict[str, Any], device: str = "cpu", cache_dir: str | Path | None = None,
                         log: Any = None) -> list[dict[str, Any]]:
    """Near-duplicates of the incoming folder's images among themselves and against the train
    split (`ingest.near_duplicate_threshold`): one dict per file (`path`, `reason` near_duplicate,
    `matched`: the store's manifest path or another incoming file, `cosine`). The store's
    embeddings are cached per encoder in `cache_dir` (an embed table: the next night embeds only
    what was added)."""
    import pandas as pd

    from sslflow.tasks.serving.embed import embed_source
    from sslflow.tasks.serving.near_duplicates import near_duplicates

    incoming, split = Path(incoming), Path(store_root) / "train"
    quiet = log or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="sslflow-nd-") as tmp:
        out = Path(tmp) / "incoming.parquet"
        embed_source(encoder, meta, incoming, out, ingest=settings.ingest, device=device,
                     workers=settings.ingest.workers, progress=False, log=quiet)
        new = pd.read_parquet(out) if out.is_file() else pd.DataFrame(columns=["path", "embedding"])
    if not len(new):
        return []
    stored = pd.DataFrame(columns=["path", "embedding"])
    if (split / "store.json").is_file() and len(ImageStore.open(split)):
        cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="sslflow-nd-store-"))
        table = cache / f"train-{meta['fingerprint']}.parquet"
        ctx = nullcontext() if cache_dir else _removed(cache)
        with ctx:
            embed_source(encoder, meta, split, table, ingest=settings.ingest, device=device, progress=False, log=quiet)
            stored = pd.read_parquet(table, columns=["path", "embedding"])
    emb = lambda df: np.stack(df["embedding"].to_numpy()).astype(np.float32) if len(df) else None  # noqa: E731
    hits = near_duplicates(emb(new), emb(stored), threshold=settings.ingest.near_duplicate_threshold, device=device)
    paths = new["path"].astype(str).tolist()
    spaths = stored["path"].astype(str).tolist()
    return [{"path": paths[h["index"]], "reason": "near_duplicate",
             "matched": (f"store:train/{spaths[h['match_index']]}" if h["match"] == "store"
                         else f"incoming:{paths[h['match_index']]}"), "cosine": h["cosine"]} for h in hits]


class _removed:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def quarantine_near_duplicates(incoming: str | Path, hits: list[dict[str, Any]], set_aside: str | Path) -> Path | None:
    """Move the near-duplicate files out of the incoming folder into
    `<set_aside>/near_duplicates-<time>/` (same relative paths) with `near_duplicates.json` (each
    file's reason and matched file), so ingest never sees them."""
    if not hits:
        return None
    incoming = Path(incoming)
    dest = Path(set_aside) / time.strftime("near_duplicates-%Y%m%dT%H%M%S")
    for h in hits:
        src = incoming / h["path"]
        if src.is_file():
            (dest / h["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), dest / h["path"])
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "near_duplicates.json").write_text(json.dumps(hits, indent=1))
    return dest


# ------------------------------------------------------------------------------------ MLflow
def log_retrain_decision(settings: Any, info: dict[str, Any], evidence: DriftEvidence | None,
                         near_dups: list[dict[str, Any]] | None = None) -> str:
    """One MLflow run per retrain decision (`sslflow.kind` = retrain-decision): the decision and
    its evidence as tags and metrics, and a drift report: `drift/map.png` (2-D PCA of reference
    vs new embeddings), `drift/history.png` (drift score and p-value of every decision so far),
    `drift/report.json`, `near_duplicates.json`. Returns the run id."""
    from mlflow import MlflowClient

    from sslflow.tasks.tracking.backend import get_or_create_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(settings)
    client = MlflowClient(tracking_uri=uri)
    exp = get_or_create_experiment(client, settings.tracking.experiment, uri)
    tags = {"sslflow.kind": DECISION_KIND, "mlflow.runName": "retrain-decision",
            "retrain.decision": "train" if info.get("train") else "nothing_to_do",
            "retrain.policy": str(settings.pipeline.retrain_policy),
            "retrain.reason": str(info.get("reason", ""))[:4900],
            "retrain.new_images": str(info.get("new_images", "")),
            "retrain.images": str(info.get("images", ""))}
    if evidence is not None:
        r = evidence.result
        tags.update({"drift.score": f"{r.score:.6g}", "drift.p_value": f"{r.p_value:.6g}",
                     "drift.drifted": str(r.drifted).lower(), "drift.level": f"{r.level:g}"})
    run = client.create_run(exp, tags=tags)
    rid = run.info.run_id
    try:
        metrics = {"retrain/train": 1.0 if info.get("train") else 0.0,
                   "retrain/new_images": float(info.get("new_images") or 0)}
        if evidence is not None:
            metrics.update({"drift/score": evidence.result.score, "drift/p_value": evidence.result.p_value})
        if near_dups is not None:
            metrics["near_duplicates"] = float(len(near_dups))
        for k, v in metrics.items():
            client.log_metric(rid, k, v)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            if evidence is not None:
                (d / "report.json").write_text(json.dumps(evidence.to_dict(), indent=1))
                if evidence.reference is not None and evidence.new is not None:
                    plot_drift_map(evidence, d / "map.png")
                plot_history(_history(client, exp, rid, evidence.result), d / "history.png")
                client.log_artifacts(rid, str(d), "drift")
            if near_dups is not None:
                (d / "near_duplicates.json").write_text(json.dumps(near_dups, indent=1))
                client.log_artifact(rid, str(d / "near_duplicates.json"))
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    return rid


def _history(client: Any, exp: str, current: str, result: DriftResult) -> list[tuple[int, float, float]]:
    """(start time ms, score, p-value) of the earlier decisions with a drift test, oldest first, and this one."""
    runs = client.search_runs([exp], f"tags.`sslflow.kind` = '{DECISION_KIND}'", max_results=500,
                              order_by=["attributes.start_time ASC"])
    rows = [(r.info.start_time, r.data.metrics["drift/score"], r.data.metrics.get("drift/p_value", float("nan")))
            for r in runs if r.info.run_id != current and "drift/score" in r.data.metrics]
    return [*rows, (int(time.time() * 1000), result.score, result.p_value)]


def plot_drift_map(evidence: DriftEvidence, out: Path) -> Path:
    from sslflow.tasks.tracking.plots import pyplot, save_figure

    plt = pyplot()
    ref, new = pca_2d(evidence.reference, evidence.new)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(ref[:, 0], ref[:, 1], s=6, alpha=0.5, label=f"reference ({len(ref)})")
    ax.scatter(new[:, 0], new[:, 1], s=6, alpha=0.6, label=f"new ({len(new)})")
    ax.set_title(f"drift: MMD^2 {evidence.result.score:.3g}, p {evidence.result.p_value:.3g}")
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, out)


def plot_history(rows: list[tuple[int, float, float]], out: Path) -> Path:
    from sslflow.tasks.tracking.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    x = np.arange(len(rows))
    ax.plot(x, [r[1] for r in rows], marker="o", label="MMD^2")
    ax2 = ax.twinx()
    ax2.plot(x, [r[2] for r in rows], marker="x", color="tab:red", label="p-value")
    ax2.set_yscale("log")
    ax.set_xlabel("retrain decision")
    ax.set_ylabel("MMD^2")
    ax2.set_ylabel("p-value")
    ax.set_title("drift score history")
    return save_figure(fig, out)
