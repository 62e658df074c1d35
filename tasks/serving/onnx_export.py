"""ONNX export of an encoder, checked with ONNX Runtime on the same inputs.

    report = export_onnx("runs/demo", "runs/demo/encoder.onnx")   # {"max_abs_diff": 2e-6, ...}

The graph takes normalised float32 (N, 3, S, S) images (as the pytorch flavor and encoder.pt2 do;
the resize / normalise of `sslflow embed` stay outside, in the caller), with a dynamic batch
dimension, and returns the (N, feature_dim) pooled features. Exported with `torch.onnx.export`
(the torch.export-based exporter), then run by ONNX Runtime's CPU provider on a batch of real
or random images next to PyTorch: the largest absolute difference is returned, and one above
`tolerance` is an error, so a file that computes something else is never left behind.
Needs the optional dependencies `pip install 'sslflow[onnx]'` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslflow.core.errors import UserError
from sslflow.ssl_models.atomic import write_atomic


def export_onnx(model_ref: str | Path, out: str | Path, *, images: np.ndarray | None = None, batch: int = 4,
                tolerance: float = 1e-3, opset: int = 18) -> dict[str, Any]:
    """Export the encoder of `model_ref` (run dir, encoder.pt or models:/ URI) to `out`, check it
    with ONNX Runtime on `images` (uint8 NHWC; default: `batch` random images at the encoder's
    size) and return {"path", "max_abs_diff", "batch", "image_size", "feature_dim", "opset"}."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX export needs onnx, onnxruntime and onnxscript: pip install 'sslflow[onnx]'") from None
    from sslflow.tasks.serving.encoder import load_encoder_for_embedding

    encoder, meta = load_encoder_for_embedding(model_ref)
    size = int(meta["image_size"])
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    x = encoder.preprocess(torch.from_numpy(np.ascontiguousarray(images)))
    backbone = encoder.backbone.eval()
    with torch.no_grad():
        expected = backbone(x).numpy()
    program = torch.onnx.export(backbone, (x,), dynamo=True, opset_version=opset, input_names=["images"],
                                output_names=["features"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    out = Path(out)
    data = program.model_proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(["features"], {"images": x.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if not np.isfinite(diff) or diff > tolerance:
        raise UserError(f"the ONNX graph differs from PyTorch by {diff:.3g} (> {tolerance:g}): not written")
    write_atomic(out, data)
    return {"path": str(out), "max_abs_diff": diff, "batch": int(x.shape[0]), "image_size": size,
            "feature_dim": int(expected.shape[1]), "opset": opset}
