"""Pretext-task losses: classification of a transformation the method applied itself (rotation,
tile permutation, relative position), with its accuracy (pure functions, no host sync)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sslflow.ssl_models.losses.common import f32, no_autocast


def pretext_classification_loss(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of a pretext classifier and its top-1 accuracy.

    Why: RotNet (which of 4 rotations), jigsaw (which of P permutations) and relative patch
    position (which of 8 neighbours) all turn a transformation the method drew itself into a
    label; the network learns what it must see to name it.

    Args:
        logits: (N, K) classifier outputs; any precision (computed in at least float32).
        target: (N,) int64 labels in [0, K).
    Returns:
        (loss, accuracy): 0-d tensors; loss is the mean cross-entropy over the N examples,
        accuracy the fraction of them whose arg-max is the target (detached, in [0, 1]).
    """
    with no_autocast(logits):
        logits = f32(logits)
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.detach().argmax(1) == target).to(logits.dtype).mean()
        return loss, accuracy
