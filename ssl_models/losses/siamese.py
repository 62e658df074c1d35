"""Non-contrastive siamese losses: SimSiam's negative cosine similarity with a stop-gradient."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sslflow.ssl_models.losses.common import f32, no_autocast


def negative_cosine_loss(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), averaged over the batch.

    Why: the predictor output p of one view regresses the projection z of the other view;
    the stop-gradient on z (no gradient reaches the encoder through the target) is what keeps
    the two branches from collapsing to a constant without negatives or a momentum encoder.
    The symmetric SimSiam loss is `(D(p1, z2) + D(p2, z1)) / 2`; values lie in [-1, 1].

    Args:
        p: (B, D) predictions of one view.
        z: (B, D) projections of the other view; detached here (stop-gradient).
    Returns:
        0-d float32 tensor.
    """
    with no_autocast(p):
        p = F.normalize(f32(p), dim=-1)
        z = F.normalize(f32(z.detach()), dim=-1).to(p.dtype)
        return -(p * z).sum(dim=-1).mean()
