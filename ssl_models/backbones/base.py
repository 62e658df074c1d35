"""The backbone contract and registry.

A backbone is the network kept after pretraining. It answers three questions:

- `forward(x)` -> (B, feature_dim) pooled features: what kNN, the linear probe, fine-tuning,
  `sslflow embed` and the exported model use;
- `forward_features(x, keep)` -> spatial features for methods that need more than one vector
  per image: a (B, C, h, w) map for convolutional networks, (B, 1 + K, D) tokens (class token
  first) for transformers, where `keep` (B, K) holds the indices of the patches to encode
  (MAE's visible-only encoder; None = all L patches);
  `pool(features)` turns them into the pooled vector, so `forward(x) == pool(forward_features(x))`;
- `metadata()` -> a JSON-able dict from which `backbone_from_metadata` rebuilds the same
  network (checkpoints, `encoder.pt`, the MLflow model).

Families register themselves with `register_backbone` (their config section is
`backbone.<family>.*`); a new family is one module in this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from sslflow.ssl_models.errors import ConfigError


def input_layout(x: Tensor) -> Tensor:
    """`x` as the network should see it: unchanged on CUDA (channels_last pays there), contiguous
    NCHW elsewhere. On the CPU, torch 2.14's channels_last convolution backward corrupted the heap
    for narrow ResNets at 96 px (issue 15; benchmarks/repro_channels_last_cpu_crash.py): the
    augmentation already hands the CPU contiguous views, this guards every other caller (a
    method's own tensors, `sslflow embed`, user code). Free when `x` is already contiguous."""
    return x if x.device.type == "cuda" else x.contiguous()


class Backbone(nn.Module):
    """Base class of every backbone; see the module docstring for the contract."""

    family: ClassVar[str]
    name: str
    feature_dim: int  # size of the pooled features
    spatial_dim: int  # channels of the map / width of the tokens of `forward_features`
    image_size: int  # the input side it was built for (positional embeddings, the stem choice)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_features(x))

    def forward_features(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def pool(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """{"name", "family", "config" (the resolved family section), "image_size", "feature_dim"}."""
        raise NotImplementedError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str
    build: Callable[[Any, int], Backbone]  # (family config section, image size) -> backbone


BACKBONES: dict[str, BackboneSpec] = {}
FAMILIES: dict[str, type] = {}  # family -> its config section class


def register_backbone(name: str, family: str, config: type, build: Callable[[Any, int], Backbone]) -> None:
    FAMILIES.setdefault(family, config)
    BACKBONES[name] = BackboneSpec(name, family, build)


def build_backbone(cfg: Any, image_size: int) -> Backbone:
    """The backbone named by `cfg.name` (a `BackboneConfig`) for square `image_size` inputs."""
    spec = BACKBONES.get(cfg.name)
    if spec is None:
        raise ConfigError(f"backbone.name must be one of {', '.join(BACKBONES)}; got {cfg.name!r}")
    return spec.build(cfg.sections[spec.family], int(image_size))


def backbone_from_metadata(meta: dict[str, Any]) -> Backbone:
    """Rebuild the (randomly initialised) backbone `metadata()` described; load its weights next.

    Encoders written before the backbone registry (`{"arch", "width", "cifar_stem"}`) load too.
    """
    from sslflow.ssl_models.schema import build

    if "arch" in meta and "name" not in meta:  # sslflow < 0.2 encoder.pt
        meta = {"name": meta["arch"], "image_size": meta.get("image_size", 32),
                "config": {"width": meta["width"], "stem": "cifar" if meta.get("cifar_stem", True) else "imagenet"}}
    spec = BACKBONES.get(meta.get("name", ""))
    if spec is None:
        raise ConfigError(f"the encoder was saved with backbone {meta.get('name')!r}, which this sslflow "
                          f"does not know ({', '.join(BACKBONES)})")
    config = build(FAMILIES[spec.family], meta.get("config") or {}, prefix=f"backbone.{spec.family}.")
    return spec.build(config, int(meta["image_size"]))
