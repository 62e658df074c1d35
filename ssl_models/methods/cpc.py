"""CPC v2 (Henaff et al., 2020; van den Oord et al., 2018): predict the embeddings of the patches
below from a context over the rows above, contrasting them with every other patch of the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    normalize,
    random_grayscale,
)
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.losses.infomax import cpc_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std
from sslflow.ssl_models.schema import PROBABILITY, Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)


@dataclass(frozen=True)
class CPCConfig:
    """`pretrain.cpc.*`"""

    patch_fraction: float = setting(0.25, domain=Range(0, 1, lo_open=True),
                                    doc="patch side as a fraction of the view side (CPC: 64 px patches of 256 px "
                                        "images, 0.25)")
    stride_fraction: float = setting(0.5, domain=Range(0, 1, lo_open=True),
                                     doc="step between patches as a fraction of the patch side (CPC: 0.5, "
                                         "half-overlapping patches)")
    steps: int = setting(5, domain=Range(1, 64), doc="rows predicted below each context row (CPC: up to 5), "
                         "capped by the grid")
    patch_jitter: bool = setting(True, doc="CPC v2's per-patch augmentation: every patch gets its own colour "
                                 "jitter (augment.strength, with probability augment.jitter_prob)")
    patch_gray_prob: float = setting(0.5, domain=PROBABILITY,
                                     doc="per-patch colour dropping: a patch becomes gray with this probability")
    temperature: float = setting(0.0, domain=Range(0, 100),
                                 doc="0 = dot-product scores (CPC); T > 0 = cosine similarity / T")
    context_dim: int = setting(512, domain=DIM, doc="channels of the context network")
    context_layers: int = setting(5, domain=Range(1, 64), doc="residual masked-convolution blocks of the context "
                                  "network (CPC v2: 5)")


@dataclass(frozen=True)
class PatchGrid:
    """Where the patches of a `size` px view are: `grid` x `grid` patches of `patch` px every
    `stride` px; a prediction skips the `skip` rows whose patches overlap the context row, and
    predicts `steps` rows after them."""

    size: int
    patch: int
    stride: int
    grid: int
    skip: int
    steps: int

    @classmethod
    def of(cls, cfg: CPCConfig, size: int) -> PatchGrid:
        patch = max(1, round(size * cfg.patch_fraction))
        stride = max(1, round(patch * cfg.stride_fraction))
        grid = (size - patch) // stride + 1
        skip = math.ceil(patch / stride) - 1
        steps = min(cfg.steps, grid - 1 - skip)
        if steps < 1:
            raise ConfigError(f"pretrain.cpc: {grid} rows of {patch} px patches every {stride} px leave no row to "
                              f"predict after the {skip} overlapping one(s) on {size} px views; lower "
                              "pretrain.cpc.patch_fraction or stride_fraction")
        return cls(size, patch, stride, grid, skip, steps)


def patches(x: Tensor, g: PatchGrid) -> Tensor:
    """(B, C, S, S) -> (B * grid * grid, C, patch, patch), row-major per image."""
    p = x.unfold(2, g.patch, g.stride).unfold(3, g.patch, g.stride)[:, :, :g.grid, :g.grid]  # (B, C, G, G, P, P)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], g.patch, g.patch)


class CausalConv(nn.Conv2d):
    """A k x k convolution over the grid whose output row i reads only rows <= i (padded above
    and on both sides, nothing below): PixelCNN's masking, applied to whole rows."""

    def __init__(self, channels: int, kernel: int = 3) -> None:
        super().__init__(channels, channels, kernel)
        self.k = kernel

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        half = self.k // 2
        return super().forward(F.pad(x, (half, self.k - 1 - half, self.k - 1, 0)))


class ContextBlock(nn.Module):
    """Residual bottleneck block 1x1 - causal 3x3 - 1x1 with ReLUs (pre-activation)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels, 1)
        self.causal = CausalConv(channels)
        self.expand = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.expand(F.relu(self.causal(F.relu(self.reduce(F.relu(x))))))


class ContextNetwork(nn.Module):
    """(B, D, G, G) patch embeddings -> (B, context_dim, G, G) contexts, c[:, :, i] a function
    of the embeddings of rows <= i only."""

    def __init__(self, in_dim: int, dim: int, layers: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(in_dim, dim, 1)
        self.blocks = nn.Sequential(*(ContextBlock(dim) for _ in range(layers)))

    def forward(self, z: Tensor) -> Tensor:
        return F.relu(self.blocks(self.inp(z)))


@register_method
class CPC(SSLMethod):
    """CPC v2 on a grid of overlapping patches, predicting downwards.

    - Patches: the view is cut on the device into a grid of patches of side
      `patch_fraction` x the view side every `stride_fraction` x the patch side (default:
      a quarter of the view, half-overlapping: CPC's 64 / 32 px geometry on 256 px images,
      a 7x7 grid). At 32 px the demo and CIFAR-10 profiles use PATCHES_32.
    - Encoder: every patch through the backbone in one call, its pooled features z (the
      evaluated representation, feature_dim wide; CPC v2 mean-pools its ResNet's last map too).
    - Context: `ContextNetwork`, a PixelCNN-style stack of residual blocks of masked
      (row-causal) convolutions over the z grid, so c_{i,j} sees the rows <= i.
    - Prediction and loss: zhat^{(k)}_{i,j} = W_k c_{i,j} (1x1 convolutions) for the patch
      k rows below after skipping the `skip` rows that share pixels with row i (1 for 50%
      overlap, as Löwe et al.'s CPC reimplementation does; otherwise the prediction can read
      the answer off the shared pixels); InfoNCE (`cpc_loss`) against every other patch
      embedding of the global batch, same-image patches included, dot-product scores.
    - Data parallel: the other ranks' patch embeddings are gathered with gradients and added
      as negatives, so the loss is the single-process loss of the global batch.
    - Metrics: `pretext_accuracy` (the true patch scores highest), `embedding_std` of z.

    Simplifications (CPC v2 -> here): predictions go top to bottom only (v2 also predicts
    upwards, left and right); the context network is a stack of row-causal 3x3 residual
    blocks rather than a full PixelCNN with masked 2-D receptive fields; colour dropping is a
    conversion to gray (v2, after Doersch et al., keeps one colour channel at random) and the
    patches get no spatial jitter;
    the backbone keeps its BatchNorm (v2 replaces it by layer norm so that statistics cannot
    leak between the patches of an image: BN here sees all patches of the batch at once).
    """

    name: ClassVar[str] = "cpc"
    family: ClassVar[str] = "contrastive"
    Config: ClassVar[type] = CPCConfig

    def __init__(self, backbone, cfg: CPCConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.grid = PatchGrid.of(cfg, ctx.view_size)
        self.context = ContextNetwork(self.feature_dim, cfg.context_dim, cfg.context_layers)
        self.predictors = nn.ModuleList(nn.Conv2d(cfg.context_dim, self.feature_dim, 1)
                                        for _ in range(self.grid.steps))

    @classmethod
    def view_specs(cls, cfg: CPCConfig, ctx: TrainContext) -> list[ViewSpec]:
        """One view with the recipe's crop and flip; its colour is augmented per patch (`augment_patches`)."""
        return [ViewSpec.from_augment(ctx.augment, ctx.view_size).geometry_only()]

    @torch.no_grad()
    def augment_patches(self, p: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
        """Per-patch colour jitter (brightness -> contrast -> saturation -> hue, SimCLR's ranges at
        augment.strength, with probability augment.jitter_prob) and colour dropping (gray with
        probability patch_gray_prob), on normalised patches. The uniforms of the global batch's
        patches come from the global RNG (checkpointed) and each rank keeps its rows."""
        cfg, aug = self.cfg, self.ctx.augment
        if not (cfg.patch_jitter and aug.jitter_prob > 0) and cfg.patch_gray_prob == 0:
            return p
        n = p.shape[0]
        rank, world = distributed.rank() if distributed.world_size() > 1 else 0, distributed.world_size()
        u = torch.rand(n * world, 6, device=p.device)[rank * n:(rank + 1) * n].to(p.dtype)
        # back to [0, 1]: the inverse normalisation is a normalisation with (-m / s, 1 / s)
        x = normalize(p, [-m / s for m, s in zip(mean, std, strict=True)], [1 / s for s in std]).clamp_(0, 1)
        if cfg.patch_jitter and aug.jitter_prob > 0:
            on = u[:, 0] < aug.jitter_prob
            lo, hi = max(0.0, 1 - 0.8 * aug.strength), 1 + 0.8 * aug.strength
            for col, op in ((1, adjust_brightness), (2, adjust_contrast), (3, adjust_saturation)):
                x = op(x, torch.where(on, lo + (hi - lo) * u[:, col], 1.0))
            x = adjust_hue(x, torch.where(on, (2 * u[:, 4] - 1) * 0.2 * aug.strength, 0.0))
        if cfg.patch_gray_prob > 0:
            x = random_grayscale(x, u[:, 5] < cfg.patch_gray_prob)
        return normalize(x, mean, std)

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x = batch.views[0]
        g = self.grid
        b = x.shape[0]
        z = self.backbone(self.augment_patches(patches(x, g), batch.mean, batch.std))  # (B * G * G, D)
        grid = z.view(b, g.grid, g.grid, -1)
        c = self.context(grid.permute(0, 3, 1, 2))  # (B, context_dim, G, G)
        preds = [w(c[:, :, :g.grid - g.skip - k]).permute(0, 2, 3, 1)  # (B, G - skip - k, G, D)
                 for k, w in enumerate(self.predictors, start=1)]
        negatives = None
        if distributed.world_size() > 1:
            negatives = distributed.others_with_grad(z.to(torch.promote_types(z.dtype, torch.float32)))
        loss, accuracy = cpc_loss(preds, grid, g.skip, negatives, self.cfg.temperature, return_accuracy=True)
        return StepOutput(loss, {"pretext_accuracy": accuracy, "embedding_std": embedding_std(z)})
