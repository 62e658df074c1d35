"""`sslflow tune` with the methods added after SimCLR/MoCo/BYOL/DINO: a study whose base method is a
new one, and one that searches the method among new ones, trains its trials with them by name."""

from __future__ import annotations

from pathlib import Path

from helpers import fast_params

TUNE_FAST = ["tune.pruner=none", "tune.startup_trials=2", "tune.heartbeat_interval_s=1", "tune.grace_period_s=2",
             "tune.budget_epochs=1"]


def test_a_study_trains_new_methods_by_name(demo_stores, tmp_path: Path) -> None:
    import optuna
    from mlflow import MlflowClient

    from sslflow.tasks.tuning.study import tune

    settings = fast_params(f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *TUNE_FAST, "pretrain.method=rotation",
                           "tune.space.method.enabled=true", "tune.space.method.choices=[rotation,vae,cmc]")
    result = tune(demo_stores["train"].parent, settings, trials=3, study="m", storage=f"sqlite:///{tmp_path / 'o.db'}",
                  output=tmp_path / "tuned.yaml", runs_dir=tmp_path / "runs", log=lambda _: None)
    assert (result.complete, result.failed) == (3, 0)
    study = optuna.load_study(study_name="m", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert study.trials[0].params["pretrain.method"] == "rotation"  # the base configuration first
    methods = {t.params["pretrain.method"] for t in study.trials}
    assert methods <= {"rotation", "vae", "cmc"}
    client = MlflowClient(tracking_uri=result.tracking_uri)
    exp = client.get_experiment_by_name("sslflow")
    trials = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'")
    assert {r.data.tags["method"] for r in trials} == methods
    assert all(r.data.params["pretrain.method"] == r.data.tags["method"] for r in trials)
