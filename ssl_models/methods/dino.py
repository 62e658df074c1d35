"""DINO (Caron et al., 2021): self-distillation from an EMA teacher with multi-crop views."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.config import AugmentConfig, PretrainConfig
from sslflow.ssl_models.heads import DINOHead, cosine_momentum, ema_update_, momentum_copy
from sslflow.ssl_models.losses import dino_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import SSLMethod, ViewSpec


@register_method
class DINO(SSLMethod):
    """Student backbone + DINOHead; teacher = EMA of both; centred, sharpened teacher targets.

    - Head: `DINOHead(feature_dim, cfg.dino_out_dim, hidden_dim=cfg.proj_hidden_dim,
      bottleneck_dim=cfg.proj_dim)` (DINO's bottleneck is 256 = the default proj_dim).
    - Teacher momentum: cosine schedule from cfg.ema_momentum to 1 (as DINO and BYOL), in
      `after_step`.
    - Temperatures: student cfg.temperature; teacher warms up linearly from
      cfg.teacher_temperature_warmup to cfg.teacher_temperature over
      cfg.teacher_temperature_warmup_epochs (epoch = progress * cfg.epochs), then stays.
    - Center: buffer updated after the loss, c <- m c + (1 - m) mean(teacher logits of the
      batch) with m = cfg.center_momentum; under DDP the batch mean is all-reduced over ranks,
      so the centre is the global batch's and identical on every rank.
    - Views: 2 global + aug.local_crops local; the teacher sees only the 2 global views, the
      student all of them. The student backbone runs once per run of consecutive views of the
      same resolution (DINO's MultiCropWrapper), the head once on all features.
    """

    name: ClassVar[str] = "dino"
    # Recipe constants (DINO's augmentation): global views blur 1.0 / 0.1, solarize 0 / 0.2;
    # local views blur 0.5, no solarize.
    global_blur: ClassVar[tuple[float, float]] = (1.0, 0.1)
    global_solarize: ClassVar[tuple[float, float]] = (0.0, 0.2)
    local_blur: ClassVar[float] = 0.5
    n_global: ClassVar[int] = 2

    center: torch.Tensor

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: PretrainConfig) -> None:
        super().__init__(backbone, feature_dim, cfg)
        self.head = DINOHead(feature_dim, cfg.dino_out_dim, hidden_dim=cfg.proj_hidden_dim,
                             bottleneck_dim=cfg.proj_dim)
        self.teacher_backbone = momentum_copy(backbone)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.dino_out_dim))

    @classmethod
    def views(cls, aug: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """2 global views (image_size, aug.crop_scale), then aug.local_crops local views."""
        globals_ = [ViewSpec(size=image_size, scale=aug.crop_scale, blur_prob=b, solarize_prob=s)
                    for b, s in zip(cls.global_blur, cls.global_solarize, strict=True)]
        local = ViewSpec(size=aug.local_size, scale=aug.local_crop_scale, blur_prob=cls.local_blur)
        return globals_ + [local] * aug.local_crops

    def tau(self, progress: float) -> float:
        """Teacher EMA momentum at `progress` (cosine from cfg.ema_momentum to 1)."""
        return cosine_momentum(self.cfg.ema_momentum, progress)

    def teacher_temperature(self, progress: float) -> float:
        """Linear warm-up of the teacher temperature over the first warmup epochs."""
        cfg = self.cfg
        epoch = progress * cfg.epochs
        if cfg.teacher_temperature_warmup_epochs <= 0 or epoch >= cfg.teacher_temperature_warmup_epochs:
            return cfg.teacher_temperature
        frac = epoch / cfg.teacher_temperature_warmup_epochs
        return cfg.teacher_temperature_warmup + frac * (cfg.teacher_temperature - cfg.teacher_temperature_warmup)

    def _student_features(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Backbone features of all views, (V * B, feature_dim), one call per resolution run."""
        feats, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(views[start:end])))
            start = end
        return torch.cat(feats)

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        b = views[0].shape[0]
        student = self.head(self._student_features(views)).split(b)
        with torch.no_grad():
            x_global = torch.cat(views[: self.n_global])
            teacher = self.teacher_head(self.teacher_backbone(x_global)).float()
        loss = dino_loss(student, teacher.split(b), self.center, self.cfg.temperature,
                         self.teacher_temperature(progress))
        self._update_center(teacher)
        return loss

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        """c <- m c + (1 - m) * batch mean of the (G * B, K) teacher logits (of all ranks)."""
        batch_center = distributed.all_reduce_mean(teacher_out.float().mean(dim=0, keepdim=True))
        self.center.lerp_(batch_center.to(self.center.dtype), 1.0 - self.cfg.center_momentum)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """EMA update of the teacher with tau(progress)."""
        tau = self.tau(progress)
        ema_update_(self.teacher_backbone, self.backbone, tau)
        ema_update_(self.teacher_head, self.head, tau)
