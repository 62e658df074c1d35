"""In-batch contrastive losses (contrastive family, no queue): MoCo v3's InfoNCE.

Kept apart from `contrastive` (SimCLR's NT-Xent, MoCo v2's queue InfoNCE) only so the two
families of negatives stay readable; the conventions are the package's (float32 or float64,
outside autocast, targets detached inside, no host sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslflow.ssl_models.losses.common import f32, no_autocast


def mocov3_info_nce(q: Tensor, keys: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """MoCo v3's contrastive loss of queries against the keys of a whole (gathered) batch.

    Why: query i must pick its own key (row `offset + i` of `keys`) among all the batch's keys;
    the other images' keys of the same step are the negatives (no queue: large batches make
    them plentiful). As in the paper's pseudocode, the cross-entropy is multiplied by 2 T so
    that the gradient's scale does not depend on the temperature.

    Args:
        q: (B, D) queries of this rank (predictor outputs; L2-normalised here).
        keys: (N, D) momentum-encoder keys of the other view for the whole global batch, in
            rank order (N = world size x B; N = B on one process); L2-normalised and detached
            here (keys are a stop-gradient target).
        temperature: T > 0.
        offset: index in `keys` of this rank's first image (rank x B).
    Returns:
        0-d float32 tensor: 2 T x mean over the B queries of -log softmax(q k^T / T)[positive].
    """
    with no_autocast(q):
        q = F.normalize(f32(q), dim=1)
        k = F.normalize(f32(keys.detach()), dim=1).to(q.dtype)
        logits = q @ k.T / temperature  # (B, N)
        targets = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, targets) * (2 * temperature)


def mocov3_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """The symmetric MoCo v3 loss: `ctr(q1, k2) + ctr(q2, k1)`, summed as in the paper.

    q1, q2: (B, D) this rank's queries of views 1 and 2; k1, k2: (N, D) the gathered keys of
    views 1 and 2; see `mocov3_info_nce`.
    """
    return mocov3_info_nce(q1, k2, temperature, offset) + mocov3_info_nce(q2, k1, temperature, offset)


__all__ = ["mocov3_info_nce", "mocov3_loss"]
