"""The registered model as a service: image bytes (base64) or file paths in, embeddings out.

`log_encoder` (sslflow.tasks.tracking.registry) logs the encoder with two flavors in one MLflow
model: `pytorch` (as before: `mlflow.pytorch.load_model(uri)` gives the backbone, normalised
float tensors in) and a `python_function` flavor whose loader is this module, so

    mlflow models serve -m models:/ssl-encoder@champion --env-manager local
    curl -d '{"dataframe_records": [{"image": "<base64 JPEG/PNG bytes>"}]}' \
         -H 'Content-Type: application/json' http://127.0.0.1:5000/invocations
    -> {"predictions": [[0.12, ...]]}          # one (feature_dim,) embedding per row

and `mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [...]}))` answer with the
embeddings. Inside: the same decoding and quarantine rules as ingest (`tasks.data.decode`:
EXIF orientation, alpha on white, 16-bit greys scaled, size and decompression-bomb limits),
the encoder's input side (shorter side, central square) and the training run's mean / std.
A bad row is one error naming the row and the ingest reason (HTTP 400 when served).

Input columns (a DataFrame, or a dict / list of records): `image` (base64 text or raw bytes)
or `path`. Paths are read on the serving host, so they are refused unless the environment
variable `SSLFLOW_SERVE_PATH_ROOT` names a directory, and then only files inside it (symlinks
resolved): an HTTP client must not be able to read the server's files.

The model directory holds `sslflow/encoder.pt` (weights and metadata, loaded with
`weights_only=True`) and `sslflow/preprocess.json`; the pytorch flavor's pickled module is
never loaded here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

PYFUNC_DATA = "sslflow"  # the pyfunc flavor's data directory inside the model
PATH_ROOT_ENV = "SSLFLOW_SERVE_PATH_ROOT"
INPUT_COLUMNS = ("image", "path")


class ImageEmbeddingModel:
    """What `mlflow.pyfunc.load_model` returns the predict of (see the module docstring)."""

    def __init__(self, encoder: Any, meta: dict[str, Any], batch_size: int = 64) -> None:
        from sslflow.core.sections import IngestConfig
        from sslflow.tasks.data.decode import DecodeOptions

        self.encoder, self.meta, self.batch_size = encoder, meta, batch_size
        self.opts = DecodeOptions.of(IngestConfig(), int(meta["image_size"]))  # ingest's default limits

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        from sslflow.tasks.serving.encoder import embed_images

        rows = _records(model_input)
        images = [self._decode(i, row) for i, row in enumerate(rows)]
        if not images:
            return np.zeros((0, self.encoder.feature_dim), np.float32)
        return embed_images(self.encoder, np.stack(images), self.batch_size, "cpu")

    def _decode(self, i: int, row: dict[str, Any]) -> np.ndarray:
        from sslflow.tasks.data.decode import Accepted, FileTask, decode_bytes, read_file

        image, path = row.get("image"), row.get("path")
        if _present(image):
            data = _b64(image, i)
            rel = f"row {i}"
        elif _present(path):
            data = read_file(FileTask(f"row {i} ({path})", _allowed_path(str(path), i), None), self.opts)
            rel = f"row {i} ({path})"
            if not isinstance(data, bytes):
                raise _bad_input(f"{data.rel}: {data.reason}: {data.detail}")
        else:
            raise _bad_input(f"row {i}: give an 'image' (base64 bytes) or a 'path' column")
        out = decode_bytes(data, rel, None, hashlib.sha256(data).hexdigest(), self.opts)
        if not isinstance(out, Accepted):
            raise _bad_input(f"{out.rel}: {getattr(out, 'reason', 'duplicate')}: {getattr(out, 'detail', '')}")
        return out.image


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and value != ""


def _records(model_input: Any) -> list[dict[str, Any]]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        unknown = [c for c in model_input.columns if c not in INPUT_COLUMNS]
        if unknown or not len(model_input.columns):
            raise _bad_input(f"input columns must be 'image' (base64) and/or 'path'; got {list(model_input.columns)}")
        return model_input.to_dict("records")
    if isinstance(model_input, dict):
        return _records(pd.DataFrame(model_input))
    if isinstance(model_input, list | tuple):
        return _records(pd.DataFrame(list(model_input)))
    raise _bad_input(f"expected a DataFrame with an 'image' or 'path' column, got {type(model_input).__name__}")


def _b64(value: Any, i: int) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise _bad_input(f"row {i}: 'image' is not base64 text") from None


def _allowed_path(path: str, i: int) -> str:
    root = os.environ.get(PATH_ROOT_ENV, "")
    if not root:
        raise _bad_input(f"row {i}: 'path' input is off: set {PATH_ROOT_ENV} to the directory the model may read "
                         "images from, or send the image bytes (base64) in 'image'")
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise _bad_input(f"row {i}: {path} is outside {PATH_ROOT_ENV}")
    return real


def _bad_input(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# ------------------------------------------------------------------------------------ the flavor
def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> ImageEmbeddingModel:
    """MLflow's entry point (`loader_module` of the python_function flavor); `model_config` unused."""
    from sslflow.ssl_models.checkpoint import load_encoder
    from sslflow.tasks.serving.encoder import ImageEncoder

    backbone, meta = load_encoder(Path(data_path) / "encoder.pt")
    backbone.eval()
    return ImageEmbeddingModel(ImageEncoder(backbone, int(meta["image_size"]), meta["mean"], meta["std"]).eval(), meta)


def signature(feature_dim: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)])
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.float32), (-1, feature_dim))]))


def input_example(images: np.ndarray) -> Any:
    """The images (uint8 NHWC) as the `image` column of PNG bytes in base64."""
    import io

    import pandas as pd
    from PIL import Image

    encoded = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
        encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return pd.DataFrame({"image": encoded})


def save_model(path: str, mlflow_model: Any, *, pytorch_model: Any, encoder_file: str | Path, feature_dim: int,
               tensor_example: np.ndarray, tensor_signature: Any, example_images: np.ndarray,
               pip_requirements: list[str] | None = None, **_: Any) -> None:
    """A flavor module's `save_model` for `mlflow.models.Model.log`: the pytorch flavor as
    `mlflow.pytorch.save_model` writes it (a torch.export program traced on `tensor_example`,
    normalised float images, dynamic batch), then `sslflow/encoder.pt` and a python_function
    flavor that loads it with this module (image bytes in), with the image signature and input
    example (the model's signature is the served one; `metadata` describes the tensor input)."""
    import mlflow.pytorch
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import _save_example

    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, pip_requirements=pip_requirements,
                              signature=tensor_signature, input_example=tensor_example)
    data = Path(path) / PYFUNC_DATA
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(encoder_file, data / "encoder.pt")
    meta = {k: v for k, v in (mlflow_model.metadata or {}).items() if k in ("image_size", "mean", "std", "name")}
    (data / "preprocess.json").write_text(json.dumps({
        **meta, "input": "columns image (base64 JPEG/PNG/WebP/BMP/TIFF/GIF bytes) or path ("
                         f"{PATH_ROOT_ENV} only); decoded as ingest does, shorter side to image_size, "
                         "central square, RGB / 255, (x - mean) / std",
        "output": f"float32 ({feature_dim},) per row"}, indent=1))
    pyfunc = dict(mlflow_model.flavors["python_function"])
    pyfunc.update(loader_module=__name__, data=PYFUNC_DATA)
    for key in ("model_path", "pickle_module_name", "config"):  # the pytorch loader's, not ours
        pyfunc.pop(key, None)
    mlflow_model.flavors["python_function"] = pyfunc
    mlflow_model.signature = signature(feature_dim)
    _save_example(mlflow_model, input_example(example_images), path)
    mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))
