"""One MLflow run of a pretraining: provenance tags, params, the metric callback, the run context.

    with tracking_run(settings, data_version=v) as run:   # checks the backend first
        result = pretrain(..., callbacks=[run.callback()])
        ...                                                 # sslflow.tasks.tracking.report / .registry

The run is also MLflow's active fluent run inside the block, and its URI the process-wide one
(restored afterwards). It ends FINISHED, or FAILED with an `error` tag if the block raises.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError
from sslflow.core.secrets import redact_uri
from sslflow.core.settings import Settings
from sslflow.tasks.tracking.backend import (
    artifact_store_errors,
    check_tracking_server,
    get_or_create_experiment,
    mlflow_outage,
    resolve_tracking_uri,
    retry_budget,
    scoped_tracking_uri,
)

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
# MLflow log_batch limits per request
MAX_BATCH_METRICS, MAX_BATCH_PARAMS, MAX_BATCH_TAGS = 1000, 100, 100


@contextmanager
def outages_as_one_line(uri: str | None, what: str) -> Iterator[None]:
    """An MLflow outage inside the block (after the bounded retries) becomes one `ServiceUnavailable` line."""
    try:
        yield
    except Exception as e:
        err = mlflow_outage(uri or "?", e, what)
        if err is None or err is e:
            raise
        raise err from e


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def run_tags(settings: Settings | None = None, *, data_version: str | None = None, device: str | None = None,
             project_dir: Path | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Provenance tags: git commit + dirty flag, data version, DVC lock hash, device, versions.

    `project_dir` None = the settings' project (the current directory without settings)."""
    import torch

    from sslflow import __version__

    params = settings
    if project_dir is None:
        project_dir = settings.project if settings is not None else Path.cwd()
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
        except ValueError:  # ConfigError: CUDA asked for where there is none; the tag says what was asked
            device = params.device
    if device is not None:
        tags["device"] = device
        if device.startswith("cuda"):
            with suppress(RuntimeError, AssertionError):
                tags["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if params is not None:
        tags["method"] = params.pretrain.method
        tags["backbone"] = backbone_label(params)
    for k, v in (extra or {}).items():
        tags[k] = str(v)
    return tags


def backbone_label(settings: Any) -> str:
    """`resnet18-w8`, `vit_small-p16`: the backbone and its main knob, for tags and tables."""
    b = settings.backbone
    if b.family == "resnet":
        return f"{b.name}-w{b.resnet.width}"
    if b.family == "vit":
        return f"{b.name}-p{b.vit.patch_size}"
    return b.name


def flat_params(params: Any) -> dict[str, str]:
    """Settings as MLflow params: the engine's dotted keys (the active method's and backbone
    family's sections only; a mapping is taken as already flat), values within MLflow's limit."""
    from sslflow.ssl_models.config import engine_flat

    flat = dict(params) if isinstance(params, Mapping) else engine_flat(params)
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
        self.tracking_uri = tracking_uri
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
        with outages_as_one_line(self.tracking_uri, f"logging metrics to MLflow run {self.run_id}"):
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
    config: Any  # the TrackingConfig section
    client: Any
    callbacks: list[MLflowCallback] = field(default_factory=list)
    data_version: str | None = None  # of the store it trains on (its dataset inputs' digest)

    def callback(self) -> MLflowCallback:
        cb = MLflowCallback(self.run_id, self.client, flush_every=self.config.flush_every,
                            tracking_uri=self.tracking_uri)
        self.callbacks.append(cb)
        return cb

    def log_metrics(self, metrics: Mapping[str, float], prefix: str = "", step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(f"{prefix}{k}", float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)]
        with outages_as_one_line(self.tracking_uri, f"logging metrics to MLflow run {self.run_id}"):
            for i in range(0, len(items), MAX_BATCH_METRICS):
                self.client.log_batch(self.run_id, metrics=items[i:i + MAX_BATCH_METRICS])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        with outages_as_one_line(self.tracking_uri, f"tagging MLflow run {self.run_id}"):
            for i in range(0, len(items), MAX_BATCH_TAGS):
                self.client.log_batch(self.run_id, tags=items[i:i + MAX_BATCH_TAGS])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        with artifact_store_errors(self.tracking_uri, f"logging {path.name} to MLflow run {self.run_id}"):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path)


@contextmanager
def tracking_run(settings: Settings, *, run_name: str | None = None, data_version: str | None = None,
                 device: str | None = None, tags: Mapping[str, Any] | None = None, check: bool = True,
                 nested: bool = False, log_params: bool = True) -> Iterator[TrackedRun]:
    """Check the backend, then open one MLflow run with the engine settings as params and
    provenance tags; it ends FINISHED, or FAILED (with an `error` tag) if the body raises.

    The run is also the active fluent run (`mlflow.active_run()`) inside the block, and the
    URI the process-wide one (restored afterwards), so `mlflow.log_*`,
    `mlflow.pytorch.log_model` and `sslflow.tasks.tracking.registry` land in it. `nested=True`
    inside another active run (e.g. one trial of a sweep).

    While the block runs, a thread refreshes the run's heartbeat tag (`tracking.heartbeat_s`);
    opening a top-level run first ends the runs of the experiment that dead processes left
    RUNNING (`sslflow.tasks.tracking.orphans`).

    An outage of the server inside the block: each request is retried for about
    `tracking.retry_budget_s` in total, then the block ends with one `ServiceUnavailable` line
    (exit 3); recording the failure (flush, `error` tag, FAILED) then gets one attempt per call,
    not another budget each.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from sslflow.tasks.tracking.orphans import end_orphaned_runs, heartbeat

    cfg = settings.tracking
    uri = resolve_tracking_uri(settings)
    if check:
        check_tracking_server(uri, cfg.preflight_timeout_s)
    client = MlflowClient(tracking_uri=uri)
    all_tags = run_tags(settings, data_version=data_version, device=device, extra=tags)
    with scoped_tracking_uri(uri), retry_budget(cfg.retry_budget_s) as give_up:
        with outages_as_one_line(uri, "opening an MLflow run"):
            experiment_id = get_or_create_experiment(client, cfg.experiment, uri)
            active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags, nested=nested)
        run = TrackedRun(active.info.run_id, experiment_id, uri, cfg, client, data_version=data_version)
        with heartbeat(MlflowClient(tracking_uri=uri), run.run_id, cfg.heartbeat_s):
            try:
                if not nested:
                    end_orphaned_runs(client, experiment_id, cfg.orphan_after_s, keep=run.run_id)
                if log_params:
                    items = [Param(k, v) for k, v in flat_params(settings).items()]
                    with outages_as_one_line(uri, f"logging params to MLflow run {run.run_id}"):
                        for i in range(0, len(items), MAX_BATCH_PARAMS):
                            client.log_batch(run.run_id, params=items[i:i + MAX_BATCH_PARAMS])
                yield run
                for cb in run.callbacks:
                    cb.flush()
            except BaseException as e:
                outage = mlflow_outage(uri, e, f"MLflow run {run.run_id}") if isinstance(e, Exception) else None
                if outage is not None:
                    give_up()  # the server is known down: one attempt for each call below
                for cb in run.callbacks:  # keep the original error whatever happens here
                    with suppress(Exception):
                        cb.flush()
                msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:5000]
                with suppress(Exception):
                    client.set_tag(run.run_id, "error", msg)
                with suppress(Exception):
                    mlflow.end_run("FAILED")
                if outage is not None and outage is not e:
                    raise outage from e
                raise
        with outages_as_one_line(uri, f"ending MLflow run {run.run_id}"):
            mlflow.end_run("FINISHED")


# ------------------------------------------------------------------------------------ a run held elsewhere
def attach_mlflow_run(tracking_uri: str, run_id: str, flush_every: int, timeout_s: float,
                      tags: dict[str, str]) -> Any:
    """A metric callback into an existing, still RUNNING MLflow run (the train flow's).

    Only `MlflowClient` calls: no fluent `start_run`, so nothing here can end the run.
    """
    from mlflow import MlflowClient
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    check_tracking_server(tracking_uri, timeout_s)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        status = client.get_run(run_id).info.status
    except MlflowException as e:
        raise UserError(f"MLflow run {run_id} not found on {redact_uri(tracking_uri)}: "
                        f"{e.message}".replace("\n", " ")) from None
    if status != "RUNNING":
        raise UserError(f"MLflow run {run_id} on {redact_uri(tracking_uri)} is {status}: pretraining logs into a "
                        "run the train flow holds open")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return MLflowCallback(run_id, client, flush_every=flush_every, tracking_uri=tracking_uri)


def device_tags(params: Any) -> dict[str, str]:
    """Where the pretraining really runs (the train flow tagged its own host's device)."""
    import torch

    from sslflow.ssl_models.train import resolve_device

    tags = {"pretrain.host": socket.gethostname()}
    try:
        device = resolve_device(params.device)
    except ValueError:  # ConfigError
        return tags  # the trainer raises the same error, in full
    tags["device"] = str(device)
    if device.type == "cuda":
        tags["gpu"] = torch.cuda.get_device_name(device)
    return tags
