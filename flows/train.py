"""The `train` flow: validate the store -> pretrain -> evaluate -> log -> register -> promotion gate.

    from sslflow.flows.train import train_flow
    summary = train_flow(store="data/store")     # the project's params.yaml
    summary = train_flow(params_files=["params/profiles/cifar10-byol.yaml"], overrides=["pretrain.epochs=10"])

Every step is a task of `sslflow.tasks.pipeline.steps` around a plain function of `sslflow.tasks`. The MLflow
backend is checked before anything else (an unreachable server fails in one line naming
the URI). The registered version is tagged with the number of train images and the data
version it was trained on; `retrain` compares the champion's with the store's.

With `pretrain_deployment` (or `pipeline.pretrain_deployment`), e.g. `pretrain/gpu`, the
pretraining runs on that deployment's work pool (a GPU host) as a subflow run
(`flows/pretrain.py`), logging into this flow's MLflow run; everything else stays here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact


@flow(name="train", log_prints=True)
def train_flow(store: str | None = None, params_files: list[str] | None = None,
               overrides: list[str] | None = None, run_name: str | None = None,
               runs_dir: str | None = None, reports_dir: str | None = None,
               protocols: list[str] | None = None, data_version: str | None = None,
               progress_bar: bool = False, pretrain_deployment: str | None = None,
               project: str | None = None) -> dict[str, Any]:
    """Pretrain, evaluate and register an encoder on the current store.

    Settings: `params_files` in order over the defaults (None = the project's params.yaml),
    then `overrides` (`--set` style `key=value` strings of any section); loaded once here.
    `protocols` None = `eval.protocols` (add `finetune` there to fine-tune too).
    `pretrain_deployment` None = `pipeline.pretrain_deployment`; "" = pretrain in this process.
    """
    from sslflow.core.project import run_name as checked_run_name
    from sslflow.core.secrets import redact_uri
    from sslflow.core.settings import load_settings
    from sslflow.tasks.data.versioning import current_data_version
    from sslflow.tasks.pipeline.decisions import markdown_report
    from sslflow.tasks.pipeline.steps import (
        evaluate_step,
        log_step,
        pretrain_step,
        register_step,
        validate_step,
        with_retries,
    )
    from sslflow.tasks.tracking.backend import check_tracking_server, resolve_tracking_uri
    from sslflow.tasks.tracking.run import tracking_run

    logger = get_run_logger()
    settings = load_settings(params_files, overrides or (), project=project)
    if protocols:  # checked like the setting: the promotion metric's protocol must be among them
        settings = settings.updated([f"eval.protocols=[{','.join(protocols)}]"])
    pp = settings.pipeline
    protocols = list(settings.eval.protocols)
    store_root = settings.path(store or pp.store)
    reports = settings.path(reports_dir or pp.reports)
    run_dir = settings.path(runs_dir or pp.runs) / checked_run_name(run_name)
    train, test = store_root / "train", store_root / "test"

    uri = resolve_tracking_uri(settings)
    check_tracking_server(uri, settings.tracking.preflight_timeout_s)  # before any work: one line naming the URI

    checked = {split.name: validate_step(split, settings, reports) for split in (train, test)}
    train_images = checked["train"]["images"]
    data_version = data_version or current_data_version(store_root)  # never "unknown" for a store that exists
    io = dict(retries=pp.retries, first_delay_s=pp.retry_delay_s)

    with tracking_run(settings, run_name=run_dir.name, data_version=data_version,
                      tags={"train_images": train_images, "test_images": checked["test"]["images"]},
                      check=False) as run:
        logger.info("MLflow run %s on %s", run.run_id, redact_uri(uri))
        remote = pp.pretrain_deployment if pretrain_deployment is None else pretrain_deployment
        if remote:
            result = _pretrain_remotely(remote, store_root, run_dir, params_files, list(overrides or []), run,
                                        data_version, progress_bar, str(settings.project))
        else:
            resume = resumable_run(run_dir)
            if resume:
                logger.info("resuming %s from its checkpoint (a retry of a run that did not finish)", run_dir)
            result = pretrain_step(train, run_dir, settings, eval_train=train, eval_test=test,
                                   callbacks=[run.callback()], progress_bar=progress_bar, gpu_limit=pp.gpu_limit,
                                   resume=resume)
        report = evaluate_step(run_dir, train, test, settings, protocols)
        gx = [Path(c["report"]) for c in checked.values() if c.get("report")]
        with_retries(log_step, **io)(run, run_dir, settings, report, train_store=train, test_store=test,
                                     gx_report=[p for p in gx if p.exists()] or None)
        decision = register_step(run, run_dir, report, settings, train_images=train_images,
                                 data_version=data_version, test_store=test)

    metrics = {**{f"eval/{k}": v for k, v in report.metrics.items()},
               **{f"pretrain/{k}": result.metrics[k] for k in ("knn_top1", "knn_top1_at_init", "final_loss")
                  if k in result.metrics}}
    create_markdown_artifact(
        markdown_report(f"train: {run_dir.name}", metrics, decision,
                        {"run directory": run_dir, "MLflow": f"{redact_uri(uri)} run {run.run_id}",
                         "train images": train_images, "data version": data_version or "unknown"}),
        key="train-report", description="metrics and promotion decision of the latest train run")
    return {"run_dir": str(run_dir), "metrics": dict(report.metrics), "pretrain_metrics": dict(result.metrics),
            "protocols": protocols, "mlflow_run_id": run.run_id, "tracking_uri": uri,
            "model_name": decision.model_name, "model_version": decision.version,
            "decision": decision.decision, "reason": decision.reason, "train_images": train_images,
            "data_version": data_version}


def resumable_run(run_dir: Path) -> bool:
    """A named run retried after a crash (its process killed with the worker, an outage) holds a
    checkpoint: it continues from there instead of failing with "already holds a run". The
    engine refuses the checkpoint of other settings or data (a one-line `RunStateError`, exit 2)."""
    from sslflow.ssl_models.train import CHECKPOINT

    return (Path(run_dir) / CHECKPOINT).is_file()


def _pretrain_remotely(deployment: str, store_root: Path, run_dir: Path, files: list[str] | None, overrides: list[str],
                       run: Any, data_version: str | None, progress_bar: bool, project: str) -> Any:
    """Pretraining as a run of `deployment` (a subflow run of this one) into this flow's MLflow
    run; the run records which deployment and flow run did it."""
    from sslflow.flows.remote import remote_parameters, run_remote_pretrain

    params = remote_parameters(store_root, run_dir, files, overrides, tracking_uri=run.tracking_uri,
                               mlflow_run_id=run.run_id, data_version=data_version, progress_bar=progress_bar,
                               project=project)
    result = run_remote_pretrain(deployment, params)
    run.set_tags({"pretrain.deployment": deployment, "pretrain.flow_run": result.flow_run_name})
    return result
