"""The contract between an SSL method and the training loop.

A method owns its networks (online backbone, heads, momentum/EMA copies, queues, centers) as
submodules and buffers, so `state_dict()` captures everything a checkpoint needs. The loop
only calls `views()` once, then per step `forward(views, progress)` -> loss and, after the
optimizer step, `after_step(progress)`. Adding a method never touches the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sslflow.ssl_models.config import AugmentConfig, PretrainConfig


@dataclass(frozen=True)
class ViewSpec:
    """How to draw one augmented view of every image in a batch.

    Crop, flip, colour jitter and grayscale come from `AugmentConfig`; the per-view
    asymmetries of BYOL/DINO (blur and solarize probabilities, crop size and scale) live here.
    """

    size: int  # output side in pixels
    scale: tuple[float, float]  # RandomResizedCrop area range
    blur_prob: float = 0.0
    solarize_prob: float = 0.0


def symmetric_views(aug: AugmentConfig, image_size: int, blur_prob: float = 0.0) -> list[ViewSpec]:
    """Two identically distributed global views (SimCLR, MoCo)."""
    view = ViewSpec(size=image_size, scale=aug.crop_scale, blur_prob=blur_prob)
    return [view, view]


class SSLMethod(nn.Module, ABC):
    """Base class: a backbone plus whatever the method adds around it."""

    name: ClassVar[str]

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: PretrainConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.cfg = cfg

    @classmethod
    @abstractmethod
    def views(cls, aug: AugmentConfig, image_size: int) -> list[ViewSpec]:
        """The view recipe: one ViewSpec per augmented view fed to `forward`."""

    @abstractmethod
    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        """Scalar loss for one batch. `progress` in [0, 1) is step / total_steps."""

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Called after each optimizer step (momentum/EMA updates). Default: nothing."""

    def encoder(self) -> nn.Module:
        """The network kept after pretraining (the online backbone)."""
        return self.backbone
