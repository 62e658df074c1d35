"""`sslflow embed` and the embedding API issue 16 builds on: load an encoder, embed images in
batches, a resumable Parquet table with ingest's quarantine, MLflow logging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sslflow.cli import main
from sslflow.core.errors import UserError
from sslflow.ssl_models.backbones import SSLResNet
from sslflow.ssl_models.checkpoint import save_encoder
from sslflow.tasks.serving import embed as embed_module
from sslflow.tasks.serving.encoder import embed_images, load_encoder_for_embedding

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An untrained 16 px encoder as a run directory (embedding does not care how it was trained)."""
    out = tmp_path_factory.mktemp("enc") / "run"
    torch.manual_seed(0)
    save_encoder(SSLResNet("resnet18", 8, True, 16), out, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), export=False)
    return out


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Labeled PNGs of several sizes (one grayscale), a loose one, and files ingest quarantines."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L").save(root / "loose.png")
    (root / "cat" / "notes.jpg").write_bytes(b"not an image at all")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "cut.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(root / "tiny.png")
    return root


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_embed_images_takes_arrays_iterables_and_tensors(run_dir):
    encoder, meta = load_encoder_for_embedding(run_dir)
    assert meta["image_size"] == 16 and meta["feature_dim"] == encoder.feature_dim == 64 and meta["fingerprint"]
    images = np.random.default_rng(1).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    whole = embed_images(encoder, images, batch_size=3)
    assert whole.shape == (7, 64) and whole.dtype == np.float32
    np.testing.assert_allclose(embed_images(encoder, list(images), batch_size=4), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embed_images(encoder, [images[:2], images[2:]], batch_size=5), whole,
                               rtol=1e-5, atol=1e-6)
    # a plain backbone on already normalised float tensors gives the same features
    x = encoder.preprocess(torch.from_numpy(images))
    np.testing.assert_allclose(embed_images(encoder.backbone, x, batch_size=7), whole, rtol=1e-5, atol=1e-6)
    # larger images are brought to the encoder's side (antialiased), not refused
    assert embed_images(encoder, np.zeros((2, 40, 30, 3), np.uint8)).shape == (2, 64)
    assert embed_images(encoder, []).shape == (0, 64)


def test_bad_model_references_are_one_line(tmp_path):
    for ref in (str(tmp_path / "nothing"), str(tmp_path)):
        with pytest.raises(UserError, match="neither a run directory"):
            load_encoder_for_embedding(ref)


def test_embed_a_folder_resumes_after_a_crash_and_quarantines_like_ingest(run_dir, folder, tmp_path, monkeypatch):
    import pandas as pd

    from sslflow.core.settings import load_settings

    ingest = load_settings([], []).ingest
    encoder, meta = load_encoder_for_embedding(run_dir)
    once = embed_module.embed_source(encoder, meta, folder, tmp_path / "once.parquet", ingest=ingest, batch_size=4,
                                     workers=1, log=lambda m: None)
    assert once.rows == once.embedded == 11 and once.skipped == 0
    reasons = {q["path"]: q["reason"] for q in once.quarantined}
    assert reasons == {"cat/notes.jpg": "not_an_image", "dog/cut.png": "truncated", "tiny.png": "too_small"}
    assert json.loads((tmp_path / "once.quarantine.json").read_text())[0]["reason"]
    table = pd.read_parquet(tmp_path / "once.parquet")
    assert list(table.columns) == ["path", "sha256", "split", "label", "embedding"]
    assert table.set_index("path")["label"].to_dict()["cat/0.png"] == "cat" and table["split"].isna().all()
    assert table.set_index("path")["label"].isna()["loose.png"] and len(table["embedding"].iat[0]) == 64

    # a crash after the first part: the part stays, the next run embeds only the rest
    out = tmp_path / "resumed.parquet"
    real, calls = embed_module.embed_images, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(embed_module, "embed_images", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        embed_module.embed_source(encoder, meta, folder, out, ingest=ingest, batch_size=4, part_rows=4, workers=1,
                                  log=lambda m: None)
    assert not out.exists() and len(list((tmp_path / "resumed.parquet.parts").iterdir())) == 1
    monkeypatch.setattr(embed_module, "embed_images", real)
    again = embed_module.embed_source(encoder, meta, folder, out, ingest=ingest, batch_size=4, part_rows=4,
                                      workers=1, log=lambda m: None)
    assert (again.skipped, again.embedded, again.rows) == (4, 7, 11)
    assert not (tmp_path / "resumed.parquet.parts").exists()
    resumed = pd.read_parquet(out).set_index("path").sort_index()
    expected = table.set_index("path").sort_index()
    assert list(resumed.index) == list(expected.index)
    np.testing.assert_allclose(np.stack(resumed["embedding"]), np.stack(expected["embedding"]), rtol=1e-5, atol=1e-6)
    # a finished table: nothing to do; another encoder's table is refused
    assert embed_module.embed_source(encoder, meta, folder, out, ingest=ingest, workers=1,
                                     log=lambda m: None).embedded == 0
    with pytest.raises(UserError, match="other weights"):
        embed_module.embed_source(encoder, {**meta, "fingerprint": "0" * 16}, folder, out, ingest=ingest,
                                  log=lambda m: None)


def test_sslflow_embed_a_store_root_logs_to_mlflow(run_dir, demo_stores, tmp_path, capsys, monkeypatch):
    import mlflow
    import pandas as pd

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    root = Path(demo_stores["train"]).parent
    code, out, err = _cli(capsys, "embed", "--model", str(run_dir), "--source", str(root), "--out",
                          str(tmp_path / "emb.parquet"), "--batch-size", "64", "--log-every", "1",
                          "--set", "device=cpu")
    assert code == 0, err
    report = json.loads(out)
    assert report["rows"] == 240 and report["embedded"] == 240 and report["quarantined"] == 0
    assert "240/240 images" in err  # not a terminal: progress lines
    table = pd.read_parquet(tmp_path / "emb.parquet")
    assert table["split"].value_counts().to_dict() == {"train": 160, "test": 80}
    assert table["label"].notna().all() and table["sha256"].str.len().eq(64).all()
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(report["mlflow_run_id"])
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {root.name, "emb.parquet"}
    assert run.data.metrics["embed/rows"] == 240
    artifacts = mlflow.MlflowClient(tracking_uri=uri).list_artifacts(run.info.run_id, "embeddings")
    assert [Path(a.path).name for a in artifacts] == ["emb.parquet"]
    # user errors: one line, exit 2
    for argv, match in ((("--source", str(tmp_path / "none")), "does not exist"),
                        (("--source", str(root), "--out", str(tmp_path / "x.csv")), ".parquet")):
        args = ["embed", "--model", str(run_dir), "--out", str(tmp_path / "e.parquet"), "--no-mlflow", *argv]
        code, _, err = _cli(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
