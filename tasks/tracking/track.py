"""MLflow tracking for a pretraining run: preflight, run context, metric callback, artifacts.

Plain functions, so a Prefect flow or the CLI calls them the same way::

    tp = load_tracking_params()                       # params/tracking.yaml (+ file, --set)
    with tracking_run(params, tp.tracking, data_version=v) as run:   # checks the server first
        result = pretrain(..., callbacks=[run.callback()])
        report = evaluate(...)
        log_training(run, result.run_dir, params, report, gx_report="reports/...")
        # tasks.register.register_and_promote(run, result.run_dir, report, tp) -> (version, decision)

The tracking URI is, in order: `MLFLOW_TRACKING_URI`, `tracking.uri`, then the embedded
default `sqlite:///<project>/mlflow.db` with artifacts in `<project>/mlartifacts`.
`check_tracking_server` runs before anything is trained: an unreachable server is a one-line
`UserError` naming the URI after at most `tracking.preflight_timeout_s` seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError
from sslflow.core.settings import PARAMS_DIR, build, merged_sections

PARAMS_FILE = "tracking.yaml"
PROJECT_DIR = PARAMS_DIR.parent
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
# MLflow log_batch limits per request
MAX_BATCH_METRICS, MAX_BATCH_PARAMS, MAX_BATCH_TAGS = 1000, 100, 100


# ------------------------------------------------------------------------------------ params
@dataclass(frozen=True)
class TrackingConfig:
    uri: str  # "" = embedded SQLite in the project dir; env MLFLOW_TRACKING_URI wins
    experiment: str
    model_name: str
    flush_every: int  # metric calls buffered per log_batch
    preflight_timeout_s: float
    embedding_map: bool
    augment_grid_images: int


@dataclass(frozen=True)
class PromotionConfig:
    metric: str  # evaluation metric key, e.g. linear_top1
    min_delta: float  # the new version must beat the champion by at least this much


@dataclass(frozen=True)
class TrackingParams:
    tracking: TrackingConfig
    promotion: PromotionConfig


def load_tracking_params(params_file: str | Path | None = None, overrides: Iterable[str] = (),
                         params_dir: Path = PARAMS_DIR) -> TrackingParams:
    """`params/tracking.yaml`, then the `tracking`/`promotion` sections of `params_file`, then
    the `tracking.*`/`promotion.*` entries of `overrides` (others are ignored: they belong to
    other loaders). Unknown keys and wrong types are a `UserError` naming the key."""
    raw = merged_sections(TrackingParams, Path(params_dir) / PARAMS_FILE, params_file, overrides)
    tracking = raw.get("tracking")
    if isinstance(tracking, dict) and tracking.get("uri") is None:
        raw["tracking"] = {**tracking, "uri": ""}
    tp: TrackingParams = build(TrackingParams, raw, prefix="")
    t = tp.tracking
    if not t.model_name.strip():
        raise UserError("tracking.model_name must not be empty")
    if not t.experiment.strip():
        raise UserError("tracking.experiment must not be empty")
    if t.flush_every < 1:
        raise UserError(f"tracking.flush_every must be >= 1; got {t.flush_every}")
    if t.preflight_timeout_s <= 0:
        raise UserError(f"tracking.preflight_timeout_s must be > 0; got {t.preflight_timeout_s}")
    if t.augment_grid_images < 0:
        raise UserError(f"tracking.augment_grid_images must be >= 0; got {t.augment_grid_images}")
    if tp.promotion.min_delta < 0:
        raise UserError(f"promotion.min_delta must be >= 0; got {tp.promotion.min_delta}")
    if not tp.promotion.metric.strip():
        raise UserError("promotion.metric must not be empty")
    return tp


# ------------------------------------------------------------------------------------ URI + preflight
def default_tracking_uri(project_dir: Path = PROJECT_DIR) -> str:
    return f"sqlite:///{(Path(project_dir) / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cfg: TrackingConfig | None = None) -> str:
    """`MLFLOW_TRACKING_URI` (env) > `tracking.uri` (params) > embedded SQLite in the project."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if cfg is not None and cfg.uri.strip():
        return cfg.uri.strip()
    return default_tracking_uri()


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:"):
        return None
    path = urllib.parse.urlparse(uri).path
    # sqlite:///rel.db -> "/rel.db" means relative; sqlite:////abs.db -> "//abs.db"
    if uri.startswith("sqlite:////"):
        return Path(path[1:]) if path.startswith("//") else Path(path)
    return Path(path.lstrip("/")) if path else None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the SQLite file (`mlartifacts/`);
    None = the server's default (an `mlflow server` proxies or names its own store)."""
    db = _sqlite_path(uri)
    if db is None:
        return None
    return (db.resolve().parent / "mlartifacts").as_uri()


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any training) when the tracking backend cannot be used.

    http(s): GET `<uri>/health` with `timeout`; no answer, a refused connection, a 5xx or an
    authentication failure is a `UserError` naming the URI. sqlite: the directory of the
    database file must exist and be writable. Other schemes (databricks, postgresql, ...) are
    checked by one real query. The message is one line.
    """
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"MLflow tracking server {uri} is unreachable ({reason}); "
                            "start it or set MLFLOW_TRACKING_URI / tracking.uri") from None
        if status in (401, 403):
            raise UserError(f"MLflow tracking server {uri} refused the credentials (HTTP {status}); "
                            "set MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN")
        if status >= 500:
            raise UserError(f"MLflow tracking server {uri} is not healthy (HTTP {status})")
        return
    db = _sqlite_path(uri)
    if db is not None:
        parent = db.resolve().parent
        if not parent.is_dir():
            raise UserError(f"MLflow tracking URI {uri}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"MLflow tracking URI {uri}: directory {parent} is not writable")
        return
    if scheme in ("file", ""):
        return  # refused by MLflow itself unless MLFLOW_ALLOW_FILE_STORE=true
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"MLflow tracking URI {uri} is unusable: {msg}") from None


# ------------------------------------------------------------------------------------ tags
def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def run_tags(params: Any = None, *, data_version: str | None = None, device: str | None = None,
             project_dir: Path = PROJECT_DIR, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Provenance tags: git commit + dirty flag, data version, DVC lock hash, device, versions."""
    import torch

    from sslflow import __version__

    tags: dict[str, str] = {"sslflow_version": __version__, "torch_version": torch.__version__}
    commit = _git("rev-parse", "HEAD", cwd=project_dir)
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
        status = _git("status", "--porcelain", "--untracked-files=no", cwd=project_dir)
        tags["git_dirty"] = str(bool(status)).lower()
    lock = Path(project_dir) / "dvc.lock"
    tags["dvc_lock_md5"] = hashlib.md5(lock.read_bytes()).hexdigest() if lock.is_file() else "none"
    tags["data_version"] = data_version or "unknown"
    if device is None and params is not None:
        try:
            from sslflow.ssl_models.train import resolve_device

            device = str(resolve_device(params.device))
        except ValueError:
            device = params.device
    if device is not None:
        tags["device"] = device
        if device.startswith("cuda"):
            with suppress(RuntimeError, AssertionError):
                tags["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if params is not None:
        tags["method"] = params.pretrain.method
        tags["backbone"] = f"{params.pretrain.backbone}-w{params.pretrain.width}"
    for k, v in (extra or {}).items():
        tags[k] = str(v)
    return tags


def flat_params(params: Any) -> dict[str, str]:
    """Resolved params as MLflow params: dotted keys, string values within MLflow's limit."""
    from sslflow.ssl_models.config import as_dict, flatten

    flat = flatten(as_dict(params)) if not isinstance(params, Mapping) else flatten(params)
    out = {}
    for k, v in flat.items():
        s = json.dumps(v) if isinstance(v, list | tuple | dict) else str(v)
        out[k] = s if len(s) <= MAX_PARAM_VALUE else s[: MAX_PARAM_VALUE - 3] + "..."
    return out


# ------------------------------------------------------------------------------------ callback
class MLflowCallback:
    """The `ssl_models.train.Callback` protocol, logging to one MLflow run.

    Metrics are buffered and sent with one `MlflowClient.log_batch` every `flush_every`
    calls, at every epoch end, and on `flush()`/`close()`, so per-step logging costs one
    request per `flush_every * pretrain.log_every` steps. Step metrics are `train/<name>`
    (x = optimizer step), epoch metrics `epoch/<name>` (x = epoch; epoch 0 = random init).
    """

    def __init__(self, run_id: str, client: Any = None, *, flush_every: int = 50,
                 tracking_uri: str | None = None) -> None:
        from mlflow import MlflowClient

        self.run_id = run_id
        self.client = client or MlflowClient(tracking_uri=tracking_uri)
        self.flush_every = max(1, int(flush_every))
        self._buffer: list[Any] = []
        self._calls = 0

    def _add(self, prefix: str, step: int, metrics: Mapping[str, float], skip: str | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if key == skip:
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            self._buffer.append(Metric(f"{prefix}/{key}", v, now, int(step)))
        self._calls += 1

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._add("train", step, metrics)
        if self._calls >= self.flush_every:
            self.flush()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self._add("epoch", epoch, metrics, skip="epoch")
        self.flush()  # once per epoch: the UI stays live, the cost is negligible

    def flush(self) -> None:
        buffer, self._buffer, self._calls = self._buffer, [], 0
        for i in range(0, len(buffer), MAX_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=buffer[i:i + MAX_BATCH_METRICS])

    close = flush


# ------------------------------------------------------------------------------------ the run
@dataclass
class TrackedRun:
    """An open MLflow run: its id, URI, client and where helpers put local artifact files."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    config: TrackingConfig
    client: Any
    callbacks: list[MLflowCallback] = field(default_factory=list)

    def callback(self) -> MLflowCallback:
        cb = MLflowCallback(self.run_id, self.client, flush_every=self.config.flush_every)
        self.callbacks.append(cb)
        return cb

    def log_metrics(self, metrics: Mapping[str, float], prefix: str = "", step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(f"{prefix}{k}", float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)]
        for i in range(0, len(items), MAX_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i:i + MAX_BATCH_METRICS])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_BATCH_TAGS):
            self.client.log_batch(self.run_id, tags=items[i:i + MAX_BATCH_TAGS])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        with artifact_store_errors(self.tracking_uri, f"logging {path.name} to MLflow run {self.run_id}"):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path)


# ------------------------------------------------------------------------------------ artifact store outages
S3_ENDPOINT_VARS = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _refuses_connections(url: str, timeout: float = 2.0) -> bool:
    import socket

    parts = urllib.parse.urlparse(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError:
        return True
    return False


def _server_answers(uri: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, TimeoutError, OSError):
        return False


def artifact_store_error(uri: str, error: BaseException, what: str) -> UserError | None:
    """A one-line `UserError` when `error` is a failed artifact transfer, else None (anything
    else is a bug or another outage and keeps its traceback).

    With proxied artifacts (`mlflow server --artifacts-destination s3://...`) the client talks
    only to `<server>/api/2.0/mlflow-artifacts/...`; when the server's object store is down the
    server answers HTTP 500 (no reason in the body) or drops the connection, and MLflow's
    message names neither the store nor what to do. So: a server that still answers
    `/health` could not reach its artifact store; one that does not is itself down. When an
    S3 endpoint is configured in this process (`MLFLOW_S3_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`,
    `AWS_ENDPOINT_URL`), the message names it too, and whether it refuses connections. This runs after
    MLflow's own HTTP retries (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`): the outage is not a blip.
    """
    text = str(error)
    proxied = "/mlflow-artifacts/" in text
    direct = type(error).__name__ in ("EndpointConnectionError", "ConnectTimeoutError")  # botocore, S3 direct
    if not (proxied or direct):
        return None
    endpoint = next((os.environ[v] for v in S3_ENDPOINT_VARS if os.environ.get(v)), None)
    down = ""
    if endpoint:  # SeaweedFS, MinIO... keep the port open while their backends are gone: name it either way
        down = f"; S3 endpoint {endpoint} " + ("refuses connections" if _refuses_connections(endpoint)
                                              else "accepts connections but fails requests")
    if direct:
        where = f"the artifact store of {uri} is unreachable ({text.splitlines()[0][:200]})"
    elif _server_answers(uri):
        where = f"the MLflow server {uri} could not reach its artifact store"
    else:
        where = f"the MLflow server {uri} stopped answering"
    return UserError(f"{what} failed: {where}{down}. The run is marked FAILED; registered versions, "
                     "aliases and the data store are unchanged: rerun when the service is back")


@contextmanager
def artifact_store_errors(uri: str, what: str) -> Iterator[None]:
    """Turn an artifact-store outage inside the block into `artifact_store_error`'s one line."""
    try:
        yield
    except Exception as e:
        err = artifact_store_error(uri, e, what)
        if err is None:
            raise
        raise err from e


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {name!r} is deleted on {uri}; restore it or set tracking.experiment")
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def scoped_tracking_uri(uri: str) -> Iterator[None]:
    """`mlflow.set_tracking_uri(uri)` for the block, then the previous global URI and
    `MLFLOW_TRACKING_URI` value back (set_tracking_uri also writes the variable)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_global = getattr(tracking_utils, "_tracking_uri", None)
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


@contextmanager
def tracking_run(params: Any, cfg: TrackingConfig, *, run_name: str | None = None,
                 data_version: str | None = None, device: str | None = None,
                 tags: Mapping[str, Any] | None = None, check: bool = True,
                 nested: bool = False) -> Iterator[TrackedRun]:
    """Check the backend, then open one MLflow run with the flattened params and provenance
    tags; it ends FINISHED, or FAILED (with an `error` tag) if the body raises.

    The run is also the active fluent run (`mlflow.active_run()`) inside the block, and the
    URI the process-wide one (restored afterwards), so `mlflow.log_*`,
    `mlflow.pytorch.log_model` and `tasks.register` land in it. `nested=True` inside another
    active run (e.g. one trial of a sweep).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param

    uri = resolve_tracking_uri(cfg)
    if check:
        check_tracking_server(uri, cfg.preflight_timeout_s)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = get_or_create_experiment(client, cfg.experiment, uri)
    all_tags = run_tags(params, data_version=data_version, device=device, extra=tags)
    with scoped_tracking_uri(uri), mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                                    tags=all_tags, nested=nested) as active:
        run = TrackedRun(active.info.run_id, experiment_id, uri, cfg, client)
        if params is not None:
            items = [Param(k, v) for k, v in flat_params(params).items()]
            for i in range(0, len(items), MAX_BATCH_PARAMS):
                client.log_batch(run.run_id, params=items[i:i + MAX_BATCH_PARAMS])
        try:
            yield run
        except BaseException as e:
            for cb in run.callbacks:  # keep the original error whatever happens here
                with suppress(Exception):
                    cb.flush()
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:5000]
            with suppress(Exception):
                client.set_tag(run.run_id, "error", msg)
            raise
        for cb in run.callbacks:
            cb.flush()


# ------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt



def _save(fig: Any, out_path: str | Path) -> Path:
    """Write a finished figure as PNG (parents created) and free it."""
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    _pyplot().close(fig)
    return out_path

def plot_curves(history: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """`loss.png` (per-step and per-epoch loss) and `knn.png` (online kNN top-1/top-5 per
    epoch, epoch 0 = random init) from a `history.json` dict. Returns the files written."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps, epochs = history.get("steps", []), history.get("epochs", [])
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    if steps:
        ax.plot([s["epoch"] if "epoch" in s else s["step"] for s in steps], [s["loss"] for s in steps],
                lw=0.8, alpha=0.6, label="per log interval")
    ep = [e for e in epochs if "loss" in e]
    if ep:
        ax.plot([e["epoch"] for e in ep], [e["loss"] for e in ep], "o-", label="epoch mean")
    ax.set(xlabel="epoch", ylabel="loss", title="pretraining loss")
    ax.grid(alpha=0.3)
    if steps or ep:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    knn = [e for e in epochs if "knn_top1" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("knn_top1", "knn_top5"):
        pts = [e for e in knn if key in e]
        if pts:
            ax.plot([e["epoch"] for e in pts], [e[key] for e in pts], "o-", label=key)
    ax.set(xlabel="epoch (0 = random init)", ylabel="accuracy (%)", title="online kNN")
    ax.grid(alpha=0.3)
    if knn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no online kNN (no eval stores)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out_dir / "knn.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "knn.png")
    return written


def plot_augmented_views(store: Any, params: Any, out_path: str | Path, n: int = 8) -> Path:
    """A grid: one row per source image, the original then each of the method's views, drawn
    with the run's `BatchAugment` (same recipe and strength as training) on the CPU."""
    import torch

    from sslflow.ssl_models.augment import BatchAugment
    from sslflow.ssl_models.methods import METHODS

    plt = _pyplot()
    images = store.images()
    n = min(n, len(images))
    if n == 0:
        raise UserError(f"{store.root} holds no images for the augmented-views grid")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(params.seed))[:n]
    batch = torch.from_numpy(images[idx.numpy()])
    views = METHODS[params.pretrain.method].views(params.augment, store.height)
    aug = BatchAugment(params.augment, views)
    out = aug(batch, torch.Generator().manual_seed(params.seed))
    mean = torch.tensor(params.augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(params.augment.std).view(1, 3, 1, 1)
    cols = 1 + len(out)
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.3 * n), squeeze=False)
    for r in range(n):
        axes[r][0].imshow(batch[r].numpy())
        for c, v in enumerate(out, start=1):
            img = (v[r:r + 1] * std + mean).clamp(0, 1)[0].permute(1, 2, 0).numpy()
            axes[r][c].imshow(img)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("original", fontsize=7)
    for c, v in enumerate(views, start=1):
        axes[0][c].set_title(f"view {c} ({v.size}px)", fontsize=7)
    return _save(fig, out_path)


def plot_embedding_map(encoder_dir: str | Path, store: Any, out_path: str | Path,
                       batch_size: int = 256, max_points: int = 5000, seed: int = 0) -> Path:
    """2-D PCA map of the encoder's test-set embeddings (L2-normalised), coloured by label."""
    import numpy as np
    import torch

    from sslflow.ssl_models.checkpoint import load_encoder
    from sslflow.ssl_models.evaluate import extract_features

    plt = _pyplot()
    encoder, meta = load_encoder(Path(encoder_dir))
    images, labels = store.images(), store.labels()
    if len(images) > max_points:
        keep = np.random.default_rng(seed).choice(len(images), max_points, replace=False)
        images, labels = images[keep], labels[keep]
    feats = extract_features(encoder, images, meta["mean"], meta["std"], batch_size, "cpu")
    feats = torch.nn.functional.normalize(feats, dim=1)
    centred = feats - feats.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    classes = list(getattr(store, "classes", []))
    cmap = plt.get_cmap("tab10" if max(len(classes), 1) <= 10 else "tab20")
    for lab in sorted(set(labels.tolist())):
        m = labels == lab
        name = "unlabeled" if lab < 0 else (classes[lab] if lab < len(classes) else str(lab))
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color="lightgrey" if lab < 0 else cmap(lab % cmap.N), label=name)
    ax.set(title="test-set embeddings (PCA)", xlabel="PC 1", ylabel="PC 2")
    if len(set(labels.tolist())) <= 20:
        ax.legend(fontsize=6, markerscale=2, loc="best")
    return _save(fig, out_path)


def plot_confusion(confusion: Mapping[str, Any], out_path: str | Path, title: str = "linear probe") -> Path:
    """The confusion matrix of `EvalReport.confusion_json()` (rows = true class) as a PNG."""
    import numpy as np

    plt = _pyplot()
    m = np.asarray(confusion["matrix"], dtype=float)
    classes = list(confusion.get("classes") or range(len(m)))
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(m), 1.2 + 0.45 * len(m)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(m)), [str(c) for c in classes], rotation=90, fontsize=7)
    ax.set_yticks(range(len(m)), [str(c) for c in classes], fontsize=7)
    if len(m) <= 20:
        top = m.max() if m.size else 0
        for i in range(len(m)):
            for j in range(len(m)):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] > top / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} confusion")
    return _save(fig, out_path)


# ------------------------------------------------------------------------------------ one call
def log_training(run: TrackedRun, run_dir: str | Path, params: Any, eval_report: Any = None, *,
                 train_store: Any = None, test_store: Any = None,
                 gx_report: str | Path | Sequence[str | Path] | None = None,
                 extra_artifacts: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Everything people look at after a run, into `run`:

    - metrics: `pretrain/<key>` from `metrics.json`, `eval/<key>` from `eval_report.metrics`;
    - artifacts: `params/params.yaml` + `params.json` (resolved), `plots/loss.png`,
      `plots/knn.png`, `plots/augmented_views.png` (needs `train_store`),
      `plots/embedding_map.png` (needs `test_store`), `evaluation/evaluation.json`,
      `evaluation/confusion.json` + `plots/confusion.png` (linear probe), `gx/` (the GX report
      files or directories), run-dir `metrics.json`/`history.json`.

    `train_store`/`test_store` are `ImageStore`s or paths. Returns the logged metric dict.
    """
    import yaml

    from sslflow.ssl_models.config import as_dict
    from sslflow.ssl_models.store import ImageStore

    run_dir = Path(run_dir)
    cfg = run.config
    logged: dict[str, Any] = {}
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        pre = json.loads(metrics_file.read_text())
        run.log_metrics(pre, prefix="pretrain/")
        logged.update({f"pretrain/{k}": v for k, v in pre.items()})
    if eval_report is not None:
        ev = {k: float(v) for k, v in eval_report.metrics.items() if not math.isnan(float(v))}
        run.log_metrics(ev, prefix="eval/")
        logged.update({f"eval/{k}": v for k, v in ev.items()})

    def _store(s: Any) -> Any:
        return ImageStore.open(s) if isinstance(s, str | Path) else s

    with tempfile.TemporaryDirectory(prefix="sslflow-mlflow-") as tmp:
        tmp = Path(tmp)
        (tmp / "params").mkdir()
        nested = as_dict(params) if params is not None else {}
        (tmp / "params" / "params.yaml").write_text(yaml.safe_dump(nested, sort_keys=False))
        (tmp / "params" / "params.json").write_text(json.dumps(flat_params(params) if params else {}, indent=1))
        plots = tmp / "plots"
        history_file = run_dir / "history.json"
        if history_file.is_file():
            plot_curves(json.loads(history_file.read_text()), plots)
        if train_store is not None and params is not None and cfg.augment_grid_images > 0:
            plot_augmented_views(_store(train_store), params, plots / "augmented_views.png",
                                 cfg.augment_grid_images)
        if test_store is not None and cfg.embedding_map and (run_dir / "encoder.pt").is_file():
            plot_embedding_map(run_dir, _store(test_store), plots / "embedding_map.png",
                               seed=params.seed if params is not None else 0)
        if eval_report is not None:
            (tmp / "evaluation").mkdir()
            (tmp / "evaluation" / "evaluation.json").write_text(json.dumps(eval_report.to_json(), indent=1))
            confusion = eval_report.confusion_json()
            if confusion is not None:
                (tmp / "evaluation" / "confusion.json").write_text(json.dumps(confusion))
                plot_confusion(confusion, plots / "confusion.png")
        run.log_artifact(tmp / "params", "params")
        if plots.is_dir():
            run.log_artifact(plots, "plots")
        if (tmp / "evaluation").is_dir():
            run.log_artifact(tmp / "evaluation", "evaluation")
    for name in ("metrics.json", "history.json"):
        run.log_artifact(run_dir / name, "run")
    if gx_report is not None:
        for p in [gx_report] if isinstance(gx_report, str | Path) else gx_report:
            p = Path(p)
            if not p.exists():
                raise UserError(f"GX report {p} does not exist")
            run.log_artifact(p, f"gx/{p.name}" if p.is_dir() else "gx")
    for p in extra_artifacts:
        run.log_artifact(p)
    return logged
