"""The engine's settings: augmentation, backbone, pretraining, evaluation, with their domains.

Every field declares its type, default, domain and resume rule here (see `ssl_models.schema`);
the per-method sections (`pretrain.<method>.*`) are declared by each method next to its code
and the per-family backbone sections (`backbone.<family>.*`) by each backbone family, so
adding either never edits this file. `sslflow.core.settings.Settings` extends `EngineSettings`
with the pipeline's sections; the engine only ever reads the fields declared here.

Defaults are the full-scale (GPU) configuration; `params.yaml` of a project (the CPU demo
profile in this repository) and `params/profiles/*.yaml` override them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sslflow.ssl_models.schema import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    Choices,
    ConfigError,
    Each,
    Pair,
    Pattern,
    Range,
    RegistrySectionsMixin,
    as_dict,
    flatten,
    registry_sections,
    resumable_keys,
    section,
    setting,
)

__all__ = [
    "AugmentConfig",
    "BackboneConfig",
    "ConfigError",
    "EngineSettings",
    "EvalConfig",
    "PretrainConfig",
    "engine_flat",
]

PROTOCOLS = ("knn", "linear", "finetune")
OPTIMIZERS = ("sgd", "lars", "adamw")
UNIT_SCALE = Range(0, 1, lo_open=True)  # crop area fractions in (0, 1]


def _method_names() -> list[str]:
    from sslflow.ssl_models.methods import METHODS

    return sorted(METHODS)


def _method_configs() -> dict[str, type]:
    from sslflow.ssl_models.methods import METHODS

    return {name: cls.Config for name, cls in sorted(METHODS.items())}


def _backbone_names() -> list[str]:
    from sslflow.ssl_models.backbones import BACKBONES

    return list(BACKBONES)


def _backbone_families() -> dict[str, type]:
    from sslflow.ssl_models.backbones import FAMILIES

    return dict(FAMILIES)


@dataclass(frozen=True)
class AugmentConfig:
    """The shared view recipe; each method builds its views from it (`ssl_models.views`)."""

    strength: float = setting(0.5, domain=Range(0, 4), doc="SimCLR's colour-jitter s: brightness/contrast/"
                              "saturation 0.8 s, hue 0.2 s (at most half a turn)")
    crop_scale: tuple[float, float] = setting((0.08, 1.0), domain=Pair(UNIT_SCALE),
                                              doc="RandomResizedCrop area range of the global views")
    crop_ratio: tuple[float, float] = setting((0.75, 4 / 3), domain=Pair(Range(0, 100, lo_open=True)),
                                              doc="aspect-ratio range (w/h) of every crop")
    flip_prob: float = setting(0.5, domain=PROBABILITY)
    jitter_prob: float = setting(0.8, domain=PROBABILITY)
    grayscale_prob: float = setting(0.2, domain=PROBABILITY)
    blur_sigma: tuple[float, float] = setting((0.1, 2.0), domain=Pair(NON_NEGATIVE),
                                              doc="per-image sigma range, in pixels of the output view")
    global_size: int = setting(0, domain=Range(0, 4096),
                               doc="side of the global views in pixels; 0 = the store's image size")
    local_crops: int = setting(6, domain=Range(0, 64), doc="multi-crop: small views besides the 2 global ones")
    local_crop_scale: tuple[float, float] = setting((0.05, 0.4), domain=Pair(UNIT_SCALE))
    local_size: int = setting(16, domain=Range(4, 1024), doc="side of the local views, in pixels")
    mean: tuple[float, float, float] = setting((0.485, 0.456, 0.406), domain=Each(PROBABILITY),
                                               doc="normalisation after augmentation (and at evaluation)")
    std: tuple[float, float, float] = setting((0.229, 0.224, 0.225), domain=Each(Range(1e-3, 10)))


@dataclass(frozen=True)
class BackboneConfig(RegistrySectionsMixin):
    """Which network is pretrained; `backbone.<family>.*` hold each family's own knobs."""

    name: str = setting("resnet18", domain=Choices(_backbone_names),
                        doc="resnet18 | resnet34 | resnet50 | vit_tiny | vit_small | vit_base")
    sections: Mapping[str, Any] = registry_sections(_backbone_families)

    @property
    def family(self) -> str:
        from sslflow.ssl_models.backbones import BACKBONES

        return BACKBONES[self.name].family

    @property
    def family_config(self) -> Any:
        return self.sections[self.family]


@dataclass(frozen=True)
class PretrainConfig(RegistrySectionsMixin):
    """Common pretraining knobs; `pretrain.<method>.*` hold each method's own (its file declares them)."""

    method: str = setting("simclr", domain=Choices(_method_names), doc="the SSL method (docs/methods.md)")
    epochs: int = setting(100, domain=Range(1, 100_000))
    batch_size: int = setting(512, domain=Range(2, 1 << 20),
                              doc="the global batch: under torchrun each of N ranks trains on batch_size / N")
    lr: float = setting(0.4, domain=POSITIVE, doc="base learning rate for a batch of 256 (scaled linearly)")
    optimizer: str = setting("lars", domain=Choices(OPTIMIZERS))
    momentum: float = setting(0.9, domain=Range(0, 1, hi_open=True), doc="sgd / lars momentum")
    betas: tuple[float, float] = setting((0.9, 0.999), domain=Each(Range(0, 1, hi_open=True)), doc="adamw betas")
    weight_decay: float = setting(1.0e-5, domain=NON_NEGATIVE, doc="on weights only, never on norms and biases")
    warmup_epochs: float = setting(10.0, domain=NON_NEGATIVE, doc="linear warm-up, then cosine decay to 0")
    compile: bool = setting(True, resumable=True, doc="torch.compile the backbones on CUDA (ignored on CPU)")
    export: bool = setting(True, resumable=True, doc="also write encoder.pt2 (torch.export) at the end; "
                           "tuning trials and tests skip it")
    checkpoint_every: int = setting(500, domain=NON_NEGATIVE, resumable=True,
                                    doc="steps between checkpoints; 0 = only at epoch end")
    log_every: int = setting(50, domain=Range(1, 1 << 30), resumable=True,
                             doc="steps between host syncs for loss/throughput metrics")
    eval_every: int = setting(10, domain=NON_NEGATIVE, resumable=True,
                              doc="epochs between online kNN evaluations; 0 = never")
    max_device_bytes: int = setting(0, domain=NON_NEGATIVE, resumable=True,
                                    doc="largest store kept whole on the device, in bytes; a larger one streams "
                                    "from its shard files in the same batch order (resume in either mode); "
                                    "0 = auto: a quarter of the GPU's memory, 8 GiB on the CPU")
    sections: Mapping[str, Any] = registry_sections(_method_configs)

    @property
    def method_config(self) -> Any:
        """The active method's own section."""
        return self.sections[self.method]


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocols on a labeled train/test pair (and the online kNN during pretraining)."""

    protocols: tuple[str, ...] = setting(("knn", "linear"), domain=Each(Choices(PROTOCOLS), min_len=1),
                                         doc="default protocols of `sslflow evaluate` and the train flow")
    knn_k: int = setting(200, domain=Range(1, 100_000))
    knn_temperature: float = setting(0.07, domain=POSITIVE)
    batch_size: int = setting(1024, domain=Range(1, 1 << 20), doc="feature extraction")
    linear_epochs: int = setting(100, domain=Range(1, 100_000), doc="on features extracted once")
    linear_lr: float = setting(0.1, domain=POSITIVE)
    linear_weight_decay: float = setting(0.0, domain=NON_NEGATIVE)
    linear_batch_size: int = setting(512, domain=Range(1, 1 << 20))
    finetune_epochs: int = setting(30, domain=Range(1, 100_000), doc="all layers, crop + flip")
    finetune_lr: float = setting(0.1, domain=POSITIVE, doc="head learning rate (batch 256)")
    finetune_backbone_lr_scale: float = setting(0.1, domain=Range(0, 10), doc="backbone lr = finetune_lr * this")
    finetune_weight_decay: float = setting(5.0e-4, domain=NON_NEGATIVE)
    finetune_batch_size: int = setting(256, domain=Range(2, 1 << 20))


DEVICE = Pattern(r"auto|cpu|cuda(:\d{1,3})?|mps", "auto, cpu, cuda, cuda:N or mps")


@dataclass(frozen=True)
class EngineSettings:
    """Everything the engine reads: the sections above plus the seed and the device."""

    seed: int = setting(0, domain=Range(0, 2**63 - 1), doc="every random stream derives from it")
    device: str = setting("auto", domain=DEVICE, resumable=True, doc="auto = cuda when available")
    augment: AugmentConfig = section(AugmentConfig)
    backbone: BackboneConfig = section(BackboneConfig)
    pretrain: PretrainConfig = section(PretrainConfig)
    eval: EvalConfig = section(EvalConfig, resumable=True)

    def check(self) -> None:
        """Rules across sections: the active method checks its own section against the rest."""
        from sslflow.ssl_models.methods import METHODS

        METHODS[self.pretrain.method].check_settings(self.pretrain.method_config, self)


ENGINE_SECTIONS = ("seed", "device", "augment", "backbone", "pretrain", "eval")


def engine_flat(params: EngineSettings) -> dict[str, Any]:
    """The engine's settings as dotted keys, with only the active method's and backbone family's
    sub-sections (the others do not affect the run): what checkpoints and `params.json` record."""
    pretrain = as_dict(params.pretrain)
    backbone = as_dict(params.backbone)
    methods = set(params.pretrain.sections) - {params.pretrain.method}
    families = set(params.backbone.sections) - {params.backbone.family}
    tree = {
        "seed": params.seed,
        "device": params.device,
        "augment": as_dict(params.augment),
        "backbone": {k: v for k, v in backbone.items() if k not in families},
        "pretrain": {k: v for k, v in pretrain.items() if k not in methods},
        "eval": as_dict(params.eval),
    }
    return flatten(tree)


def resumable(key: str) -> bool:
    """Whether a change of dotted `key` between a checkpoint and its resumption is allowed."""
    keys = resumable_keys(EngineSettings)
    return any(key == k or key.startswith(k + ".") for k in keys)
