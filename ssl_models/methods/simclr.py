"""SimCLR (Chen et al., 2020): contrast two views of each image against the rest of the batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sslflow.ssl_models import distributed
from sslflow.ssl_models.heads import ProjectionMLP
from sslflow.ssl_models.losses.contrastive import nt_xent_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std
from sslflow.ssl_models.schema import POSITIVE, Range, setting
from sslflow.ssl_models.views import ViewSpec, symmetric_views

DIM = Range(1, 1 << 16)


@dataclass(frozen=True)
class SimCLRConfig:
    """`pretrain.simclr.*`"""

    temperature: float = setting(0.2, domain=POSITIVE, doc="NT-Xent temperature")
    proj_hidden_dim: int = setting(2048, domain=DIM)
    proj_dim: int = setting(256, domain=DIM)


@register_method
class SimCLR(SSLMethod):
    """Backbone + projector (feature_dim -> proj_hidden_dim -> proj_dim), NT-Xent loss.

    Both views go through the backbone in one call of 2B images, so BatchNorm normalises over
    the whole 2B batch as in the paper's (global-BN) setup, and the GPU sees one large batch.

    Data parallel: each rank's anchors are its own 2B projections, the negatives are every
    rank's projections (`extra_negatives`, gathered with gradients), and BN is synced; the
    mean of the ranks' losses is then the single-process loss of the global batch, and DDP's
    averaged gradients are its gradients.
    """

    name: ClassVar[str] = "simclr"
    family: ClassVar[str] = "contrastive"
    Config: ClassVar[type] = SimCLRConfig
    # Recipe constant: SimCLR's CIFAR-10 setup drops Gaussian blur (it hurts at 32 px); the
    # ImageNet recipe uses 0.5 on both views.
    blur_prob: ClassVar[float] = 0.0

    def __init__(self, backbone, cfg: SimCLRConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.projector = ProjectionMLP(self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)

    @classmethod
    def view_specs(cls, cfg: SimCLRConfig, ctx: TrainContext) -> list[ViewSpec]:
        """Two identically distributed views (the CIFAR SimCLR recipe: no blur, no solarize)."""
        return symmetric_views(ctx.augment, ctx.view_size, cls.blur_prob)

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x1, x2 = batch.views
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        z1, z2 = z.split(x1.shape[0])
        negatives = None
        if distributed.world_size() > 1:
            # the other ranks' projections in at least float32 (the loss computes in float32
            # anyway), so that their gradients are not summed over ranks in bf16
            negatives = distributed.others_with_grad(z.to(torch.promote_types(z.dtype, torch.float32)))
        loss = nt_xent_loss(z1, z2, self.cfg.temperature, extra_negatives=negatives)
        return StepOutput(loss, {"embedding_std": embedding_std(z1)})
