"""Autoencoder: the backbone encodes an image, a convolutional decoder puts it back (Hinton &
Salakhutdinov, 2006; convolutional form as in Masci et al., 2011)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.ssl_models.losses.generative import reconstruction_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext
from sslflow.ssl_models.schema import Choices, Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)
CODES = ("pooled", "spatial")
#: The decoder's channels double per coarser stage at most this many times (x8 `decoder_dim`).
MAX_DOUBLINGS = 3
#: added to each image's per-channel variance before dividing by its square root (`target_norm`)
TARGET_NORM_EPS = 1e-4


def upsampling_plan(size: int) -> tuple[int, int]:
    """(seed side s0, number of x2 stages k) of a decoder to `size` px: s0 in [4, 8) for sizes
    of at least 4, s0 * 2**k == size whenever size is s0 times a power of two (16, 28, 32, 96,
    224, ...); otherwise the decoder resizes its output (s0 * 2**k > size) bilinearly to `size`."""
    k = max(0, (size // 4).bit_length() - 1)
    return -(-size // 2**k), k


class ConvDecoder(nn.Module):
    """A vector (or a feature map) -> a (B, 3, size, size) image, in [0, 1] with `sigmoid`
    (DCGAN-style generator).

    From a vector: Linear to a (c_0, s0, s0) seed map (`upsampling_plan` gives s0 and the number
    of stages k); from a (in_dim, m, m) map (`in_side` = m): a 1x1 convolution to c_0 channels,
    s0 = m and k = round(log2(size / m)). Then BN-ReLU and k stages of ConvTranspose2d(4,
    stride 2)-BN-ReLU doubling the side and halving the channels (c_i = width * 2^min(k - i, 3),
    so the finest stage has `width` channels), a 3x3 convolution to RGB and a sigmoid (or
    nothing, for unbounded targets); a side that is not s0 * 2^k is resized bilinearly at the
    end. Matched to the view size: 32 px -> 4x4 seed, 3 stages; 224 px -> 7x7 seed, 5 stages.
    """

    def __init__(self, in_dim: int, size: int, width: int, sigmoid: bool = True, in_side: int = 0) -> None:
        super().__init__()
        self.size, self.sigmoid, self.from_map = size, sigmoid, in_side > 0
        if self.from_map:
            self.seed_side, stages = in_side, max(0, round(math.log2(size / in_side)))
        else:
            self.seed_side, stages = upsampling_plan(size)
        channels = [width * 2 ** min(stages - i, MAX_DOUBLINGS) for i in range(stages + 1)]
        self.seed_channels = channels[0]
        self.fc = (nn.Conv2d(in_dim, channels[0], 1) if self.from_map
                   else nn.Linear(in_dim, channels[0] * self.seed_side**2))
        layers: list[nn.Module] = [nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in itertools.pairwise(channels):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(channels[-1], 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        seed = self.fc(z)
        x = self.net(seed if self.from_map else seed.view(-1, self.seed_channels, self.seed_side, self.seed_side))
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return torch.sigmoid(x) if self.sigmoid else x


def standardize_images(x: Tensor) -> Tensor:
    """Each image and channel of (B, C, H, W) to zero mean and unit variance (`target_norm`)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + TARGET_NORM_EPS)


def inputs_above_outputs(inputs: Tensor, outputs: Tensor, per_row: int = 8) -> Tensor:
    """(2N, 3, H, W): rows of `per_row` inputs, each followed by the row of their outputs (a grid
    written `per_row` images wide shows every input above its reconstruction)."""
    rows = [t for i in range(0, len(inputs), per_row) for t in (inputs[i:i + per_row], outputs[i:i + per_row])]
    return torch.cat(rows)


class ReconstructionMixin:
    """What the autoencoder and the VAE share: the view, its target, the pictures."""

    ctx: TrainContext
    cfg: Any

    def _register_stats(self) -> None:
        # non-persistent: not in the state_dict (they follow the settings), moved by .to(device)
        self.register_buffer("pixel_mean", torch.tensor(self.ctx.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.ctx.std).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def view_specs(cls, cfg, ctx: TrainContext) -> list[ViewSpec]:
        """One lightly augmented view: the augment recipe's random resized crop and flip, no colour
        operation; it is both the encoder's input and the reconstruction target."""
        return [ViewSpec.from_augment(ctx.augment, ctx.view_size).geometry_only()]

    def pixels(self, view: Tensor) -> Tensor:
        """The normalised view back in [0, 1]."""
        return (view * self.pixel_std.to(view.dtype) + self.pixel_mean.to(view.dtype)).clamp(0, 1)

    def target(self, view: Tensor) -> Tensor:
        """What the decoder must output: the view in [0, 1], or with `target_norm` each image and
        channel of it standardised (its colour offset and contrast removed)."""
        x = self.pixels(view)
        return standardize_images(x) if self.cfg.target_norm else x

    def reconstruct(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def visualize(self, batch: Batch) -> dict[str, Tensor]:
        """`reconstructions`: the un-augmented images (resized to the view size if it differs),
        each row of 8 above the row of their reconstructions."""
        x = batch.raw()
        if x.shape[-1] != self.ctx.view_size:
            x = F.interpolate(x, size=(self.ctx.view_size,) * 2, mode="bilinear", align_corners=False,
                              antialias=True).clamp(0, 1)
        recon = self.reconstruct(batch.normalize(x)).float()
        if self.cfg.target_norm:  # back to pixels with each input's own channel means and stds
            mean = x.mean(dim=(2, 3), keepdim=True)
            std = torch.sqrt(x.var(dim=(2, 3), unbiased=False, keepdim=True) + TARGET_NORM_EPS)
            recon = (recon * std + mean).clamp(0, 1)
        return {"reconstructions": inputs_above_outputs(x.float(), recon)}


@dataclass(frozen=True)
class AutoencoderConfig:
    """`pretrain.autoencoder.*`"""

    decoder_dim: int = setting(32, domain=DIM, doc="channels of the decoder's finest stage (x2 per coarser "
                               "stage, at most x8)")
    target_norm: bool = setting(False, doc="reconstruct each image standardised per channel (its colour "
                                "offset and contrast removed) instead of its pixels; no output sigmoid")
    code: str = setting("pooled", domain=Choices(CODES), doc="what the decoder reads: the backbone's pooled "
                        "features, or its spatial map (forward_features; ViT patch tokens as a grid)")


@register_method
class Autoencoder(ReconstructionMixin, SSLMethod):
    """Backbone (encoder) + convolutional decoder from the pooled features; per-pixel MSE.

    - Code: the backbone's pooled features (feature_dim), the vector every evaluation reads, so
      the representation that is evaluated is the one that must hold the image. (Decoding the
      spatial map would let position-specific information bypass the pooled vector.)
    - Decoder: `ConvDecoder` matched to the view size (`ctx.view_size`), sigmoid output in [0, 1].
    - Input and target: one geometry-only view (crop + flip of the augment recipe, no colour
      operation), the target being that view in [0, 1]; the loss is the mean squared error per
      pixel, logged as `reconstruction_mse`.
    - `visualize`: the un-augmented images above their reconstructions (MLflow `plots/method/`).

    Deviations: the 2006 autoencoder is fully connected with RBM pre-training and a small code;
    here the encoder is the configured backbone (trained end to end) and the code is its pooled
    feature vector, without an extra bottleneck. Data parallel: per-pixel mean, synced BN.
    """

    name: ClassVar[str] = "autoencoder"
    family: ClassVar[str] = "generative"
    Config: ClassVar[type] = AutoencoderConfig

    def __init__(self, backbone, cfg: AutoencoderConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        if cfg.code == "spatial":
            side = self.feature_map(torch.zeros(1, 3, ctx.view_size, ctx.view_size), dry_run=True).shape[-1]
            self.decoder = ConvDecoder(backbone.spatial_dim, ctx.view_size, cfg.decoder_dim,
                                       sigmoid=not cfg.target_norm, in_side=side)
        else:
            self.decoder = ConvDecoder(self.feature_dim, ctx.view_size, cfg.decoder_dim, sigmoid=not cfg.target_norm)
        self._register_stats()

    def feature_map(self, x: Tensor, dry_run: bool = False) -> Tensor:
        """The backbone's (B, C, h, w) map: a ResNet's last stage, a ViT's patch tokens as a grid.
        `dry_run`: in eval mode without gradient (finding the map's side leaves no trace)."""
        if dry_run:
            was_training = self.backbone.training
            self.backbone.eval()
            with torch.no_grad():
                out = self.feature_map(x)
            self.backbone.train(was_training)
            return out
        f = self.backbone.forward_features(x)
        if f.ndim == 3:  # (B, 1 + L, D) tokens, class token first
            patches = f[:, 1:]
            side = math.isqrt(patches.shape[1])
            f = patches.transpose(1, 2).reshape(f.shape[0], -1, side, side)
        return f

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder(self.feature_map(x) if self.cfg.code == "spatial" else self.backbone(x))

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x = batch.views[0]
        loss = reconstruction_loss(self.reconstruct(x), self.target(x), "mean")
        return StepOutput(loss, {"reconstruction_mse": loss.detach()})
