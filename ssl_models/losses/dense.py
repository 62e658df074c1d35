"""Dense (per-pixel) pretext losses: colorization (Zhang et al., 2016) and inpainting (Pathak et al., 2016).

Pure functions of tensors, computed in at least float32 outside autocast like every loss (see
`ssl_models.losses`). Each loss is a mean over images of a per-image quantity with the same
pixel count, or normalised per image, so that 2 ranks x B give the loss of 1 process x 2B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslflow.ssl_models.losses.common import f32, no_autocast

__all__ = ["colorization_loss", "colorization_regression_loss", "masked_reconstruction_loss",
           "nearest_bin", "rebalancing_weights", "soft_encode"]


def _pixels_ab(ab: Tensor) -> Tensor:
    """(B, 2, H, W) -> (B*H*W, 2), pixel order b, h, w."""
    return ab.permute(0, 2, 3, 1).reshape(-1, 2)


def nearest_bin(ab: Tensor, bins: Tensor) -> Tensor:
    """Index (B, H, W) of the bin centre nearest to each pixel's (a, b) in `bins` (Q, 2)."""
    with no_autocast(ab):
        pix = _pixels_ab(f32(ab))
        d2 = torch.cdist(pix, bins.to(pix.dtype), compute_mode="donot_use_mm_for_euclid_dist")
        return d2.argmin(dim=1).view(ab.shape[0], *ab.shape[2:])


def soft_encode(ab: Tensor, bins: Tensor, neighbours: int = 5, sigma: float = 5.0) -> tuple[Tensor, Tensor]:
    """Zhang et al.'s soft encoding of a*b* over the quantised gamut.

    Why: a one-hot target on the nearest bin would make neighbouring bins (almost the same
    colour) count as wrong as distant ones; the target spreads over the `neighbours` nearest
    bin centres with Gaussian weights exp(-d^2 / (2 sigma^2)) (the paper: 5 neighbours,
    sigma = 5 in a*b* units), normalised to sum to 1.

    Args:
        ab: (B, 2, H, W) a*b* of the ground truth.
        bins: (Q, 2) bin centres.
    Returns:
        (indices (B*H*W, k), weights (B*H*W, k)), pixel order b, h, w; nearest bin first.
    """
    with no_autocast(ab):
        pix = _pixels_ab(f32(ab))
        d = torch.cdist(pix, bins.to(pix.dtype), compute_mode="donot_use_mm_for_euclid_dist")  # (N, Q)
        dist, idx = d.topk(neighbours, dim=1, largest=False, sorted=True)
        w = torch.softmax(-dist.pow(2) / (2 * sigma**2), dim=1)
        return idx, w


def rebalancing_weights(prior: Tensor, bins: Tensor, lam: float = 0.5, sigma: float = 5.0) -> Tensor:
    """Zhang et al.'s class-rebalancing weights w_q (Eq. 4) from the empirical colour distribution.

    Why: natural images are dominated by desaturated colours, and the plain cross-entropy
    predicts them everywhere. The empirical distribution p is smoothed with a Gaussian kernel
    over the bin centres (sigma in a*b* units; each bin spreads its mass, so p~ sums to 1),
    mixed with the uniform distribution, inverted and normalised so that the expected weight
    under p~ is 1: w ∝ ((1 - lam) p~ + lam / Q)^-1, sum_q p~_q w_q = 1. lam = 1 gives
    w = 1 (no rebalancing).

    Args:
        prior: (Q,) non-negative bin frequencies (any scale; normalised here).
        bins: (Q, 2) bin centres.
    Returns:
        (Q,) weights, detached (a statistic of the data, not a function of the model).
    """
    with no_autocast(prior):
        p = f32(prior.detach())
        p = p / p.sum().clamp_min(torch.finfo(p.dtype).tiny)
        c = bins.to(p.dtype)
        kernel = torch.exp(-torch.cdist(c, c, compute_mode="donot_use_mm_for_euclid_dist").pow(2) / (2 * sigma**2))
        kernel = kernel / kernel.sum(dim=0, keepdim=True)  # column r: how bin r's mass spreads
        smoothed = kernel @ p
        w = 1.0 / ((1 - lam) * smoothed + lam / p.numel())
        return w / (smoothed * w).sum()


def colorization_loss(logits: Tensor, ab: Tensor, bins: Tensor, class_weights: Tensor | None = None,
                      neighbours: int = 5, sigma: float = 5.0) -> Tensor:
    """Zhang et al.'s multinomial cross-entropy over quantised a*b*, rebalanced (Eq. 2).

    Why: colour is multimodal (a car may be red or blue); a classification over Q colour bins
    lets the network express that, where a regression averages to grey. Each pixel's loss
    -sum_q Z_q log softmax(logits)_q against the soft-encoded target Z (`soft_encode`) is
    weighted by the rebalancing weight of the pixel's nearest bin, v(Z) = w_{argmax Z}.

    Args:
        logits: (B, Q, H, W) unnormalised bin scores.
        ab: (B, 2, H, W) ground-truth a*b* (same H, W).
        bins: (Q, 2) bin centres.
        class_weights: (Q,) rebalancing weights (`rebalancing_weights`); None = all 1.
    Returns:
        0-d float32 tensor: the mean over the B*H*W pixels (the paper sums over pixels).
    """
    with no_autocast(logits):
        idx, w = soft_encode(ab, bins, neighbours, sigma)  # (N, k)
        logp = F.log_softmax(f32(logits), dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])  # (N, Q)
        per_pixel = -(logp.gather(1, idx) * w.to(logp.dtype)).sum(dim=1)
        if class_weights is not None:
            per_pixel = per_pixel * class_weights.detach().to(logp.dtype)[idx[:, 0]]
        return per_pixel.mean()


def colorization_regression_loss(pred_ab: Tensor, ab: Tensor, scale: float = 100.0) -> Tensor:
    """The regression baseline of Zhang et al.: squared error on a*b* / `scale`.

    Args:
        pred_ab, ab: (B, 2, H, W) predicted and true a*b*.
    Returns:
        0-d float32 tensor: mean over pixels of ||pred - ab||^2 / scale^2 (summed over a and b).
    """
    with no_autocast(pred_ab):
        diff = (f32(pred_ab) - f32(ab.detach()).to(f32(pred_ab).dtype)) / scale
        return diff.pow(2).sum(dim=1).mean()


def masked_reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """The context encoder's reconstruction loss (Pathak et al., Eq. 1), on the masked region only.

    Why: the network sees the image with a region dropped and must fill it in from the
    context; the pixels it was shown are not scored (copying them is trivial).
    Normalised per image (squared error summed over the masked pixels and channels, divided by
    the image's masked pixel count times channels), then averaged over images: random masks
    of different sizes weigh their images equally, and the loss of a batch split over ranks
    is the mean of the ranks' losses.

    Args:
        pred, target: (B, C, H, W) reconstruction and original (target detached here).
        mask: (B, 1, H, W) or (B, H, W), 1 (True) where the pixel was dropped.
    Returns:
        0-d float32 tensor; images without a masked pixel contribute 0.
    """
    with no_autocast(pred):
        pred = f32(pred)
        target = f32(target.detach()).to(pred.dtype)
        m = mask.reshape(mask.shape[0], 1, *mask.shape[-2:]).to(pred.dtype)
        sq = ((pred - target).pow(2) * m).flatten(1).sum(dim=1)
        count = m.flatten(1).sum(dim=1) * pred.shape[1]
        return (sq / count.clamp_min(1.0)).mean()

