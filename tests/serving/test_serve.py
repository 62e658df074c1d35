"""The registered model answers HTTP: `mlflow models serve -m models:/NAME@champion` as a real
process, a real POST of base64 image bytes, the embeddings the run's encoder gives; and
`sslflow embed --model models:/...` reads the same registered model."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import BIN, stop_process_group
from sslflow.ssl_models.backbones import SSLResNet
from sslflow.ssl_models.checkpoint import save_encoder

NAME = "serve-encoder"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A 16 px encoder logged, registered and made champion in a SQLite registry."""
    import mlflow

    from sslflow.tasks.tracking.registry import log_encoder, register_encoder

    tmp = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_encoder(SSLResNet("resnet18", 8, True, 16), tmp / "run", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), export=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            # an explicit experiment of this database: the fluent API may still hold the active
            # experiment id of another test's database
            experiment = mlflow.MlflowClient(uri).create_experiment("serve")
            with mlflow.start_run(experiment_id=experiment):
                info = log_encoder(tmp / "run")
            version = register_encoder(info.model_uri, NAME).version
            mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version)
        finally:
            mlflow.set_tracking_uri(None)
    return {"uri": uri, "run": tmp / "run", "tmp": tmp}


def _png(seed: int, shape=(30, 40, 3)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _expected(run_dir: Path, files: list[bytes]) -> np.ndarray:
    from sslflow.core.sections import IngestConfig
    from sslflow.tasks.data.decode import DecodeOptions, decode_bytes
    from sslflow.tasks.serving.encoder import embed_images, load_encoder_for_embedding

    encoder, meta = load_encoder_for_embedding(run_dir)
    opts = DecodeOptions.of(IngestConfig(), meta["image_size"])
    images = [decode_bytes(b, "x", None, "sha", opts).image for b in files]
    return embed_images(encoder, images)


def _bindable() -> int | None:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_image_bytes_with_embeddings(registry):
    port = _bindable()
    if port is None:
        pytest.skip("cannot bind a port on 127.0.0.1 here")
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn, beside mlflow
    env.pop("SSLFLOW_SERVE_PATH_ROOT", None)
    log = open(registry["tmp"] / "serve.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow models serve did not start: {(registry['tmp'] / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        files = [_png(1), _png(2, (50, 20, 3))]
        status, body = _post(f"{base}/invocations",
                             {"dataframe_records": [{"image": base64.b64encode(b).decode()} for b in files]})
        assert status == 200, body
        got = np.asarray(body["predictions"], np.float32)
        assert got.shape == (2, 64)
        np.testing.assert_allclose(got, _expected(registry["run"], files), rtol=1e-4, atol=1e-5)
        # a bad row is a 400 naming the row and ingest's reason; paths are off by default
        status, body = _post(f"{base}/invocations", {"dataframe_records": [
            {"image": base64.b64encode(files[0]).decode()}, {"image": base64.b64encode(b"junk").decode()}]})
        assert status == 400 and "row 1: not_an_image" in body.get("message", ""), body
        status, body = _post(f"{base}/invocations", {"dataframe_records": [{"path": "/etc/passwd"}]})
        assert status == 400 and "SSLFLOW_SERVE_PATH_ROOT" in body.get("message", ""), body
    finally:
        stop_process_group(proc)
        log.close()


def test_path_column_only_inside_the_allowed_root(registry, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    inside = tmp_path / "allowed"
    inside.mkdir()
    (inside / "a.png").write_bytes(_png(3))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    with pytest.raises(MlflowException, match="SSLFLOW_SERVE_PATH_ROOT"):
        model.predict(pd.DataFrame({"path": [str(inside / "a.png")]}))
    monkeypatch.setenv("SSLFLOW_SERVE_PATH_ROOT", str(inside))
    got = model.predict(pd.DataFrame({"path": [str(inside / "a.png")]}))
    np.testing.assert_allclose(got, _expected(registry["run"], [_png(3)]), rtol=1e-4, atol=1e-5)
    (inside / "escape.png").symlink_to(tmp_path.parent)
    with pytest.raises(MlflowException, match="outside"):
        model.predict(pd.DataFrame({"path": [str(inside / ".." / "x.png")]}))


def test_sslflow_embed_reads_the_champion_from_the_registry(registry, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from sslflow.cli import main

    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(3):
        Image.open(io.BytesIO(_png(10 + i))).save(folder / f"{i}.png")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    code = main(["embed", "--model", f"models:/{NAME}@champion", "--source", str(folder), "--out",
                 str(tmp_path / "e.parquet"), "--no-mlflow", "--set", "device=cpu"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["rows"] == 3, err
    code = main(["embed", "--model", "models:/no-such-model@champion", "--source", str(folder), "--out",
                 str(tmp_path / "f.parquet"), "--no-mlflow"])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no such model" in err, err
