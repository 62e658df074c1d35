"""The caller side of pretraining on a GPU work pool: run the `pretrain` deployment as a subflow
run of the `train` flow, wait for it, read what it wrote (see `sslflow.flows.pretrain`)."""

from __future__ import annotations

import json
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from sslflow.core.errors import RemotePretrainFailed, UserError
from sslflow.flows.pretrain import DEFAULT_EVAL_SPLITS

STALL_WARNING_S = 120.0  # a remote run still Scheduled/Pending this long: probably no worker on its pool


@dataclass(frozen=True)
class RemotePretrain:
    """What the train flow needs from a remote pretraining (the `PretrainResult` fields it uses)."""

    run_dir: Path
    metrics: dict[str, float]
    flow_run_id: str
    flow_run_name: str


def remote_parameters(store_root: Path, run_dir: Path, params_files: list[str] | None, overrides: list[str], *,
                      tracking_uri: str, mlflow_run_id: str, data_version: str | None,
                      progress_bar: bool = False, project: str | None = None) -> dict[str, Any]:
    """The `pretrain` flow's parameters, paths made absolute (the worker has another cwd).

    `host_overrides` and `gpu_limit` are left out on purpose: the deployment's values stand.
    """
    return {"store": str(store_root.absolute()), "run_dir": str(run_dir.absolute()),
            "params_files": None if params_files is None else [str(Path(f).absolute()) for f in params_files],
            "overrides": list(overrides),
            "split": "train", "eval_splits": list(DEFAULT_EVAL_SPLITS), "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id, "data_version": data_version, "progress_bar": progress_bar,
            **({"project": project} if project else {})}


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
