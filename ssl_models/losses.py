"""Pure SSL loss functions (no state, no modules): SimCLR, MoCo, BYOL, DINO.

Every loss computes in (at least) float32 whatever the caller's precision: bf16/fp16 inputs
are upcast (float64 is kept, for exact reference tests) and autocast is switched off inside,
because under bf16 autocast the similarity matmuls would otherwise run in bf16 and logits
divided by a small temperature (0.04-0.2) lose most of their precision. Each returns a 0-d
tensor (float32 for float32/bf16/fp16 inputs) and never synchronises with the host.

Targets (MoCo keys, BYOL target projections, DINO teacher outputs) are detached *inside* the
losses: they are stop-gradient by definition of each method, so a caller cannot forget it.

Multi-GPU: the contrastive losses take their negatives explicitly, so a distributed caller
only gathers tensors and passes them in: `nt_xent_loss(..., extra_negatives=gathered)` with the
other ranks' projections, and `info_nce_loss(q, k, queue, ...)` with any (K, D) negative set
(MoCo enqueues keys gathered from all ranks; in-batch negatives from other ranks can be
concatenated to the queue). No distributed code lives here: the gathers, with the gradient
flowing back to the rank that produced each negative, are in `ssl_models.distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _f32(x: Tensor) -> Tensor:
    """`x` in at least float32: bf16/fp16 are upcast, float64 stays (for exact reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _no_autocast(t: Tensor) -> torch.autocast:
    """A context that disables autocast on `t`'s device type, so matmuls stay in float32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


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
    with _no_autocast(z1):
        z = F.normalize(_f32(torch.cat([z1, z2])), dim=1)  # (2B, D)
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
    with _no_autocast(q):
        q = F.normalize(_f32(q), dim=1)
        k = F.normalize(_f32(k.detach()), dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
        l_neg = q @ queue.detach().to(q.dtype).T  # (B, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, targets)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss 2 - 2 cos(p, z), averaged over the batch.

    Why: the squared distance of the L2-normalised online prediction and target projection,
    ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z); values lie in [0, 4].

    Args:
        p: (B, D) online predictions.
        z: (B, D) target projections of the *other* view; detached here (stop-gradient).
    Returns:
        0-d float32 tensor.
    """
    with _no_autocast(p):
        p = F.normalize(_f32(p), dim=-1)
        z = F.normalize(_f32(z.detach()), dim=-1)
        return 2 - 2 * (p * z).sum(dim=-1).mean()


def dino_loss(student_out: Sequence[Tensor], teacher_out: Sequence[Tensor], center: Tensor,
              student_temperature: float, teacher_temperature: float) -> Tensor:
    """DINO's self-distillation cross-entropy between teacher and student output distributions.

    Why: the student (all views, temperature T_s) must match the teacher's centred and
    sharpened distribution (global views only, temperature T_t) of a *different* view of the
    same image; centring prevents one prototype from dominating, sharpening prevents a uniform
    collapse. Averaged as in the DINO code: each (teacher view i, student view j != i) pair
    contributes its batch-mean cross-entropy, and the pair terms are averaged.

    Args:
        student_out: V tensors (B, K) of student logits, one per view. The first
            len(teacher_out) must be the same views, in the same order, as `teacher_out`.
        teacher_out: G tensors (B, K) of teacher logits for the global views; detached here.
        center: (1, K) or (K,) running mean of the teacher logits.
        student_temperature, teacher_temperature: T_s and T_t > 0.
    Returns:
        0-d float32 tensor.
    """
    n_t, n_s = len(teacher_out), len(student_out)
    if not 1 <= n_t <= n_s or n_s < 2:
        raise ValueError(f"dino_loss needs 1 <= teacher views ({n_t}) <= student views ({n_s}) "
                         "and at least 2 student views")
    with _no_autocast(student_out[0]):
        t = torch.stack([_f32(x.detach()) for x in teacher_out])  # (G, B, K)
        t = F.softmax((t - _f32(center.detach())) / teacher_temperature, dim=-1)
        s = torch.stack([_f32(x) for x in student_out]).to(t.dtype)  # (V, B, K)
        log_s = F.log_softmax(s / student_temperature, dim=-1)
        # cross[i, j] = mean_b  -sum_k t[i, b, k] * log_s[j, b, k]
        cross = -torch.einsum("ibk,jbk->ij", t, log_s) / t.shape[1]  # (G, V)
        same_view = torch.eye(n_t, n_s, dtype=torch.bool, device=cross.device)
        n_terms = n_t * n_s - n_t
        return cross.masked_fill(same_view, 0.0).sum() / n_terms
