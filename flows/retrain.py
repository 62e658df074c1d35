"""The `retrain` flow (the scheduled one): ingest `data/incoming` -> validate -> train if enough is new.

    from sslflow.flows.retrain import retrain_flow
    retrain_flow()                 # the project's settings: pipeline.min_new_images, force, lock, ...
    retrain_flow(force=True)

It trains (the `train` flow, as a subflow) when at least `pipeline.min_new_images` train
images arrived since the last training (the newest registered version's `data.train_images`
tag, champion or challenger: never the same data twice), or with `pipeline.retrain_policy`
drift / any when the champion's embeddings of the new rows drifted (docs/drift.md), or when
forced; otherwise it ends in a Completed state named `NothingToDo` with the reason. The
evidence (drift score, p-value, counts, near-duplicates of the incoming images) goes to the
Prefect artifact and to one MLflow run per decision (`tasks/pipeline/drift.py`). The reason
says in one line what was compared with what (the train split's images and data version, the
champion's version, images and data version).

A batch that validation rejects is set aside (`pipeline.set_aside`, with its report) and the
run fails with one line naming the folder and the setting that would admit it; the next run
goes on without it (`sslflow.tasks.data.setaside`).

Two overlapping runs never both train: the decision and the training run inside the one
slot of the Prefect global concurrency limit `pipeline.lock` (created on first use), held
under a lease of `pipeline.lock_lease_s` that a killed holder loses (`tasks/pipeline/slot.py`).
A run that cannot get the slot within `pipeline.lock_timeout_s` ends in a **Cancelled** state
named `Skipped` with a warning (the CLI exits 4), the way Prefect cancels a deployment run
that collides with a running one; a scheduler never mistakes it for a retrain. A run that
gets the slot after another one trained on the same data (forced or not) does not train it
again: it ends `NothingToDo`. So two retrains started together train exactly once.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Cancelled, Completed

NOTHING_TO_DO, SKIPPED = "NothingToDo", "Skipped"


@flow(name="retrain", log_prints=True)
def retrain_flow(incoming: str | None = None, store: str | None = None, params_files: list[str] | None = None,
                 overrides: list[str] | None = None, force: bool | None = None,
                 min_new_images: int | None = None, run_name: str | None = None,
                 runs_dir: str | None = None, reports_dir: str | None = None, project: str | None = None) -> Any:
    """Ingest `incoming` into the train split, validate it, and train if enough is new.

    Settings: `params_files` (None = the project's params.yaml) then `overrides`; an argument
    left None takes its `pipeline.*` setting."""
    from sslflow.core.settings import load_settings
    from sslflow.flows.train import train_flow
    from sslflow.ssl_models.train import resolve_device
    from sslflow.tasks.data.setaside import BatchSetAside, set_aside
    from sslflow.tasks.data.splits import train_image_count
    from sslflow.tasks.data.validate import ValidationFailed
    from sslflow.tasks.data.versioning import current_data_version
    from sslflow.tasks.pipeline import drift as evidence
    from sslflow.tasks.pipeline.decisions import (
        champion_version,
        last_training,
        latest_version,
        markdown_report,
        retrain_decision,
        trained_meanwhile,
        trained_on,
    )
    from sslflow.tasks.pipeline.slot import SlotBusy, retrain_slot
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
    device = str(resolve_device(settings.device))
    champion: tuple[Any, Any] | None = None  # (encoder, meta), loaded once when the evidence needs it

    def champion_encoder() -> tuple[Any, Any]:
        nonlocal champion
        champion = champion or evidence.load_champion(settings)
        return champion

    near_dups: list[dict[str, Any]] | None = None
    if settings.ingest.near_duplicate_threshold > 0 and incoming_dir.is_dir() and any(incoming_dir.iterdir()) \
            and champion_version(settings) is not None:
        encoder, meta = champion_encoder()
        near_dups = evidence.scan_near_duplicates(settings, incoming_dir, store_root, encoder=encoder, meta=meta,
                                                  device=device, cache_dir=settings.path("data/embeddings"))
        if near_dups:
            logger.info("%d near-duplicate(s) in %s (cosine >= %s), e.g. %s ~ %s", len(near_dups), incoming_dir,
                        settings.ingest.near_duplicate_threshold, near_dups[0]["path"], near_dups[0]["matched"])
        if near_dups and settings.ingest.quarantine_near_duplicates:
            moved = evidence.quarantine_near_duplicates(incoming_dir, near_dups, settings.path(pp.set_aside))
            logger.info("moved %d near-duplicate(s) to %s", len(near_dups), moved)
    if incoming_dir.is_dir() and any(incoming_dir.iterdir()):
        try:
            summary = with_retries(ingest_step, pp.retries, pp.retry_delay_s)(
                str(incoming_dir), store_root, "train", settings, reports)
        except ValidationFailed as rejected:  # moved aside: the next night does not fail on it again
            aside = set_aside(incoming_dir, store_root, settings.path(pp.set_aside), rejected,
                              reports=[rejected.result.report])
            raise BatchSetAside(aside.message(incoming_dir)) from None
        data_version = summary.data_version
    else:
        logger.info("%s does not exist or is empty: no new images to ingest", incoming_dir)
    if (store_root / "train" / "store.json").is_file():
        validate_step(store_root / "train", settings, reports)

    def report(name: str, reason: str, info: dict[str, Any]) -> None:
        shown = dict(info)
        if isinstance(d := info.get("drift"), dict):  # the evidence, readable
            shown["drift"] = (f"MMD^2 {d['score']:.4g}, p-value {d['p_value']:.3g} (level {d['level']:g}, drifted: "
                              f"{d['drifted']}), {d['new']} new vs {d['reference']} reference embeddings")
        create_markdown_artifact(markdown_report(f"retrain: {name}", {}, None, {"reason": reason, **shown}),
                                 key="retrain-report", description="the latest retrain decision")

    def finish(name: str, reason: str, info: dict[str, Any]) -> Any:
        report(name, reason, info)
        if name == SKIPPED:  # Cancelled, as Prefect cancels a run that collides with a running one
            logger.warning("retrain SKIPPED, nothing trained: %s", reason)
            return Cancelled(name=name, message=reason)
        logger.info(reason)
        return Completed(name=name, message=reason, data={"trained": False, "state": name, "reason": reason, **info})

    before = latest_version(settings)
    try:
        with retrain_slot(pp.lock, pp.lock_timeout_s, pp.lock_lease_s) as waited_s:
            if waited_s >= 1:
                logger.info("got the %r slot after %.0f s", pp.lock, waited_s)
            images = train_image_count(store_root)
            data_version = current_data_version(store_root) or data_version
            done = trained_meanwhile(settings, before, images, data_version)
            if done is not None:
                return finish(NOTHING_TO_DO, f"nothing to do: version {done.version} was trained on this data "
                                             f"({images} train images) while this run waited for the slot",
                              {"images": images, "trained_version": done.version})
            champ = champion_version(settings)
            last = last_training(settings)  # champion or challenger: not the same data twice
            reference = trained_on(last)
            drift = None
            if pp.retrain_policy != "count" and champ is not None and not force and images > (reference or 0):
                drift = evidence.drift_evidence(settings, store_root, reference or 0,
                                                encoder=champion_encoder()[0], device=device)
            decision = retrain_decision(images, reference, min_new, force=force, has_champion=last is not None,
                                        policy=pp.retrain_policy if champ is not None else "count",
                                        drift=drift.result if drift else None)
            compared = comparison(settings.project, store_root, images, data_version, champ)
            if last is not None and (champ is None or last.version != champ.version):
                compared += f"; last training: v{last.version} ({reference if reference is not None else '?'} images)"
            info = {**decision.to_dict(), "champion_version": getattr(champ, "version", None), "compared": compared}
            if near_dups is not None:
                info["near_duplicates"] = len(near_dups)
            info["decision_run_id"] = evidence.log_retrain_decision(settings, info, drift, near_dups)
            reason = f"{decision.reason}; {compared}"  # one line: what was compared with what
            if not decision.train:
                return finish(NOTHING_TO_DO, reason, info)
            logger.info("training: %s", reason)
            report("Trained", reason, info)
            result = train_flow(store=str(store_root), params_files=params_files, overrides=overrides,
                                run_name=run_name, runs_dir=runs_dir, reports_dir=str(reports),
                                data_version=data_version, project=str(settings.project))
            if pp.select_n > 0:
                info["selection"] = select_after_training(settings, store_root, result, info["decision_run_id"],
                                                          reports, device, reference)
            return {"trained": True, "state": "Trained", **info, "reason": reason, "train": result}
    except SlotBusy as busy:
        return finish(SKIPPED, f"skipped: {busy}", {})


def select_after_training(settings: Any, store_root: Any, result: dict[str, Any], run_id: str, reports: Any,
                          device: str, reference: int | None) -> str:
    """`pipeline.select_n` unlabeled train images to label next, picked with the encoder just
    trained (weighted towards the drifted clusters), as `<reports>/selection.csv` and an artifact
    of the decision's MLflow run."""
    from pathlib import Path

    from mlflow import MlflowClient

    from sslflow.tasks.serving.encoder import load_encoder_for_embedding
    from sslflow.tasks.serving.select import select_from_store
    from sslflow.tasks.tracking.backend import resolve_tracking_uri

    encoder, _ = load_encoder_for_embedding(result["run_dir"])
    picked = select_from_store(Path(store_root) / "train", encoder, settings.pipeline.select_n, device=device,
                               seed=settings.seed, drift_reference=reference, clusters=settings.pipeline.drift_clusters)
    out = Path(reports) / "selection.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    picked.to_csv(out, index=False)
    MlflowClient(tracking_uri=resolve_tracking_uri(settings)).log_artifact(run_id, str(out))
    return str(out)


def comparison(project: Any, store_root: Any, images: int, data_version: str | None, champion: Any) -> str:
    """`compared data/store/train (52 images, data version 1a2b3c4d) with champion ssl-encoder
    v3 (trained on 40 images, data version 9f8e7d6c)`: the retrain decision in one line."""
    from contextlib import suppress
    from pathlib import Path

    from sslflow.tasks.tracking.registry import TAG_DATA_VERSION, TAG_TRAIN_IMAGES

    def short(version: Any) -> str:
        return str(version)[:8] if version not in (None, "", "None", "unknown") else "unknown"

    train = Path(store_root) / "train"
    with suppress(ValueError):  # relative to the project when inside it: shorter
        train = train.relative_to(Path(project))
    ours = f"compared {train} ({images} images, data version {short(data_version)})"
    if champion is None:
        return f"{ours} with no champion"
    tags = champion.tags or {}
    return (f"{ours} with champion {champion.name} v{champion.version} (trained on "
            f"{tags.get(TAG_TRAIN_IMAGES) or '?'} images, data version {short(tags.get(TAG_DATA_VERSION))})")
