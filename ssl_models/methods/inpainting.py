"""Inpainting with a context encoder (Pathak et al., 2016): fill in a dropped region from its context."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.losses.dense import masked_reconstruction_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext
from sslflow.ssl_models.schema import Choices, Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)
MASKS = ("center", "blocks")
#: The decoder's stages halve their channels down to this many.
MIN_DECODER_CHANNELS = 16


@dataclass(frozen=True)
class InpaintingConfig:
    """`pretrain.inpainting.*`"""

    mask: str = setting("center", domain=Choices(MASKS),
                        doc="center: one central square; blocks: num_blocks squares at random positions "
                            "(may overlap), drawn per image")
    mask_fraction: float = setting(0.5, domain=Range(0, 1, lo_open=True, hi_open=True),
                                   doc="side of the central square as a fraction of the view's (0.5 = a "
                                       "quarter of the area, Pathak et al.); blocks: each block's side is "
                                       "this / sqrt(num_blocks), covering at most the same area")
    num_blocks: int = setting(4, domain=Range(1, 64), doc="squares per image with mask: blocks")
    norm_target: bool = setting(False, doc="score the hole after normalising it by its own per-channel mean and "
                                "std (MAE's normalised-pixel target): its structure rather than its colours")
    decoder_dim: int = setting(256, domain=DIM, doc="channels of the decoder's first stage (halved per x2 stage, "
                               f"at least {MIN_DECODER_CHANNELS})")


def feature_map(backbone: nn.Module, x: Tensor) -> Tensor:
    """The backbone's spatial features as a (B, C, h, w) map: a ResNet's last stage as is, a
    ViT's patch tokens back on their grid (class token dropped)."""
    f = backbone.forward_features(x)
    if f.ndim == 3:
        side = math.isqrt(f.shape[1] - 1)
        f = f[:, 1:].transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)
    return f


@torch.no_grad()
def map_side(backbone: nn.Module, size: int) -> int:
    """Side of the backbone's feature map for `size` px inputs (one dry run in eval mode, so
    BatchNorm statistics are untouched; no random number is drawn)."""
    was_training = backbone.training
    backbone.eval()
    try:
        return int(feature_map(backbone, torch.zeros(1, 3, size, size)).shape[-1])
    finally:
        backbone.train(was_training)


def rows_of(*groups: Tensor, per_row: int = 8) -> Tensor:
    """Interleave equally long image batches row by row (see `colorization.rows_of`)."""
    n = groups[0].shape[0]
    per_row = min(per_row, n)
    rows = []
    for i in range(0, n, per_row):
        for g in groups:
            chunk = g[i:i + per_row]
            pad = per_row - chunk.shape[0]
            rows.append(torch.cat([chunk, chunk.new_zeros(pad, *chunk.shape[1:])]) if pad else chunk)
    return torch.cat(rows)


class ChannelwiseFC(nn.Module):
    """Pathak et al.'s channel-wise fully connected layer: each channel's h x w map is fully
    connected to itself (C separate (hw x hw) matrices, no cross-channel parameters), so every
    location of the decoder's input can see every location of the encoder's output."""

    def __init__(self, channels: int, side: int) -> None:
        super().__init__()
        n = side * side
        bound = 1 / math.sqrt(n)
        self.weight = nn.Parameter(torch.empty(channels, n, n).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(channels, n))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = torch.einsum("bcp,cpq->bcq", x.flatten(2), self.weight) + self.bias
        return y.view(b, c, h, w)


class ContextDecoder(nn.Module):
    """Encoder map (B, C, s, s) -> (B, 3, size, size) image in the normalised pixel space.

    Channel-wise FC, a 1x1 convolution across channels (the paper's stride-1 convolution after
    it), then k = ceil(log2(size / s)) stages of ConvTranspose2d(4, stride 2)-BN-ReLU (channels
    halved per stage from `width`, at least 16) and a 3x3 convolution to RGB; resized
    bilinearly when s * 2^k overshoots `size`. 32 px, CIFAR stem: 4x4 -> 3 stages.
    """

    def __init__(self, channels: int, side: int, size: int, width: int) -> None:
        super().__init__()
        self.size = size
        stages = max(0, math.ceil(math.log2(size / side)))
        widths = [max(width // 2**i, MIN_DECODER_CHANNELS) for i in range(stages + 1)]
        layers: list[nn.Module] = [ChannelwiseFC(channels, side), nn.Conv2d(channels, widths[0], 1, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in itertools.pairwise(widths):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, f: Tensor) -> Tensor:
        x = self.net(f)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


@register_method
class Inpainting(SSLMethod):
    """Context encoder: backbone on the masked view, decoder back to the image, L2 on the hole.

    - Input: one geometry-only view (the recipe's crop and flip), with the masked pixels set
      to 0 in the normalised space, i.e. the mean colour (the paper fills the hole with the
      mean pixel value). `mask: center` drops the central square of side `mask_fraction`
      (0.5: a quarter of the image, the paper's central region); `mask: blocks` drops
      `num_blocks` squares of side mask_fraction / sqrt(num_blocks) at random positions
      (the paper's "random block" masks), drawn per image on the device with the global RNG
      (checkpointed, so a resumed run draws the same masks). Under data parallel every rank
      draws the masks of the whole global batch and keeps its rows, as one process would.
    - Encoder: `backbone.forward_features` (the last stage's map); decoder: `ContextDecoder`
      (channel-wise FC + up-convolutions), predicting the normalised pixels.
    - Loss: `masked_reconstruction_loss`, the squared error on the dropped pixels only,
      normalised per image (logged as `reconstruction_mse`). With `norm_target` the hole is
      first normalised by its own per-channel mean and std (MAE's normalised-pixel target,
      He et al., 2022, per hole instead of per patch): the network is asked where the hole's
      light and dark structures go rather than their colours, which keeps image-specific
      colours (a nuisance for most downstream tasks) out of the representation.
    - `visualize`: rows of masked inputs, completions (the input with the hole filled by the
      prediction) and originals (MLflow `plots/method/inpainting.png`), central mask or blocks
      from a fixed seed.

    Deviations: no adversarial term (the paper's joint loss adds one with weight 0.001 for
    sharper completions; it is optional and reported as a small effect on the features, so
    it is not implemented); the reconstruction is scored on the hole only, without the
    paper's 4 px overlap with the context weighted 10x; the encoder is the configured
    backbone instead of AlexNet, and the whole view is decoded (the loss reads the hole).
    """

    name: ClassVar[str] = "inpainting"
    family: ClassVar[str] = "pretext"
    Config: ClassVar[type] = InpaintingConfig

    def __init__(self, backbone, cfg: InpaintingConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        size = ctx.view_size
        self.decoder = ContextDecoder(backbone.spatial_dim, map_side(backbone, size), size, cfg.decoder_dim)
        self.register_buffer("pixel_mean", torch.tensor(ctx.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(ctx.std).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def view_specs(cls, cfg: InpaintingConfig, ctx: TrainContext) -> list[ViewSpec]:
        """One view with the recipe's crop and flip, no colour operation (it is also the target)."""
        return [ViewSpec.from_augment(ctx.augment, ctx.view_size).geometry_only()]

    def masks(self, n: int, size: int, device: torch.device, generator: torch.Generator | None = None,
              shard: bool = True) -> Tensor:
        """(n, 1, size, size) bool, True where a pixel is dropped. With `shard`, the positions of
        the global batch (n x ranks) are drawn and this rank's rows kept."""
        cfg = self.cfg
        ar = torch.arange(size, device=device)
        if cfg.mask == "center":
            side = max(1, round(size * cfg.mask_fraction))
            start = (size - side) // 2
            inside = (ar >= start) & (ar < start + side)
            return (inside[:, None] & inside[None, :]).expand(n, 1, size, size)
        side = max(1, round(size * cfg.mask_fraction / math.sqrt(cfg.num_blocks)))
        world = distributed.world_size() if shard else 1
        rank = distributed.rank() if world > 1 else 0
        u = torch.rand(n * world, cfg.num_blocks, 2, device=device, generator=generator)[rank * n:(rank + 1) * n]
        start = (u * (size - side + 1)).floor().long().clamp_(max=size - side)  # (n, blocks, 2): y, x
        inside = (ar >= start[..., None]) & (ar < start[..., None] + side)  # (n, blocks, 2, size)
        return (inside[:, :, 0, :, None] & inside[:, :, 1, None, :]).any(dim=1, keepdim=True)

    @staticmethod
    def hole_stats(x: Tensor, mask: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
        """Per image and channel mean and std (sqrt(var + eps)) of `x` over the dropped pixels."""
        m = mask.to(x.dtype)
        count = m.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
        mean = (x * m).sum(dim=(2, 3), keepdim=True) / count
        var = ((x - mean).pow(2) * m).sum(dim=(2, 3), keepdim=True) / count
        return mean, (var + eps).sqrt()

    def target(self, x: Tensor, mask: Tensor) -> Tensor:
        """What the hole is scored against: the view, or with `norm_target` the view normalised by
        the hole's own statistics (only the hole's pixels are scored)."""
        if not self.cfg.norm_target:
            return x
        mean, std = self.hole_stats(x, mask)
        return (x - mean) / std

    def complete(self, x: Tensor, mask: Tensor) -> Tensor:
        """The decoder's prediction of the whole view from the view with `mask` dropped."""
        return self.decoder(feature_map(self.backbone, x.masked_fill(mask, 0.0)))

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x = batch.views[0]
        mask = self.masks(x.shape[0], x.shape[-1], x.device)
        loss = masked_reconstruction_loss(self.complete(x, mask), self.target(x, mask), mask)
        return StepOutput(loss, {"reconstruction_mse": loss.detach()})

    @torch.no_grad()
    def visualize(self, batch: Batch) -> dict[str, Tensor]:
        """`inpainting`: rows of 8 masked inputs, their completions and the originals."""
        x = batch.raw()
        size = self.ctx.view_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        g = torch.Generator(device=x.device).manual_seed(0)
        mask = self.masks(x.shape[0], size, x.device, generator=g, shard=False)
        xn = batch.normalize(x)
        pred = self.complete(xn, mask)
        if self.cfg.norm_target:  # back to pixels with the hole's true statistics (as MAE shows its outputs)
            mean, std = self.hole_stats(xn, mask)
            pred = pred * std + mean
        pred = pred.float() * self.pixel_std.float() + self.pixel_mean.float()
        mean = self.pixel_mean.float().expand_as(x)
        masked = torch.where(mask, mean, x.float())
        completed = torch.where(mask, pred.clamp(0, 1), x.float())
        return {"inpainting": rows_of(masked, completed, x.float())}
