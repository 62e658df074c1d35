"""Barlow Twins (Zbontar et al., 2021): make the views' cross-correlation matrix the identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.losses.common import f32
from sslflow.ssl_models.losses.redundancy import barlow_twins_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std
from sslflow.ssl_models.schema import NON_NEGATIVE, POSITIVE, PROBABILITY, Each, Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)


def projector(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """(Linear-BN-ReLU) x (num_layers - 1), then a Linear; every Linear bias-free (the hidden ones
    are followed by BN, and the loss standardises the output per dimension)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=False))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class BarlowConfig:
    """`pretrain.barlow.*` (defaults: the official Barlow Twins ImageNet recipe)."""

    proj_hidden_dim: int = setting(8192, domain=DIM)
    proj_dim: int = setting(8192, domain=DIM, doc="embedding dimension D (the correlation matrix is D x D)")
    proj_layers: int = setting(3, domain=Range(1, 8))
    off_diagonal_weight: float = setting(0.0051, domain=NON_NEGATIVE,
                                         doc="lambda, the weight of the redundancy (off-diagonal) term")
    loss_scale: float = setting(1.0, domain=POSITIVE, doc="overall loss factor (solo-learn's CIFAR recipe: 0.1)")
    blur_probs: tuple[float, float] = setting((1.0, 0.1), domain=Each(PROBABILITY),
                                              doc="Gaussian blur probability of view 1 and view 2")
    solarize_probs: tuple[float, float] = setting((0.0, 0.2), domain=Each(PROBABILITY),
                                                  doc="solarisation probability of view 1 and view 2")


@register_method
class BarlowTwins(SSLMethod):
    """Backbone + projector; `barlow_twins_loss` on the batch-standardised embeddings.

    - Projector: `proj_layers` bias-free layers, (Linear-BN-ReLU) x (proj_layers - 1) then
      Linear, feature_dim -> proj_hidden_dim ... -> proj_dim (8192-8192-8192 officially).
    - Loss: C = bn(z1)^T bn(z2) / N, sum (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2; bn is the
      affine-free BatchNorm of the official code (biased variance, eps 1e-5), applied inside
      the loss so that it runs on the global batch. Logged: both terms and `embedding_std`.
    - Views: BYOL's asymmetric pair (blur 1.0 / 0.1, solarise 0.0 / 0.2), each through the
      backbone in its own call, as the official code (BatchNorm statistics per view).
    - Data parallel: the embeddings of every rank are gathered with gradients, so every rank
      computes the correlation of the global batch (the single-process loss of 2 ranks x B
      is that of 1 process x 2B); DDP's averaged gradients are then its gradients. (The
      official code all-reduces the per-rank correlation without a gradient path.)

    Deviations: the colour jitter's saturation follows the shared strength (0.8 s, so 0.4 at
    s = 0.5) where the official recipe uses 0.2; the official optimizer has separate learning
    rates for weights (0.2) and biases/BN (0.0048), here both follow `pretrain.lr` with biases
    and BN excluded from LARS and weight decay.
    """

    name: ClassVar[str] = "barlow"
    family: ClassVar[str] = "redundancy reduction"
    Config: ClassVar[type] = BarlowConfig

    def __init__(self, backbone, cfg: BarlowConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.projector = projector(self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)

    @classmethod
    def view_specs(cls, cfg: BarlowConfig, ctx: TrainContext) -> list[ViewSpec]:
        """View 1: blur blur_probs[0], solarize solarize_probs[0]; view 2: the second values."""
        return [ViewSpec.from_augment(ctx.augment, ctx.view_size, blur_prob=b, solarize_prob=s)
                for b, s in zip(cfg.blur_probs, cfg.solarize_probs, strict=True)]

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x1, x2 = batch.views
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        if distributed.world_size() > 1:  # the global batch, in at least float32, one collective
            z1, z2 = distributed.gather_with_grad(f32(torch.stack([z1, z2], dim=1))).unbind(1)
        terms = barlow_twins_loss(z1, z2, self.cfg.off_diagonal_weight, scale=self.cfg.loss_scale)
        return StepOutput(terms.loss, {"on_diagonal": terms.on_diagonal.detach(),
                                       "off_diagonal": terms.off_diagonal.detach(),
                                       "embedding_std": embedding_std(z1)})
