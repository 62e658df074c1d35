"""Masked image modelling losses: MAE's pixel regression on the masked patches.

Pure functions, the package's conventions (at least float32, outside autocast, no host sync).
Patches are flattened as MAE's `patchify`: (B, L, p * p * 3), patches in row-major order
(the order of a ViT's patch embedding), pixels inside a patch row-major with the channel last.
"""

from __future__ import annotations

from torch import Tensor

from sslflow.ssl_models.losses.common import f32, no_autocast


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, L, p * p * C) with L = (H / p) * (W / p), MAE's layout."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: {h}x{w} images are not a whole number of {p} px patches")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """The inverse of `patchify` for square images: (B, L, p * p * C) -> (B, C, H, W)."""
    b, n, _ = patches.shape
    g = round(n ** 0.5)
    if g * g != n:
        raise ValueError(f"unpatchify: {n} patches do not form a square grid")
    p = patch_size
    x = patches.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)


def normalized_pixel_target(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch standardised by its own mean and (unbiased) variance: (t - mu) / sqrt(var + eps).

    MAE's `norm_pix_loss` target (Sec. 4, Table 1d): it sharpens the reconstruction's local
    contrast and improves the representation; `var` is torch's default (unbiased), as the
    official code computes it.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> tuple[Tensor, Tensor]:
    """MAE's reconstruction loss: mean squared error on the *masked* patches only.

    Why: the visible patches were seen by the encoder, predicting them is trivial; the loss is
    the per-patch MSE (mean over the p * p * C values) averaged over the masked patches.

    Args:
        pred: (B, L, p * p * C) the decoder's prediction for every patch.
        target: (B, L, p * p * C) the input's patches (`patchify`); detached here, and
            standardised per patch when `norm_pix`.
        mask: (B, L), 1 = masked (the loss counts it), 0 = visible (ignored).
        norm_pix: regress the per-patch standardised pixels (`normalized_pixel_target`).
    Returns:
        (loss, per_patch): the 0-d loss and the (B, L) per-patch MSE (for diagnostics, e.g.
        the error on the visible patches, which the loss ignores).
    """
    with no_autocast(pred):
        pred = f32(pred)
        target = f32(target.detach()).to(pred.dtype)
        if norm_pix:
            target = normalized_pixel_target(target)
        per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, L)
        mask = mask.to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum(), per_patch


__all__ = ["mae_loss", "normalized_pixel_target", "patchify", "unpatchify"]
