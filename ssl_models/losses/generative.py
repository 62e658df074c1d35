"""Generative losses: the reconstruction term of autoencoders and the VAE's KL term (pure functions).

Every function computes in (at least) float32 outside autocast, returns per-image means (a
sum or mean over each image's pixels / latent dimensions, then the mean over the batch), so
under data parallel the average of the ranks' losses is the loss of the global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sslflow.ssl_models.losses.common import f32, no_autocast

REDUCTIONS = ("mean", "sum")


def reconstruction_loss(x_hat: Tensor, x: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error between a reconstruction and its target.

    Why: an autoencoder's decoder must put back every pixel of its input; with a Gaussian
    decoder of fixed variance sigma^2 the negative log-likelihood of an image is its summed
    squared error / (2 sigma^2) plus a constant, so the summed form is the VAE's ELBO term
    (sigma^2 = 1/2) and the per-pixel mean is the plain autoencoder's MSE.

    Args:
        x_hat: (B, ...) reconstructions.
        x: (B, ...) targets of the same shape; detached here (the target is data).
        reduction: "mean" = mean over every element (per-pixel MSE, equal to the mean over
            images of each image's MSE); "sum" = summed over each image's elements, then
            averaged over the B images.
    Returns:
        0-d float32 tensor (float64 for float64 inputs).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if x_hat.shape != x.shape:
        raise ValueError(f"reconstruction {tuple(x_hat.shape)} and target {tuple(x.shape)} differ in shape")
    with no_autocast(x_hat):
        sq = (f32(x_hat) - f32(x.detach()).to(f32(x_hat).dtype)).pow(2)
        if reduction == "mean":
            return sq.mean()
        return sq.flatten(1).sum(1).mean()


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL( N(mu, diag(exp(logvar))) || N(0, I) ), summed over the latent dimensions, averaged over images.

    Why: the VAE's regulariser in closed form (Kingma & Welling, 2014, appendix B):
    -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2), in nats per image.

    Args:
        mu, logvar: (B, D) posterior means and log-variances.
    Returns:
        0-d float32 tensor (float64 for float64 inputs), >= 0.
    """
    with no_autocast(mu):
        mu, logvar = f32(mu), f32(logvar)
        return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """The reparameterisation trick: z = mu + exp(logvar / 2) * eps, with eps ~ N(0, I) drawn by the caller.

    Why: a sample of the posterior that is a differentiable function of (mu, logvar), so the
    ELBO's expectation can be back-propagated; the noise is an argument, so this stays pure
    and a caller controls its random stream (resume, data parallel).

    Args:
        mu, logvar: (B, D); eps: (B, D) standard normal noise.
    Returns:
        (B, D) in at least float32.
    """
    with no_autocast(mu):
        mu, logvar = f32(mu), f32(logvar)
        return mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype)
