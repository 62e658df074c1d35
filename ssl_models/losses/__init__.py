"""Pure SSL loss functions (no state, no modules), one module per family.

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

Losses live in one module per family (`contrastive`, `distillation`, ...); a method imports
from its family's module. The names below are the original ones, kept importable from here.
"""

from sslflow.ssl_models.losses.contrastive import info_nce_loss, nt_xent_loss
from sslflow.ssl_models.losses.distillation import byol_loss, dino_loss

__all__ = ["byol_loss", "dino_loss", "info_nce_loss", "nt_xent_loss"]
