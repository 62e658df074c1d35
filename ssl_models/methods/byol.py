"""BYOL (Grill et al., 2020): predict an EMA target network's projection of the other view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sslflow.ssl_models.heads import ProjectionMLP, cosine_momentum, ema_update_, momentum_copy
from sslflow.ssl_models.losses.distillation import byol_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std
from sslflow.ssl_models.schema import UNIT_OPEN_TOP, Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)


@dataclass(frozen=True)
class BYOLConfig:
    """`pretrain.byol.*`"""

    proj_hidden_dim: int = setting(2048, domain=DIM)
    proj_dim: int = setting(256, domain=DIM)
    pred_hidden_dim: int = setting(4096, domain=DIM)
    momentum: float = setting(0.99, domain=UNIT_OPEN_TOP, doc="target EMA momentum at the start (cosine to 1)")


@register_method
class BYOL(SSLMethod):
    """Online backbone + projector + predictor; target = EMA of backbone + projector.

    - Projector: feature_dim -> proj_hidden_dim -> proj_dim; predictor: proj_dim ->
      pred_hidden_dim -> proj_dim (both Linear-BN-ReLU-Linear).
    - Target momentum: cosine schedule tau = 1 - (1 - momentum) * (cos(pi * progress) + 1) / 2
      (tau = momentum at the start, 1 at the end), applied in `after_step`.
    - Loss: symmetric, `(byol_loss(p1, z2') + byol_loss(p2, z1')) / 2`; the paper (and
      solo-learn) *sum* the two terms, so this loss and its gradient are half theirs. Under
      LARS a weight's update is rescaled by ||w|| / ||g + wd w||, so halving g equals doubling
      the weight decay: a summed recipe's (lr, wd) is (lr, wd / 2) here (LARS-excluded biases
      and norms take half-size steps); with SGD it is (2 lr, wd / 2); AdamW is insensitive to
      the scale. params/profiles/cifar10-byol.yaml applies this to solo-learn's recipe.
    Both views are encoded in one backbone call of 2B images (online and target alike).
    Data parallel needs nothing of its own: the loss is a per-image mean, so DDP's averaged
    gradients and synced BN give the global-batch result, and the EMA target stays identical
    on every rank because the online weights are.
    """

    name: ClassVar[str] = "byol"
    family: ClassVar[str] = "distillation"
    Config: ClassVar[type] = BYOLConfig
    # Recipe constants (BYOL, Table 6): asymmetric blur/solarize between the two views.
    view_blur: ClassVar[tuple[float, float]] = (1.0, 0.1)
    view_solarize: ClassVar[tuple[float, float]] = (0.0, 0.2)

    def __init__(self, backbone, cfg: BYOLConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.projector = ProjectionMLP(self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = ProjectionMLP(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.target_backbone = momentum_copy(backbone)
        self.target_projector = momentum_copy(self.projector)

    @classmethod
    def view_specs(cls, cfg: BYOLConfig, ctx: TrainContext) -> list[ViewSpec]:
        """View 1: blur 1.0, solarize 0.0; view 2: blur 0.1, solarize 0.2."""
        return [ViewSpec.from_augment(ctx.augment, ctx.view_size, blur_prob=b, solarize_prob=s)
                for b, s in zip(cls.view_blur, cls.view_solarize, strict=True)]

    def tau(self, progress: float) -> float:
        """Target EMA momentum at `progress` (cosine from cfg.momentum to 1)."""
        return cosine_momentum(self.cfg.momentum, progress)

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x1, x2 = batch.views
        x = torch.cat([x1, x2])
        p1, p2 = self.predictor(self.projector(self.backbone(x))).split(x1.shape[0])
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_backbone(x)).split(x1.shape[0])
        loss = (byol_loss(p1, z2) + byol_loss(p2, z1)) / 2
        return StepOutput(loss, {"embedding_std": embedding_std(p1)})

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """EMA update of the target with tau(progress)."""
        tau = self.tau(progress)
        ema_update_(self.target_backbone, self.backbone, tau)
        ema_update_(self.target_projector, self.projector, tau)
