"""SwAV (Caron et al., 2020): swap the prototype assignments of multi-crop views."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.heads import ProjectionMLP
from sslflow.ssl_models.losses.clustering import sinkhorn_knopp, swav_loss
from sslflow.ssl_models.losses.common import f32, no_autocast
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std
from sslflow.ssl_models.schema import NON_NEGATIVE, POSITIVE, PROBABILITY, Range, setting
from sslflow.ssl_models.views import ViewSpec, global_and_local

DIM = Range(1, 1 << 16)


@dataclass(frozen=True)
class SwAVConfig:
    """`pretrain.swav.*` (defaults: the official SwAV code's ImageNet recipe)."""

    num_prototypes: int = setting(3000, domain=Range(2, 1 << 20), doc="prototypes K (3000 on ImageNet)")
    proj_hidden_dim: int = setting(2048, domain=DIM)
    proj_dim: int = setting(128, domain=DIM, doc="dimension of the L2-normalised embedding and the prototypes")
    temperature: float = setting(0.1, domain=POSITIVE, doc="softmax temperature of the swapped prediction")
    epsilon: float = setting(0.05, domain=POSITIVE, doc="Sinkhorn-Knopp entropic regularisation")
    sinkhorn_iterations: int = setting(3, domain=Range(1, 1000), doc="Sinkhorn-Knopp iterations")
    freeze_prototypes_epochs: float = setting(1.0, domain=NON_NEGATIVE,
                                              doc="the prototypes get no update for this many epochs")
    queue_size: int = setting(0, domain=Range(0, 1 << 24),
                              doc="embeddings kept from past batches for the assignments; 0 = no queue "
                                  "(official 3840 for batches of 256)")
    queue_start_epoch: int = setting(15, domain=Range(0, 100_000),
                                     doc="the queue fills from this epoch on and is used once full")
    blur_prob: float = setting(0.5, domain=PROBABILITY, doc="Gaussian blur probability of every crop")


def _sum_over_ranks(x: Tensor) -> Tensor:
    """The sum of `x` over ranks (a new tensor); `x` itself on one process."""
    if distributed.world_size() == 1:
        return x
    out = x.clone()
    dist.all_reduce(out)
    return out


@register_method
class SwAV(SSLMethod):
    """Backbone + projector + L2-normalised prototypes; codes by Sinkhorn-Knopp, swapped prediction.

    - Projector: feature_dim -> proj_hidden_dim -> proj_dim (Linear-BN-ReLU-Linear), then L2
      normalisation; prototypes: a bias-free Linear(proj_dim, num_prototypes) whose rows are
      unit vectors (normalised at construction and after every optimizer step, as the
      official code does before every forward), so the scores are cosines.
    - Prototypes frozen: their gradient is dropped for the first `freeze_prototypes_epochs`
      (`after_backward`), as the official `freeze_prototypes_niters` (one epoch).
    - Views: 2 global + `augment.local_crops` local (`global_and_local`), blur `blur_prob` on
      every crop and no solarisation (the SwAV recipe). The backbone runs once per run of
      views of the same resolution, the projector once on all features.
    - Codes: for each of the 2 global views, `sinkhorn_knopp` of its scores (computed in
      float32, whatever the autocast) with `epsilon` and `sinkhorn_iterations`; every other
      view predicts them (`swav_loss`, temperature `temperature`).
    - Queue (`queue_size` > 0): from epoch `queue_start_epoch` on, each step pushes both
      global views' embeddings (newest first) into a (2, queue_size, proj_dim) buffer, so it
      is checkpointed; once it is full (`ceil(queue_size / batch_size)` steps later, as the
      official code waits for its last row) the queued embeddings, scored against the current
      prototypes, join the batch in Sinkhorn, and only the batch's codes are kept. When the
      queue fills and when it is used is a function of the step alone: no host sync.
    - Data parallel: the Sinkhorn sums are summed over ranks and the sample count is the
      global one, so each rank gets its rows of the global batch's codes; the queue holds the
      embeddings of the global batch (gathered, identical on every rank and for any number of
      ranks), and each rank brings a disjoint share of it to Sinkhorn. 2 ranks x B compute
      what 1 process x 2B computes.

    Deviations from the official code: the queue is global and identical on every rank
    (there: one queue of queue_size / world per rank, saved in a side file), which keeps the
    checkpoint independent of the number of ranks; Sinkhorn subtracts the constant 1/epsilon
    inside exp() (it cancels exactly) so it cannot overflow; the optimizer leaves biases and
    BatchNorm parameters out of LARS and weight decay (the project's convention, the official
    LARC adapts every tensor).
    """

    name: ClassVar[str] = "swav"
    family: ClassVar[str] = "clustering"
    Config: ClassVar[type] = SwAVConfig
    n_assign: ClassVar[int] = 2  # the official crops_for_assign [0, 1]: the two global views

    queue: torch.Tensor

    def __init__(self, backbone, cfg: SwAVConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.projector = ProjectionMLP(self.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.num_prototypes, bias=False)
        self.normalize_prototypes()
        self.register_buffer("queue", torch.zeros(self.n_assign, cfg.queue_size, cfg.proj_dim))

    @classmethod
    def check_settings(cls, cfg: SwAVConfig, settings) -> None:
        batch = settings.pretrain.batch_size
        if 0 < cfg.queue_size < batch:
            raise ConfigError(f"pretrain.swav.queue_size ({cfg.queue_size}) must be 0 (no queue) or at least "
                              f"pretrain.batch_size ({batch}): every step pushes a whole batch")

    @classmethod
    def view_specs(cls, cfg: SwAVConfig, ctx: TrainContext) -> list[ViewSpec]:
        """2 global views (view size, augment.crop_scale) then augment.local_crops local views
        (augment.local_size, local_crop_scale); blur `blur_prob` everywhere, no solarisation."""
        p = cfg.blur_prob
        return global_and_local(ctx.augment, ctx.view_size, global_blur=(p, p), global_solarize=(0.0, 0.0),
                                local_blur=p)

    # ------------------------------------------------------------------ queue schedule
    def step_of(self, progress: float) -> int:
        """The optimizer step `progress` stands for."""
        return round(progress * self.ctx.epochs * self.ctx.steps_per_epoch)

    def queue_filling(self, progress: float) -> bool:
        """Whether this step pushes its embeddings into the queue (from `queue_start_epoch` on)."""
        start = self.cfg.queue_start_epoch * self.ctx.steps_per_epoch
        return self.cfg.queue_size > 0 and self.step_of(progress) >= start

    def queue_in_use(self, progress: float) -> bool:
        """Whether the queue is full, so this step's assignments use it."""
        start = self.cfg.queue_start_epoch * self.ctx.steps_per_epoch
        full_after = math.ceil(self.cfg.queue_size / self.ctx.batch_size)
        return self.queue_filling(progress) and self.step_of(progress) >= start + full_after

    # ------------------------------------------------------------------ step
    def _features(self, views: list[Tensor]) -> Tensor:
        """Backbone features of all views, (V * B, feature_dim), one call per resolution run."""
        feats, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(views[start:end])))
            start = end
        return torch.cat(feats)

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        views = batch.views
        b = views[0].shape[0]
        z = self.projector(self._features(views))
        with no_autocast(z):  # cosines / 0.1 and exp(cosines / 0.05): float32, not bf16
            z = F.normalize(f32(z), dim=1)
            prototypes = f32(self.prototypes.weight)
            scores = z @ prototypes.T  # (V * B, K)
        per_view = scores.split(b)
        codes = self._assignments(per_view[: self.n_assign], prototypes.detach(), progress)
        loss = swav_loss(per_view, codes, self.cfg.temperature)
        if self.queue_filling(progress):
            self._enqueue(z[: self.n_assign * b].detach().unflatten(0, (self.n_assign, b)))
        with torch.no_grad():  # collapse indicators: embedding spread, prototype usage
            mean_p = torch.softmax(scores[: self.n_assign * b].detach() / self.cfg.temperature, dim=1).mean(0)
            entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
        return StepOutput(loss, {"embedding_std": embedding_std(z[:b]), "prototype_entropy": entropy})

    @torch.no_grad()
    def _assignments(self, scores: tuple[Tensor, ...], prototypes: Tensor, progress: float) -> list[Tensor]:
        """Sinkhorn codes of this rank's rows for each assignment view (with the queue if full)."""
        world = distributed.world_size()
        rank = distributed.rank() if world > 1 else 0
        use_queue = self.queue_in_use(progress)
        b = scores[0].shape[0]
        total = b * world + (self.cfg.queue_size if use_queue else 0)
        codes = []
        for i, s in enumerate(scores):
            s = s.detach()
            if use_queue:  # this rank's share of the queue: the ranks' shares partition it
                shared = self.queue[i].tensor_split(world)[rank].to(s.dtype)
                s = torch.cat([shared @ prototypes.T, s])
            q = sinkhorn_knopp(s, self.cfg.epsilon, self.cfg.sinkhorn_iterations, total_samples=total,
                               sum_over_ranks=_sum_over_ranks)
            codes.append(q[-b:])
        return codes

    @torch.no_grad()
    def _enqueue(self, z: Tensor) -> None:
        """Push (A, B, D) embeddings of the global batch (all ranks, in rank order) newest first."""
        new = distributed.all_gather(z, dim=1).to(self.queue.dtype)
        n, size = new.shape[1], self.queue.shape[1]
        if n > size:
            raise ValueError(f"cannot push {n} embeddings into a queue of {size}")
        self.queue.copy_(torch.cat([new, self.queue[:, : size - n]], dim=1))

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def prototypes_frozen(self, progress: float) -> bool:
        return self.ctx.epoch(progress) < self.cfg.freeze_prototypes_epochs

    def after_backward(self, progress: float) -> None:
        """Drop the prototypes' gradient while they are frozen (the optimizer then skips them)."""
        if self.prototypes_frozen(progress):
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Back to unit-norm prototypes after the optimizer moved them (frozen ones stay bit for bit)."""
        if not self.prototypes_frozen(progress):
            self.normalize_prototypes()
