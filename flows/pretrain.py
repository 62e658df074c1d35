"""The `pretrain` flow: pretraining alone, for a worker on a GPU host (deployment `pretrain/gpu`).

    # on the GPU host, in a checkout:   prefect worker start --pool sslflow-gpu
    # anywhere:                         sslflow deploy --gpu
    train_flow(..., pretrain_deployment="pretrain/gpu")   # or pipeline.pretrain_deployment

The `train` flow keeps everything else (validation, evaluation, logging, registration,
promotion) and its MLflow run: it calls `sslflow.flows.remote.run_remote_pretrain`, which
starts this flow with `run_deployment` as a subflow run, waits for it, and reads the run
directory it wrote.

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

import socket
from contextlib import suppress
from typing import Any

from prefect import flow, get_run_logger

from sslflow.core.errors import UserError

DEFAULT_EVAL_SPLITS = ("train", "test")


@flow(name="pretrain", log_prints=True)
def pretrain_flow(store: str, run_dir: str, params_files: list[str] | None = None,
                  overrides: list[str] | None = None, host_overrides: list[str] | None = None,
                  split: str = "train", eval_splits: list[str] | None = None,
                  tracking_uri: str | None = None, mlflow_run_id: str | None = None,
                  data_version: str | None = None, gpu_limit: str | None = None,
                  progress_bar: bool = False, project: str | None = None) -> dict[str, Any]:
    """Pretrain on `store/split` into `run_dir` (online kNN on `eval_splits` of the store).

    `host_overrides` are applied after `overrides`: the deployment sets them for its hosts
    (`device=cuda`), the caller's `overrides` describe the experiment, so they never clash.
    `gpu_limit` None = `pipeline.gpu_limit`; the slot is held while training.
    With `mlflow_run_id` the step and epoch metrics go to that run on `tracking_uri`.
    """
    from prefect.runtime import flow_run

    from sslflow.core.settings import load_settings
    from sslflow.tasks.data.availability import ensure_store, require_files
    from sslflow.tasks.pipeline.steps import pretrain_step
    from sslflow.tasks.tracking.backend import resolve_tracking_uri
    from sslflow.tasks.tracking.run import attach_mlflow_run, device_tags

    logger = get_run_logger()
    files = None if params_files is None else [str(f) for f in params_files]
    require_files(files or [], "settings file")
    settings = load_settings(files, [*(overrides or []), *(host_overrides or [])], project=project)
    pp = settings.pipeline
    evals = list(DEFAULT_EVAL_SPLITS if eval_splits is None else eval_splits)
    if evals and len(evals) != 2:
        raise UserError(f"eval_splits must name two splits (kNN train, test) or none; got {evals}")
    root = ensure_store(store, [split, *evals], data_version)

    callbacks = []
    if mlflow_run_id:
        uri = tracking_uri or resolve_tracking_uri(settings)
        tags = {**device_tags(settings), "pretrain.flow_run_id": str(flow_run.id)}
        callbacks.append(attach_mlflow_run(uri, mlflow_run_id, settings.tracking.flush_every,
                                           settings.tracking.preflight_timeout_s, tags))
        logger.info("logging pretraining metrics to MLflow run %s on %s", mlflow_run_id, uri)
    from sslflow.flows.train import resumable_run

    resume = resumable_run(run_dir)  # a retried crashed run continues its checkpoint
    if resume:
        logger.info("resuming %s from its checkpoint (a retry of a run that did not finish)", run_dir)
    try:
        result = pretrain_step(root / split, run_dir, settings, resume=resume,
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
