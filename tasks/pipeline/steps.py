"""The pipeline steps as Prefect tasks: thin wrappers around the plain functions in `tasks/`.

Each wrapper only adds Prefect's logger, retries and a task name; without Prefect, call
`sslflow.tasks.data.ingest.ingest`, `...data.validate.validate_split`,
`...training.pretrain.pretrain`, `...training.evaluate.evaluate`,
`...tracking.report.log_training` and `...tracking.registry.register_and_promote` directly:
they are what the tests test.

I/O steps (ingest, MLflow logging) retry with exponential backoff (`pipeline.retries`,
`pipeline.retry_delay_s`: the flows apply them with `with_retries`), but never on bad input
(`UserError`, or an engine error such as `StoreError`): it does not get better. Compute steps
(pretrain, evaluate) and registration + promotion (not idempotent: a retry would register a
second version and move aliases again) do not retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sslflow.core.errors import UserError
from sslflow.ssl_models.errors import EngineError
from sslflow.tasks.data.splits import require_images
from sslflow.tasks.pipeline.decisions import retry_delays


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry unless the failure is the user's to fix."""
    try:
        state.result()
    except (UserError, EngineError):
        return False
    except BaseException:
        return True
    return True


def with_retries(t: Any, retries: int, first_delay_s: float) -> Any:
    """`t` with `retries` retries after first_delay_s, 2x, 4x, ... seconds."""
    if retries <= 0:
        return t.with_options(retries=0)
    return t.with_options(retries=retries, retry_delay_seconds=retry_delays(retries, first_delay_s))


@task(name="ingest", cache_policy=NO_CACHE, retry_condition_fn=_worth_retrying)
def ingest_step(source: str, store: str | Path, split: str, settings: Any, reports_dir: str | Path) -> Any:
    from sslflow.tasks.data.ingest import ingest

    logger = get_run_logger()
    summary = ingest(str(source), store, split, settings=settings, reports_dir=reports_dir,
                     log=lambda msg: logger.info("ingest %s: %s", split, msg))
    logger.info("ingest %s from %s: %s, %d new images, %d in the split, data version %s", split, source,
                summary.status, summary.new_images, summary.total_in_store, summary.data_version)
    return summary


@task(name="validate", cache_policy=NO_CACHE)
def validate_step(split_dir: str | Path, settings: Any, reports_dir: str | Path) -> dict[str, Any]:
    """Re-check a published split: its shard files (`StoreDamaged`), then the GX suites
    (`ValidationFailed`); either stops the flow in one line."""
    from sslflow.ssl_models.store import ImageStore
    from sslflow.tasks.data.decode import DecodeOptions
    from sslflow.tasks.data.integrity import require_sound
    from sslflow.tasks.data.validate import ValidationFailed, validate_split

    split_dir = Path(split_dir)
    n = require_images(split_dir)
    require_sound(split_dir, settings.validate.checksums)
    c = settings.ingest
    classes = list(c.classes) or (None if settings.validate.allow_new_classes else ImageStore.open(split_dir).classes)
    result = validate_split(split_dir, limits=DecodeOptions.of(c),
                            cfg=settings.validate, classes=classes, reports_dir=Path(reports_dir))
    if not result.success:
        raise ValidationFailed(result, prefix=f"{split_dir}: ")
    get_run_logger().info("validated %s: %d images, report %s", split_dir, n, result.report)
    return {"images": n, **result.to_dict()}


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_step(data: str | Path, out: str | Path, settings: Any, *, eval_train: str | Path | None = None,
                  eval_test: str | Path | None = None, callbacks: Sequence[Any] = (),
                  progress_bar: bool = False, gpu_limit: str = "", resume: bool = False) -> Any:
    """`sslflow.tasks.training.pretrain.pretrain`; with `gpu_limit` it holds one slot of that global
    concurrency limit while it trains (one slot per GPU: `prefect gcl create gpu --limit N`).
    `resume`: continue the checkpoint in `out` (the engine refuses other settings)."""
    from contextlib import nullcontext

    from sslflow.tasks.tracking.run import backbone_label
    from sslflow.tasks.training.pretrain import pretrain

    logger = get_run_logger()
    p = settings.pretrain
    logger.info("pretraining %s / %s for %d epochs on %s into %s", p.method, backbone_label(settings),
                p.epochs, data, out)
    if gpu_limit:
        from prefect.concurrency.sync import concurrency

        slot = concurrency(gpu_limit, occupy=1, strict=True)
    else:
        slot = nullcontext()
    with slot:
        result = pretrain(data, out, settings, eval_train=eval_train, eval_test=eval_test,
                          callbacks=list(callbacks), progress_bar=progress_bar, resume=resume)
    logger.info("pretraining done: %s", {k: round(v, 4) if isinstance(v, float) else v
                                         for k, v in result.metrics.items()})
    return result


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_step(run_dir: str | Path, train: str | Path, test: str | Path, settings: Any,
                  protocols: Sequence[str]) -> Any:
    from sslflow.tasks.training.evaluate import evaluate

    report = evaluate(run_dir, train, test, settings, list(protocols))
    get_run_logger().info("evaluation (%s): %s", ", ".join(protocols),
                          {k: round(float(v), 2) for k, v in report.metrics.items()})
    return report


@task(name="log", cache_policy=NO_CACHE, retry_condition_fn=_worth_retrying)
def log_step(run: Any, run_dir: str | Path, settings: Any, report: Any, *, train_store: str | Path,
             test_store: str | Path, gx_report: Any = None) -> dict[str, Any]:
    from sslflow.tasks.tracking.report import log_training

    logged = log_training(run, run_dir, settings, report, train_store=train_store, test_store=test_store,
                          gx_report=gx_report)
    get_run_logger().info("logged %d metrics and the artifacts to MLflow run %s", len(logged), run.run_id)
    return logged


@task(name="register", cache_policy=NO_CACHE)
def register_step(run: Any, run_dir: str | Path, report: Any, settings: Any, *, train_images: int,
                  data_version: str | None, test_store: str | Path | None = None,
                  validation_ok: bool = True) -> Any:
    """`register_and_promote`: log the encoder as an MLflow model, register it as a new version of
    `tracking.model_name` tagged with its metrics and what it was trained on (`data.train_images`,
    `data.version`: `retrain` compares with the champion's), then the promotion gate."""
    from sslflow.tasks.tracking.registry import TAG_DATA_VERSION, TAG_TRAIN_IMAGES, register_and_promote

    decision = register_and_promote(run, run_dir, report, settings, validation_ok=validation_ok, test_store=test_store,
                                    data={TAG_TRAIN_IMAGES: train_images, TAG_DATA_VERSION: data_version})
    get_run_logger().info("registered %s version %s; promotion gate: %s (%s)", decision.model_name,
                          decision.version, decision.decision, decision.reason)
    return decision
