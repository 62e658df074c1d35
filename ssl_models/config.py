"""Typed parameter sections shared by the engine and the CLI.

The values live in ``params/*.yaml`` (one source of defaults); these dataclasses only say
which keys exist and what type each has, so a typo in a YAML file or a ``--set`` override is
an error instead of a silently ignored key. ``sslflow.params`` does the loading/validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AugmentConfig:
    """SimCLR-style augmentation; each method picks its per-view recipe (blur/solarize)."""

    strength: float  # SimCLR's colour-jitter s: brightness/contrast/saturation 0.8*s, hue 0.2*s
    crop_scale: tuple[float, float]  # RandomResizedCrop area range of the global views
    crop_ratio: tuple[float, float]  # aspect-ratio range (w/h)
    flip_prob: float
    jitter_prob: float
    grayscale_prob: float
    blur_sigma: tuple[float, float]  # per-image sigma range, in pixels of the output view
    local_crops: int  # multi-crop (DINO): number of small views besides the 2 global ones
    local_crop_scale: tuple[float, float]
    local_size: int  # side of the local views, in pixels
    mean: tuple[float, float, float]  # normalisation after augmentation
    std: tuple[float, float, float]


@dataclass(frozen=True)
class PretrainConfig:
    method: str  # a key of ssl_models.methods.METHODS
    backbone: str  # resnet18 | resnet34 | resnet50
    width: int  # channels of the first stage; 64 is the torchvision network
    epochs: int
    batch_size: int
    lr: float  # base learning rate for a batch of 256 (scaled linearly with batch_size)
    optimizer: str  # sgd | lars
    momentum: float
    weight_decay: float
    warmup_epochs: float
    temperature: float  # SimCLR / MoCo / DINO student temperature
    queue_size: int  # MoCo negatives
    proj_hidden_dim: int
    proj_dim: int
    pred_hidden_dim: int  # BYOL predictor
    ema_momentum: float  # MoCo key encoder / BYOL target / DINO teacher base momentum
    dino_out_dim: int
    teacher_temperature: float
    teacher_temperature_warmup: float  # teacher temperature at step 0
    teacher_temperature_warmup_epochs: int
    center_momentum: float
    compile: bool  # torch.compile the backbone (CUDA only)
    checkpoint_every: int  # steps; 0 = only at epoch end
    log_every: int  # steps between host syncs for loss/throughput metrics
    eval_every: int  # epochs between online kNN evaluations; 0 = never


@dataclass(frozen=True)
class EvalConfig:
    protocols: tuple[str, ...]  # default protocols of `sslflow evaluate`
    knn_k: int
    knn_temperature: float
    batch_size: int  # feature extraction
    linear_epochs: int
    linear_lr: float
    linear_weight_decay: float
    linear_batch_size: int
    finetune_epochs: int
    finetune_lr: float  # head learning rate (batch 256)
    finetune_backbone_lr_scale: float  # backbone lr = finetune_lr * this
    finetune_weight_decay: float
    finetune_batch_size: int


@dataclass(frozen=True)
class Params:
    """All parameters of a run; `seed` and `device` are top-level keys."""

    seed: int
    device: str  # auto | cpu | cuda | cuda:N
    augment: AugmentConfig
    pretrain: PretrainConfig
    eval: EvalConfig


def as_dict(params: Any) -> dict[str, Any]:
    """A params dataclass as a plain nested dict (tuples become lists), for JSON/YAML/MLflow."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(params))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"pretrain": {"lr": 0.3}}` -> `{"pretrain.lr": 0.3}` (the dotted keys of `--set`)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
