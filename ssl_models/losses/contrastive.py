"""Contrastive losses: SimCLR's NT-Xent and MoCo's InfoNCE (negatives passed in explicitly)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslflow.ssl_models.losses.common import f32, no_autocast


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float,
                 extra_negatives: Tensor | None = None) -> Tensor:
    """SimCLR's normalised-temperature cross-entropy over the 2B projections of a batch.

    Why: each of the 2B embeddings is an anchor whose positive is the other view of the same
    image and whose negatives are the other 2B - 2 embeddings; cosine similarity / T is the
    logit. The self-similarity is masked out (it would be a trivial, constant positive).

    Args:
        z1, z2: (B, D) projections of view 1 and view 2 (any scale; L2-normalised here).
            Row i of z1 and row i of z2 are the positive pair.
        temperature: softmax temperature T > 0.
        extra_negatives: optional (M, D) embeddings that are negatives for every anchor and
            never anchors themselves, e.g. the projections gathered from other ranks.
    Returns:
        0-d float32 tensor: mean over the 2B anchors of
        -log(exp(s_ip / T) / sum_{k != i} exp(s_ik / T)).
    """
    with no_autocast(z1):
        z = F.normalize(f32(torch.cat([z1, z2])), dim=1)  # (2B, D)
        n, b = z.shape[0], z1.shape[0]
        keys = z
        if extra_negatives is not None:
            keys = torch.cat([z, F.normalize(extra_negatives.to(z.dtype), dim=1)])  # (2B + M, D)
        logits = z @ keys.T / temperature  # (2B, 2B + M)
        idx = torch.arange(n, device=z.device)
        self_mask = torch.eye(n, keys.shape[0], dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        targets = (idx + b) % n  # anchor i in view 1 <-> i + B in view 2, and back
        return F.cross_entropy(logits, targets)


def info_nce_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: one positive key per query against a set of negative keys.

    Why: the query must pick its own key (logit q.k / T at index 0) out of K negatives
    (q.queue_j / T), a (K + 1)-way classification solved with cross-entropy.

    Args:
        q: (B, D) queries from the online encoder (L2-normalised here).
        k: (B, D) keys of the other view from the momentum encoder (L2-normalised here and
            detached: keys are a stop-gradient target).
        queue: (K, D) negatives, already L2-normalised and detached by the caller. For a
            multi-GPU variant with in-batch negatives, concatenate the keys gathered from the
            other ranks onto it. Pass a copy if the caller updates its queue in place before
            `backward()` (autograd keeps it to compute the gradient of q).
        temperature: softmax temperature T > 0.
    Returns:
        0-d float32 tensor, the mean cross-entropy over the B queries.
    """
    with no_autocast(q):
        q = F.normalize(f32(q), dim=1)
        k = F.normalize(f32(k.detach()), dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
        l_neg = q @ queue.detach().to(q.dtype).T  # (B, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, targets)
