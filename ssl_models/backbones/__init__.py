"""Backbones: the networks SSL methods train and sslflow keeps (see `base` for the contract).

    backbone = build_backbone(settings.backbone, image_size=32)    # registry by name
    backbone(x)                      # (B, feature_dim) pooled features
    backbone.forward_features(x)     # ResNet: (B, C, h, w) map; ViT: (B, 1 + L, D) tokens
    backbone_from_metadata(backbone.metadata())   # the same architecture, for loading weights

Families: `resnet` (resnet18/34/50, CIFAR or standard stem) and `vit` (vit_tiny/small/base).
"""

from sslflow.ssl_models.backbones import resnet, vit  # noqa: F401  (registration)
from sslflow.ssl_models.backbones.base import (
    BACKBONES,
    FAMILIES,
    Backbone,
    BackboneSpec,
    backbone_from_metadata,
    build_backbone,
    register_backbone,
)
from sslflow.ssl_models.backbones.resnet import ARCHS, ResNetConfig, SSLResNet
from sslflow.ssl_models.backbones.vit import VisionTransformer, ViTConfig

__all__ = [
    "ARCHS",
    "BACKBONES",
    "FAMILIES",
    "Backbone",
    "BackboneSpec",
    "ResNetConfig",
    "SSLResNet",
    "ViTConfig",
    "VisionTransformer",
    "backbone_from_metadata",
    "build_backbone",
    "register_backbone",
]
