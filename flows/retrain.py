"""The `retrain` flow (the scheduled one): ingest `data/incoming` -> validate -> train if enough is new.

    from sslflow.flows.retrain import retrain_flow
    retrain_flow()                 # params/pipeline.yaml: min_new_images, force, lock, ...
    retrain_flow(force=True)

It trains (the `train` flow, as a subflow) when at least `pipeline.min_new_images` train
images arrived since the champion was trained (its `data.train_images` version tag), or when
forced; otherwise it ends in a Completed state named `NothingToDo` with the reason.

Two overlapping runs never both train: the decision and the training run inside one slot of
the Prefect global concurrency limit `pipeline.lock` (limit 1, created on first use). A run
that cannot get the slot within `pipeline.lock_timeout_s` ends in a Completed state named
`Skipped`; one that gets it after another finished decides again, against the new champion.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

NOTHING_TO_DO, SKIPPED = "NothingToDo", "Skipped"


def ensure_limit(name: str, limit: int = 1) -> None:
    """Create global concurrency limit `name` with `limit` slots unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        with suppress(ObjectAlreadyExists):  # another run created it meanwhile
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


@flow(name="retrain", log_prints=True)
def retrain_flow(incoming: str | None = None, store: str | None = None, params_file: str | None = None,
                 overrides: list[str] | None = None, force: bool | None = None,
                 min_new_images: int | None = None, run_name: str | None = None,
                 runs_dir: str | None = None, reports_dir: str | None = None) -> Any:
    """Ingest `incoming` into the train split, validate it, and train if enough is new.
    None = the value in `params/pipeline.yaml` (section `pipeline`)."""
    from prefect.concurrency.sync import concurrency

    from sslflow.flows.train import train_flow
    from sslflow.tasks.data.ingest import load_params as load_ingest_params
    from sslflow.tasks.pipeline.decisions import (
        champion_version,
        load_pipeline_params,
        markdown_report,
        partition_overrides,
        retrain_decision,
        trained_on,
    )
    from sslflow.tasks.pipeline.steps import ingest_step, validate_step, with_retries
    from sslflow.tasks.tracking.track import check_tracking_server, load_tracking_params, resolve_tracking_uri

    logger = get_run_logger()
    overrides = list(overrides or [])
    ov = partition_overrides(overrides)
    pp = load_pipeline_params(params_file, ov["pipeline"]).pipeline
    tp = load_tracking_params(params_file, ov["tracking"])
    data_params = load_ingest_params(params_file, ov["data"])
    force = pp.force if force is None else bool(force)
    min_new = pp.min_new_images if min_new_images is None else int(min_new_images)
    incoming_dir, store_root = Path(incoming or pp.incoming), Path(store or pp.store)
    reports = Path(reports_dir or pp.reports)
    check_tracking_server(resolve_tracking_uri(tp.tracking), tp.tracking.preflight_timeout_s)

    data_version = None
    if incoming_dir.is_dir() and any(incoming_dir.iterdir()):
        summary = with_retries(ingest_step, pp.retries, pp.retry_delay_s)(
            str(incoming_dir), store_root, "train", data_params, reports)
        data_version = summary.data_version
    else:
        logger.info("%s does not exist or is empty: no new images to ingest", incoming_dir)
    if (store_root / "train" / "store.json").is_file():
        validate_step(store_root / "train", data_params, reports)

    def finish(name: str, reason: str, info: dict[str, Any]) -> Any:
        logger.info(reason)
        create_markdown_artifact(markdown_report(f"retrain: {name}", {}, None, {"reason": reason, **info}),
                                 key="retrain-report", description="the latest retrain decision")
        return Completed(name=name, message=reason, data={"trained": False, "state": name, "reason": reason, **info})

    ensure_limit(pp.lock, 1)
    slot = concurrency(pp.lock, occupy=1, timeout_seconds=pp.lock_timeout_s, strict=True)
    try:
        slot.__enter__()
    except TimeoutError:
        return finish(SKIPPED, f"skipped: another retrain run holds the {pp.lock!r} slot "
                               f"(waited {pp.lock_timeout_s:g} s)", {})
    try:
        from sslflow.tasks.pipeline.decisions import train_image_count

        champ = champion_version(tp)
        decision = retrain_decision(train_image_count(store_root), trained_on(champ), min_new, force=force,
                                    has_champion=champ is not None)
        info = {**decision.to_dict(), "champion_version": getattr(champ, "version", None)}
        if not decision.train:
            return finish(NOTHING_TO_DO, decision.reason, info)
        logger.info("training: %s", decision.reason)
        files = [params_file] if params_file else []
        result = train_flow(store=str(store_root), params_files=files, overrides=overrides, run_name=run_name,
                            runs_dir=runs_dir, reports_dir=str(reports), data_version=data_version)
        return {"trained": True, "state": "Trained", "reason": decision.reason, **info, "train": result}
    finally:
        slot.__exit__(None, None, None)
