"""Mutual-information estimators of the early contrastive methods: CPC, Deep InfoMax, CMC.

Pure functions of tensors, computed in at least float32 outside autocast like every loss (see
`ssl_models.losses`). Negatives from other ranks are passed in explicitly (`extra_*`), so a
distributed caller gathers them (with gradients, `distributed.others_with_grad`) and the
loss of each rank's anchors is the single-process loss of those anchors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sslflow.ssl_models.losses.common import f32, no_autocast

__all__ = ["DIM_ESTIMATORS", "cmc_loss", "cpc_loss", "dim_local_loss"]

DIM_ESTIMATORS = ("jsd", "infonce")


def cpc_loss(predictions: Sequence[Tensor], z: Tensor, skip: int = 0, extra_negatives: Tensor | None = None,
             temperature: float = 0.0, return_accuracy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """CPC's InfoNCE over a grid of patch embeddings (van den Oord et al., 2018; Henaff et al., 2020).

    Why: the context at row i must tell the true embedding of the patch k rows below (same
    column) apart from every other patch embedding of the batch, other positions of the same
    image included; the score is the dot product z_{i+s+k,j}^T zhat_{i,j}^{(k)}, where
    zhat^{(k)} = W_k c is the caller's prediction. Neither side is detached: the patch encoder
    learns from both roles, as in CPC.

    Args:
        predictions: K tensors; predictions[k - 1] is (B, R - skip - k, C, D), the predictions
            of the context rows 0 .. R - skip - k - 1 for rows skip + k .. R - 1.
        z: (B, R, C, D) patch embeddings (targets and negatives), R rows of C columns.
        skip: rows skipped after the context row (patches that share pixels with it).
        extra_negatives: optional (M, D) embeddings that are negatives for every prediction,
            e.g. the other ranks' patch embeddings.
        temperature: 0 = the dot product (CPC); T > 0 = cosine similarity / T (predictions and
            embeddings L2-normalised, as SimCLR / MoCo score).
        return_accuracy: also return the share of predictions whose true patch scores highest.
    Returns:
        0-d float32 tensor: the mean over k of the mean cross-entropy of step k's predictions
        (each step weighs the same, although far steps have fewer rows); with
        `return_accuracy`, (loss, accuracy) with the accuracy over all predictions, detached.
    """
    if not predictions:
        raise ValueError("cpc_loss needs at least one prediction step")
    with no_autocast(z):
        zf = f32(z)
        b, rows, cols, dim = zf.shape
        candidates = zf.reshape(-1, dim)
        if extra_negatives is not None:
            candidates = torch.cat([candidates, f32(extra_negatives).to(zf.dtype)])
        if temperature:
            candidates = F.normalize(candidates, dim=1) / temperature
        index = torch.arange(b * rows * cols, device=z.device).view(b, rows, cols)
        losses, hits = [], []
        for k, pred in enumerate(predictions, start=1):
            offset = skip + k
            pred = f32(pred).to(zf.dtype).reshape(-1, dim)
            logits = (F.normalize(pred, dim=1) if temperature else pred) @ candidates.T
            target = index[:, offset:, :].reshape(-1)
            losses.append(F.cross_entropy(logits, target))
            if return_accuracy:
                hits.append((logits.detach().argmax(dim=1) == target).to(zf.dtype))
        loss = torch.stack(losses).mean()
        if return_accuracy:
            return loss, torch.cat(hits).mean()
        return loss


def dim_local_loss(local: Tensor, global_: Tensor, estimator: str = "jsd",
                   extra_local: Tensor | None = None) -> Tensor:
    """Deep InfoMax's local objective (Hjelm et al., 2019, Eq. 5-6): a lower bound on the mutual
    information between an image's global feature and each of its local features, negated.

    Why: every location of the feature map should carry information about the whole image,
    so that the global feature is what is common to all its parts rather than one region.
    Scores are "encode-and-dot-product": u[n, m, l] = g_n . local_{m, l}. Positive pairs are
    (g_n, local_{n, l}); negatives pair g_n with the local features of every other image m.

    - `jsd`: the Jensen-Shannon bound (f-GAN form, as the DIM code):
      E_neg[softplus(u) - log 2] - E_pos[log 2 - softplus(-u)], means over the positive pairs
      (n, l) and the negative pairs (n, m != n, l).
    - `infonce`: for each positive (n, l), a softmax over it and every negative score of g_n
      (all locations of all other images): mean of -log(e^{u_pos} / (e^{u_pos} + sum e^{u_neg})).
      The DIM code masks its own image by subtracting 10 from those scores; they are excluded here.

    Args:
        local: (B, L, D) local embeddings of B images at L locations.
        global_: (B, D) global embeddings; row n pairs with local[n].
        estimator: "jsd" or "infonce".
        extra_local: optional (M, L, D) local embeddings of other images (other ranks), negatives only.
    Returns:
        0-d float32 tensor (to minimise; -loss is the estimate for JSD, log(negatives + 1) - loss
        the InfoNCE bound).
    """
    if estimator not in DIM_ESTIMATORS:
        raise ValueError(f"unknown DIM estimator {estimator!r}; choose one of {DIM_ESTIMATORS}")
    with no_autocast(local):
        loc = f32(local)
        if extra_local is not None:
            loc = torch.cat([loc, f32(extra_local).to(loc.dtype)])
        g = f32(global_).to(loc.dtype)
        b = g.shape[0]
        u = torch.einsum("nd,mld->nml", g, loc)  # (B, B + M, L)
        is_pos = torch.eye(b, u.shape[1], dtype=torch.bool, device=u.device)  # (B, B + M)
        pos = u.diagonal(dim1=0, dim2=1).T  # (B, L): u[n, n, l]
        if estimator == "jsd":
            e_pos = (math.log(2.0) - F.softplus(-pos)).mean()
            neg = (F.softplus(u) - math.log(2.0)).masked_fill(is_pos[:, :, None], 0.0)
            e_neg = neg.sum() / ((~is_pos).sum() * u.shape[2])
            return e_neg - e_pos
        neg_lse = u.masked_fill(is_pos[:, :, None], float("-inf")).flatten(1).logsumexp(dim=1)  # (B,)
        return (torch.logaddexp(pos, neg_lse[:, None]) - pos).mean()


def cmc_loss(z1: Tensor, z2: Tensor, temperature: float, extra_1: Tensor | None = None,
             extra_2: Tensor | None = None, return_accuracy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """CMC's two-view contrastive loss (Tian et al., 2020), the softmax (NCE-softmax) form.

    Why: the embedding of view 1 of image i must identify view 2 of image i among view-2
    embeddings of other images, and symmetrically (L_{V1,V2} + L_{V2,V1}); what survives is the
    information the two views (L and ab channels) share. Cosine similarity / T is the score.

    Args:
        z1, z2: (B, D) embeddings of view 1 and view 2 (L2-normalised here); row i of each is
            the positive pair.
        temperature: T > 0.
        extra_1: optional (M1, D) view-1 embeddings that are negatives for the view-2 anchors
            (other ranks' embeddings, a memory of past ones; L2-normalised here).
        extra_2: the same for the view-1 anchors, in view 2.
        return_accuracy: also return the share of anchors whose positive scores highest.
    Returns:
        0-d float32 tensor: (mean CE of the view-1 anchors + mean CE of the view-2 anchors) / 2;
        with `return_accuracy`, (loss, accuracy over both directions, detached).
    """
    with no_autocast(z1):
        a = F.normalize(f32(z1), dim=1)
        b = F.normalize(f32(z2), dim=1).to(a.dtype)
        target = torch.arange(a.shape[0], device=a.device)
        losses, hits = [], []
        for anchors, positives, extra in ((a, b, extra_2), (b, a, extra_1)):
            candidates = positives
            if extra is not None:
                candidates = torch.cat([positives, F.normalize(f32(extra).to(a.dtype), dim=1)])
            logits = anchors @ candidates.T / temperature
            losses.append(F.cross_entropy(logits, target))
            if return_accuracy:
                hits.append((logits.detach().argmax(dim=1) == target).to(a.dtype))
        loss = (losses[0] + losses[1]) / 2
        if return_accuracy:
            return loss, torch.cat(hits).mean()
        return loss
