"""The `retrain` flow (the scheduled one): ingest `data/incoming` -> validate -> train if enough is new.

    from sslflow.flows.retrain import retrain_flow
    retrain_flow()                 # the project's settings: pipeline.min_new_images, force, lock, ...
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
def retrain_flow(incoming: str | None = None, store: str | None = None, params_files: list[str] | None = None,
                 overrides: list[str] | None = None, force: bool | None = None,
                 min_new_images: int | None = None, run_name: str | None = None,
                 runs_dir: str | None = None, reports_dir: str | None = None, project: str | None = None) -> Any:
    """Ingest `incoming` into the train split, validate it, and train if enough is new.

    Settings: `params_files` (None = the project's params.yaml) then `overrides`; an argument
    left None takes its `pipeline.*` setting."""
    from prefect.concurrency.sync import concurrency

    from sslflow.core.settings import load_settings
    from sslflow.flows.train import train_flow
    from sslflow.tasks.data.splits import train_image_count
    from sslflow.tasks.pipeline.decisions import champion_version, markdown_report, retrain_decision, trained_on
    from sslflow.tasks.pipeline.steps import ingest_step, validate_step, with_retries
    from sslflow.tasks.tracking.backend import check_tracking_server, resolve_tracking_uri

    logger = get_run_logger()
    overrides = list(overrides or [])
    settings = load_settings(params_files, overrides, project=project)
    pp = settings.pipeline
    force = pp.force if force is None else bool(force)
    min_new = pp.min_new_images if min_new_images is None else int(min_new_images)
    incoming_dir, store_root = settings.path(incoming or pp.incoming), settings.path(store or pp.store)
    reports = settings.path(reports_dir or pp.reports)
    check_tracking_server(resolve_tracking_uri(settings), settings.tracking.preflight_timeout_s)

    data_version = None
    if incoming_dir.is_dir() and any(incoming_dir.iterdir()):
        summary = with_retries(ingest_step, pp.retries, pp.retry_delay_s)(
            str(incoming_dir), store_root, "train", settings, reports)
        data_version = summary.data_version
    else:
        logger.info("%s does not exist or is empty: no new images to ingest", incoming_dir)
    if (store_root / "train" / "store.json").is_file():
        validate_step(store_root / "train", settings, reports)

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
        champ = champion_version(settings)
        decision = retrain_decision(train_image_count(store_root), trained_on(champ), min_new, force=force,
                                    has_champion=champ is not None)
        info = {**decision.to_dict(), "champion_version": getattr(champ, "version", None)}
        if not decision.train:
            return finish(NOTHING_TO_DO, decision.reason, info)
        logger.info("training: %s", decision.reason)
        result = train_flow(store=str(store_root), params_files=params_files, overrides=overrides, run_name=run_name,
                            runs_dir=runs_dir, reports_dir=str(reports), data_version=data_version,
                            project=str(settings.project))
        return {"trained": True, "state": "Trained", "reason": decision.reason, **info, "train": result}
    finally:
        slot.__exit__(None, None, None)
