"""The `tune` flow: validate the store -> Optuna study -> best params file -> train the best.

    from sslflow.flows.tune import tune_flow
    tune_flow(trials=20)                                  # on the project's params.yaml
    tune_flow(trials=20, params_files=["params/profiles/cifar10-moco.yaml"])

The study is the `tune` task around `sslflow.tasks.tuning.study.tune` (see there for storage, heartbeats,
resumption and pruning). With `train_best` (default `tune.train_best`) the best
configuration, written to `tune.output`, goes to the `train` flow as a subflow with the full
number of epochs: evaluation, registration and the promotion gate decide whether it becomes
the champion. Extra workers join the same study with `sslflow tune --no-train --storage URL
--study NAME`, or with more runs of the `tune` deployment with `train_best=false`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE


@task(name="tune", cache_policy=NO_CACHE)
def tune_step(store: str, settings: Any, gpu_limit: str = "", **kwargs: Any) -> Any:
    """`sslflow.tasks.tuning.study.tune`; with `gpu_limit` the study holds one slot of that global
    concurrency limit (one GPU) while its trials run one after the other."""
    from contextlib import nullcontext

    from sslflow.tasks.tuning.study import tune

    logger = get_run_logger()
    if gpu_limit:
        from prefect.concurrency.sync import concurrency

        slot = concurrency(gpu_limit, occupy=1, strict=True)
    else:
        slot = nullcontext()
    with slot:
        return tune(store, settings, log=logger.info, **kwargs)


@flow(name="tune", log_prints=True)
def tune_flow(trials: int | None = None, study: str | None = None, storage: str | None = None,
              timeout_s: float | None = None, params_files: list[str] | None = None,
              overrides: list[str] | None = None, train_best: bool | None = None,
              store: str | None = None, output: str | None = None, project: str | None = None) -> dict[str, Any]:
    """Search `tune.space` for `trials` finished trials, then (optionally) train the best.

    Settings: `params_files` (None = the project's params.yaml) then `overrides`; an argument
    left None takes its `tune.*` / `pipeline.*` setting."""
    from sslflow.core.project import PARAMS_FILE
    from sslflow.core.settings import load_settings
    from sslflow.flows.train import train_flow
    from sslflow.tasks.pipeline.decisions import markdown_report
    from sslflow.tasks.pipeline.steps import validate_step

    overrides = list(overrides or [])
    settings = load_settings(params_files, overrides, project=project)
    pp, cfg = settings.pipeline, settings.tune
    store_root = settings.path(store or pp.store)
    for split in ("train", "test"):
        validate_step(store_root / split, settings, settings.path(pp.reports))
    base_file = params_files[-1] if params_files else settings.project / PARAMS_FILE

    result = tune_step(str(store_root), settings, gpu_limit=pp.gpu_limit, trials=trials, study=study,
                       storage=storage, timeout_s=timeout_s, output=output, base_file=base_file)
    summary: dict[str, Any] = {"tune": result.to_dict(), "trained": False}
    train_best = cfg.train_best if train_best is None else train_best
    trained: dict[str, Any] = {}
    if train_best and result.output:
        tuned = {key.split("[", 1)[0] for key in result.best_params}  # an override must not undo what was tuned
        kept = [o for o in overrides if o.split("=", 1)[0].strip() not in tuned]
        trained = train_flow(store=str(store_root), params_files=[*(params_files or []), result.output],
                             overrides=kept, run_name=f"tune-{result.study}-best", project=str(settings.project))
        summary.update(trained=True, train=trained)
        _link_best_run(result, trained)
    elif train_best:
        get_run_logger().warning("tune: no trial completed, so there is no best configuration to train")
    metrics = {"best kNN top-1 (budget)": result.best_value if result.best_value is not None else float("nan"),
               **{f"eval/{k}": v for k, v in trained.get("metrics", {}).items()}}
    details = {"study": f"{result.study} on {result.storage}", "best trial": result.best_trial,
               "best params": result.best_params, "params file": result.output or "none (no complete trial)",
               "trials": f"{result.complete} complete, {result.pruned} pruned, {result.failed} failed",
               "MLflow parent run": result.mlflow_run_id,
               "training of the best": (f"{trained['model_name']} version {trained['model_version']}: "
                                        f"{trained['decision']} ({trained['reason']})") if trained else "not run"}
    create_markdown_artifact(markdown_report(f"tune: {result.study}", metrics, None, details),
                             key="tune-report", description="best configuration of the latest study")
    return summary


def _link_best_run(result: Any, trained: dict[str, Any]) -> None:
    """Tag the study's parent run with the training run of its best configuration."""
    from mlflow import MlflowClient

    if not result.mlflow_run_id:
        return
    client = MlflowClient(tracking_uri=result.tracking_uri)
    client.set_tag(result.mlflow_run_id, "best.train_run_id", trained["mlflow_run_id"])
    client.set_tag(result.mlflow_run_id, "best.model_version", str(trained["model_version"]))
