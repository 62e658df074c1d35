"""Jigsaw puzzles (Noroozi & Favaro, 2016): recognise which permutation shuffled a grid of tiles."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.ssl_models.augment import model_layout
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.losses.pretext import pretext_classification_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext
from sslflow.ssl_models.methods.vae import global_rows
from sslflow.ssl_models.schema import Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)
#: added to each tile's per-channel variance before dividing by its square root
TILE_NORM_EPS = 1e-5


# ------------------------------------------------------------------------------ permutation set
@lru_cache(maxsize=8)
def _maximal_hamming_permutations(n_tiles: int, count: int, seed: int) -> Tensor:
    every = torch.tensor(list(itertools.permutations(range(n_tiles))), dtype=torch.uint8)  # (n!, n)
    columns = every.T.contiguous()
    n = len(every)
    # ties are broken by a random priority drawn once from `seed` (Noroozi's algorithm draws the
    # first permutation at random and takes an arg-max afterwards)
    priority = torch.randperm(n, generator=torch.Generator().manual_seed(seed), dtype=torch.int64)

    def distances(p: Tensor) -> Tensor:  # Hamming distance of every permutation to p, (n,)
        d = torch.zeros(n, dtype=torch.int64)
        for j in range(n_tiles):
            d += columns[j] != p[j]
        return d

    chosen = [int(priority.argmax())]
    min_dist = distances(every[chosen[0]])
    for _ in range(count - 1):
        pick = int((min_dist * n + priority).argmax())  # the farthest from the chosen set, ties at random
        chosen.append(pick)
        torch.minimum(min_dist, distances(every[pick]), out=min_dist)
    return every[chosen].long()


def maximal_hamming_permutations(n_tiles: int, count: int, seed: int) -> Tensor:
    """(count, n_tiles) int64: permutations of range(n_tiles) chosen greedily for maximal Hamming
    distance (Noroozi & Favaro, 2016, Algorithm 1): each is one that maximises the minimum Hamming
    distance to those chosen before it, ties broken at random. A function of the arguments only
    (same seed, same set, on any machine), cached per process.

    With 9 tiles the minimum pairwise distance is 6 for up to 100 permutations and 5 for 1000
    (average about 8, as in the paper); the chosen permutations are all distinct (count <= n!).
    """
    if not 1 <= count <= math.factorial(n_tiles):
        raise ValueError(f"{count} permutations of {n_tiles} tiles: between 1 and {math.factorial(n_tiles)}")
    return _maximal_hamming_permutations(n_tiles, count, seed).clone()


# ------------------------------------------------------------------------------ tile geometry
@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of a `grid` x `grid` puzzle lie in a `size` px view.

    The grid of cells (side `cell` = size // grid) is centred in the view (`margin` px left over
    before it); each tile is a `tile` x `tile` square placed at a random integer offset in
    [0, jitter] (jitter = cell - tile) inside its cell, independently per tile and axis. Two
    neighbouring tiles are therefore `cell - tile` px apart on average, at least 0 and at most
    2 x jitter px (the gap), and never overlap: the network cannot match tile edges or
    continue lines across them, which is the shortcut the gap and the jitter remove.
    """

    size: int
    grid: int
    tile_fraction: float

    @property
    def cell(self) -> int:
        return self.size // self.grid

    @property
    def tile(self) -> int:
        return max(1, math.floor(self.tile_fraction * self.cell))

    @property
    def jitter(self) -> int:
        return self.cell - self.tile

    @property
    def margin(self) -> int:
        return (self.size - self.grid * self.cell) // 2

    @property
    def n_tiles(self) -> int:
        return self.grid * self.grid

    def corners(self, offsets: Tensor) -> Tensor:
        """(B, T, 2) integer (y, x) top-left corners of the tiles in row-major cell order, from
        (B, T, 2) offsets in [0, jitter]."""
        cells = torch.arange(self.grid, device=offsets.device) * self.cell + self.margin
        base = torch.stack(torch.meshgrid(cells, cells, indexing="ij"), dim=-1).view(1, -1, 2)  # (1, T, 2)
        return base + offsets


def extract_tiles(x: Tensor, corners: Tensor, tile: int) -> Tensor:
    """(B, C, H, W), (B, T, 2) corners -> (B, T, C, tile, tile): tile t of image b is
    x[b, :, y:y + tile, x:x + tile] with (y, x) = corners[b, t] (one gather, on the device)."""
    r = torch.arange(tile, device=x.device)
    ys = (corners[..., 0, None] + r)[:, :, :, None]  # (B, T, tile, 1)
    xs = (corners[..., 1, None] + r)[:, :, None, :]  # (B, T, 1, tile)
    b = torch.arange(x.shape[0], device=x.device)[:, None, None, None]
    return x.permute(0, 2, 3, 1)[b, ys, xs].permute(0, 1, 4, 2, 3)  # (B, T, t, t, C) -> (B, T, C, t, t)


def standardize_tiles(tiles: Tensor) -> Tensor:
    """Each tile and channel to zero mean and unit variance (Noroozi & Favaro, Sec. 3.3: no
    low-level statistics shared between neighbouring tiles). (..., C, h, w) -> same shape."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    var = tiles.var(dim=(-2, -1), unbiased=False, keepdim=True)
    return (tiles - mean) / torch.sqrt(var + TILE_NORM_EPS)


# ------------------------------------------------------------------------------ method
@dataclass(frozen=True)
class JigsawConfig:
    """`pretrain.jigsaw.*`"""

    grid: int = setting(3, domain=Range(2, 3), doc="tiles per side (3 = the paper's 3x3 puzzle)")
    num_permutations: int = setting(1000, domain=Range(2, 362_880),
                                    doc="classes: a maximal-Hamming-distance set of permutations "
                                        "(the paper: 1000; at most (grid^2)!)")
    permutation_seed: int = setting(0, domain=Range(0, 2**63 - 1), doc="draws the permutation set's ties")
    tile_fraction: float = setting(0.85, domain=Range(0, 1, lo_open=True),
                                   doc="tile side / cell side (the paper: 64 / 75); the rest is gap and jitter")
    tile_size: int = setting(0, domain=Range(0, 1024), doc="tiles are resized to this side before the backbone; "
                             "0 = their own side (view size // grid x tile_fraction)")
    tile_norm: bool = setting(True, doc="standardise each tile per channel (the paper's shortcut removal)")
    color_augment: bool = setting(False, doc="also apply the augment recipe's colour jitter / grayscale / blur")
    tile_dim: int = setting(512, domain=DIM, doc="per-tile layer after the backbone (the paper's fc6)")
    hidden_dim: int = setting(4096, domain=DIM, doc="layer over the concatenated tiles (the paper's fc7)")

    def check(self) -> None:
        n_max = math.factorial(self.grid * self.grid)
        if self.num_permutations > n_max:
            raise ConfigError(f"pretrain.jigsaw.num_permutations ({self.num_permutations}) exceeds the "
                              f"{n_max} permutations of a {self.grid}x{self.grid} grid")


@register_method
class Jigsaw(SSLMethod):
    """The 3x3 jigsaw puzzle: shuffled tiles -> shared backbone -> which permutation (of P)?

    Per image (all on the device, no host sync):
    1. one view (the augment recipe's crop + flip, no colour operation unless
       `color_augment`), cut into a grid x grid array of cells (`TileGrid`);
    2. one tile per cell at a random offset (jitter) leaving random gaps, each tile
       standardised per channel (`tile_norm`) and resized to `tile_size` if set;
    3. a permutation index k drawn uniformly from the P permutations of a fixed set with
       maximal Hamming distance (`maximal_hamming_permutations`, deterministic from
       `permutation_seed`, kept as a buffer so a checkpoint carries it); input slot j gets
       tile perm[k][j];
    4. every tile through the shared backbone (one call of B x grid^2 tiles), a per-tile
       Linear-BN-ReLU to `tile_dim` (fc6), the slots concatenated in order, Linear-BN-ReLU to
       `hidden_dim` (fc7) and Linear to P (fc8); cross-entropy with k.
    Metric: `pretext_accuracy`. The random offsets and k come from the global RNG
    (checkpointed: resume is bitwise), drawn for the global batch with each rank keeping its
    rows, so data parallel draws what one process draws; the loss is a per-image mean.

    Tile size: a 32 px view in a 3x3 grid has 10 px cells and (tile_fraction 0.85) 8 px tiles
    with 0-2 px of jitter; ResNets with the CIFAR stem take them as they are (a 1x1 map after
    the last stage), `tile_size` can upsample them (the demo uses 16). ViT backbones need a
    tile side that the patch size divides (checked with `tile_size`).

    Deviations from the paper: the tiles come from the augment recipe's view at its size
    instead of a 225 px crop of a 256 px image (so 8 px tiles at 32 px rather than 64 px);
    BatchNorm instead of dropout in fc6/fc7; no colour-channel jitter against chromatic
    aberration (a cue at ImageNet resolution, not at 32 px), grayscale only through
    `color_augment`.
    """

    name: ClassVar[str] = "jigsaw"
    family: ClassVar[str] = "pretext"
    Config: ClassVar[type] = JigsawConfig

    def __init__(self, backbone, cfg: JigsawConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        cfg.check()
        self.geometry = TileGrid(ctx.view_size, cfg.grid, cfg.tile_fraction)
        if self.geometry.cell < 1:
            raise ConfigError(f"pretrain.jigsaw.grid ({cfg.grid}) is larger than the view ({ctx.view_size} px)")
        n = self.geometry.n_tiles
        self.register_buffer("permutations", maximal_hamming_permutations(n, cfg.num_permutations,
                                                                          cfg.permutation_seed))
        self.tile_head = nn.Sequential(nn.Linear(self.feature_dim, cfg.tile_dim), nn.BatchNorm1d(cfg.tile_dim),
                                       nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(n * cfg.tile_dim, cfg.hidden_dim), nn.BatchNorm1d(cfg.hidden_dim),
                                        nn.ReLU(inplace=True), nn.Linear(cfg.hidden_dim, cfg.num_permutations))

    @classmethod
    def check_settings(cls, cfg: JigsawConfig, settings: Any) -> None:
        cfg.check()
        backbone = settings.backbone
        if backbone.family == "vit" and cfg.tile_size and cfg.tile_size % backbone.family_config.patch_size:
            raise ConfigError(f"pretrain.jigsaw.tile_size ({cfg.tile_size}) must be a multiple of "
                              f"backbone.vit.patch_size ({backbone.family_config.patch_size})")

    @classmethod
    def view_specs(cls, cfg: JigsawConfig, ctx: TrainContext) -> list[ViewSpec]:
        view = ViewSpec.from_augment(ctx.augment, ctx.view_size)
        return [view if cfg.color_augment else view.geometry_only()]

    def puzzles(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, S, S) views -> (shuffled tiles (B, T, C, s, s), permutation indices (B,))."""
        geo, b, t = self.geometry, x.shape[0], self.geometry.n_tiles
        offsets = global_rows(b, lambda n: torch.randint(geo.jitter + 1, (n, t, 2), device=x.device))
        k = global_rows(b, lambda n: torch.randint(len(self.permutations), (n,), device=x.device))
        tiles = extract_tiles(x, geo.corners(offsets), geo.tile)
        if self.cfg.tile_norm:
            tiles = standardize_tiles(tiles)
        order = self.permutations[k]  # (B, T): slot j holds tile order[:, j]
        shuffled = tiles[torch.arange(b, device=x.device)[:, None], order]
        return shuffled, k

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x = batch.views[0]
        shuffled, target = self.puzzles(x)
        b, t = shuffled.shape[:2]
        tiles = shuffled.flatten(0, 1)
        size = self.cfg.tile_size
        if size and size != tiles.shape[-1]:
            tiles = F.interpolate(tiles, size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=size < tiles.shape[-1])
        tiles = tiles.contiguous(memory_format=model_layout(x.device))
        features = self.tile_head(self.backbone(tiles)).view(b, t * self.cfg.tile_dim)
        loss, accuracy = pretext_classification_loss(self.classifier(features), target)
        return StepOutput(loss, {"pretext_accuracy": accuracy})
