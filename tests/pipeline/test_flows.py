"""The Prefect flows (train, retrain) on a tiny store, against one session-scoped test server."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import FAST, TINY_DEMO, fast_params
from sslflow.core.errors import UserError
from sslflow.tasks.data.versioning import dir_hash
from sslflow.tasks.pipeline.decisions import TAG_TRAIN_IMAGES, retrain_decision

DATA = TINY_DEMO
FLOW_SET = [*FAST, *DATA, "eval.knn_k=5", "tracking.embedding_map=false", "tracking.augment_grid_images=0",
            "pipeline.retries=1", "pipeline.retry_delay_s=0.1"]


def _versions(model="ssl-encoder"):
    from mlflow import MlflowClient

    return MlflowClient().search_model_versions(f"name='{model}'")


def _champion(model="ssl-encoder"):
    from mlflow import MlflowClient

    return MlflowClient().get_model_version_by_alias(model, "champion")


def _drop_images(folder: Path, n: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"new_{seed}_{i}.png")


def _flow_run_logs(flow_run_id) -> list[str]:
    """The messages of a flow run's log (its task runs' too), once the log handler has sent them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in sorted(logs, key=lambda log: log.timestamp)]


# ------------------------------------------------------------------------------------ plain logic
def test_retrain_decision_rules():
    assert not retrain_decision(120, 100, 50).train
    assert "nothing to do" in retrain_decision(120, 100, 50).reason
    assert retrain_decision(150, 100, 50).train
    assert retrain_decision(120, 100, 50, force=True).train
    assert retrain_decision(40, None, 10, has_champion=False).train  # no champion: everything is new
    assert not retrain_decision(0, None, 0, force=True).train  # nothing to train on


def test_pipeline_settings_are_one_section_of_the_tree():
    pp = fast_params("pipeline.min_new_images=7", "pretrain.lr=1").pipeline
    assert pp.min_new_images == 7 and len(pp.cron.split()) == 5
    with pytest.raises(ValueError, match=r"pipeline\.min_new_imagse \(did you mean pipeline\.min_new_images\?\)"):
        fast_params("pipeline.min_new_imagse=7")


# ------------------------------------------------------------------------------------ flows
def test_train_then_retrain_nothing_to_do_then_new_images(project):
    from prefect.artifacts import Artifact

    from sslflow.flows.retrain import retrain_flow
    from sslflow.flows.train import train_flow

    state = train_flow(store="data/store", overrides=FLOW_SET, run_name="first", return_state=True)
    out = state.result()
    assert out["decision"] == "promoted" and out["train_images"] == 40, out
    # the pretraining's progress, one line per epoch, is in the flow-run log
    logged = _flow_run_logs(state.state_details.flow_run_id)
    assert [m.split("  ")[0] for m in logged if m.startswith("epoch ")] == ["epoch 0/2", "epoch 1/2", "epoch 2/2"]
    assert {"knn_top1", "linear_top1"} <= set(out["metrics"])
    assert (project / "runs" / "first" / "evaluation.json").is_file()
    [mv] = _versions()
    assert mv.tags[TAG_TRAIN_IMAGES] == "40" and _champion().version == mv.version
    art = Artifact.get("train-report")
    assert art is not None and "| decision | **promoted** |" in art.data and "eval/linear_top1" in art.data
    version = dir_hash(project / "data" / "store")  # no DVC here: the same hash, computed
    assert f"**data version**: {version}" in art.data and out["data_version"] == version

    # nothing arrived since the champion was trained
    state = retrain_flow(overrides=[*FLOW_SET, "pipeline.min_new_images=10"], return_state=True)
    assert state.is_completed() and state.name == "NothingToDo", state
    assert state.message.endswith(f"; compared data/store/train (40 images, data version {version[:8]}) with "
                                  f"champion ssl-encoder v1 (trained on 40 images, data version {version[:8]})")
    assert state.result()["trained"] is False and state.result()["new_images"] == 0
    assert len(_versions()) == 1

    # 12 new (unlabeled) images dropped into data/incoming -> ingested, enough -> train
    _drop_images(project / "data" / "incoming", 12, seed=1)
    res = retrain_flow(overrides=[*FLOW_SET, "pipeline.min_new_images=10"], run_name="second")
    assert res["trained"] is True and res["new_images"] == 12, res
    assert res["train"]["train_images"] == 52
    latest = max(_versions(), key=lambda v: int(v.version))
    assert latest.tags[TAG_TRAIN_IMAGES] == "52"


def test_a_rejected_batch_is_set_aside_and_the_next_retrain_goes_on(project):
    from sslflow.flows.retrain import retrain_flow
    from sslflow.tasks.data.setaside import RECORD, BatchSetAside

    incoming = project / "data" / "incoming"
    _drop_images(incoming / "cats", 2, seed=5)
    for i in range(3):
        (incoming / "cats" / f"broken{i}.png").write_bytes(b"not an image")  # 3 of 5 quarantined: > 5%
    overrides = [*FLOW_SET, "pipeline.min_new_images=1000"]
    with pytest.raises(BatchSetAside) as e:
        retrain_flow(overrides=overrides)
    message = str(e.value)
    assert "\n" not in message and "validate.max_quarantined_fraction" in message, message
    [folder] = (project / "data" / "rejected").iterdir()
    assert f"moved to {folder}/" in message and f"back to {incoming}/" in message
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == [
        "cats/broken0.png", "cats/broken1.png", "cats/broken2.png", "cats/new_5_0.png", "cats/new_5_1.png"]
    assert (folder / RECORD).is_file() and (folder / "train.json").is_file()  # the validation report
    assert not any(incoming.rglob("*.png"))
    # the next night: nothing to fail on
    state = retrain_flow(overrides=overrides, return_state=True)
    assert state.name == "NothingToDo" and "compared data/store/train (40 images" in state.message, state


def test_overlapping_retrains_do_not_both_train(project):
    """Two retrain runs at once, both forced: the concurrency slot lets one train; the other
    cannot get the slot within lock_timeout_s and ends `Skipped`."""
    from sslflow.flows.retrain import retrain_flow

    states = {}

    def go(name):
        states[name] = retrain_flow(overrides=[*FLOW_SET, "pipeline.lock=sslflow-retrain-overlap",
                                               "pipeline.lock_timeout_s=2"],
                                    force=True, run_name=name, return_state=True)

    threads = [threading.Thread(target=go, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    names = sorted(s.name for s in states.values())
    assert names == ["Completed", "Skipped"], states
    skipped = next(s for s in states.values() if s.name == "Skipped")
    assert skipped.is_cancelled() and "holds the 'sslflow-retrain-overlap' slot" in skipped.message
    assert len(_versions()) == 1


def test_two_forced_retrains_train_once_even_when_the_second_gets_the_slot(project):
    """The docs' promise, whatever the timing: the second run waits long enough to get the slot
    after the first one trained, sees a version trained on this very data meanwhile, and does
    not train it again."""
    from sslflow.flows.retrain import retrain_flow

    states = {}

    def go(name):
        states[name] = retrain_flow(overrides=[*FLOW_SET, "pipeline.lock=sslflow-retrain-wait",
                                               "pipeline.lock_timeout_s=600"],
                                    force=True, run_name=name, return_state=True)

    threads = [threading.Thread(target=go, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    results = {s.name: s.result() for s in states.values()}
    assert sorted(results) == ["Completed", "NothingToDo"], states
    assert "while this run waited for the slot" in results["NothingToDo"]["reason"]
    assert len(_versions()) == 1


def test_retrain_waits_for_the_slot_held_elsewhere(project):
    """The slot held by someone else (another retrain, on another host): a forced retrain
    does not train."""
    from prefect.concurrency.sync import concurrency

    from sslflow.flows.retrain import retrain_flow
    from sslflow.tasks.pipeline.slot import ensure_limit

    ensure_limit("sslflow-retrain-held", 1)
    with concurrency("sslflow-retrain-held", occupy=1, strict=True):
        state = retrain_flow(overrides=[*FLOW_SET, "pipeline.lock=sslflow-retrain-held",
                                        "pipeline.lock_timeout_s=1"], force=True, return_state=True)
    assert state.name == "Skipped" and state.is_cancelled() and "holds" in state.message
    assert _versions() == []


def test_errors_are_one_line_before_training(project, monkeypatch, capsys):
    from sslflow.cli import main
    from sslflow.flows.train import train_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    code = main(["retrain", "--force", *[a for s in FLOW_SET for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "http://127.0.0.1:9" in err and len(err.splitlines()) == 1, err
    with pytest.raises(UserError, match=r"127\.0\.0\.1:9"):
        train_flow(store="data/store", overrides=FLOW_SET, run_name="x")
    assert not (project / "runs" / "x").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    with pytest.raises(UserError, match="does not exist: ingest images first"):
        train_flow(store="nowhere", overrides=FLOW_SET, run_name="y")
    code = main(["retrain", "--set", "pipeline.min_new_imagse=3"])
    assert code == 2 and "unknown setting pipeline.min_new_imagse" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_flow_trains_the_best_configuration(project: Path) -> None:
    """`tune` flow: a 2-trial study, the best params file, then a `train` subflow with it
    that registers a version; the study's parent run points at that training run."""
    from mlflow import MlflowClient

    from sslflow.flows.tune import tune_flow

    sets = [*FLOW_SET, "tune.budget_epochs=1", "tune.pruner=none", "tune.startup_trials=1"]
    out = tune_flow(trials=2, study="flow", storage=f"sqlite:///{project / 'optuna.db'}", overrides=sets,
                    output=str(project / "tuned.yaml"))
    t = out["tune"]
    assert (t["complete"], out["trained"]) == (2, True)
    best_temperature = t["best_params"]["pretrain.simclr.temperature"]
    client = MlflowClient()
    train_run = client.get_run(out["train"]["mlflow_run_id"])
    assert float(train_run.data.params["pretrain.simclr.temperature"]) == pytest.approx(best_temperature)
    assert train_run.data.params["pretrain.epochs"] == "2"  # the full epochs, not the trial budget
    parent = client.get_run(t["mlflow_run_id"])
    assert parent.data.tags["best.train_run_id"] == train_run.info.run_id
    assert parent.data.tags["best.model_version"] == str(out["train"]["model_version"])
    assert [str(v.version) for v in _versions()] == [str(out["train"]["model_version"])]
