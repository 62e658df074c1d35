"""Clustering losses: SwAV's Sinkhorn-Knopp equipartition and its swapped prediction."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sslflow.ssl_models.losses.common import f32, no_autocast


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float, iterations: int, *, total_samples: int | None = None,
                   sum_over_ranks: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """SwAV's soft assignments of N samples to K prototypes with equal prototype marginals.

    Why: the codes Q maximise Tr(Q^T C) + epsilon H(Q) under the constraint that every
    prototype gets the same share of the batch (N/K samples), which rules out the trivial
    solution where every image maps to one prototype. Q = diag(u) exp(C / epsilon) diag(v) is
    found with a fixed number of Sinkhorn-Knopp iterations, each a row then a column
    normalisation, exactly as `distributed_sinkhorn` of the official SwAV code; the last step
    is a column normalisation, so every sample's codes sum to 1 exactly and the prototype
    marginals are N/K up to the iterations' convergence.

    Data parallel: every sum over samples goes through `sum_over_ranks` (an all-reduce sum),
    so each rank passes only its own rows and gets back its rows of the assignment of the
    union of all ranks' rows, the single-process result for any split of the samples.

    Args:
        scores: (N, K) this rank's sample-prototype similarities (cosines: unit-norm
            embeddings against unit-norm prototypes); detached, computed in at least float32.
        epsilon: entropic regularisation (0.05 in SwAV); smaller is sharper.
        iterations: Sinkhorn-Knopp iterations (3 in SwAV).
        total_samples: N summed over ranks (default: N, one process).
        sum_over_ranks: sums a tensor over ranks (default: the identity, one process).
    Returns:
        (N, K) codes, each row sums to 1 (float32, or float64 for float64 scores).
    """
    reduce = sum_over_ranks or _identity
    with no_autocast(scores):
        # exp((s - 1) / eps) = exp(s / eps) / exp(1 / eps): the constant cancels in the first
        # normalisation, and with cosines <= 1 no entry overflows whatever eps (the official
        # exp(s / eps) overflows float32 for eps < 0.012); an entry underflows to 0 only below
        # s = 1 - 87 eps, and the clamps below only matter if a whole row or column did
        q = torch.exp((f32(scores.detach()) - 1.0) / epsilon).T  # (K, N)
        k = q.shape[0]
        n = q.shape[1] if total_samples is None else total_samples
        tiny = torch.finfo(q.dtype).tiny  # only guards a prototype or sample whose weights all underflowed
        q = q / reduce(q.sum()).clamp_min(tiny)
        for _ in range(iterations):
            q = q / reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny) / k  # each prototype: 1/K
            q = q / q.sum(dim=0, keepdim=True).clamp_min(tiny) / n  # each sample: 1/N
        return (q * n).T


def _identity(t: Tensor) -> Tensor:
    return t


def swav_loss(scores: Sequence[Tensor], codes: Sequence[Tensor], temperature: float) -> Tensor:
    """SwAV's swapped prediction: every view predicts the codes of the other views.

    Why: the codes q_i of assignment view i (Sinkhorn on the prototype scores) are the target
    of the prototype softmax p_v = softmax(scores_v / T) of every other view v; the cross
    entropy -sum_k q_i log p_v is averaged over the batch, over the V - 1 predicting views,
    then over the assignment views (the averaging of the official code).

    Args:
        scores: V tensors (B, K) of prototype scores, one per view; the first len(codes) are
            the views the codes were computed from, in the same order.
        codes: A tensors (B, K) of soft assignments (rows sum to 1); detached here.
        temperature: softmax temperature T > 0 (0.1 in SwAV).
    Returns:
        0-d float32 tensor.
    """
    n_a, n_v = len(codes), len(scores)
    if not 1 <= n_a <= n_v or n_v < 2:
        raise ValueError(f"swav_loss needs 1 <= assignment views ({n_a}) <= views ({n_v}) and at least 2 views")
    with no_autocast(scores[0]):
        q = torch.stack([f32(c.detach()) for c in codes])  # (A, B, K)
        log_p = F.log_softmax(torch.stack([f32(s) for s in scores]).to(q.dtype) / temperature, dim=-1)  # (V, B, K)
        cross = -torch.einsum("abk,vbk->av", q, log_p) / q.shape[1]  # (A, V): batch-mean cross-entropies
        own = torch.eye(n_a, n_v, dtype=torch.bool, device=cross.device)
        return (cross.masked_fill(own, 0.0).sum(dim=1) / (n_v - 1)).mean()
