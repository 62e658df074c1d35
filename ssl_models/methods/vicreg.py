"""VICReg (Bardes et al., 2022): variance, invariance and covariance regularisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.losses.common import f32
from sslflow.ssl_models.losses.redundancy import vicreg_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std
from sslflow.ssl_models.schema import NON_NEGATIVE, PROBABILITY, Each, Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)


def expander(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """(Linear-BN-ReLU) x (num_layers - 1), then a bias-free Linear (the official `Projector`;
    the hidden Linears are bias-free too, as BN's shift makes their bias redundant)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=False))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class VICRegConfig:
    """`pretrain.vicreg.*` (defaults: the official VICReg ImageNet recipe)."""

    proj_hidden_dim: int = setting(8192, domain=DIM)
    proj_dim: int = setting(8192, domain=DIM, doc="embedding (expander output) dimension D")
    proj_layers: int = setting(3, domain=Range(1, 8))
    invariance_weight: float = setting(25.0, domain=NON_NEGATIVE, doc="lambda, weight of the MSE between views")
    variance_weight: float = setting(25.0, domain=NON_NEGATIVE, doc="mu, weight of the std hinge")
    covariance_weight: float = setting(1.0, domain=NON_NEGATIVE, doc="nu, weight of the off-diagonal covariance")
    blur_probs: tuple[float, float] = setting((1.0, 0.1), domain=Each(PROBABILITY),
                                              doc="Gaussian blur probability of view 1 and view 2")
    solarize_probs: tuple[float, float] = setting((0.0, 0.2), domain=Each(PROBABILITY),
                                                  doc="solarisation probability of view 1 and view 2")


@register_method
class VICReg(SSLMethod):
    """Backbone + expander; `vicreg_loss` (invariance, variance, covariance) on the global batch.

    - Expander: `proj_layers` layers, (Linear-BN-ReLU) x (proj_layers - 1) then a bias-free
      Linear, feature_dim -> proj_hidden_dim ... -> proj_dim (8192-8192-8192 officially).
    - Loss: lambda MSE(z1, z2) + mu [mean_d relu(1 - sqrt(Var z1_d + 1e-4)) + same z2] / 2
      + nu [sum_{i != j} Cov(z1)_ij^2 + same z2] / D, with the official code's unbiased
      statistics. The three unweighted terms and `embedding_std` are logged.
    - Views: BYOL's asymmetric pair (blur 1.0 / 0.1, solarise 0.0 / 0.2), each through the
      backbone in its own call, as the official code.
    - Data parallel: the embeddings of every rank are gathered with gradients (the official
      `FullGatherLayer`), so every rank computes the loss of the global batch and 2 ranks x B
      equal 1 process x 2B. (The official code takes the invariance term over each rank's
      own batch, whose mean over ranks is the same value.)

    Deviations: the colour jitter's saturation follows the shared strength (0.8 s) where the
    official recipe uses 0.2; biases and BN are excluded from LARS and weight decay (the
    official LARS excludes them from both too, with one learning rate as here).
    """

    name: ClassVar[str] = "vicreg"
    family: ClassVar[str] = "redundancy reduction"
    Config: ClassVar[type] = VICRegConfig

    def __init__(self, backbone, cfg: VICRegConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.projector = expander(self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)

    @classmethod
    def view_specs(cls, cfg: VICRegConfig, ctx: TrainContext) -> list[ViewSpec]:
        """View 1: blur blur_probs[0], solarize solarize_probs[0]; view 2: the second values."""
        return [ViewSpec.from_augment(ctx.augment, ctx.view_size, blur_prob=b, solarize_prob=s)
                for b, s in zip(cfg.blur_probs, cfg.solarize_probs, strict=True)]

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x1, x2 = batch.views
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        if distributed.world_size() > 1:  # the global batch, in at least float32, one collective
            z1, z2 = distributed.gather_with_grad(f32(torch.stack([z1, z2], dim=1))).unbind(1)
        cfg = self.cfg
        terms = vicreg_loss(z1, z2, invariance_weight=cfg.invariance_weight, variance_weight=cfg.variance_weight,
                            covariance_weight=cfg.covariance_weight)
        return StepOutput(terms.loss, {"invariance": terms.invariance.detach(), "variance": terms.variance.detach(),
                                       "covariance": terms.covariance.detach(), "embedding_std": embedding_std(z1)})
