"""ONNX export of the encoder, checked with ONNX Runtime on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslflow.ssl_models.backbones import SSLResNet
from sslflow.ssl_models.checkpoint import save_encoder

ort = pytest.importorskip("onnxruntime", reason="the optional sslflow[onnx] dependencies are not installed")


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(tmp_path):
    from sslflow.tasks.serving.encoder import load_encoder_for_embedding
    from sslflow.tasks.serving.onnx_export import export_onnx

    torch.manual_seed(0)
    save_encoder(SSLResNet("resnet18", 8, False, 32), tmp_path / "run", (0.5,) * 3, (0.25,) * 3, export=False)
    report = export_onnx(tmp_path / "run", tmp_path / "encoder.onnx", batch=4)
    assert report["max_abs_diff"] < 1e-4 and report["feature_dim"] == 64 and report["image_size"] == 32
    # another batch size through the saved file
    encoder, _ = load_encoder_for_embedding(tmp_path / "run")
    images = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    x = encoder.preprocess(images)
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, encoder.backbone(x).numpy(), rtol=1e-4, atol=1e-4)
