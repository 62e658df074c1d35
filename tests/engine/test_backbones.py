"""The backbone registry: ResNets with a stem chosen from the image size, ViTs, the contract's
pooled / spatial features, and rebuilding from metadata."""

from __future__ import annotations

import pytest
import torch

from helpers import fast_params
from sslflow.ssl_models.backbones import BACKBONES, SSLResNet, VisionTransformer, backbone_from_metadata, build_backbone
from sslflow.ssl_models.backbones.vit import sincos_2d
from sslflow.ssl_models.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_registry_names_and_families():
    assert {"resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small", "vit_base"} <= set(BACKBONES)
    assert {BACKBONES[n].family for n in ("resnet18", "vit_small")} == {"resnet", "vit"}


@pytest.mark.parametrize(("size", "stem", "cifar"), [
    (32, "auto", True), (64, "auto", True), (96, "auto", False), (224, "auto", False),
    (96, "cifar", True), (32, "imagenet", False)])
def test_resnet_stem_follows_the_image_size_unless_told(size, stem, cifar):
    settings = fast_params(f"backbone.resnet.stem={stem}")
    net = build_backbone(settings.backbone, size)
    assert isinstance(net, SSLResNet) and net.cifar_stem is cifar
    assert isinstance(net.maxpool, torch.nn.Identity) is cifar
    assert net.metadata()["config"]["stem"] == ("cifar" if cifar else "imagenet")


def test_resnet_pooled_and_spatial_features_agree():
    net = SSLResNet("resnet18", width=8, cifar_stem=False, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = net.forward_features(x)
    assert maps.shape == (2, net.feature_dim, 2, 2)  # standard stem: /4, then /8 over the stages
    torch.testing.assert_close(net(x), net.pool(maps))
    with pytest.raises(ConfigError, match="ViT"):
        net.forward_features(x, keep=torch.zeros(2, 1, dtype=torch.long))


def test_vit_tokens_keep_and_pool():
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", image_size=32, patch_size=8, pool="cls").eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = vit.forward_features(x)
    assert tokens.shape == (2, 1 + 16, 192) and vit.feature_dim == 192
    torch.testing.assert_close(vit(x), tokens[:, 0])
    keep = torch.tensor([[0, 5, 9], [1, 2, 15]])
    visible = vit.forward_features(x, keep)
    assert visible.shape == (2, 4, 192)
    mean = VisionTransformer("vit_tiny", image_size=32, patch_size=8, pool="mean").eval()
    mean.load_state_dict(vit.state_dict())
    torch.testing.assert_close(mean(x), tokens[:, 1:].mean(1))
    # sin-cos positions exist for any grid: a model built at 32 px embeds 48 px images
    assert vit(torch.randn(1, 3, 48, 48)).shape == (1, 192)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        vit(torch.randn(1, 3, 30, 30))
    with pytest.raises(ConfigError, match="must divide the image size"):
        VisionTransformer("vit_tiny", image_size=30, patch_size=8)


def test_sincos_positions_are_distinct_and_bounded():
    pe = sincos_2d(4, 16)
    assert pe.shape == (16, 16) and pe.abs().max() <= 1
    assert len({tuple(row.tolist()) for row in pe}) == 16


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_metadata_rebuilds_the_same_network(name):
    settings = fast_params(f"backbone.name={name}", "backbone.vit.patch_size=8")
    torch.manual_seed(0)
    net = build_backbone(settings.backbone, 32).eval()
    again = backbone_from_metadata(net.metadata()).eval()
    again.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), net(x))


def test_old_encoder_metadata_still_loads():
    """encoder.pt files written before the registry say arch / width / cifar_stem."""
    net = backbone_from_metadata({"arch": "resnet18", "width": 8, "cifar_stem": True, "image_size": 32})
    assert isinstance(net, SSLResNet) and net.width == 8 and net.cifar_stem
    with pytest.raises(ConfigError, match="does not know"):
        backbone_from_metadata({"name": "alexnet", "image_size": 32})
