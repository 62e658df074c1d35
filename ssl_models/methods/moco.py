"""MoCo v2 (Chen et al., 2020): contrast queries against a queue of momentum-encoded keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sslflow.ssl_models import distributed
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.heads import ProjectionMLP, cosine_momentum, ema_update_, momentum_copy
from sslflow.ssl_models.losses.contrastive import info_nce_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std
from sslflow.ssl_models.schema import POSITIVE, UNIT_OPEN_TOP, Choices, Range, setting
from sslflow.ssl_models.views import ViewSpec, symmetric_views

DIM = Range(1, 1 << 16)


@dataclass(frozen=True)
class MoCoConfig:
    """`pretrain.moco.*`"""

    temperature: float = setting(0.2, domain=POSITIVE, doc="InfoNCE temperature")
    queue_size: int = setting(4096, domain=Range(2, 1 << 24), doc="negatives kept (>= 2 x batch_size)")
    proj_hidden_dim: int = setting(2048, domain=DIM)
    proj_dim: int = setting(256, domain=DIM)
    momentum: float = setting(0.99, domain=UNIT_OPEN_TOP, doc="key-encoder EMA momentum (at the start)")
    momentum_schedule: str = setting("constant", domain=Choices(("constant", "cosine")),
                                     doc="constant (MoCo v2) or cosine from momentum to 1 (solo-learn)")


@register_method
class MoCo(SSLMethod):
    """MoCo v2 with the symmetrised loss.

    - Query encoder: backbone + BN-free 2-layer MLP projector (feature_dim -> proj_hidden_dim
      -> proj_dim), as in MoCo v2.
    - Key encoder: momentum copy of backbone + projector, updated in `after_step` with
      `cfg.momentum` (constant, MoCo v2: 0.999 on ImageNet, 0.99 on CIFAR; or a cosine schedule
      to 1 with `momentum_schedule: cosine`).
    - Queue: `cfg.queue_size` L2-normalised keys of dim proj_dim (random unit vectors at
      start), a ring buffer with a tensor pointer so enqueueing never syncs with the host.
    - Loss: symmetric, as in the official MoCo CIFAR demo: view 1 queries view 2's key and vice
      versa, `(info_nce(q1, k2) + info_nce(q2, k1)) / 2`. The official demo *sums* the two
      terms; averaging (as solo-learn's MoCo v2+ does) keeps the loss on the scale of the
      asymmetric one and halves the gradient: with SGD, the summed loss at (lr, weight decay)
      is this one at (2 lr, weight decay / 2), so take solo-learn's lr as is and double the
      demo's (params/profiles/cifar10-moco.yaml says so). Both views' keys (2B per step) are enqueued
      after the loss, so `2 * batch_size <= queue_size` is required.
    - Data parallel: the keys of all ranks are gathered (no gradient: keys are a stop-gradient
      target) and enqueued in global-batch order, so every rank's queue is identical and equal
      to the single-process queue; `batch_size` above is the global batch.

    BatchNorm: MoCo's "shuffle BN" (keys computed on a batch permuted across GPUs so BN
    statistics cannot leak which key is positive) needs per-device BN and is not implemented;
    under DDP, BN is synced over the global batch instead. As mitigation each view is encoded
    in its own backbone call, so the positive pair (q of view 1, k of view 2) never shares a
    BN batch. A faithful emulation would need a split (ghost) BN in the backbone.
    """

    name: ClassVar[str] = "moco"
    family: ClassVar[str] = "contrastive"
    Config: ClassVar[type] = MoCoConfig
    # Recipe constant: MoCo v2 uses blur p=0.5 on both (identically distributed) views.
    blur_prob: ClassVar[float] = 0.5

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, backbone, cfg: MoCoConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.projector = ProjectionMLP(self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, use_bn=False)
        self.momentum_backbone = momentum_copy(backbone)
        self.momentum_projector = momentum_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def check_settings(cls, cfg: MoCoConfig, settings) -> None:
        keys_per_step = 2 * settings.pretrain.batch_size
        if keys_per_step > cfg.queue_size:
            raise ConfigError(f"pretrain.moco.queue_size ({cfg.queue_size}) must be at least 2 x pretrain.batch_size "
                              f"({keys_per_step}): every step enqueues the keys of both views")

    @classmethod
    def view_specs(cls, cfg: MoCoConfig, ctx: TrainContext) -> list[ViewSpec]:
        """Two identically distributed views with blur p=0.5 (MoCo v2 recipe)."""
        return symmetric_views(ctx.augment, ctx.view_size, cls.blur_prob)

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x1, x2 = batch.views
        q1 = self.projector(self.backbone(x1))
        q2 = self.projector(self.backbone(x2))
        with torch.no_grad():
            k1 = F.normalize(self.momentum_projector(self.momentum_backbone(x1)).float(), dim=1)
            k2 = F.normalize(self.momentum_projector(self.momentum_backbone(x2)).float(), dim=1)
        # The queue is updated in place below, before backward; autograd needs this snapshot.
        queue = self.queue.clone()
        t = self.cfg.temperature
        loss = (info_nce_loss(q1, k2, queue, t) + info_nce_loss(q2, k1, queue, t)) / 2
        # all of view 1's keys, then all of view 2's: the single-process order for any N
        self._enqueue(distributed.all_gather(torch.stack([k1, k2]), dim=1).flatten(0, 1))
        return StepOutput(loss, {"embedding_std": embedding_std(q1)})

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write (N, D) L2-normalised keys at the ring pointer (wrapping around), advance it.

        Index arithmetic runs on the device (no `.item()`), so any N <= queue_size works,
        including queue sizes that are not a multiple of N.
        """
        n, size = keys.shape[0], self.queue.shape[0]
        if n > size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of {size}")
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def tau(self, progress: float) -> float:
        """Key-encoder momentum at `progress`."""
        if self.cfg.momentum_schedule == "cosine":
            return cosine_momentum(self.cfg.momentum, progress)
        return self.cfg.momentum

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Momentum update of the key encoder."""
        tau = self.tau(progress)
        ema_update_(self.momentum_backbone, self.backbone, tau)
        ema_update_(self.momentum_projector, self.projector, tau)
