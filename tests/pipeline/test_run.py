"""The main job (`sslflow run`, the README's first command) end to end on the demo set."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import REPO
from sslflow.cli import main
from sslflow.ssl_models.store import ImageStore


def run_main_job(project, capsys, *overrides: str) -> tuple[str, dict, dict]:
    """`sslflow run` on the repository's params.yaml (+ overrides), as `make demo` runs it, in
    its own project: checks what every run leaves behind; returns the output, the pretraining
    metrics and the evaluation report."""
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    code = main(["run", "--project", str(project), "--run-name", "demo", "--no-progress",
                 *(a for s in overrides for a in ("--set", s))])
    out = capsys.readouterr().out
    assert code == 0, out
    run = project / "runs" / "demo"
    metrics = json.loads((run / "metrics.json").read_text())
    report = json.loads((run / "evaluation.json").read_text())
    assert (project / "reports" / "ingest" / "train.json").is_file()
    assert "run directory:" in out
    return out, metrics, report


def test_main_job_runs_end_to_end_on_the_project_settings(tmp_path, capsys):
    """The main job with a smaller demo set and budget (the full one: the extended test below):
    ingest, validate, pretrain, evaluate, register, every result file where the README says."""
    _, metrics, report = run_main_job(
        tmp_path, capsys, "ingest.demo_train_per_class=20", "ingest.demo_test_per_class=10", "pretrain.epochs=2",
        "pretrain.eval_every=1", "eval.knn_k=5", "eval.linear_epochs=2", "eval.finetune_epochs=1")
    assert len(ImageStore.open(tmp_path / "data" / "store" / "train")) == 200
    assert len(ImageStore.open(tmp_path / "data" / "store" / "test")) == 100
    assert {"knn_top1", "knn_top1_at_init", "final_loss"} <= set(metrics), metrics
    assert {"knn_top1", "linear_top1"} <= set(report), report
    assert (tmp_path / "runs" / "demo" / "encoder.pt").is_file() and (tmp_path / "mlflow.db").is_file()


@pytest.mark.slow
@pytest.mark.extended
def test_main_job_ingests_pretrains_and_clearly_learns(tmp_path, capsys):
    """The repository's project settings (the CPU demo profile), exactly as `make demo` runs
    them, in a project directory of its own (about 3 minutes on 2 cores)."""
    _, metrics, report = run_main_job(tmp_path, capsys)
    assert len(ImageStore.open(tmp_path / "data" / "store" / "train")) == 2000
    assert len(ImageStore.open(tmp_path / "data" / "store" / "test")) == 1000
    # SSL has to beat the randomly initialised encoder by a wide margin, not just chance (10%)
    assert metrics["knn_top1"] > metrics["knn_top1_at_init"] + 25, metrics
    assert report["knn_top1"] > 60 and report["linear_top1"] > 60, report
