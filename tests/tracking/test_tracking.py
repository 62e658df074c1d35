"""MLflow tracking against a real SQLite backend: params, metrics, tags, artifacts, preflight."""

from __future__ import annotations

import os
import time

import pytest

from helpers import fast_params
from sslflow.core.errors import UserError
from sslflow.core.settings import load_settings
from sslflow.ssl_models.errors import ConfigError
from sslflow.tasks.tracking.backend import check_tracking_server, resolve_tracking_uri
from sslflow.tasks.tracking.run import MLflowCallback, flat_params, tracking_run

UNREACHABLE = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, demo_stores):
    """One tiny pretraining + evaluation, tracked with the callback and `log_training`."""
    from sslflow.tasks.tracking.report import log_training
    from sslflow.tasks.training.evaluate import evaluate
    from sslflow.tasks.training.pretrain import pretrain

    tmp = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    gx = tmp / "gx"
    gx.mkdir()
    (gx / "validation.json").write_text('{"success": true}')
    params = fast_params("eval.protocols=[knn,linear]", "tracking.experiment=test-tracking", "tracking.flush_every=3",
                         "tracking.augment_grid_images=4")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        with tracking_run(params, run_name="tiny", data_version="abc123.dir") as run:
            result = pretrain(demo_stores["train"], tmp / "run", params, eval_train=demo_stores["train"],
                              eval_test=demo_stores["test"], callbacks=[run.callback()], progress_bar=False)
            report = evaluate(tmp / "run", demo_stores["train"], demo_stores["test"], params)
            logged = log_training(run, tmp / "run", params, report, train_store=demo_stores["train"],
                                  test_store=demo_stores["test"], gx_report=gx)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        yield {"client": client, "run_id": run.run_id, "params": params, "result": result, "report": report,
               "logged": logged, "tmp": tmp, "uri": uri}


def test_params_are_flattened_and_complete(tracked):
    run = tracked["client"].get_run(tracked["run_id"])
    expected = flat_params(tracked["params"])
    assert run.data.params == expected
    assert run.data.params["pretrain.lr"] == "0.1"
    assert run.data.params["backbone.resnet.width"] == "8" and run.data.params["pretrain.simclr.temperature"]
    assert not any(k.startswith("pretrain.moco.") for k in run.data.params)  # only the active method's section
    assert run.info.status == "FINISHED"


def test_step_and_epoch_metrics(tracked):
    client, run_id, result = tracked["client"], tracked["run_id"], tracked["result"]
    steps = result.history.steps
    for key in ("loss", "lr", "images_per_s"):
        hist = client.get_metric_history(run_id, f"train/{key}")
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [s["step"] for s in steps]
    loss = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert loss[-1].value == pytest.approx(steps[-1]["loss"])
    knn = sorted(client.get_metric_history(run_id, "epoch/knn_top1"), key=lambda m: m.step)
    assert [m.step for m in knn] == [0, 1, 2]  # epoch 0 = the random-init encoder
    assert knn[-1].value == pytest.approx(result.history.epochs[-1]["knn_top1"])
    assert len(client.get_metric_history(run_id, "epoch/loss")) == 2
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/linear_top1"] == pytest.approx(tracked["report"].metrics["linear_top1"])
    assert metrics["eval/knn_top1"] == pytest.approx(tracked["report"].metrics["knn_top1"])
    assert "pretrain/train_seconds" in metrics and "pretrain/knn_top1_at_init" in metrics
    assert "gpu_memory_gb" not in " ".join(metrics)  # CPU run


def test_provenance_tags(tracked):
    import torch

    from sslflow import __version__

    tags = tracked["client"].get_run(tracked["run_id"]).data.tags
    assert tags["data_version"] == "abc123.dir"
    assert tags["device"] == "cpu"
    assert tags["torch_version"] == torch.__version__
    assert tags["sslflow_version"] == __version__
    assert tags["method"] == "simclr"
    assert "dvc_lock_md5" in tags
    if "git_commit" in tags:  # the checkout is a git repo in CI
        assert len(tags["git_commit"]) == 40
        assert tags["git_dirty"] in ("true", "false")


def test_artifacts(tracked):
    from mlflow.artifacts import download_artifacts

    client, run_id = tracked["client"], tracked["run_id"]

    def listing(path=None):
        out = []
        for f in client.list_artifacts(run_id, path):
            out += listing(f.path) if f.is_dir else [f.path]
        return out

    files = set(listing())
    for name in ("params/params.yaml", "params/params.json", "plots/loss.png", "plots/knn.png",
                 "plots/augmented_views.png", "plots/embedding_map.png", "plots/confusion.png",
                 "evaluation/evaluation.json", "evaluation/confusion.json", "run/history.json",
                 "run/metrics.json", "gx/gx/validation.json"):
        assert name in files, f"{name} missing from {sorted(files)}"
    local = download_artifacts(run_id=run_id, artifact_path="plots", dst_path=str(tracked["tmp"] / "dl"),
                               tracking_uri=tracked["uri"])
    for png in ("loss.png", "knn.png", "augmented_views.png", "embedding_map.png", "confusion.png"):
        with open(os.path.join(local, png), "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # artifacts live beside the SQLite file, not in the working directory
    assert (tracked["tmp"] / "mlartifacts").is_dir()


def test_dataset_inputs_and_top_level_metrics(tracked):
    """The Dataset column of the MLflow runs table: the train split (training) and the test split
    (evaluation), digest = the data version; the evaluation's top-1 under their plain names."""
    import json

    run = tracked["client"].get_run(tracked["run_id"])
    inputs = {tag.value: di.dataset for di in run.inputs.dataset_inputs for tag in di.tags
              if tag.key == "mlflow.data.context"}
    assert set(inputs) == {"training", "evaluation"}
    train, test = inputs["training"], inputs["evaluation"]
    assert train.digest == test.digest == "abc123.dir"
    assert train.name.endswith("train") and test.name.endswith("test") and train.source_type == "local"
    assert json.loads(train.source)["uri"].startswith("file://")
    assert json.loads(train.profile)["num_rows"] == 160 and json.loads(test.profile)["num_rows"] == 80
    features = json.loads(json.loads(train.schema)["mlflow_tensorspec"]["features"])
    assert features[0]["name"] == "image" and features[0]["tensor-spec"]["shape"] == [-1, 16, 16, 3]
    metrics, report = run.data.metrics, tracked["report"].metrics
    for key in ("knn_top1", "linear_top1"):
        assert metrics[key] == pytest.approx(report[key])


def test_runs_command_lists_method_data_version_accuracy_decision_and_alias(tracked, monkeypatch, capsys):
    from sslflow.cli import main

    client = tracked["client"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    experiment = client.get_run(tracked["run_id"]).info.experiment_id
    later = client.create_run(experiment, run_name="registered", start_time=int(time.time() * 1000) + 60_000,
                              tags={"method": "byol", "data_version": "feedbeef0123.dir", "model_version": "1",
                                    "promotion.decision": "promoted"})
    client.log_metric(later.info.run_id, "knn_top1", 81.234)
    client.log_metric(later.info.run_id, "linear_top1", 90.5)
    client.set_terminated(later.info.run_id)
    client.create_registered_model("runs-test-encoder")
    client.create_model_version("runs-test-encoder", f"runs:/{later.info.run_id}/encoder", run_id=later.info.run_id)
    client.set_registered_model_alias("runs-test-encoder", "champion", "1")

    args = ["runs", "--set", "tracking.experiment=test-tracking", "--set", "tracking.model_name=runs-test-encoder"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "started", "method", "data", "kNN", "linear", "decision", "model"]
    newest, tiny = lines[1].split(), lines[2].split()
    assert newest[0] == "registered" and newest[3:] == ["byol", "feedbeef", "81.23", "90.50", "promoted", "v1",
                                                         "champion"]
    knn, linear = tracked["report"].metrics["knn_top1"], tracked["report"].metrics["linear_top1"]
    assert tiny[0] == "tiny" and tiny[3:] == ["simclr", "abc123.d", f"{knn:.2f}", f"{linear:.2f}", "-", "-"]
    assert "2 newest of experiment 'test-tracking'" in lines[3]
    assert main(["runs", "--set", "tracking.experiment=nothing-here"]) == 0
    assert "no runs yet" in capsys.readouterr().out


def test_failed_body_marks_run_failed(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(RuntimeError, match="boom"), tracking_run(fast_params()) as run:
        raise RuntimeError("boom")
    r = MlflowClient(tracking_uri=uri).get_run(run.run_id)
    assert r.info.status == "FAILED"
    assert "boom" in r.data.tags["error"]


def test_callback_batches_metric_requests(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = MlflowClient(tracking_uri=uri)
    exp = real.create_experiment("cb", artifact_location=(tmp_path / "art").as_uri())
    run_id = real.create_run(exp).info.run_id

    class Counting:  # the real client, counting requests
        calls = 0

        def log_batch(self, *a, **k):
            Counting.calls += 1
            return real.log_batch(*a, **k)

    cb = MLflowCallback(run_id, Counting(), flush_every=4)
    for step in range(1, 11):
        cb.on_step(step, {"loss": 1.0 / step, "lr": 0.1, "images_per_s": 100.0, "epoch": step / 10})
    assert Counting.calls == 2  # after calls 4 and 8
    cb.on_epoch_end(1, {"epoch": 1, "loss": 0.5, "knn_top1": 50.0})  # flushes the rest
    assert Counting.calls == 3
    assert len(real.get_metric_history(run_id, "train/loss")) == 10
    assert real.get_metric_history(run_id, "epoch/knn_top1")[0].step == 1
    assert not real.get_metric_history(run_id, "epoch/epoch")


def test_unreachable_server_fails_fast_with_one_line():
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        check_tracking_server(UNREACHABLE, timeout=3)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert UNREACHABLE in msg and "\n" not in msg


def test_unreachable_server_stops_before_training(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    entered = False
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"127\.0\.0\.1:9"), tracking_run(fast_params("tracking.preflight_timeout_s=2")):
        entered = True
    assert not entered and time.perf_counter() - t0 < 5


def test_cli_promote_unreachable_is_one_line_exit_3(monkeypatch, capsys):
    from sslflow import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    assert cli.main(["promote", "--version", "1", "--set", "tracking.preflight_timeout_s=2"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("sslflow promote: error:") and UNREACHABLE in err and "\n" not in err


def test_tracking_settings(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = load_settings([], project=tmp_path)
    assert s.tracking.model_name == "ssl-encoder"
    assert s.promotion.metric == "linear_top1"
    assert resolve_tracking_uri(s) == f"sqlite:///{tmp_path / 'mlflow.db'}"  # the project's database
    s = load_settings([], ["tracking.uri=http://mlflow:5000", "promotion.min_delta=1", "pretrain.lr=3"])
    assert resolve_tracking_uri(s) == "http://mlflow:5000"
    assert s.promotion.min_delta == 1.0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(s) == "sqlite:///env.db"  # the environment wins
    with pytest.raises(ConfigError, match=r"unknown setting promotion\.min_detla \(did you mean promotion\.min_delta"):
        load_settings([], ["promotion.min_detla=1"])
    with pytest.raises(ConfigError, match=r"promotion\.min_delta must be >= 0"):
        load_settings([], ["promotion.min_delta=-1"])
    profile = tmp_path / "p.yaml"
    profile.write_text("tracking: {experiment: nightly}\npretrain: {lr: 1.0}\n")
    assert load_settings(profile).tracking.experiment == "nightly"
