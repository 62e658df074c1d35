"""MAE (He et al., 2022): masked autoencoders; a ViT encodes a random 25 % of the patches and a
light decoder reconstructs the pixels of the others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.backbones.vit import Block, sincos_2d
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.losses.masked import mae_loss, patchify, unpatchify
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext
from sslflow.ssl_models.schema import Pair, Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)


@dataclass(frozen=True)
class MAEConfig:
    """`pretrain.mae.*` (defaults: the paper's ViT-B recipe, also solo-learn's CIFAR one)."""

    mask_ratio: float = setting(0.75, domain=Range(0, 1, lo_open=True, hi_open=True),
                                doc="share of each image's patches hidden from the encoder")
    decoder_dim: int = setting(512, domain=DIM, doc="decoder width (divisible by 4 and by decoder_heads)")
    decoder_depth: int = setting(8, domain=Range(1, 64), doc="decoder transformer blocks")
    decoder_heads: int = setting(16, domain=Range(1, 256))
    norm_pix_loss: bool = setting(True, doc="regress per-patch standardised pixels (the paper's best target)")
    crop_scale: tuple[float, float] = setting((0.2, 1.0), domain=Pair(Range(0, 1, lo_open=True)),
                                              doc="RandomResizedCrop area range of MAE's only view")


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder: encoder tokens -> decoder width, mask tokens at the hidden
    positions, fixed 2-D sin-cos positions, `depth` pre-norm blocks, LayerNorm, and a linear
    prediction of each patch's p * p * 3 pixels."""

    pos_embed: Tensor

    def __init__(self, embed_dim: int, grid: int, patch_size: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(grid, dim)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        for m in self.modules():  # the official initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: Tensor, restore: Tensor) -> Tensor:
        """(B, 1 + K, D) encoder tokens (class token first, then the K visible patches in
        `keep` order) and (B, L) `restore` indices -> (B, L, p * p * 3) predictions."""
        x = self.embed(tokens)
        b, n = restore.shape
        hidden = self.mask_token.to(x.dtype).expand(b, n - (x.shape[1] - 1), -1)
        patches = torch.cat([x[:, 1:], hidden], dim=1)  # visible first, then the mask tokens
        patches = patches.gather(1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # image order
        x = torch.cat([x[:, :1], patches + self.pos_embed.to(x.dtype)], dim=1)  # class token: position 0
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x)[:, 1:])


@register_method
class MAE(SSLMethod):
    """ViT encoder on the visible patches, `MAEDecoder`, normalised-pixel loss on the masked ones.

    - Mask: per image, `mask_ratio` of the L patches hidden (`int(L * (1 - mask_ratio))` kept,
      the same count for every image), chosen by ranking uniform noise as the official
      `random_masking`. The noise is drawn on the device with the global torch generator (no
      host sync; its CPU and CUDA states are in the checkpoint, so a resumed run draws the
      same masks). Data parallel: every rank draws the noise of the whole global batch (the
      ranks' generators are seeded alike) and keeps its own rows, so 2 ranks x B see the
      masks of 1 process x 2B.
    - Encoder: `backbone.forward_features(x, keep)`, the ViT on the class token and the kept
      patches only (the compute saving that makes MAE cheap).
    - Loss: `mae_loss`: per-patch MSE to the (per-patch standardised, `norm_pix_loss`) pixels of
      the view, averaged over the masked patches only. Metric `visible_loss`: the same error on
      the visible patches, which the loss ignores (a diagnostic; the decoder is not trained there).
    - Views: one crop + flip, no colour operation (`crop_scale`, the paper's (0.2, 1)).
    - Kept encoder: the ViT without the decoder (`encoder()`); the pooled feature for kNN /
      linear is `backbone.vit.pool` (the MAE profiles say which and why).
    - Optimiser: AdamW (betas 0.9 / 0.95, weight decay 0.05, lr 1.5e-4 x batch / 256, 40
      warm-up epochs in the paper) is set by the profiles through the common `pretrain.*`
      section; this class does not force it (any optimizer runs, e.g. in the fast tests).
    Deviations: none in the objective. The encoder's class token receives no positional
    embedding rather than the official all-zero one (the same thing).
    """

    name: ClassVar[str] = "mae"
    family: ClassVar[str] = "masked image modelling"
    Config: ClassVar[type] = MAEConfig

    def __init__(self, backbone, cfg: MAEConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        if backbone.family != "vit":
            raise ConfigError(f"pretrain.method mae needs a ViT backbone; backbone.name is {backbone.name}")
        self.num_patches, self.patch_size = backbone.num_patches, backbone.patch_size
        self.num_keep = int(self.num_patches * (1 - cfg.mask_ratio))
        if not 1 <= self.num_keep < self.num_patches:
            raise ConfigError(f"pretrain.mae.mask_ratio ({cfg.mask_ratio}) keeps {self.num_keep} of the "
                              f"{self.num_patches} patches; at least 1 must stay visible and 1 be masked")
        self.decoder = MAEDecoder(backbone.embed_dim, backbone.grid, backbone.patch_size, cfg.decoder_dim,
                                  cfg.decoder_depth, cfg.decoder_heads)

    @classmethod
    def check_settings(cls, cfg: MAEConfig, settings) -> None:
        if settings.backbone.family != "vit":
            raise ConfigError(f"backbone.name must be a ViT (vit_tiny, vit_small, vit_base) for pretrain.method "
                              f"mae, got {settings.backbone.name}: MAE encodes only the visible patches")
        if cfg.decoder_dim % cfg.decoder_heads or cfg.decoder_dim % 4:
            raise ConfigError(f"pretrain.mae.decoder_dim ({cfg.decoder_dim}) must be divisible by 4 (sin-cos "
                              f"positions) and by pretrain.mae.decoder_heads ({cfg.decoder_heads})")

    @classmethod
    def view_specs(cls, cfg: MAEConfig, ctx: TrainContext) -> list[ViewSpec]:
        """One view: random resized crop (`crop_scale`) + flip, true colours."""
        return [ViewSpec.from_augment(ctx.augment, ctx.view_size, tuple(cfg.crop_scale)).geometry_only()]

    def random_masking(self, b: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(keep (B, K), mask (B, L) with 1 = masked, restore (B, L)) for this rank's `b` images.

        Uniform noise ranks the patches; the K lowest are kept. The noise of the whole global
        batch is drawn and this rank's rows kept (see the class docstring)."""
        world = distributed.world_size()
        noise = torch.rand(b * world, self.num_patches, device=device)
        if world > 1:
            r = distributed.rank()
            noise = noise[r * b:(r + 1) * b]
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        keep = shuffle[:, :self.num_keep]
        mask = torch.ones(b, self.num_patches, device=device).scatter_(1, keep, 0.0)
        return keep, mask, restore

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(predicted patches (B, L, p * p * 3), mask (B, L)) of normalised images `x`."""
        keep, mask, restore = self.random_masking(x.shape[0], x.device)
        return self.decoder(self.backbone.forward_features(x, keep), restore), mask

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x = batch.views[0]
        pred, mask = self.reconstruct(x)
        loss, per_patch = mae_loss(pred, patchify(x, self.patch_size), mask, self.cfg.norm_pix_loss)
        with torch.no_grad():
            visible = 1.0 - mask
            visible_loss = (per_patch.detach() * visible).sum() / visible.sum()
        return StepOutput(loss, {"visible_loss": visible_loss})

    @torch.no_grad()
    def visualize(self, batch: Batch) -> dict[str, Tensor]:
        """Unaugmented inputs, the same with the masked patches blanked (the mean colour), and the
        reconstruction: the visible patches pasted over the prediction of the masked ones (with
        `norm_pix_loss` the prediction is un-standardised with each true patch's mean and
        std, as the official visualisation does)."""
        raw = batch.raw()
        size = self.ctx.view_size
        if raw.shape[-1] != size:
            raw = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = batch.normalize(raw)
        pred, mask = self.reconstruct(x)
        target = patchify(x, self.patch_size).to(pred.dtype)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        m = mask.unsqueeze(-1).to(pred.dtype)
        mean_c = torch.tensor(batch.mean, device=x.device, dtype=pred.dtype).view(1, 3, 1, 1)
        std_c = torch.tensor(batch.std, device=x.device, dtype=pred.dtype).view(1, 3, 1, 1)

        def to_image(patches: Tensor) -> Tensor:
            return (unpatchify(patches, self.patch_size) * std_c + mean_c).clamp(0, 1)

        return {"inputs": raw.clamp(0, 1), "masked": to_image(target * (1 - m)),
                "reconstruction": to_image(target * (1 - m) + pred * m)}
