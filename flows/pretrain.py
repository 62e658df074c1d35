"""The `pretrain` flow: pretraining alone, for a worker on a GPU host (deployment `pretrain/gpu`).

    # on the GPU host, in a checkout:   prefect worker start --pool sslflow-gpu
    # anywhere:                         sslflow deploy --gpu
    train_flow(..., pretrain_deployment="pretrain/gpu")   # or pipeline.pretrain_deployment

The `train` flow keeps everything else (validation, evaluation, logging, registration,
promotion) and its MLflow run: it calls `run_remote_pretrain`, which starts this flow with
`run_deployment` as a subflow run, waits for it, and reads the run directory it wrote.

Contract between the two hosts (docs/scaling-gpu-pool.md):

- paths are sent absolute, as the train flow sees them. The run directory must be on a
  filesystem both hosts mount at the same path (the train flow reads `metrics.json`,
  `history.json` and the encoder from it). So must the params files (or keep the checkout at
  the same path on every host);
- the store is used where it is. When it is missing on the GPU host and `<store>.dvc` is
  there (the checkout at the same path, the store not pulled yet), it is `dvc pull`ed first,
  provided the `.dvc` file records the data version the train flow asked for; otherwise a
  one-line error names the path;
- metrics go to the MLflow run the train flow opened (`tracking_uri` + `mlflow_run_id`): this
  flow logs into it through `MlflowClient` and never ends it; the train flow owns the run.
"""

from __future__ import annotations

import json
import socket
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from sslflow.core.errors import RemotePretrainFailed, UserError

DEFAULT_EVAL_SPLITS = ("train", "test")
STALL_WARNING_S = 120.0  # a remote run still Scheduled/Pending this long: probably no worker on its pool


def _logger() -> Any:
    """The run logger inside a flow or task run, else a plain one (the helpers work without Prefect)."""
    import logging

    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("sslflow")


# ------------------------------------------------------------------------------------ data contract
def _missing_splits(store_root: Path, splits: list[str]) -> list[str]:
    return [s for s in splits if not (store_root / s / "store.json").is_file()]


def ensure_store(store_root: str | Path, splits: list[str], data_version: str | None = None) -> Path:
    """Make `store_root/<split>` usable on this host, pulling the store with DVC if needed.

    A store that is present is used as it is, unless its `<store>.dvc` records another data
    version than the one asked for (the checkout here lags behind). A missing one is pulled
    from the DVC remote through `<store>.dvc` when that file records the version asked for.
    Every other case is a `UserError` naming the path: nothing is trained on the wrong data.
    """
    from sslflow.tasks.pipeline.decisions import store_data_version

    root = Path(store_root)
    recorded = store_data_version(root)
    if data_version and recorded and recorded != data_version:
        raise UserError(f"{root}.dvc on {socket.gethostname()} records data version {recorded}, the train flow "
                        f"asked for {data_version}: update this checkout (git pull, dvc pull) or share the store")
    missing = _missing_splits(root, splits)
    if not missing:
        return root
    if recorded is None:
        raise UserError(f"image store {root / missing[0]} is not on {socket.gethostname()} and there is no "
                        f"{root}.dvc to pull it with: mount the store at the same path as on the host of the "
                        "train flow, or track it with DVC (docs/scaling-gpu-pool.md)")
    dvc_pull(Path(f"{root}.dvc"))
    missing = _missing_splits(root, splits)
    if missing:
        raise UserError(f"dvc pull {root}.dvc did not produce {root / missing[0]}/store.json")
    return root


def dvc_pull(dvc_file: Path) -> None:
    """`dvc pull <dvc_file>` in the DVC repo that holds it (from its default remote)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from sslflow.tasks.data.versioning import find_repo_root

    repo_root = find_repo_root(dvc_file.parent)
    if repo_root is None:
        raise UserError(f"{dvc_file} is not inside a DVC repo: cannot pull the store it names")
    _logger().info("store not on this host: dvc pull %s", dvc_file)
    try:
        with Repo(str(repo_root)) as repo:
            repo.pull(targets=[str(dvc_file)])
    except DvcException as e:
        raise UserError(f"dvc pull {dvc_file} failed: {e}".replace("\n", " ")) from None


def require_files(paths: list[str], what: str) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"{what} {missing[0]} is not on {socket.gethostname()}: share it at the same path "
                        "or keep the checkout at the same path on every host")


# ------------------------------------------------------------------------------------ MLflow
def attach_mlflow_run(tracking_uri: str, run_id: str, flush_every: int, timeout_s: float,
                      tags: dict[str, str]) -> Any:
    """A metric callback into an existing, still RUNNING MLflow run (the train flow's).

    Only `MlflowClient` calls: no fluent `start_run`, so nothing here can end the run.
    """
    from mlflow import MlflowClient
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    from sslflow.tasks.tracking.track import MLflowCallback, check_tracking_server

    check_tracking_server(tracking_uri, timeout_s)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        status = client.get_run(run_id).info.status
    except MlflowException as e:
        raise UserError(f"MLflow run {run_id} not found on {tracking_uri}: {e.message}".replace("\n", " ")) from None
    if status != "RUNNING":
        raise UserError(f"MLflow run {run_id} on {tracking_uri} is {status}: pretraining logs into a run the "
                        "train flow holds open")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return MLflowCallback(run_id, client, flush_every=flush_every)


def device_tags(params: Any) -> dict[str, str]:
    """Where the pretraining really runs (the train flow tagged its own host's device)."""
    import torch

    from sslflow.ssl_models.train import resolve_device

    tags = {"pretrain.host": socket.gethostname()}
    try:
        device = resolve_device(params.device)
    except ValueError:
        return tags  # the trainer raises the same error, in full
    tags["device"] = str(device)
    if device.type == "cuda":
        tags["gpu"] = torch.cuda.get_device_name(device)
    return tags


# ------------------------------------------------------------------------------------ the flow
@flow(name="pretrain", log_prints=True)
def pretrain_flow(store: str, run_dir: str, params_files: list[str] | None = None,
                  overrides: list[str] | None = None, host_overrides: list[str] | None = None,
                  split: str = "train", eval_splits: list[str] | None = None,
                  tracking_uri: str | None = None, mlflow_run_id: str | None = None,
                  data_version: str | None = None, gpu_limit: str | None = None,
                  progress_bar: bool = False) -> dict[str, Any]:
    """Pretrain on `store/split` into `run_dir` (online kNN on `eval_splits` of the store).

    `host_overrides` are applied after `overrides`: the deployment sets them for its hosts
    (`device=cuda`), the caller's `overrides` describe the experiment, so they never clash.
    `gpu_limit` None = `pipeline.gpu_limit`; the slot is held while training.
    With `mlflow_run_id` the step and epoch metrics go to that run on `tracking_uri`.
    """
    from prefect.runtime import flow_run

    from sslflow.core.settings import load_params
    from sslflow.tasks.pipeline.decisions import load_pipeline_params, partition_overrides
    from sslflow.tasks.pipeline.steps import pretrain_step
    from sslflow.tasks.tracking.track import load_tracking_params, resolve_tracking_uri

    logger = get_run_logger()
    files = [str(f) for f in params_files or []]
    require_files(files, "params file")
    last = files[-1] if files else None
    ov = partition_overrides([*(overrides or []), *(host_overrides or [])])
    params = load_params(files, ov["engine"])
    pp = load_pipeline_params(last, ov["pipeline"]).pipeline
    tp = load_tracking_params(last, ov["tracking"])
    evals = list(DEFAULT_EVAL_SPLITS if eval_splits is None else eval_splits)
    if evals and len(evals) != 2:
        raise UserError(f"eval_splits must name two splits (kNN train, test) or none; got {evals}")
    root = ensure_store(store, [split, *evals], data_version)

    callbacks = []
    if mlflow_run_id:
        uri = tracking_uri or resolve_tracking_uri(tp.tracking)
        tags = {**device_tags(params), "pretrain.flow_run_id": str(flow_run.id)}
        callbacks.append(attach_mlflow_run(uri, mlflow_run_id, tp.tracking.flush_every,
                                           tp.tracking.preflight_timeout_s, tags))
        logger.info("logging pretraining metrics to MLflow run %s on %s", mlflow_run_id, uri)
    try:
        result = pretrain_step(root / split, run_dir, params,
                               eval_train=root / evals[0] if evals else None,
                               eval_test=root / evals[1] if evals else None, callbacks=callbacks,
                               progress_bar=progress_bar, gpu_limit=pp.gpu_limit if gpu_limit is None else gpu_limit)
    except BaseException:
        for cb in callbacks:  # keep the metrics so far, and the original error
            with suppress(Exception):
                cb.flush()
        raise
    for cb in callbacks:  # the train flow reads the run next: everything must be in it
        cb.flush()
    return {"run_dir": str(run_dir), "metrics": dict(result.metrics), "host": socket.gethostname()}


# ------------------------------------------------------------------------------------ caller side
@dataclass(frozen=True)
class RemotePretrain:
    """What the train flow needs from a remote pretraining (the `PretrainResult` fields it uses)."""

    run_dir: Path
    metrics: dict[str, float]
    flow_run_id: str
    flow_run_name: str


def remote_parameters(store_root: Path, run_dir: Path, params_files: list[str], overrides: list[str], *,
                      tracking_uri: str, mlflow_run_id: str, data_version: str | None,
                      progress_bar: bool = False) -> dict[str, Any]:
    """The `pretrain` flow's parameters, paths made absolute (the worker has another cwd).

    `host_overrides` and `gpu_limit` are left out on purpose: the deployment's values stand.
    """
    return {"store": str(store_root.absolute()), "run_dir": str(run_dir.absolute()),
            "params_files": [str(Path(f).absolute()) for f in params_files], "overrides": list(overrides),
            "split": "train", "eval_splits": list(DEFAULT_EVAL_SPLITS), "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id, "data_version": data_version, "progress_bar": progress_bar}


def run_remote_pretrain(deployment: str, parameters: dict[str, Any], poll_s: float = 1.0) -> RemotePretrain:
    """Run `deployment` as a subflow run of the current flow run, wait for its final state,
    and read the run directory it wrote; `RemotePretrainFailed` names the deployment and the
    flow run when it did not complete."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    logger = get_run_logger()
    try:
        child = run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=True)
    except ObjectNotFound:
        raise UserError(f"Prefect deployment {deployment!r} does not exist on this server: create it with "
                        "`sslflow deploy --gpu` (or prefect deploy), or set pipeline.pretrain_deployment=''") from None
    logger.info("pretraining on deployment %s: flow run %s (%s)", deployment, child.name, child.id)
    final = wait_for_flow_run(child.id, deployment, poll_s)
    state = final.state
    if state is None or not state.is_completed():
        kind = state.type.value if state is not None else "UNKNOWN"
        raise RemotePretrainFailed(
            f"pretraining on deployment {deployment!r} failed: flow run {final.name!r} ({final.id}) ended "
            f"{kind} ({state.name if state else '-'}): {(state.message if state else '') or 'no message'}")
    return read_remote_run(Path(parameters["run_dir"]), final, deployment)


def wait_for_flow_run(flow_run_id: Any, deployment: str, poll_s: float) -> Any:
    """Poll until the flow run is final. A run nobody picks up gets one warning naming its pool;
    if this flow stops waiting (cancelled, interrupted), the remote run is cancelled too."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    logger = get_run_logger()
    start, warned = time.monotonic(), False
    with get_client(sync_client=True) as client:
        try:
            while True:
                fr = client.read_flow_run(flow_run_id)
                if fr.state is not None and fr.state.is_final():
                    return fr
                waited = time.monotonic() - start
                if not warned and waited > STALL_WARNING_S and fr.state is not None and \
                        (fr.state.is_scheduled() or fr.state.is_pending()):
                    logger.warning("flow run %s of %s is still %s after %.0f s: is a worker polling pool %r?",
                                   fr.name, deployment, fr.state.name, waited, fr.work_pool_name)
                    warned = True
                time.sleep(poll_s)
        except BaseException:
            with suppress(Exception):
                client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
            raise


def read_remote_run(run_dir: Path, fr: Any, deployment: str) -> RemotePretrain:
    """The metrics the remote run wrote; a clear error when its run directory is not shared."""
    needed = [run_dir / "metrics.json", run_dir / "encoder.pt"]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        where = fr.infrastructure_pid or "the worker's host"
        raise RemotePretrainFailed(
            f"flow run {fr.name!r} ({fr.id}) of {deployment!r} completed on {where} but {missing[0]} is not "
            "visible here: the run directory (pipeline.runs) must be on a filesystem both hosts mount at "
            "the same path")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return RemotePretrain(run_dir, metrics, str(fr.id), fr.name)
