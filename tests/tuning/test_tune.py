"""Optuna tuning: the search space, a tiny study with pruning, resumption after Ctrl-C and
kill -9, and two worker processes sharing one study on a real PostgreSQL server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from helpers import FAST, fast_params, saturated_cpu
from sslflow.core.settings import load_settings
from sslflow.ssl_models.errors import ConfigError
from sslflow.tasks.tuning.space import as_overrides, sample, search_space, write_best_params

# one epoch of kNN per trial on the 16 px demo stores; pruning as soon as a baseline exists
TUNE_FAST = ["tune.pruner=median", "tune.pruner_startup_trials=1", "tune.pruner_warmup_epochs=0",
             "tune.startup_trials=2", "tune.heartbeat_interval_s=1", "tune.grace_period_s=2"]


def _tune(store_root: Path, tmp: Path, *extra: str, trials: int, budget: int = 1, study: str = "s"):
    from sslflow.tasks.tuning.study import tune

    settings = fast_params(f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", *TUNE_FAST, f"tune.budget_epochs={budget}",
                           *extra)
    return tune(store_root, settings, trials=trials, study=study, storage=f"sqlite:///{tmp / 'optuna.db'}",
                output=tmp / "tuned.yaml", runs_dir=tmp / "runs", log=lambda _: None)


def _mlflow_runs(uri: str, parent: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sslflow")
    return client, client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


# ------------------------------------------------------------------------------------ space
@pytest.mark.parametrize("override, message", [
    ("tune.space.temperature.low=2.0", "tune.space.temperature: low (2) must be below high"),
    ("tune.space.temperature.low=0", "tune.space.temperature: a log range needs low > 0"),
    ("tune.space.strength.colour=1", "unknown setting tune.space.strength.colour"),
    ("tune.space.queue_size.low=1", "tune.space.queue_size: give either choices or low/high"),
    ("tune.pruner=asha", "tune.pruner must be one of median, hyperband, none"),
    ("tune.grace_period_s=10", "must exceed tune.heartbeat_interval_s"),
    ("tune.trials=0", "tune.trials must be >= 1"),
])
def test_bad_tune_settings_are_one_line_errors(override: str, message: str) -> None:
    extra = ["tune.heartbeat_interval_s=60"] if "grace" in override else []
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings([], [override, *extra])


def test_a_space_with_everything_disabled_is_an_error() -> None:
    names = ["temperature", "queue_size", "strength", "crop_min_scale"]
    with pytest.raises(ConfigError, match="every entry is disabled"):
        load_settings([], [f"tune.space.{n}.enabled=false" for n in names])


def test_sampling_follows_the_method_and_indexed_keys_replace_one_element() -> None:
    space = search_space(load_settings([], ["tune.space.method.enabled=true"]))
    trial = optuna.trial.FixedTrial({"pretrain.method": "byol", "augment.strength": 0.7,
                                     "augment.crop_scale[0]": 0.3})
    values = sample(trial, space, base_method="simclr")
    # BYOL has no temperature and no queue: neither is suggested
    assert values == {"pretrain.method": "byol", "augment.strength": 0.7, "augment.crop_scale[0]": 0.3}
    # the method's own keys: {method} in a search key names the trial's section
    moco = sample(optuna.trial.FixedTrial({"pretrain.moco.temperature": 0.1, "pretrain.moco.queue_size": 4096,
                                           "augment.strength": 1.0, "augment.crop_scale[0]": 0.2}),
                  search_space(load_settings([])), base_method="moco")
    assert moco["pretrain.moco.queue_size"] == 4096 and moco["pretrain.moco.temperature"] == 0.1
    base = load_settings([])
    params = base.updated(as_overrides(values, base))
    assert params.pretrain.method == "byol" and params.augment.crop_scale == (0.3, 1.0)


def test_best_params_update_only_the_tuned_keys_of_a_settings_file(tmp_path: Path) -> None:
    base = tmp_path / "params.yaml"
    base.write_text("# the pipeline's experiment\nseed: 0\npretrain:\n  simclr:\n    temperature: 0.2   # SimCLR\n"
                    "backbone:\n  resnet:\n    width: 8\naugment:\n  crop_scale: [0.2, 1.0]\n")
    values = {"pretrain.simclr.temperature": 0.35, "augment.crop_scale[0]": 0.25}
    settings = load_settings(base)
    write_best_params(base, values, settings, base_file=base, header=["study x"])
    text = base.read_text()
    assert "# the pipeline's experiment" in text and "# SimCLR" in text  # comments kept (DVC's file)
    assert yaml.safe_load(text) == {"seed": 0, "pretrain": {"simclr": {"temperature": 0.35}},
                                    "backbone": {"resnet": {"width": 8}}, "augment": {"crop_scale": [0.25, 1.0]}}
    other = write_best_params(tmp_path / "tuned.yaml", values, settings, base_file=None, header=["study x"])
    assert other.read_text().startswith("# Best configuration written by `sslflow tune`")
    assert load_settings(other, FAST).pretrain.simclr.temperature == 0.35


def test_an_unreachable_storage_is_one_line_and_trains_nothing(demo_stores, tmp_path: Path, capsys) -> None:
    from sslflow.cli import main

    args = ["tune", "--no-train", "--store", str(demo_stores["train"].parent), "--storage",
            "postgresql+psycopg2://u:secret@127.0.0.1:9/optuna", "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db",
            "--set", f"tune.runs={tmp_path}/runs"]
    assert main(args) == 3  # a service that is down: exit 3, not 2
    err = capsys.readouterr().err
    assert "Optuna storage postgresql+psycopg2://u:***@127.0.0.1:9/optuna is unreachable" in err
    assert "secret" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_holdout_stores_keep_the_train_class_numbering(demo_stores, tmp_path: Path) -> None:
    from sslflow.ssl_models.store import ImageStore
    from sslflow.tasks.tuning.holdout import objective_stores

    train = ImageStore.open(demo_stores["train"])
    bank, queries = objective_stores(train, ImageStore.open(demo_stores["test"]), 0.25, 0, tmp_path)
    assert bank.classes == queries.classes == train.classes
    names = [train.classes[i] for i in train.labels()]
    assert sorted(names) == sorted([bank.classes[i] for i in bank.labels()] +
                                   [queries.classes[i] for i in queries.labels()])
    assert len(queries) == 4 * len(train.classes)  # 25 % of 16 per class


def test_online_knn_matches_classes_by_name_not_by_index(demo_stores, tmp_path: Path) -> None:
    """A query store that numbers its classes in another order gets the same kNN accuracy."""
    from sslflow.ssl_models.store import ImageStore
    from sslflow.ssl_models.train import Pretrainer

    train, test = ImageStore.open(demo_stores["train"]), ImageStore.open(demo_stores["test"])
    reordered = ImageStore.create(tmp_path / "reordered", test.height, test.width)
    with reordered.writing():
        reordered.publish([], list(reversed(test.classes)))
        reordered.add(test.images(), [test.classes[i] for i in test.labels()])
    assert reordered.classes != train.classes
    params = fast_params()
    knn = [Pretrainer(train, params, tmp_path / f"r{i}", eval_stores=(train, t), progress_bar=False).online_knn()
           for i, t in enumerate((test, reordered))]
    assert knn[0] == knn[1]


# ------------------------------------------------------------------------------------ studies
def test_tiny_study_logs_nested_runs_and_writes_the_best_params(demo_stores, tmp_path: Path) -> None:
    root = demo_stores["train"].parent
    result = _tune(root, tmp_path, trials=3)
    assert (result.complete + result.pruned, result.failed) == (3, 0)
    assert result.trials_here == [0, 1, 2] and result.best_trial is not None
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    best = study.best_trial
    assert result.best_value == best.value and result.best_params == best.params
    base = fast_params()
    assert {t.user_attrs["seed"] for t in study.trials} == {base.seed}  # fixed, recorded
    assert study.trials[0].user_attrs["baseline"] and study.trials[0].params == {  # the current configuration
        "pretrain.simclr.temperature": base.pretrain.simclr.temperature, "augment.strength": base.augment.strength,
        "augment.crop_scale[0]": base.augment.crop_scale[0]}
    assert all(set(t.intermediate_values) == {1} for t in study.trials)  # each epoch's kNN was reported

    tuned = load_settings(result.output, FAST)  # the best configuration is a settings file
    assert tuned.pretrain.simclr.temperature == pytest.approx(best.params["pretrain.simclr.temperature"])
    assert tuned.augment.crop_scale[0] == pytest.approx(best.params["augment.crop_scale[0]"])

    client, trials = _mlflow_runs(result.tracking_uri, result.mlflow_run_id)
    assert sorted(r.data.tags["optuna.trial"] for r in trials) == ["0", "1", "2"]
    for r in trials:
        n = int(r.data.tags["optuna.trial"])
        state = study.trials[n].state.name
        assert r.data.tags["optuna.state"] == state
        assert r.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[state]
        assert r.data.params["pretrain.epochs"] == "1" and "sampled.augment.crop_scale.0" in r.data.params
        knn = client.get_metric_history(r.info.run_id, "epoch/knn_top1")
        assert [m.step for m in knn] == [0, 1]  # random init, then the budget's epoch
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.metrics["best_knn_top1"] == pytest.approx(best.value)
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "tune")}
    assert {"tune/optimization_history.png", "tune/knn_by_epoch.png", "tune/trials.json",
            "tune/tuned.yaml"} <= artifacts


def test_pruner_stops_a_hopeless_trial_after_its_first_epoch(demo_stores, tmp_path: Path) -> None:
    """Two finished trials that reached 99% kNN after each epoch: the median pruner must stop
    a real trial (far below) after epoch 1 of 3, and the study counts it as finished."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    dist = {"augment.strength": optuna.distributions.FloatDistribution(0.25, 1.5)}
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(params={"augment.strength": 0.5}, distributions=dist, value=99.0,
                                                  intermediate_values={1: 99.0, 2: 99.0, 3: 99.0}))
    result = _tune(demo_stores["train"].parent, tmp_path, trials=3, budget=3)
    [trial] = [t for t in optuna.load_study(study_name="s", storage=storage).trials if t.number == 2]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    assert result.pruned == 1 and result.best_trial in (0, 1)
    assert not (tmp_path / "runs" / "s" / "trial-2" / "checkpoints").exists()  # finished: no resume state
    _, [run] = _mlflow_runs(result.tracking_uri, result.mlflow_run_id)
    assert (run.info.status, run.data.tags["optuna.state"]) == ("KILLED", "PRUNED")
    assert "after epoch 1" in run.data.tags["optuna.reason"]


def _start_worker(workdir: Path, store: Path, storage: str, study: str, trials: int, budget: int,
                  env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sslflow.cli", "tune", "--no-train", "--no-progress", "--trials", str(trials),
           "--storage", storage, "--study", study, "--store", str(store)]
    for o in [*FAST, "pretrain.checkpoint_every=0", *TUNE_FAST, f"tune.budget_epochs={budget}", "tune.pruner=none"]:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, cwd=workdir, env={**os.environ, "SSLFLOW_PROJECT": str(workdir), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"worker exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)


def _epochs(checkpoint: Path) -> int:
    """Epoch records (epoch 0 = random init) in a trial's checkpoint; 0 while there is none."""
    import torch

    try:
        return len(torch.load(checkpoint, weights_only=True)["history"]["epochs"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


@pytest.fixture
def bigger_stores(tmp_path_factory) -> Path:
    """32 images per class, so an epoch lasts long enough to interrupt it mid-trial."""
    from sslflow.ssl_models.store import ImageStore
    from sslflow.tasks.data.demo import CLASSES, generate_demo

    root = tmp_path_factory.mktemp("tune-stores")
    for split, n, seed in (("train", 32, 0), ("test", 8, 1)):
        images, labels = generate_demo(n, size=16, seed=seed)
        ImageStore.create(root / split, 16, 16).add(images, [CLASSES[i] for i in labels])
    return root


@pytest.mark.slow
def test_interrupted_study_resumes_from_the_checkpoint(bigger_stores: Path, tmp_path: Path) -> None:
    """Ctrl-C during trial 0, kill -9 during its retry, then a third run: the study finishes
    with the interrupted trial resumed from its last epoch checkpoint (its kNN curve is whole)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    ckpt0 = tmp_path / "runs" / "tune" / "s" / "trial-0" / "checkpoints" / "last.pt"
    ckpt1 = ckpt0.parents[2] / "trial-1" / "checkpoints" / "last.pt"

    first = _start_worker(tmp_path, bigger_stores, storage, "s", trials=2, budget=3, env=env)
    _wait_for(ckpt0.is_file, first)  # trial 0 has finished epoch 1
    first.send_signal(signal.SIGINT)
    out = first.communicate(timeout=60)[0]
    assert first.returncode == 130, out
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]  # re-enqueued at once
    epochs_at_sigint = _epochs(ckpt0)

    second = _start_worker(tmp_path, bigger_stores, storage, "s", trials=2, budget=3, env=env)
    _wait_for(lambda: _epochs(ckpt1) > epochs_at_sigint, second)  # resumed, and trained one more epoch
    second.kill()  # kill -9: no cleanup, the trial stays RUNNING until its heartbeat goes stale
    second.wait()
    time.sleep(3)  # > tune.grace_period_s

    third = _start_worker(tmp_path, bigger_stores, storage, "s", trials=2, budget=3, env=env)
    out = third.communicate(timeout=240)[0]
    assert third.returncode == 0, out
    study = optuna.load_study(study_name="s", storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.FAIL, 1: TrialState.FAIL, 2: TrialState.COMPLETE, 3: TrialState.COMPLETE}
    resumed = study.trials[2]
    assert resumed.system_attrs["retry_history"] == [0, 1] and resumed.params == study.trials[0].params
    assert sorted(resumed.intermediate_values) == [1, 2, 3]  # replayed from the checkpoint + trained
    history = yaml.safe_load((tmp_path / "runs" / "tune" / "s" / "trial-2" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2, 3]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = {r.data.tags["optuna.trial"]: r for r in client.search_runs(
        [client.get_experiment_by_name("sslflow").experiment_id], "tags.`sslflow.kind` = 'tune-trial'")}
    assert runs["0"].info.status == "FAILED" and "interrupted" in runs["0"].data.tags["optuna.reason"]
    assert runs["1"].info.status == "FAILED"  # the killed worker's run, closed by the retry
    assert runs["2"].info.status == "FINISHED"


@pytest.mark.slow
def test_two_workers_share_one_study_on_postgresql(demo_stores, postgres_url: str, postgres_service,
                                                   tmp_path: Path) -> None:
    """Two processes, one study on a real PostgreSQL server: every trial runs exactly once,
    all of them finish, and both workers log under the same MLflow parent run."""
    mlflow_db = f"mlflow_{uuid.uuid4().hex[:10]}"
    conn = postgres_service.connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {mlflow_db}")
    mlflow_uri = postgres_service.pg_url(mlflow_db)
    try:
        from mlflow import MlflowClient

        # create the schema once: two processes migrating an empty database at once would race
        client = MlflowClient(tracking_uri=mlflow_uri)
        client.create_experiment("sslflow", artifact_location=(tmp_path / "artifacts").as_uri())
        store = demo_stores["train"].parent
        env = {"MLFLOW_TRACKING_URI": mlflow_uri}
        workers = []
        with saturated_cpu(1):  # under load the second worker starts seconds late: the parent race
            for i in range(2):
                (tmp_path / f"w{i}").mkdir()
                workers.append(_start_worker(tmp_path / f"w{i}", store, postgres_url, "shared", trials=4,
                                             budget=1, env=env))
            outs = [w.communicate(timeout=400)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], "\n".join(outs)

        study = optuna.load_study(study_name="shared", storage=postgres_url)
        trials = study.trials
        numbers = [t.number for t in trials]
        assert numbers == list(range(len(trials)))  # no gaps, no duplicates
        assert all(t.state == TrialState.COMPLETE for t in trials)  # none lost or left RUNNING
        # each worker stops at the target; one may finish the trial it already started
        assert 4 <= len(trials) <= 5
        workers_seen = {t.user_attrs["worker"] for t in trials}
        assert len(workers_seen) == 2, workers_seen  # both took part
        parents = {r.data.tags["mlflow.parentRunId"] for r in client.search_runs(
            [client.get_experiment_by_name("sslflow").experiment_id], "tags.`sslflow.kind` = 'tune-trial'")}
        assert parents == {study.user_attrs["mlflow_parent_run_id"]}
        assert len(client.search_runs([client.get_experiment_by_name("sslflow").experiment_id],
                                      "tags.`sslflow.kind` = 'tune-trial'")) == len(trials)
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {mlflow_db} WITH (FORCE)")
        conn.close()
