"""SimCLR (Chen et al., 2020): contrast two views of each image against the rest of the batch."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.config import AugmentConfig, PretrainConfig
from sslflow.ssl_models.heads import ProjectionMLP
from sslflow.ssl_models.losses import nt_xent_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import SSLMethod, ViewSpec, symmetric_views


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
    # Recipe constant: SimCLR's CIFAR-10 setup drops Gaussian blur (it hurts at 32 px); the
    # ImageNet recipe uses 0.5 on both views.
    blur_prob: ClassVar[float] = 0.0

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: PretrainConfig) -> None:
        super().__init__(backbone, feature_dim, cfg)
        self.projector = ProjectionMLP(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)

    @classmethod
    def views(cls, aug: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """Two identically distributed views (the CIFAR SimCLR recipe: no blur, no solarize)."""
        return symmetric_views(aug, image_size, cls.blur_prob)

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        x1, x2 = views
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        z1, z2 = z.split(x1.shape[0])
        negatives = None
        if distributed.world_size() > 1:
            # the other ranks' projections in at least float32 (the loss computes in float32
            # anyway), so that their gradients are not summed over ranks in bf16
            negatives = distributed.others_with_grad(z.to(torch.promote_types(z.dtype, torch.float32)))
        return nt_xent_loss(z1, z2, self.cfg.temperature, extra_negatives=negatives)
