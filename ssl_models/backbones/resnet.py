"""torchvision ResNets with a stem chosen from the image size and a width knob.

The CIFAR stem (3x3 conv, stride 1, no max-pool) keeps small inputs at full resolution in the
first stage, as every CIFAR SSL result assumes; the standard stem (7x7 conv, stride 2, then a
3x3/2 max-pool) divides the side by 4 first, which is what 96-512 px images need (the CIFAR
stem on 224 px costs ~16x the compute). `stem: auto` picks CIFAR up to `CIFAR_STEM_MAX_SIDE`
pixels. `width=64` is torchvision's network exactly (same module names, so weights load into
`torchvision.models.resnet18()` after the same stem swap); smaller widths make tests and the
CPU demo run in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from sslflow.ssl_models.backbones.base import Backbone, input_layout, register_backbone
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.schema import Choices, Range, setting

ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
CIFAR_STEM_MAX_SIDE = 64


@dataclass(frozen=True)
class ResNetConfig:
    """`backbone.resnet.*`"""

    width: int = setting(64, domain=Range(8, 1024), doc="channels of the first stage (a multiple of 8); "
                         "64 = torchvision's network, 8-32 for quick CPU runs")
    stem: str = setting("auto", domain=Choices(("auto", "cifar", "imagenet")),
                        doc=f"auto = cifar (3x3, stride 1, no max-pool) up to {CIFAR_STEM_MAX_SIDE} px, "
                            "imagenet (7x7/2 + max-pool) above")

    def check(self) -> None:
        if self.width % 8:
            raise ConfigError(f"backbone.resnet.width must be a multiple of 8; got {self.width}")

    def resolved_stem(self, image_size: int) -> str:
        if self.stem != "auto":
            return self.stem
        return "cifar" if image_size <= CIFAR_STEM_MAX_SIDE else "imagenet"


class SSLResNet(ResNet, Backbone):
    """A torchvision `ResNet` whose classifier is `nn.Identity`: forward gives pooled features."""

    family: ClassVar[str] = "resnet"

    def __init__(self, arch: str, width: int = 64, cifar_stem: bool = True, image_size: int = 32) -> None:
        if arch not in ARCHS:
            raise ConfigError(f"unknown ResNet {arch!r}; choose one of {sorted(ARCHS)}")
        if width < 8 or width % 8:
            raise ConfigError(f"backbone.resnet.width must be a positive multiple of 8, got {width}")
        block, layers = ARCHS[arch]
        self._scale = width / 64
        super().__init__(block, layers)
        self.name, self.arch, self.width, self.cifar_stem = arch, arch, width, cifar_stem
        self.image_size = image_size
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(width)
        self.feature_dim: int = int(512 * self._scale) * block.expansion
        self.spatial_dim = self.feature_dim
        self.fc = nn.Identity()

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # type: ignore[override]
        # torchvision hard-codes widths 64..512; scale them (and the stem width) here.
        if planes == 64:
            self.inplanes = int(64 * self._scale)
        return super()._make_layer(block, int(planes * self._scale), blocks, stride, dilate)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_features(x))

    def forward_features(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) -> the last stage's (B, feature_dim, H/s, W/s) map (s = 8 or 32)."""
        if keep is not None:
            raise ConfigError("ResNet backbones cannot drop patches (a mask needs a ViT backbone)")
        x = self.maxpool(self.relu(self.bn1(self.conv1(input_layout(x)))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pool(self, features: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(features), 1)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.arch, "family": self.family, "image_size": self.image_size,
                "feature_dim": self.feature_dim,
                "config": {"width": self.width, "stem": "cifar" if self.cifar_stem else "imagenet"}}


def _builder(arch: str):
    def build(cfg: ResNetConfig, image_size: int) -> SSLResNet:
        return SSLResNet(arch, cfg.width, cfg.resolved_stem(image_size) == "cifar", image_size)
    return build


for _arch in ARCHS:
    register_backbone(_arch, "resnet", ResNetConfig, _builder(_arch))
