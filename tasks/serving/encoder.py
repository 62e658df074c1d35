"""An encoder ready to embed images: loaded from a run directory or the MLflow registry, with the
training run's input pipeline (resize, normalise) attached, run in batches on a device.

    encoder, meta = load_encoder_for_embedding("runs/demo")          # or models:/ssl-encoder@champion
    x = embed_images(encoder, images, batch_size=256, device="cpu")   # (N, feature_dim) float32

Inputs are uint8 (N, H, W, 3) RGB images (a NumPy array, a tensor, or any iterable of single
images / chunks, e.g. a store's shards): each is brought to the encoder's input side
(`meta["image_size"]`) the way ingest brings files to the store size (shorter side to the size,
then the central square; a square image is just resized, antialiased), scaled to [0, 1] and
normalised with the run's mean / std. Float (N, 3, H, W) tensors are taken as already
normalised. Every file is read as data: `encoder.pt` with `torch.load(weights_only=True)`, a
registered model through its `sslflow/encoder.pt` copy, never its pickled module.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.core.errors import UserError
from sslflow.ssl_models.augment import normalize, to_float
from sslflow.ssl_models.backbones import Backbone
from sslflow.ssl_models.checkpoint import ENCODER_FILE, load_encoder

#: Where a registered model keeps the plain encoder (weights + metadata), beside its MLflow flavors.
MODEL_ENCODER = f"sslflow/{ENCODER_FILE}"
ImageBatches = np.ndarray | Tensor | Iterable[np.ndarray | Tensor]


class ImageEncoder(nn.Module):
    """A backbone with its input pipeline: uint8 (N, H, W, 3) images in, (N, feature_dim) out."""

    def __init__(self, backbone: Backbone, image_size: int, mean: Iterable[float], std: Iterable[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.feature_dim = int(backbone.feature_dim)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, H, W, 3) -> normalised float32 (N, 3, S, S), S = `image_size`, on their device."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"expected uint8 (N, H, W, 3) RGB images, got {images.dtype} {tuple(images.shape)}")
        return normalize(fit_side(to_float(images), self.image_size), self.mean, self.std)

    def forward(self, images: Tensor) -> Tensor:
        x = self.preprocess(images) if images.dtype == torch.uint8 else images
        return self.backbone(x)


def fit_side(x: Tensor, size: int) -> Tensor:
    """(N, C, H, W) float -> (N, C, size, size): the central square, resized (antialiased bilinear)."""
    h, w = x.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top:top + s, left:left + s]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


# ------------------------------------------------------------------------------------ loading
def load_encoder_for_embedding(model_ref: str | Path) -> tuple[ImageEncoder, dict[str, Any]]:
    """(ImageEncoder in eval mode on the CPU, metadata) from a run directory, an `encoder.pt`, or an
    MLflow model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/encoder`).

    `meta` holds the backbone's metadata (name, image_size, feature_dim, config), mean, std,
    `model_ref` and `fingerprint` (sha256 of the weights: what a resumed embedding table checks).
    Bad references are one-line `UserError`s; MLflow being down surfaces as MLflow's exception
    (the caller turns it into one line, see `sslflow.tasks.tracking.run.outages_as_one_line`).
    """
    ref = str(model_ref)
    if ref.startswith(("models:/", "runs:/")):
        with tempfile.TemporaryDirectory(prefix="sslflow-model-") as tmp:
            backbone, meta = load_encoder(_download_registered(ref, Path(tmp)))
    else:
        path = Path(ref)
        if not (path / ENCODER_FILE).is_file() and not path.is_file():
            raise UserError(f"--model {ref}: neither a run directory with {ENCODER_FILE}, an {ENCODER_FILE} file, "
                            "nor a models:/NAME@ALIAS URI")
        backbone, meta = load_encoder(path)
    backbone.eval()
    encoder = ImageEncoder(backbone, int(meta["image_size"]), meta["mean"], meta["std"]).eval()
    return encoder, {**meta, "model_ref": ref, "fingerprint": weights_fingerprint(backbone)}


def _download_registered(uri: str, dst: Path) -> Path:
    """The `sslflow/encoder.pt` of a logged / registered model (only that file is downloaded)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{MODEL_ENCODER}",
                                                        dst_path=str(dst)))
    except MlflowException as e:
        code = getattr(e, "error_code", "")
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE") or "not found" in text.lower() \
                or "does not exist" in text.lower() or "no such file" in text.lower():
            raise UserError(f"--model {uri}: no such model, or it holds no {MODEL_ENCODER} (models registered "
                            f"before sslflow embed: register the run again): {text[:200]}") from None
        raise
    except OSError as e:
        raise UserError(f"--model {uri}: {MODEL_ENCODER} could not be read: {e}") from None


def weights_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ embedding
def iter_batches(images: ImageBatches, batch_size: int) -> Iterator[Tensor]:
    """Tensors of at most `batch_size` images from an array / tensor of N images, or an iterable of
    single images (H, W, 3) and chunks (n, H, W, 3) (consecutive images must share a size)."""
    if isinstance(images, np.ndarray | Tensor) and images.ndim == 4:
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            yield chunk if isinstance(chunk, Tensor) else torch.from_numpy(np.ascontiguousarray(chunk))
        return
    pending: list[Tensor] = []
    count = 0
    for item in images:
        t = item if isinstance(item, Tensor) else torch.from_numpy(np.require(item, requirements=("C", "W")))
        t = t.unsqueeze(0) if t.ndim == 3 else t
        pending.append(t)
        count += len(t)
        while count >= batch_size:
            flat = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield flat[:batch_size]
            rest = flat[batch_size:]
            pending, count = ([rest] if len(rest) else []), len(rest)
    if count:
        yield torch.cat(pending) if len(pending) > 1 else pending[0]


@torch.no_grad()
def embed_images(encoder: nn.Module, images: ImageBatches, batch_size: int = 256, device: str | torch.device = "cpu",
                 *, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, feature_dim) float32 embeddings of `images` (see the module docstring), `batch_size` at a
    time on `device`; `progress(n)` is called after each batch with its size.

    `encoder` is an `ImageEncoder` (uint8 images in) or any module taking normalised float
    (N, 3, H, W) tensors. On CUDA the forward runs under bf16 autocast (as evaluation does); the
    result is float32 on the host."""
    device = torch.device(device)
    was = encoder.training
    encoder.eval().to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    parts: list[np.ndarray] = []
    try:
        for batch in iter_batches(images, batch_size):
            x = batch.to(device, non_blocking=True)
            with autocast:
                y = encoder(x)
            parts.append(y.float().cpu().numpy())
            if progress is not None:
                progress(len(batch))
    finally:
        encoder.train(was)
    if not parts:
        return np.zeros((0, int(getattr(encoder, "feature_dim", 0))), np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)
