"""Deep InfoMax (Hjelm et al., 2019): maximise the mutual information between an image's global
feature and its local features."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.losses.infomax import DIM_ESTIMATORS, dim_local_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std
from sslflow.ssl_models.schema import Choices, Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)


@dataclass(frozen=True)
class DIMConfig:
    """`pretrain.dim.*`"""

    estimator: str = setting("jsd", domain=Choices(DIM_ESTIMATORS),
                             doc="mutual-information bound: jsd (Jensen-Shannon, the paper's default, robust to "
                                 "few negatives) or infonce (tighter with many negatives)")
    global_dim: int = setting(64, domain=DIM, doc="width of the global feature Y (the paper: 64)")
    hidden_dim: int = setting(1024, domain=DIM, doc="hidden width of the global MLP and of the scoring networks")
    views: int = setting(1, domain=Range(1, 2),
                         doc="1 = DIM: an image's global feature against its own local features; 2 = the global "
                             "feature of each of two augmented views against the local features of the other "
                             "(AMDIM's extension, Bachman et al., 2019)")
    embed_dim: int = setting(2048, domain=DIM, doc="width of the space the local and global features are scored "
                             "in (encode-and-dot-product; the paper: 2048)")


def as_map(features: Tensor) -> Tensor:
    """`forward_features` as a (B, C, h, w) map: a ResNet's last stage as is, a ViT's patch
    tokens back on their grid (class token dropped)."""
    if features.ndim == 3:
        side = math.isqrt(features.shape[1] - 1)
        return features[:, 1:].transpose(1, 2).reshape(features.shape[0], features.shape[2], side, side)
    return features


class ScoreNet(nn.Module):
    """DIM's scoring network ("MI1x1ConvNet"): x -> LayerNorm(MLP(x) + linear shortcut(x)),
    one hidden layer with BN-ReLU; the shortcut starts as the identity where the widths allow.
    Works on (N, in_dim) vectors; local maps are flattened to vectors per location."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.shortcut = nn.Linear(in_dim, out_dim, bias=False)
        with torch.no_grad():
            if out_dim >= in_dim:
                self.shortcut.weight.zero_()
                self.shortcut.weight[:in_dim].copy_(torch.eye(in_dim))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.mlp(x) + self.shortcut(x))


@register_method
class DeepInfoMax(SSLMethod):
    """DIM(L): the local objective, with the JSD or InfoNCE estimator.

    - Local features: the backbone's last spatial map (`forward_features`; 4x4 at 32 px with
      the CIFAR stem), every location scored through `local_net` (1x1, i.e. per location).
    - Global feature: Y = MLP(pooled features) of width `global_dim` (the paper's 64-d Y after
      fully connected layers), scored through `global_net`. The encoder that is evaluated is
      the backbone (the paper's convolutional features C).
    - Score: u(g, l) = global_net(Y) . local_net(l) ("encode and dot product", the paper's
      best architecture); loss `dim_local_loss` over positives (an image's global with each of
      its locations) and negatives (with every location of every other image of the batch).
    - `views: 2` (not DIM, its successor AMDIM's idea): the global feature of one augmented view
      is scored against the local features of another view of the same image, so what they
      share must survive the augmentation (colour jitter breaks the colour shortcut: on images
      whose colours are random, one-view DIM can match an image's parts to it by colour alone).
    - Data parallel: the other ranks' local embeddings are gathered with gradients and added as
      negatives, so each image's term is the single-process term of the global batch.
    - Metrics: `mi_estimate` (-loss for JSD, log(number of candidates) - loss for InfoNCE, in
      nats) and `embedding_std` of the global embeddings.

    Deviations: only the local objective (DIM(L), alpha = 0, beta = 1, the setting that gave
    the paper's best classification results); the global objective DIM(G) and the prior
    matching term (gamma, an adversarial match of Y to a uniform prior) are optional in the
    paper and not implemented. The local map is the backbone's last stage rather than an
    intermediate layer (the backbone contract exposes the last one); the InfoNCE variant
    excludes the image's own other locations from its negatives instead of the DIM code's
    -10 shift. One view of the shared augmentation recipe (the paper trains on un-augmented
    or lightly cropped images). The embedding layers of the scores are the DIM code's
    1x1-convolution "MI networks" written as per-location MLPs.
    """

    name: ClassVar[str] = "dim"
    family: ClassVar[str] = "contrastive"
    Config: ClassVar[type] = DIMConfig

    def __init__(self, backbone, cfg: DIMConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.global_head = nn.Sequential(nn.Linear(self.feature_dim, cfg.hidden_dim, bias=False),
                                         nn.BatchNorm1d(cfg.hidden_dim), nn.ReLU(inplace=True),
                                         nn.Linear(cfg.hidden_dim, cfg.global_dim))
        self.local_net = ScoreNet(backbone.spatial_dim, cfg.hidden_dim, cfg.embed_dim)
        self.global_net = ScoreNet(cfg.global_dim, cfg.hidden_dim, cfg.embed_dim)

    @classmethod
    def view_specs(cls, cfg: DIMConfig, ctx: TrainContext) -> list[ViewSpec]:
        """`views` identically distributed views of the shared recipe."""
        return [ViewSpec.from_augment(ctx.augment, ctx.view_size)] * cfg.views

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Views -> (local embeddings (N, h * w, embed_dim), global embeddings (N, embed_dim))."""
        features = self.backbone.forward_features(x)
        fmap = as_map(features)  # (N, C, h, w)
        n, c = fmap.shape[:2]
        local = self.local_net(fmap.flatten(2).transpose(1, 2).reshape(-1, c)).view(n, -1, self.cfg.embed_dim)
        return local, self.global_net(self.global_head(self.backbone.pool(features)))

    def _term(self, local: Tensor, g: Tensor) -> Tensor:
        others = None
        if distributed.world_size() > 1:
            others = distributed.others_with_grad(local.to(torch.promote_types(local.dtype, torch.float32)))
        return dim_local_loss(local, g, self.cfg.estimator, others)

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        local, g = self.encode(torch.cat(batch.views))  # one backbone call: BN over every view
        b = batch.views[0].shape[0]
        if self.cfg.views == 1:
            loss = self._term(local, g)
        else:  # each view's global against the other view's locations
            (l1, l2), (g1, g2) = local.split(b), g.split(b)
            loss = (self._term(l2, g1) + self._term(l1, g2)) / 2
        if self.cfg.estimator == "jsd":
            mi = -loss.detach()
        else:  # InfoNCE: log(1 + negatives per positive) - loss
            candidates = 1 + (b * distributed.world_size() - 1) * local.shape[1]
            mi = math.log(candidates) - loss.detach()
        return StepOutput(loss, {"mi_estimate": mi, "embedding_std": embedding_std(g[:b])})
