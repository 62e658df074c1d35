"""The main job (`sslflow run`, the README's first command) end to end on the demo set."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import REPO
from sslflow.cli import main
from sslflow.ssl_models.store import ImageStore


@pytest.mark.slow
def test_main_job_ingests_pretrains_and_clearly_learns(tmp_path, capsys):
    """The repository's project settings (the CPU demo profile), exactly as `make demo` runs
    them, in a project directory of its own (about 3 minutes on 2 cores)."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    code = main(["run", "--project", str(tmp_path), "--run-name", "demo", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert len(ImageStore.open(tmp_path / "data" / "store" / "train")) == 2000
    assert len(ImageStore.open(tmp_path / "data" / "store" / "test")) == 1000
    run = tmp_path / "runs" / "demo"
    metrics = json.loads((run / "metrics.json").read_text())
    report = json.loads((run / "evaluation.json").read_text())
    # SSL has to beat the randomly initialised encoder by a wide margin, not just chance (10%)
    assert metrics["knn_top1"] > metrics["knn_top1_at_init"] + 25, metrics
    assert report["knn_top1"] > 60 and report["linear_top1"] > 60, report
    assert (tmp_path / "reports" / "ingest" / "train.json").is_file()
    assert "run directory:" in out
