"""Vision Transformers (Dosovitskiy et al., 2021) as SSL backbones: tiny, small, base.

The layout of MAE / MoCo v3 / DINO's ViTs: a patch embedding (a conv with kernel = stride =
patch size), a class token, pre-norm blocks (attention + MLP x4, GELU) and a final
LayerNorm. Positional embeddings are the fixed 2-D sin-cos ones of MAE and MoCo v3 by default
(they need no training and exist for any grid, so a model trained at one size evaluates at
another), or learned (`pos_embed: learned`, interpolated bicubically to another grid).

`forward_features(x, keep)` takes optional indices (B, K) of the patches to keep: MAE encodes
only its visible patches this way. The pooled feature (`backbone.vit.pool`) is the class
token (`cls`, the default, as MoCo v3 and DINO evaluate) or the mean of the patch tokens
(`mean`, what MAE's linear probe uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.ssl_models.backbones.base import Backbone, input_layout, register_backbone
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.schema import Choices, Range, setting

# name -> (embedding width, depth, heads)
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


@dataclass(frozen=True)
class ViTConfig:
    """`backbone.vit.*`"""

    patch_size: int = setting(16, domain=Range(1, 256), doc="side of a patch in pixels (4 for 32 px images, "
                              "16 for 224 px); must divide the image size")
    pool: str = setting("cls", domain=Choices(("cls", "mean")),
                        doc="pooled feature for kNN/linear/embeddings: the class token or the mean patch token")
    pos_embed: str = setting("sincos", domain=Choices(("sincos", "learned")), doc="fixed 2-D sin-cos or learned")
    drop_path: float = setting(0.0, domain=Range(0, 0.9), doc="stochastic depth rate of the last block")


def sincos_2d(grid: int, dim: int) -> Tensor:
    """(grid * grid, dim) fixed 2-D sin-cos positional embedding (MAE's / MoCo v3's).

    Half of the dimensions encode the row, half the column; each half is [sin, cos] of the
    position times frequencies 1 / 10000^(i / (dim / 4)).
    """
    if dim % 4:
        raise ConfigError(f"a sin-cos positional embedding needs a width divisible by 4, got {dim}")
    pos = torch.arange(grid, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    out = torch.einsum("p,f->pf", pos, omega)  # (grid, dim / 4)
    emb_1d = torch.cat([out.sin(), out.cos()], dim=1)  # (grid, dim / 2)
    rows = emb_1d[:, None, :].expand(grid, grid, dim // 2)
    cols = emb_1d[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=2).reshape(grid * grid, dim).float()


class DropPath(nn.Module):
    """Per-sample stochastic depth: drop the residual branch of a random subset of the batch."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, drop_path: float = 0.0, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(Backbone):
    """ViT with a class token; see the module docstring."""

    family: ClassVar[str] = "vit"

    def __init__(self, name: str, image_size: int, patch_size: int, pool: str = "cls",
                 pos_embed: str = "sincos", drop_path: float = 0.0, in_chans: int = 3) -> None:
        super().__init__()
        if name not in ARCHS:
            raise ConfigError(f"unknown ViT {name!r}; choose one of {sorted(ARCHS)}")
        if image_size % patch_size:
            raise ConfigError(f"backbone.vit.patch_size ({patch_size}) must divide the image size ({image_size})")
        dim, depth, heads = ARCHS[name]
        self.name, self.image_size, self.patch_size = name, image_size, patch_size
        self.pool_mode, self.pos_mode, self.drop_path_rate = pool, pos_embed, drop_path
        self.feature_dim = self.spatial_dim = self.embed_dim = dim
        self.depth, self.num_heads = depth, heads
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_buffer("pos_embed", sincos_2d(self.grid, dim)[None], persistent=False)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE / MoCo v3: xavier-uniform linears and patch projection, class token N(0, 0.02)."""
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def positions(self, grid: int) -> Tensor:
        """(1, grid * grid, D) positional embedding for a `grid` x `grid` patch layout."""
        if grid == self.grid:
            return self.pos_embed
        if self.pos_mode == "sincos":
            return sincos_2d(grid, self.embed_dim).to(self.pos_embed)[None]
        pe = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(grid, grid), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)

    def patch_tokens(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, D) patch embeddings with positions (no class token)."""
        h, w = x.shape[-2:]
        if h != w or h % self.patch_size:
            raise ConfigError(f"the ViT needs square inputs whose side is a multiple of the patch size "
                              f"{self.patch_size}; got {h}x{w}")
        tokens = self.patch_embed(input_layout(x)).flatten(2).transpose(1, 2)
        return tokens + self.positions(h // self.patch_size)

    def forward_features(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """(B, 1 + K, D) normalised tokens, class token first; `keep` (B, K) = patch indices to encode."""
        tokens = self.patch_tokens(x)
        if keep is not None:
            tokens = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def pool(self, features: Tensor) -> Tensor:
        return features[:, 0] if self.pool_mode == "cls" else features[:, 1:].mean(dim=1)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "image_size": self.image_size,
                "feature_dim": self.feature_dim,
                "config": {"patch_size": self.patch_size, "pool": self.pool_mode, "pos_embed": self.pos_mode,
                           "drop_path": self.drop_path_rate}}


def _builder(name: str):
    def build(cfg: ViTConfig, image_size: int) -> VisionTransformer:
        return VisionTransformer(name, image_size, cfg.patch_size, cfg.pool, cfg.pos_embed, cfg.drop_path)
    return build


for _name in ARCHS:
    register_backbone(_name, "vit", ViTConfig, _builder(_name))

__all__ = ["ARCHS", "ViTConfig", "VisionTransformer", "sincos_2d"]
