"""SimSiam (Chen & He, 2021): a predictor and a stop-gradient, no negatives, no momentum encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sslflow.ssl_models.heads import ProjectionMLP
from sslflow.ssl_models.losses.siamese import negative_cosine_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std
from sslflow.ssl_models.schema import PROBABILITY, Range, setting
from sslflow.ssl_models.views import ViewSpec, symmetric_views

DIM = Range(1, 1 << 16)


@dataclass(frozen=True)
class SimSiamConfig:
    """`pretrain.simsiam.*` (defaults: the official SimSiam ImageNet recipe)."""

    proj_hidden_dim: int = setting(2048, domain=DIM)
    proj_dim: int = setting(2048, domain=DIM, doc="projection (and prediction) dimension")
    proj_layers: int = setting(3, domain=Range(1, 8), doc="projector depth (3 on ImageNet, 2 in the CIFAR study)")
    pred_hidden_dim: int = setting(512, domain=DIM, doc="predictor bottleneck (proj_dim / 4)")
    blur_prob: float = setting(0.5, domain=PROBABILITY, doc="Gaussian blur probability of both views")


@register_method
class SimSiam(SSLMethod):
    """Backbone + projector + predictor, symmetric negative cosine with a stop-gradient.

    - Projector: `proj_layers` layers, (Linear-BN-ReLU) x (proj_layers - 1) then Linear-BN
      with an affine-free output BN (the official `fc[6].bias.requires_grad = False` hack
      amounts to a bias-free last Linear): feature_dim -> proj_hidden_dim ... -> proj_dim.
    - Predictor: bottleneck Linear-BN-ReLU-Linear, proj_dim -> pred_hidden_dim -> proj_dim.
    - Loss: `(D(p1, z2) + D(p2, z1)) / 2` with D the negative cosine and z detached
      (`negative_cosine_loss`); each view through the backbone in its own call, as the
      official code (BatchNorm statistics per view).
    - Collapse indicator: `embedding_std`, the per-dimension std of the L2-normalised
      projections averaged over dimensions (the paper's Fig. 2): about 1/sqrt(proj_dim) when
      healthy, 0 when collapsed.
    - Data parallel needs nothing of its own: the loss is a per-image mean and BN is synced.

    Deviation: the official code keeps the predictor's learning rate fixed (`--fix-pred-lr`)
    while the rest follows the cosine schedule; the loop has one schedule for every group,
    so here the predictor follows it too (solo-learn's `static_lr` would need a loop change).
    """

    name: ClassVar[str] = "simsiam"
    family: ClassVar[str] = "siamese"
    Config: ClassVar[type] = SimSiamConfig

    def __init__(self, backbone, cfg: SimSiamConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.projector = ProjectionMLP(self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim,
                                       num_layers=cfg.proj_layers, last_bn=True)
        self.predictor = ProjectionMLP(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)

    @classmethod
    def view_specs(cls, cfg: SimSiamConfig, ctx: TrainContext) -> list[ViewSpec]:
        """Two identically distributed views with blur `blur_prob` (SimSiam: 0.5)."""
        return symmetric_views(ctx.augment, ctx.view_size, cfg.blur_prob)

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x1, x2 = batch.views
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = (negative_cosine_loss(p1, z2) + negative_cosine_loss(p2, z1)) / 2
        return StepOutput(loss, {"embedding_std": embedding_std(z1)})
