"""The contract between an SSL method and the training loop (method contract v2).

A method is one class plus a pure loss. It owns its networks (the backbone, heads, momentum
copies, decoders), queues and centres as submodules and buffers, so `state_dict()` holds all
a checkpoint needs, and it declares its settings section (`pretrain.<name>.*`) as a frozen
dataclass `Config` next to its code. The loop, per step::

    views = BatchAugment(method.views())(images)          # the method's view recipes
    out = method(Batch(views, images, mean, std), progress)   # -> StepOutput(loss, metrics)
    out.loss.backward(); method.after_backward(progress)   # gradient clipping, freezing
    optimizer.step();   method.after_step(progress)        # momentum / EMA updates

`progress` in [0, 1) is step / total steps; `self.ctx.epoch(progress)` converts it to epochs.
Metrics are 0-d tensors left on the device (the loop sums them and reads them only when it
logs, so a step never waits for the GPU): reconstruction / KL terms, pretext accuracy,
collapse indicators such as the embedding std. Adding a method never touches the loop, the
checkpoints or the settings code: see docs/architecture.md for a worked example.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.ssl_models.augment import model_layout, normalize, to_float
from sslflow.ssl_models.backbones import Backbone
from sslflow.ssl_models.views import ViewSpec

#: Parameters never decayed nor LARS-adapted besides biases and norm weights (ViT tokens).
NO_DECAY_SUFFIXES = ("cls_token", "pos_embed", "mask_token")


@dataclass(frozen=True)
class TrainContext:
    """What the loop tells a method about the run it is part of."""

    image_size: int  # side of the stored images (what the raw batch holds)
    view_size: int  # side of the global views (`augment.global_size`, 0 = image_size)
    batch_size: int  # the global batch
    epochs: int
    steps_per_epoch: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Any  # the AugmentConfig the views are built from

    def epoch(self, progress: float) -> float:
        """Epochs done at `progress` (fractional)."""
        return progress * self.epochs


@dataclass
class Batch:
    """One step's input: the augmented views and the raw images they were drawn from."""

    views: list[Tensor]  # one normalised float (B, 3, s, s) tensor per ViewSpec of `method.views()`
    images: Tensor  # (B, H, W, 3) uint8 on the device: this rank's rows of the batch, unaugmented
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def size(self) -> int:
        return self.images.shape[0]

    def raw(self) -> Tensor:
        """The unaugmented images as (B, 3, H, W) float in [0, 1] (the model's memory layout)."""
        return to_float(self.images).contiguous(memory_format=model_layout(self.images.device))

    def normalize(self, x: Tensor) -> Tensor:
        """Images in [0, 1] normalised with the run's mean / std (what the backbone expects)."""
        return normalize(x, self.mean, self.std)


@dataclass
class StepOutput:
    loss: Tensor  # 0-d, the quantity to minimise
    metrics: dict[str, Tensor] = field(default_factory=dict)  # 0-d tensors, detached, on the device


def embedding_std(z: Tensor) -> Tensor:
    """Collapse indicator (SimSiam, Sec. 4.1): mean over dimensions of the per-dimension std of the
    L2-normalised embeddings; about 1/sqrt(dim) when healthy, 0 when every image maps to one point."""
    with torch.no_grad():
        return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


class SSLMethod(nn.Module, ABC):
    """Base class: a backbone plus whatever the method adds around it."""

    name: ClassVar[str]  # the `pretrain.method` value and the settings section name
    family: ClassVar[str]  # contrastive, distillation, clustering, redundancy reduction, ...
    Config: ClassVar[type]  # the frozen dataclass of `pretrain.<name>.*`

    def __init__(self, backbone: Backbone, cfg: Any, ctx: TrainContext) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = backbone.feature_dim
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def check_settings(cls, cfg: Any, settings: Any) -> None:
        """Rules between this method's section and the rest of the settings (e.g. a queue at least
        two batches long); raise `ConfigError` naming the key. Runs before any data is loaded."""

    @classmethod
    @abstractmethod
    def view_specs(cls, cfg: Any, ctx: TrainContext) -> list[ViewSpec]:
        """The view recipe: one ViewSpec per augmented view in `Batch.views` (may be empty)."""

    def views(self) -> list[ViewSpec]:
        return type(self).view_specs(self.cfg, self.ctx)

    @abstractmethod
    def forward(self, batch: Batch, progress: float) -> StepOutput:
        """Loss (and device-side metrics) of one batch."""

    def after_backward(self, progress: float) -> None:
        """Called between backward and the optimizer step (clip or zero gradients). Default: nothing."""

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Called after each optimizer step (momentum/EMA updates). Default: nothing."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: weights get decay and LARS adaptation; biases, norm parameters and
        ViT tokens get neither (the SimCLR/BYOL/MAE convention). Frozen parameters are left out."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay, "lars": True},
                {"params": no_decay, "weight_decay": 0.0, "lars": False}]

    def encoder(self) -> Backbone:
        """The network kept after pretraining (the online backbone)."""
        return self.backbone

    @torch.no_grad()
    def visualize(self, batch: Batch) -> dict[str, Tensor]:
        """Images worth looking at after training (e.g. inputs above their reconstructions),
        name -> (N, 3, H, W) in [0, 1]. Called once at the end of a run (eval mode) on up to 16
        images; written as `visuals/<name>.png` grids of 8 per row and logged to MLflow under
        `plots/method/`. Default: none."""
        return {}
