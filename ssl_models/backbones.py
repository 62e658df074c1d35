"""torchvision ResNets with an optional CIFAR stem and a width knob.

The CIFAR stem (3x3 conv, stride 1, no max-pool) keeps 32x32 inputs at full resolution in
the first stage, as every CIFAR SSL result assumes. `width=64` is torchvision's network
exactly (same module names, so weights load into `torchvision.models.resnet18()` after the
same stem swap); smaller widths make tests and the CPU demo run in minutes.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class SSLResNet(ResNet):
    """A torchvision `ResNet` whose classifier is `nn.Identity`: forward gives features."""

    def __init__(self, arch: str, width: int = 64, cifar_stem: bool = True) -> None:
        if arch not in ARCHS:
            raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(ARCHS)}")
        if width < 8 or width % 8:
            raise ValueError(f"backbone width must be a positive multiple of 8, got {width}")
        block, layers = ARCHS[arch]
        self._scale = width / 64
        super().__init__(block, layers)
        self.arch, self.width, self.cifar_stem = arch, width, cifar_stem
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(width)
        self.feature_dim: int = int(512 * self._scale) * block.expansion
        self.fc = nn.Identity()

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # type: ignore[override]
        # torchvision hard-codes widths 64..512; scale them (and the stem width) here.
        if planes == 64:
            self.inplanes = int(64 * self._scale)
        return super()._make_layer(block, int(planes * self._scale), blocks, stride, dilate)


def build_backbone(arch: str, width: int = 64, cifar_stem: bool = True) -> SSLResNet:
    """A randomly initialised feature extractor; its `feature_dim` says the output size."""
    return SSLResNet(arch, width, cifar_stem)
