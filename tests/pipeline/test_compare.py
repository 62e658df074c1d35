"""`sslflow compare`: several methods as child runs of one MLflow parent, a table printed and logged;
each child is a full training run (its method's pictures, e.g. the VAE's reconstructions, included)."""

from __future__ import annotations

import csv
import io
import math

import pytest

from helpers import FAST
from sslflow.cli import main

FAST_SET = [a for s in [*FAST, "eval.knn_k=5", "eval.linear_epochs=2", "tracking.embedding_map=false",
                        "tracking.augment_grid_images=0"] for a in ("--set", s)]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server for the module (its startup limit is generous: a loaded 2-core
    machine needs more than the 90 s the CLI's own temporary server waits)."""
    import os

    old = os.environ.get("PREFECT_HOME")
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=180):
            yield
    finally:  # later modules keep their own Prefect home
        if old is None:
            os.environ.pop("PREFECT_HOME", None)


# `project` (tests/pipeline/conftest.py) runs on this module's `prefect_server`


def test_compare_trains_children_of_one_parent_and_tables_them(project, capfd):
    from mlflow import MlflowClient

    code = main(["compare", "--methods", "simclr,vae", "--epochs", "1", "--run-name", "cmp", "--no-progress",
                 "--report", str(project / "report"), "--project", str(project), *FAST_SET])
    out, err = capfd.readouterr()  # capfd: Prefect's log handler must not bind to a per-test stream
    assert code == 0, out + err
    table = out[out.index("method "):]
    assert "random-init kNN" in table and "linear top-1" in table and "images/s" in table
    assert "simclr" in table and "vae" in table and "contrastive" in table and "generative" in table

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("sslflow").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sslflow.kind") == "compare"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["method"] for r in children) == ["simclr", "vae"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"knn_top1", "linear_top1", "knn_top1_at_init", "eval/knn_top1"} <= set(child.data.metrics)
        assert child.data.params["pretrain.epochs"] == "1"
        assert child.data.tags["data_version"] == parent.data.tags["data_version"]
    assert {"simclr/knn_top1", "vae/linear_top1"} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert artifacts == {"comparison/compare.md", "comparison/compare.csv", "comparison/compare.png"}

    rows = list(csv.DictReader(io.StringIO((project / "report" / "compare.csv").read_text())))
    assert [r["method"] for r in rows] == ["simclr", "vae"]
    for r in rows:
        assert 0 <= float(r["knn_top1"]) <= 100 and float(r["images_per_s"]) > 0 and not r["error"]
        assert math.isclose(float(r["knn_gain"]), float(r["knn_top1"]) - float(r["knn_top1_at_init"]))
    assert "| simclr | contrastive |" in (project / "report" / "compare.md").read_text()
    assert (project / "runs" / "cmp" / "vae" / "encoder.pt").is_file()
    # what a method shows of itself (the VAE's reconstruction grid and samples) reaches its MLflow run
    vae = next(r for r in children if r.data.tags["method"] == "vae")
    pictures = {a.path for a in client.list_artifacts(vae.info.run_id, "plots/method")}
    assert pictures == {"plots/method/reconstructions.png", "plots/method/samples.png"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "simclr,bylo"], "unknown method 'bylo' (did you mean byol?)"),
    (["--methods", "simclr", "--epochs", "0"], "--epochs must be at least 1"),
    (["--methods", "simclr", "--data", "nowhere/train"], "--data nowhere/train does not exist"),
    (["--methods", "simclr", "--set", "pretrain.simclr.temprature=0.1"], "did you mean pretrain.simclr.temperature"),
])
def test_bad_input_is_one_line_before_anything_trains(tmp_path, capsys, argv, message):
    code = main(["compare", *argv, "--project", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_table_formats_escape_user_strings_and_show_failures():
    from sslflow.tasks.tracking.comparison import comparison_row, csv_table, failed_row, markdown_table, text_table

    ok = comparison_row("simclr", "contrastive", "resnet18-w8", 40, {"knn_top1": 90.0, "linear_top1": 92.5},
                        {"knn_top1_at_init": 40.0, "images_per_s": 512.3}, 2.5)
    bad = failed_row("m|<b>", "x", "resnet18-w8", 40, "TrainingDiverged: loss is nan\nat step 3", 0.1)
    md = markdown_table([ok, bad])
    assert "| simclr | contrastive | resnet18-w8 | 40 | 90.0 | 92.5 | 40.0 | 50.0 | 2.5 | 512 |" in md
    assert "m\\|&lt;b&gt;" in md and "<b>" not in md and "failed: TrainingDiverged: loss is nan at step 3" in md
    assert "failed: TrainingDiverged" in text_table([ok, bad])
    rows = list(csv.DictReader(io.StringIO(csv_table([ok, bad]))))
    assert rows[0]["knn_gain"] == "50.0" and rows[1]["knn_top1"] == "" and rows[1]["error"].startswith("Training")
