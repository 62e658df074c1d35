"""RotNet (Gidaris et al., 2018): predict which of 4 rotations was applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from sslflow.ssl_models.augment import model_layout
from sslflow.ssl_models.losses.pretext import pretext_classification_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext
from sslflow.ssl_models.schema import Range, setting
from sslflow.ssl_models.views import ViewSpec

ROTATIONS = 4  # 0, 90, 180, 270 degrees


@dataclass(frozen=True)
class RotationConfig:
    """`pretrain.rotation.*`"""

    hidden_dim: int = setting(512, domain=Range(0, 1 << 16),
                              doc="classifier hidden width (Linear-BN-ReLU-Linear); 0 = a linear classifier")
    color_augment: bool = setting(False, doc="also apply the augment recipe's colour jitter / grayscale / blur "
                                  "(the paper: crop and flip only)")


def rotate_all(x: Tensor) -> tuple[Tensor, Tensor]:
    """The 4 rotations of every image of (B, C, H, W) square `x`, on x's device.

    Returns (rotated (4B, C, H, W), labels (4B,)): rows k*B .. (k+1)*B - 1 are
    `torch.rot90(x, k, dims=(2, 3))` (k quarter turns counter-clockwise) with label k.
    """
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])
    rotated = rotated.contiguous(memory_format=model_layout(x.device))
    labels = torch.arange(ROTATIONS, device=x.device).repeat_interleave(x.shape[0])
    return rotated, labels


@register_method
class Rotation(SSLMethod):
    """Backbone + rotation classifier on the pooled features; 4-way cross-entropy.

    As in the paper, all 4 rotated copies of each image are in the same batch (one backbone
    call of 4B images, so BatchNorm normalises over all of them), on the device, with the
    labels 0..3 = 0/90/180/270 degrees (counter-clockwise). The view is the augment recipe's
    random resized crop + flip without colour operations (the paper's ImageNet and CIFAR
    recipes use crops and flips only; `color_augment: true` adds the recipe's colour ops).
    Metric: `pretext_accuracy` (fraction of the 4B rotations recognised).

    Deviations from the paper: the classifier is an MLP (Linear-BN-ReLU-Linear, or linear
    with hidden_dim 0) on the backbone's pooled features instead of the NIN/AlexNet layers
    after the probed block; the loss is averaged over the 4B rotated copies (the paper's
    per-copy mean) rather than summed per image, which only scales the learning rate.
    Data parallel: the loss is a per-image mean and BN is synced, so DDP's averaged
    gradients are the global batch's.
    """

    name: ClassVar[str] = "rotation"  # pretrain.method: rotation
    family: ClassVar[str] = "pretext"
    Config: ClassVar[type] = RotationConfig

    def __init__(self, backbone, cfg: RotationConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        if cfg.hidden_dim:
            self.classifier = nn.Sequential(nn.Linear(self.feature_dim, cfg.hidden_dim),
                                            nn.BatchNorm1d(cfg.hidden_dim), nn.ReLU(inplace=True),
                                            nn.Linear(cfg.hidden_dim, ROTATIONS))
        else:
            self.classifier = nn.Linear(self.feature_dim, ROTATIONS)

    @classmethod
    def view_specs(cls, cfg: RotationConfig, ctx: TrainContext) -> list[ViewSpec]:
        """One view: crop and flip (plus the recipe's colour ops with `color_augment`)."""
        view = ViewSpec.from_augment(ctx.augment, ctx.view_size)
        return [view if cfg.color_augment else view.geometry_only()]

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        rotated, target = rotate_all(batch.views[0])  # on the device, no host sync
        logits = self.classifier(self.backbone(rotated))
        loss, accuracy = pretext_classification_loss(logits, target)
        return StepOutput(loss, {"pretext_accuracy": accuracy})
