"""MoCo v2 (Chen et al., 2020): contrast queries against a queue of momentum-encoded keys."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.config import AugmentConfig, PretrainConfig
from sslflow.ssl_models.heads import ProjectionMLP, ema_update_, momentum_copy
from sslflow.ssl_models.losses import info_nce_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import SSLMethod, ViewSpec, symmetric_views


@register_method
class MoCo(SSLMethod):
    """MoCo v2 with the symmetrised loss.

    - Query encoder: backbone + BN-free 2-layer MLP projector (feature_dim -> proj_hidden_dim
      -> proj_dim), as in MoCo v2.
    - Key encoder: momentum copy of backbone + projector, updated in `after_step` with a
      *constant* momentum `cfg.ema_momentum` (MoCo v2: 0.999 on ImageNet, 0.99 on CIFAR).
    - Queue: `cfg.queue_size` L2-normalised keys of dim proj_dim (random unit vectors at
      start), a ring buffer with a tensor pointer so enqueueing never syncs with the host.
    - Loss: symmetric, as in the official MoCo CIFAR demo: view 1 queries view 2's key and vice
      versa, `(info_nce(q1, k2) + info_nce(q2, k1)) / 2` (the demo sums; averaging keeps the
      loss on the scale of the asymmetric one). Both views' keys (2B per step) are enqueued
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
    # Recipe constant: MoCo v2 uses blur p=0.5 on both (identically distributed) views.
    blur_prob: ClassVar[float] = 0.5

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: PretrainConfig) -> None:
        super().__init__(backbone, feature_dim, cfg)
        keys_per_step = 2 * cfg.batch_size
        if keys_per_step > cfg.queue_size:
            raise ValueError(
                f"pretrain.queue_size ({cfg.queue_size}) must be at least 2 * batch_size "
                f"({keys_per_step}): MoCo enqueues the keys of both views every step")
        self.projector = ProjectionMLP(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, use_bn=False)
        self.momentum_backbone = momentum_copy(backbone)
        self.momentum_projector = momentum_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def views(cls, aug: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """Two identically distributed views with blur p=0.5 (MoCo v2 recipe)."""
        return symmetric_views(aug, image_size, cls.blur_prob)

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        x1, x2 = views
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
        return loss

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

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Momentum update of the key encoder with the constant `cfg.ema_momentum`."""
        tau = self.cfg.ema_momentum
        ema_update_(self.momentum_backbone, self.backbone, tau)
        ema_update_(self.momentum_projector, self.projector, tau)
