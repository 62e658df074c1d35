"""Retrain evidence without Prefect: the decision policies, the last training as the reference
(a real MLflow registry in SQLite), near-duplicates of an incoming folder, the drift report in
MLflow, and `sslflow select`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import fast_params
from sslflow.cli import main
from sslflow.ssl_models.backbones import SSLResNet
from sslflow.ssl_models.checkpoint import save_encoder
from sslflow.ssl_models.store import ImageStore
from sslflow.tasks.pipeline.decisions import last_training, retrain_decision, trained_on
from sslflow.tasks.serving.drift import DriftResult

pytestmark = pytest.mark.usefixtures("single_thread", "mlflow_db")


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One SQLite tracking database for the module (creating one takes ~10 s on 2 cores)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        yield db


def _drift(drifted: bool) -> DriftResult:
    return DriftResult(0.2 if drifted else 0.001, 0.002 if drifted else 0.6, 0.01, drifted, 40, 12, 99, 0.5)


def test_policies_count_drift_any():
    # count: today's rule; the drift result is ignored
    assert not retrain_decision(52, 40, 100, drift=_drift(True)).train
    # drift: trains on a rejected test only, whatever the count
    d = retrain_decision(52, 40, 100, policy="drift", drift=_drift(True))
    assert d.train and "drift: MMD^2 0.2, p 0.002" in d.reason and d.to_dict()["drift"]["p_value"] == 0.002
    d = retrain_decision(500, 40, 10, policy="drift", drift=_drift(False))
    assert not d.train and d.reason.startswith("nothing to do: no drift") and d.new_images == 460
    # any: either
    assert retrain_decision(52, 40, 100, policy="any", drift=_drift(True)).train
    assert retrain_decision(500, 40, 10, policy="any", drift=_drift(False)).train
    d = retrain_decision(52, 40, 100, policy="any", drift=_drift(False))
    assert not d.train and "no drift" in d.reason and "< min_new_images 100" in d.reason
    # nothing new: never trains, whatever the policy (no test of an empty batch)
    assert not retrain_decision(40, 40, 0, policy="drift", drift=None).train
    assert retrain_decision(52, 40, 100, policy="drift", force=True).train


def test_the_reference_is_the_last_training_not_the_champion(tmp_path, monkeypatch):
    """v1 champion on 40 images, v2 challenger on 52: 52 images in the store are nothing new."""
    from mlflow import MlflowClient

    settings = fast_params()
    client = MlflowClient()
    name = settings.tracking.model_name
    client.create_registered_model(name)
    for n in (40, 52):
        client.create_model_version(name, f"file://{tmp_path}/m{n}", tags={"data.train_images": str(n)})
    client.set_registered_model_alias(name, "champion", "1")
    last = last_training(settings, client)
    assert int(last.version) == 2 and trained_on(last) == 52
    assert retrain_decision(52, trained_on(last), 10).new_images == 0
    assert not retrain_decision(52, trained_on(last), 10).train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "run"
    torch.manual_seed(0)
    save_encoder(SSLResNet("resnet18", 8, True, 16), out, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), export=False)
    return out


def _textures(n: int, seed: int, side: int = 32) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                                .resize((side, side), Image.BICUBIC)) for _ in range(n)])


def test_near_duplicates_of_an_incoming_folder_are_reported_and_quarantined(run_dir, tmp_path):
    from PIL import Image

    from sslflow.tasks.data.ingest import ingest
    from sslflow.tasks.pipeline.drift import quarantine_near_duplicates, scan_near_duplicates
    from sslflow.tasks.serving.encoder import load_encoder_for_embedding

    settings = fast_params("ingest.size=32", "ingest.workers=1", "versioning.dvc=off",
                           "ingest.near_duplicate_threshold=0.995")
    old = tmp_path / "old"
    old.mkdir()
    images = _textures(20, seed=1)
    for i, img in enumerate(images):
        Image.fromarray(img).save(old / f"o{i}.png")
    ingest(str(old), tmp_path / "store", "train", settings=settings, reports_dir=tmp_path / "reports")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for i, img in enumerate(_textures(6, seed=2)):
        Image.fromarray(img).save(incoming / f"new{i}.png")
    Image.fromarray(images[7]).resize((24, 24), Image.BICUBIC).save(incoming / "copy_of_o7.jpg", quality=80)
    buf = io.BytesIO()
    Image.open(incoming / "new3.png").save(buf, "JPEG", quality=85)
    (incoming / "new3_again.jpg").write_bytes(buf.getvalue())
    encoder, meta = load_encoder_for_embedding(run_dir)
    hits = scan_near_duplicates(settings, incoming, tmp_path / "store", encoder=encoder, meta=meta,
                                cache_dir=tmp_path / "cache")
    found = {h["path"]: h["matched"] for h in hits}
    assert found == {"copy_of_o7.jpg": "store:train/o7.png", "new3_again.jpg": "incoming:new3.png"}, hits
    assert list((tmp_path / "cache").glob("train-*.parquet"))  # the store's embeddings, for the next night
    dest = quarantine_near_duplicates(incoming, hits, tmp_path / "rejected")
    assert sorted(p.name for p in incoming.iterdir()) == [f"new{i}.png" for i in range(6)]
    listed = json.loads((dest / "near_duplicates.json").read_text())
    assert {r["reason"] for r in listed} == {"near_duplicate"} and (dest / "copy_of_o7.jpg").is_file()


@pytest.fixture
def mixed_store(tmp_path) -> Path:
    """A train split: 20 labeled demo images, then 40 unlabeled (30 of one class, 10 of another)."""
    from sslflow.tasks.data.demo import CLASSES, generate_demo

    images, labels = generate_demo(6, size=16, seed=0)
    store = ImageStore.create(tmp_path / "store" / "train", 16, 16)
    store.add(images[:20], [CLASSES[y] for y in labels[:20]])
    store.add(images[20:60], [None] * 40)
    return tmp_path / "store"


def test_sslflow_select_writes_a_csv_and_logs_it(run_dir, mixed_store, tmp_path, capsys, monkeypatch):
    import mlflow
    import pandas as pd

    out = tmp_path / "sel" / "selection.csv"
    code = main(["select", "--n", "8", "--model", str(run_dir), "--store", str(mixed_store), "--out", str(out),
                 "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and "select: 8 of 40 unlabeled images" in printed, printed
    df = pd.read_csv(out)
    assert list(df.columns) == ["rank", "index", "path", "sha256", "weight"] and len(df) == 8
    assert df["index"].min() >= 20 and df["index"].is_unique  # only unlabeled rows
    [run] = mlflow.search_runs(experiment_names=["sslflow"], filter_string="tags.`sslflow.kind` = 'selection'",
                               output_format="list")
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)] == ["selection.csv"]
    # bad input: one line, exit 2
    assert main(["select", "--n", "0", "--model", str(run_dir), "--out", str(out), "--no-mlflow"]) == 2
    assert main(["select", "--n", "3", "--model", str(run_dir), "--store", str(tmp_path / "nope"),
                 "--out", str(out), "--no-mlflow"]) == 2


def test_drift_evidence_and_its_mlflow_report(run_dir, tmp_path, monkeypatch):
    """Store rows after the last training are the new batch; the report lands in MLflow."""
    from mlflow import MlflowClient

    from sslflow.tasks.pipeline.drift import drift_evidence, log_retrain_decision
    from sslflow.tasks.serving.encoder import load_encoder_for_embedding

    store = ImageStore.create(tmp_path / "store" / "train", 32, 32)
    store.add(_textures(60, seed=3), [None] * 60)
    bright = np.clip(_textures(30, seed=4).astype(np.int16) + 90, 0, 255).astype(np.uint8)
    store.add(bright, [None] * 30)
    settings = fast_params("pipeline.drift_permutations=99", "pipeline.drift_level=0.05", "pipeline.drift_clusters=4")
    encoder, _ = load_encoder_for_embedding(run_dir)
    same = drift_evidence(settings, tmp_path / "store", 30, encoder=encoder)  # rows 30..59 + the bright ones
    assert same is not None and same.result.new == 60 and same.result.reference == 30
    ev = drift_evidence(settings, tmp_path / "store", 60, encoder=encoder)
    assert ev.result.drifted and ev.result.new == 30 and len(ev.result.clusters) == 4
    assert drift_evidence(settings, tmp_path / "store", 90, encoder=encoder) is None  # nothing new
    info = {"train": True, "reason": ev.result.summary(), "new_images": 30, "images": 90}
    for _ in range(2):  # a second night: the history has two points
        rid = log_retrain_decision(settings, info, ev, near_dups=[])
    client = MlflowClient()
    run = client.get_run(rid)
    assert run.data.tags["drift.drifted"] == "true" and run.data.tags["retrain.decision"] == "train"
    assert run.data.metrics["drift/p_value"] == pytest.approx(ev.result.p_value)
    names = {a.path for a in client.list_artifacts(rid, "drift")} | {a.path for a in client.list_artifacts(rid)}
    assert {"drift/map.png", "drift/history.png", "drift/report.json", "near_duplicates.json"} <= names


def test_retrain_selects_what_to_label_next_after_training(run_dir, mixed_store, tmp_path):
    """`pipeline.select_n`: the step `retrain` runs after a training (plain function, no Prefect run)."""
    import pandas as pd
    from mlflow import MlflowClient

    from sslflow.flows.retrain import select_after_training

    settings = fast_params("pipeline.select_n=5", "pipeline.drift_clusters=3")
    client = MlflowClient()
    exp = client.get_experiment_by_name("sslflow") or client.get_experiment(client.create_experiment("sslflow"))
    rid = client.create_run(exp.experiment_id).info.run_id
    out = select_after_training(settings, mixed_store, {"run_dir": str(run_dir)}, rid, tmp_path / "reports", "cpu",
                                reference=30)  # rows 30.. are "new": drift-weighted picks
    df = pd.read_csv(out)
    assert len(df) == 5 and df["index"].min() >= 20 and (df["weight"] > 0).all()
    assert [a.path for a in client.list_artifacts(rid)] == ["selection.csv"]
