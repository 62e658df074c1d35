"""MoCo v3 (Chen, Xie & He, 2021): in-batch InfoNCE between a predictor and a momentum encoder,
the recipe that made contrastive learning stable on Vision Transformers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.heads import cosine_momentum, ema_update_, momentum_copy
from sslflow.ssl_models.losses.contrastive_inbatch import mocov3_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std
from sslflow.ssl_models.schema import POSITIVE, UNIT_OPEN_TOP, Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)


@dataclass(frozen=True)
class MoCoV3Config:
    """`pretrain.mocov3.*` (defaults: the official ViT recipe's heads, temperature and momentum)."""

    proj_hidden_dim: int = setting(4096, domain=DIM, doc="hidden width of the projector")
    proj_dim: int = setting(256, domain=DIM, doc="output width of the projector and the predictor")
    pred_hidden_dim: int = setting(4096, domain=DIM, doc="hidden width of the predictor")
    proj_layers: int = setting(0, domain=Range(0, 8),
                               doc="projector depth; 0 = the paper's: 3 on a ViT, 2 on a ResNet")
    temperature: float = setting(0.2, domain=POSITIVE, doc="InfoNCE temperature (paper: 0.2 ViT, 1.0 ResNet-50)")
    momentum: float = setting(0.99, domain=UNIT_OPEN_TOP, doc="key-encoder EMA momentum at the start (cosine to 1)")
    frozen_patch_embed: bool = setting(False, doc="keep the ViT's random patch projection fixed (the paper's "
                                       "stability trick; ViT backbones only)")


def moco_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's `_build_mlp`: (Linear without bias - BN - ReLU) x (num_layers - 1), then a Linear
    without bias, followed by an affine-free BN when `last_bn` (the projector; not the predictor)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


@register_method
class MoCoV3(SSLMethod):
    """Backbone + projector + predictor (queries); momentum copy of backbone + projector (keys).

    - Heads (the official code's): projector `proj_layers` deep (3 on a ViT, 2 on a ResNet),
      feature_dim -> proj_hidden_dim -> proj_dim, BN after every hidden layer and an affine-free
      BN on its output; predictor 2 layers proj_dim -> pred_hidden_dim -> proj_dim, no last BN.
      No linear has a bias (BN's shift replaces it), as in the official `_build_mlp`.
    - Loss: the paper's symmetric `ctr(q1, k2) + ctr(q2, k1)`, *summed* (not averaged), each a
      cross-entropy over the batch's keys at temperature T, multiplied by 2 T (Algorithm 1).
      Each view is encoded in its own backbone call, as in the official code (BN statistics
      per view).
    - Momentum encoder: EMA of backbone + projector in `after_step`, tau from `momentum` to 1
      on a cosine schedule over the run (the official `--moco-m-cos`).
    - Frozen patch projection (`frozen_patch_embed`, Sec. 4.2 of the paper): the ViT's random
      `patch_embed` gets `requires_grad=False`, so the optimizer never sees it
      (`param_groups` leaves frozen parameters out) and the EMA copy stays equal to it.
    - Data parallel: the keys of every rank are gathered (no gradient: keys are a stop-gradient
      target) and query i of rank r is labelled `r x B + i`, so each rank's loss is its rows of
      the single-process loss on the global batch; DDP averages the gradients and BatchNorm is
      synced over the global batch, hence 2 ranks x B = 1 process x 2B.
    - ResNet backbones work too (the paper reports ResNet-50; solo-learn's CIFAR recipe is a
      ResNet-18, LARS, T = 0.2); `frozen_patch_embed` is then refused by `check_settings`.

    Views: BYOL's asymmetric pair (blur 1.0 / 0.1, solarize 0 / 0.2), the paper's augmentation.
    Deviation: the paper's ViT recipe (AdamW lr 1.5e-4 x batch / 256, weight decay 0.1,
    40 warm-up epochs, batch 4096) is a profile (`params/profiles/cifar10-mocov3.yaml`), not a
    default of the engine's common `pretrain.*` section.
    """

    name: ClassVar[str] = "mocov3"
    family: ClassVar[str] = "contrastive"
    Config: ClassVar[type] = MoCoV3Config
    # Recipe constants (MoCo v3 follows BYOL's augmentation): asymmetric blur/solarize.
    view_blur: ClassVar[tuple[float, float]] = (1.0, 0.1)
    view_solarize: ClassVar[tuple[float, float]] = (0.0, 0.2)

    def __init__(self, backbone, cfg: MoCoV3Config, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        layers = cfg.proj_layers or (3 if backbone.family == "vit" else 2)
        self.projector = moco_mlp(layers, self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, last_bn=True)
        self.predictor = moco_mlp(2, cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, last_bn=False)
        if cfg.frozen_patch_embed:
            if not hasattr(backbone, "patch_embed"):
                raise ConfigError(f"pretrain.mocov3.frozen_patch_embed needs a ViT backbone, not {backbone.name}")
            backbone.patch_embed.requires_grad_(False)
        self.momentum_backbone = momentum_copy(backbone)
        self.momentum_projector = momentum_copy(self.projector)

    @classmethod
    def check_settings(cls, cfg: MoCoV3Config, settings) -> None:
        if cfg.frozen_patch_embed and settings.backbone.family != "vit":
            raise ConfigError(f"pretrain.mocov3.frozen_patch_embed freezes a ViT's patch projection; "
                              f"backbone.name is {settings.backbone.name} (set it false or choose a vit_*)")

    @classmethod
    def view_specs(cls, cfg: MoCoV3Config, ctx: TrainContext) -> list[ViewSpec]:
        """View 1: blur 1.0, solarize 0.0; view 2: blur 0.1, solarize 0.2 (BYOL's, as the paper)."""
        return [ViewSpec.from_augment(ctx.augment, ctx.view_size, blur_prob=b, solarize_prob=s)
                for b, s in zip(cls.view_blur, cls.view_solarize, strict=True)]

    def tau(self, progress: float) -> float:
        """Key-encoder EMA momentum at `progress` (cosine from cfg.momentum to 1)."""
        return cosine_momentum(self.cfg.momentum, progress)

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x1, x2 = batch.views
        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
            # every rank's keys in rank order: this rank's queries are rows rank x B ...
            keys = distributed.all_gather(torch.stack([k1, k2]), dim=1)
        offset = distributed.rank() * x1.shape[0] if distributed.world_size() > 1 else 0
        loss = mocov3_loss(q1, q2, keys[0], keys[1], self.cfg.temperature, offset)
        return StepOutput(loss, {"embedding_std": embedding_std(q1)})

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Momentum update of the key encoder with tau(progress)."""
        tau = self.tau(progress)
        ema_update_(self.momentum_backbone, self.backbone, tau)
        ema_update_(self.momentum_projector, self.projector, tau)
