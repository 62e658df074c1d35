"""Redundancy-reduction losses: Barlow Twins' cross-correlation and VICReg's three terms.

Both are statistics of the *batch* (per-dimension means, variances, correlations), not sums
of per-image terms, so under data parallelism the caller passes the embeddings of the
global batch (`distributed.gather_with_grad`): the loss is then the single-process loss of
the global batch on every rank, and DDP's averaged gradients are its gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sslflow.ssl_models.losses.common import f32, no_autocast


class BarlowTwinsTerms(NamedTuple):
    loss: Tensor  # scale * (on_diagonal + lambda * off_diagonal)
    on_diagonal: Tensor  # sum_i (1 - C_ii)^2: invariance
    off_diagonal: Tensor  # sum_{i != j} C_ij^2: redundancy (before the lambda weight)


class VICRegTerms(NamedTuple):
    loss: Tensor  # the weighted sum of the three terms
    invariance: Tensor  # mean squared error between the two views' embeddings
    variance: Tensor  # hinge on the per-dimension std, averaged over dimensions and views
    covariance: Tensor  # sum of squared off-diagonal covariances / D, summed over views


def _off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix (flattened)."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def batch_standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """(z - mean) / sqrt(var + eps) per dimension over the batch (biased variance): what the
    affine-free `BatchNorm1d` of the official Barlow Twins code computes in training mode."""
    var, mean = torch.var_mean(z, dim=0, correction=0)
    return (z - mean) * torch.rsqrt(var + eps)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float, *, scale: float = 1.0,
                      eps: float = 1e-5) -> BarlowTwinsTerms:
    """Barlow Twins: the cross-correlation of the two views' embeddings should be the identity.

    Why: C = bn(z1)^T bn(z2) / N is the (D, D) cross-correlation matrix of the batch-normalised
    embeddings. Its diagonal near 1 makes each dimension invariant to the augmentation; its
    off-diagonal near 0 decorrelates the dimensions, so the embedding cannot collapse to a
    few informative directions. `lambd` trades the two (5e-3 in the paper, 0.0051 in the code).

    Args:
        z1, z2: (N, D) projector outputs of the two views, rows paired; under DDP the
            global batch (gathered with gradients).
        lambd: weight of the off-diagonal term.
        scale: overall factor (1 in the paper; solo-learn's CIFAR recipe uses 0.1).
        eps: BatchNorm's epsilon in the per-dimension standardisation.
    Returns:
        BarlowTwinsTerms of 0-d float32 tensors (float64 for float64 inputs).
    """
    with no_autocast(z1):
        a = batch_standardize(f32(z1), eps)
        b = batch_standardize(f32(z2).to(a.dtype), eps)
        c = a.T @ b / a.shape[0]  # (D, D)
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = _off_diagonal(c).pow(2).sum()
        return BarlowTwinsTerms(scale * (on_diag + lambd * off_diag), on_diag, off_diag)


def vicreg_loss(z1: Tensor, z2: Tensor, *, invariance_weight: float = 25.0, variance_weight: float = 25.0,
                covariance_weight: float = 1.0, std_target: float = 1.0, eps: float = 1e-4) -> VICRegTerms:
    """VICReg: variance, invariance and covariance regularisation of two views' embeddings.

    Why: invariance (the MSE between the views) pulls the views together; variance (a hinge
    max(0, gamma - sqrt(Var + eps)) on each dimension's std over the batch) keeps every
    dimension spread so the embedding cannot collapse; covariance (the squared off-diagonal
    entries of each view's covariance matrix, / D) decorrelates the dimensions. As the
    official code: unbiased variances and covariances, the variance term averaged over the
    two views, the covariance terms summed.

    Args:
        z1, z2: (N, D) expander outputs of the two views, rows paired; under DDP the global
            batch (gathered with gradients).
        invariance_weight, variance_weight, covariance_weight: lambda, mu, nu (25, 25, 1).
        std_target: gamma, the std each dimension is pushed to reach (1).
        eps: added to the variance before the square root (numerical stability).
    Returns:
        VICRegTerms of 0-d float32 tensors (float64 for float64 inputs); the terms unweighted.
    """
    with no_autocast(z1):
        x = f32(z1)
        y = f32(z2).to(x.dtype)
        n, d = x.shape
        invariance = (x - y).pow(2).mean()
        x = x - x.mean(dim=0)
        y = y - y.mean(dim=0)
        std_x = torch.sqrt(x.var(dim=0) + eps)
        std_y = torch.sqrt(y.var(dim=0) + eps)
        variance = torch.relu(std_target - std_x).mean() / 2 + torch.relu(std_target - std_y).mean() / 2
        cov_x = x.T @ x / (n - 1)
        cov_y = y.T @ y / (n - 1)
        covariance = _off_diagonal(cov_x).pow(2).sum() / d + _off_diagonal(cov_y).pow(2).sum() / d
        loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
        return VICRegTerms(loss, invariance, variance, covariance)
