"""Distillation losses: BYOL's regression to a target and DINO's cross-entropy to a teacher."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sslflow.ssl_models.losses.common import f32, no_autocast


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
    with no_autocast(p):
        p = F.normalize(f32(p), dim=-1)
        z = F.normalize(f32(z.detach()), dim=-1)
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
    with no_autocast(student_out[0]):
        t = torch.stack([f32(x.detach()) for x in teacher_out])  # (G, B, K)
        t = F.softmax((t - f32(center.detach())) / teacher_temperature, dim=-1)
        s = torch.stack([f32(x) for x in student_out]).to(t.dtype)  # (V, B, K)
        log_s = F.log_softmax(s / student_temperature, dim=-1)
        # cross[i, j] = mean_b  -sum_k t[i, b, k] * log_s[j, b, k]
        cross = -torch.einsum("ibk,jbk->ij", t, log_s) / t.shape[1]  # (G, V)
        same_view = torch.eye(n_t, n_s, dtype=torch.bool, device=cross.device)
        n_terms = n_t * n_s - n_t
        return cross.masked_fill(same_view, 0.0).sum() / n_terms
