"""DINO (Caron et al., 2021): self-distillation from an EMA teacher with multi-crop views."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sslflow.ssl_models import distributed
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.heads import DINOHead, cosine_momentum, ema_update_, momentum_copy
from sslflow.ssl_models.losses.distillation import dino_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext
from sslflow.ssl_models.schema import NON_NEGATIVE, POSITIVE, UNIT_OPEN_TOP, Range, setting
from sslflow.ssl_models.views import ViewSpec, global_and_local

DIM = Range(1, 1 << 20)


@dataclass(frozen=True)
class DINOConfig:
    """`pretrain.dino.*` (defaults: the official DINO code's, except `out_dim`, 65536 there)."""

    out_dim: int = setting(4096, domain=DIM, doc="prototypes K of the head's last layer")
    hidden_dim: int = setting(2048, domain=DIM)
    bottleneck_dim: int = setting(256, domain=DIM)
    temperature: float = setting(0.1, domain=POSITIVE, doc="student temperature")
    teacher_temperature: float = setting(0.04, domain=POSITIVE)
    teacher_temperature_warmup: float = setting(0.04, domain=POSITIVE, doc="teacher temperature at step 0")
    teacher_temperature_warmup_epochs: int = setting(0, domain=NON_NEGATIVE)
    center_momentum: float = setting(0.9, domain=UNIT_OPEN_TOP)
    momentum: float = setting(0.996, domain=UNIT_OPEN_TOP, doc="teacher EMA momentum at the start (cosine to 1)")
    freeze_last_layer_epochs: float = setting(1.0, domain=NON_NEGATIVE,
                                              doc="the head's last layer gets no update for this many epochs")
    clip_grad: float = setting(3.0, domain=NON_NEGATIVE, doc="per-parameter gradient norm clip; 0 = off")


@register_method
class DINO(SSLMethod):
    """Student backbone + DINOHead; teacher = EMA of both; centred, sharpened teacher targets.

    - Head: `DINOHead(feature_dim, out_dim, hidden_dim, bottleneck_dim)`.
    - Teacher momentum: cosine schedule from `momentum` to 1 (as DINO and BYOL), in `after_step`.
    - Temperatures: student `temperature`; teacher warms up linearly from
      `teacher_temperature_warmup` to `teacher_temperature` over
      `teacher_temperature_warmup_epochs`, then stays.
    - Center: buffer updated after the loss, c <- m c + (1 - m) mean(teacher logits of the
      batch) with m = `center_momentum`; under DDP the batch mean is all-reduced over ranks,
      so the centre is the global batch's and identical on every rank.
    - Views: 2 global + `augment.local_crops` local; the teacher sees only the 2 global views,
      the student all of them. The student backbone runs once per run of consecutive views of
      the same resolution (DINO's MultiCropWrapper), the head once on all features.
    - Stabilisers of the official code: the gradient of the head's last layer is dropped during
      the first `freeze_last_layer_epochs`, and every parameter's gradient is clipped to norm
      `clip_grad` (per tensor, as `utils.clip_gradients` does), both in `after_backward`.
    """

    name: ClassVar[str] = "dino"
    family: ClassVar[str] = "distillation"
    Config: ClassVar[type] = DINOConfig
    n_global: ClassVar[int] = 2

    center: torch.Tensor

    def __init__(self, backbone, cfg: DINOConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.head = DINOHead(self.feature_dim, cfg.out_dim, hidden_dim=cfg.hidden_dim,
                             bottleneck_dim=cfg.bottleneck_dim)
        self.teacher_backbone = momentum_copy(backbone)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))

    @classmethod
    def check_settings(cls, cfg: DINOConfig, settings) -> None:
        if cfg.teacher_temperature_warmup_epochs > settings.pretrain.epochs:
            raise ConfigError(f"pretrain.dino.teacher_temperature_warmup_epochs "
                              f"({cfg.teacher_temperature_warmup_epochs}) exceeds pretrain.epochs "
                              f"({settings.pretrain.epochs})")

    @classmethod
    def view_specs(cls, cfg: DINOConfig, ctx: TrainContext) -> list[ViewSpec]:
        """2 global views (view size, augment.crop_scale; blur 1.0 / 0.1, solarize 0 / 0.2), then
        augment.local_crops local views (augment.local_size, local_crop_scale, blur 0.5)."""
        return global_and_local(ctx.augment, ctx.view_size)

    def tau(self, progress: float) -> float:
        """Teacher EMA momentum at `progress` (cosine from cfg.momentum to 1)."""
        return cosine_momentum(self.cfg.momentum, progress)

    def teacher_temperature(self, progress: float) -> float:
        """Linear warm-up of the teacher temperature over the first warmup epochs."""
        cfg = self.cfg
        epoch = self.ctx.epoch(progress)
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

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        views = batch.views
        b = views[0].shape[0]
        student = self.head(self._student_features(views)).split(b)
        with torch.no_grad():
            x_global = torch.cat(views[: self.n_global])
            teacher = self.teacher_head(self.teacher_backbone(x_global)).float()
        loss = dino_loss(student, teacher.split(b), self.center, self.cfg.temperature,
                         self.teacher_temperature(progress))
        self._update_center(teacher)
        with torch.no_grad():  # collapse indicator: entropy of the mean teacher distribution
            probs = torch.softmax((teacher - self.center) / self.teacher_temperature(progress), dim=-1).mean(0)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
        return StepOutput(loss, {"teacher_entropy": entropy})

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        """c <- m c + (1 - m) * batch mean of the (G * B, K) teacher logits (of all ranks)."""
        batch_center = distributed.all_reduce_mean(teacher_out.float().mean(dim=0, keepdim=True))
        self.center.lerp_(batch_center.to(self.center.dtype), 1.0 - self.cfg.center_momentum)

    def after_backward(self, progress: float) -> None:
        """Drop the last layer's gradient while it is frozen; clip each parameter's gradient norm."""
        if self.ctx.epoch(progress) < self.cfg.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None
        if self.cfg.clip_grad > 0:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                scales = [(self.cfg.clip_grad / (n + 1e-6)).clamp(max=1.0) for n in norms]
                torch._foreach_mul_(grads, scales)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """EMA update of the teacher with tau(progress)."""
        tau = self.tau(progress)
        ema_update_(self.teacher_backbone, self.backbone, tau)
        ema_update_(self.teacher_head, self.head, tau)
