"""Colorization (Zhang, Isola & Efros, 2016): predict an image's a*b* colour channels from its lightness L*."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.color import first_rgb_conv, lab_to_rgb, rgb_to_lab, tie_to_luma_
from sslflow.ssl_models.losses.dense import (
    colorization_loss,
    colorization_regression_loss,
    nearest_bin,
    rebalancing_weights,
)
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext
from sslflow.ssl_models.schema import POSITIVE, Choices, Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)
TARGETS = ("classification", "regression")
#: sRGB colours enumerated per channel to find the in-gamut a*b* bins (48^3 = 110,592 colours).
GAMUT_STEPS = 48


@dataclass(frozen=True)
class ColorizationConfig:
    """`pretrain.colorization.*`"""

    target: str = setting("classification", domain=Choices(TARGETS),
                          doc="classification over quantised a*b* bins with class rebalancing (Zhang et al.) "
                              "or the L2 regression baseline")
    head_hidden_dim: int = setting(256, domain=DIM, doc="channels of the prediction head's 3x3 convolution")
    output_stride: int = setting(4, domain=Range(1, 64),
                                 doc="the a*b* map is predicted and scored at 1/output_stride of the view side "
                                     "(Zhang et al.: 4); 1 = full resolution")
    bin_size: float = setting(10.0, domain=Range(2, 50), doc="side of the a*b* quantisation grid (in-gamut bins kept)")
    neighbours: int = setting(5, domain=Range(1, 32), doc="nearest bins of the soft-encoded target")
    sigma: float = setting(5.0, domain=POSITIVE,
                           doc="Gaussian width (a*b* units) of the soft encoding and of the prior's smoothing")
    rebalance: float = setting(0.5, domain=Range(0, 1, lo_open=True),
                               doc="lambda: weights 1 / ((1 - lambda) prior + lambda / Q); 1 = no rebalancing")
    tie_luma: bool = setting(True, doc="keep the encoder's first convolution a function of the luma "
                             "(`color.tie_to_luma_`), so RGB images are encoded as their gray versions; false = "
                             "RGB is fed to an encoder that only saw gray images")
    annealed_temperature: float = setting(0.38, domain=POSITIVE,
                                          doc="temperature of the annealed mean that turns bins into a colour "
                                              "in the pictures")


def gamut_bins(bin_size: float, steps: int = GAMUT_STEPS) -> Tensor:
    """(Q, 2) float64 centres (multiples of `bin_size`) of the a*b* bins that some sRGB colour
    falls in (nearest centre), sorted by (a, b); Q = 261 for the paper's grid of 10
    (Zhang et al. report 313, from a wider gamut)."""
    g = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    rgb = torch.stack(torch.meshgrid(g, g, g, indexing="ij")).reshape(3, -1, 1)
    ab = rgb_to_lab(rgb)[1:].reshape(2, -1).T
    cells = torch.unique(torch.round(ab / bin_size).long(), dim=0)  # sorted lexicographically
    return cells.double() * bin_size


def feature_map(backbone: nn.Module, x: Tensor) -> Tensor:
    """The backbone's spatial features as a (B, C, h, w) map: a ResNet's last stage as is, a
    ViT's patch tokens back on their grid (class token dropped)."""
    f = backbone.forward_features(x)
    if f.ndim == 3:
        side = math.isqrt(f.shape[1] - 1)
        f = f[:, 1:].transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)
    return f


def rows_of(*groups: Tensor, per_row: int = 8) -> Tensor:
    """Interleave equally long image batches row by row: `per_row` of the first group, the same
    `per_row` of the second, ..., then the next `per_row` (a grid `per_row` wide shows each
    input above its outputs). The last row of each group is padded with black to `per_row`."""
    n = groups[0].shape[0]
    per_row = min(per_row, n)
    rows = []
    for i in range(0, n, per_row):
        for g in groups:
            chunk = g[i:i + per_row]
            pad = per_row - chunk.shape[0]
            rows.append(torch.cat([chunk, chunk.new_zeros(pad, *chunk.shape[1:])]) if pad else chunk)
    return torch.cat(rows)


@register_method
class Colorization(SSLMethod):
    """Backbone on the L* channel (as a gray RGB image) + a dense head predicting a*b*.

    - Input: one geometry-only view (the augment recipe's crop and flip, no colour operation:
      the colours are the target), converted to L*a*b* on the device (`ssl_models.color`).
      The encoder sees L* / 100 replicated to 3 channels and normalised with the run's
      mean / std, i.e. the gray image (L* / 100 is within a few percent of the sRGB gray
      level), so it stays a 3-channel RGB encoder. Evaluation on RGB: with `tie_luma` (the
      default) the first convolution is re-tied after every step (and at initialisation) to
      respond to the luma of its input only (`color.tie_to_luma_`), so evaluation feeds RGB
      as usual and the encoder computes exactly what it computes on the gray version of the
      image: the conversion to gray is folded into its weights. (Untied, the colour
      differences of its first layer would keep their random initial values, never trained
      on gray inputs, and colour images would be encoded through them.) Zhang et al.
      evaluate on L* alone.
    - Prediction: `backbone.forward_features` (the last stage's map, stride 8 with the CIFAR
      stem) -> 3x3 conv - BN - ReLU - 1x1 conv to Q bin logits (or 2 a*b* values for
      `target: regression`), resized bilinearly to 1/`output_stride` of the view side (4, as
      the paper: 8x8 at 32 px, 56x56 at 224 px; 1 = the full image, which costs ~16x more
      in the Q-way loss, the step's largest term), the ground truth a*b* area-downsampled
      to the same side; the pictures upsample the prediction to the image size.
    - Loss (`target: classification`, the default, the paper's): cross-entropy against the
      soft-encoded target (5 nearest of the Q in-gamut bins of a 10-unit grid, Gaussian
      sigma 5), each pixel weighted by the class-rebalancing weight of its nearest bin
      (lambda 0.5). Classification because colour is multimodal: the paper shows the L2
      regression (`target: regression`) averages to desaturated colours and learns weaker
      features; regression is kept as the paper's baseline and for data whose colours are
      unimodal.
    - Prior of the rebalancing: the paper computes the colour distribution of ImageNet
      beforehand; here it is the running mean of the per-batch histograms of nearest bins
      over every batch seen (a buffer, checkpointed; the global batch's histogram under data
      parallel), so it needs no pass over the data and converges to the training set's
      distribution within the first epoch.
    - Metrics: `pixel_accuracy` (argmax bin == nearest bin) or `ab_rmse` (regression).
    - `visualize`: rows of gray inputs, predicted colorizations (annealed mean, T = 0.38, of
      the bin distribution) and originals (MLflow `plots/method/colorization.png`).

    Deviations: Zhang et al.'s network is a VGG-style stack with dilated convolutions;
    here the encoder is the configured backbone and the
    decoder a two-layer head on its last map. The in-gamut bins are the ones reached by
    sRGB colours (261 for the 10-unit grid, the paper's 313 came from a wider gamut).
    """

    name: ClassVar[str] = "colorization"
    family: ClassVar[str] = "pretext"
    Config: ClassVar[type] = ColorizationConfig

    bins: Tensor
    prior: Tensor
    prior_batches: Tensor

    def __init__(self, backbone, cfg: ColorizationConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        bins = gamut_bins(cfg.bin_size).to(torch.get_default_dtype())
        classes = bins.shape[0] if cfg.target == "classification" else 2
        hidden = cfg.head_hidden_dim
        self.head = nn.Sequential(nn.Conv2d(backbone.spatial_dim, hidden, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(hidden), nn.ReLU(inplace=True), nn.Conv2d(hidden, classes, 1))
        self.output_size = max(1, ctx.view_size // cfg.output_stride)
        # derived from the settings: not saved; the prior is data and is checkpointed
        self.register_buffer("bins", bins, persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(ctx.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(ctx.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("prior", torch.zeros(bins.shape[0]))
        self.register_buffer("prior_batches", torch.zeros((), dtype=torch.long))
        self.after_step(0.0)  # the luma tie holds from the start (the kNN at init is the same encoder's)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Re-tie the first convolution to the luma (the optimizer step moved it off)."""
        if self.cfg.tie_luma:
            tie_to_luma_(first_rgb_conv(self.backbone), self.ctx.std)

    @classmethod
    def view_specs(cls, cfg: ColorizationConfig, ctx: TrainContext) -> list[ViewSpec]:
        """One view with the recipe's crop and flip and no colour operation (colour is the target)."""
        return [ViewSpec.from_augment(ctx.augment, ctx.view_size).geometry_only()]

    # ------------------------------------------------------------------------------ pieces
    def to_lab(self, view: Tensor) -> Tensor:
        """A normalised view -> its L*a*b* (B, 3, H, W), in at least float32."""
        rgb = view * self.pixel_std.to(view.dtype) + self.pixel_mean.to(view.dtype)
        return rgb_to_lab(rgb.clamp(0, 1))

    def gray_input(self, lightness: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, 1, H, W) L* -> the encoder's input: L* / 100 as a normalised 3-channel gray image."""
        gray = (lightness / 100).to(dtype).expand(-1, 3, -1, -1)
        return (gray - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)

    def predict(self, x: Tensor) -> Tensor:
        """Normalised gray input -> (B, Q or 2, s, s) bin logits or a*b* / 100 at the output side."""
        out = self.head(feature_map(self.backbone, x))
        s = self.output_size
        return F.interpolate(out, size=(s, s), mode="bilinear", align_corners=False) if out.shape[-1] != s else out

    def target_ab(self, lab: Tensor) -> Tensor:
        ab = lab[:, 1:]
        s = self.output_size
        return F.interpolate(ab, size=(s, s), mode="area") if ab.shape[-1] != s else ab

    @torch.no_grad()
    def _update_prior(self, nearest: Tensor) -> None:
        """Running mean of the global batch's nearest-bin histograms (equal pixels per rank)."""
        counts = torch.bincount(nearest.flatten(), minlength=self.prior.shape[0]).to(self.prior.dtype)
        hist = distributed.all_reduce_mean(counts / nearest.numel())
        self.prior_batches.add_(1)
        self.prior.add_((hist - self.prior) / self.prior_batches.to(self.prior.dtype))

    # ------------------------------------------------------------------------------ step
    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x = batch.views[0]
        lab = self.to_lab(x)
        out = self.predict(self.gray_input(lab[:, :1], x.dtype))
        ab = self.target_ab(lab)
        cfg = self.cfg
        if cfg.target == "regression":
            loss = colorization_regression_loss(out * 100, ab)
            return StepOutput(loss, {"ab_rmse": loss.detach().sqrt() * 100})
        nearest = nearest_bin(ab, self.bins)
        self._update_prior(nearest)
        weights = rebalancing_weights(self.prior, self.bins, cfg.rebalance, cfg.sigma)
        loss = colorization_loss(out, ab, self.bins, weights, cfg.neighbours, cfg.sigma)
        accuracy = (out.detach().argmax(dim=1) == nearest).float().mean()
        return StepOutput(loss, {"pixel_accuracy": accuracy})

    @torch.no_grad()
    def colorize(self, rgb: Tensor) -> tuple[Tensor, Tensor]:
        """RGB in [0, 1] -> (the gray input in [0, 1], the predicted colorization in [0, 1])."""
        lab = rgb_to_lab(rgb)
        lightness = lab[:, :1]
        out = self.predict(self.gray_input(lightness, rgb.dtype)).float()
        if self.cfg.target == "regression":
            ab = out * 100
        else:  # the annealed mean of the bin distribution (Zhang et al., Sec. 2.3)
            probs = torch.softmax(out / self.cfg.annealed_temperature, dim=1)
            ab = torch.einsum("bqhw,qc->bchw", probs, self.bins.float())
        ab = F.interpolate(ab, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        colour = lab_to_rgb(torch.cat([lightness.float(), ab], dim=1))
        return (lightness / 100).float().expand(-1, 3, -1, -1), colour

    @torch.no_grad()
    def visualize(self, batch: Batch) -> dict[str, Tensor]:
        """`colorization`: rows of 8 gray inputs, their predicted colours and the originals."""
        x = batch.raw()
        if x.shape[-1] != self.ctx.view_size:
            x = F.interpolate(x, size=(self.ctx.view_size,) * 2, mode="bilinear", align_corners=False,
                              antialias=True).clamp(0, 1)
        gray, colour = self.colorize(x)
        return {"colorization": rows_of(gray, colour, x.float())}
