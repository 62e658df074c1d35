"""CMC, Contrastive Multiview Coding (Tian, Krishnan & Isola, 2020): contrast the L* channel of an
image with its a*b* channels."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.color import first_rgb_conv, rgb_to_lab, tie_to_luma_
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.losses.infomax import cmc_loss
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext, embedding_std
from sslflow.ssl_models.schema import POSITIVE, Range, setting
from sslflow.ssl_models.views import ViewSpec

DIM = Range(1, 1 << 16)
#: a*b* are divided by this before the ab encoder (sRGB a*b* lie within about +-110).
AB_SCALE = 110.0


@dataclass(frozen=True)
class CMCConfig:
    """`pretrain.cmc.*`"""

    temperature: float = setting(0.07, domain=POSITIVE, doc="softmax temperature (the paper: 0.07)")
    proj_dim: int = setting(128, domain=DIM, doc="width of each view's embedding (a linear layer, the paper: 128)")
    queue_size: int = setting(16384, domain=Range(0, 1 << 24),
                              doc="past embeddings of each view kept as extra negatives (a FIFO memory; the "
                                  "paper: 16384); 0 = the batch's negatives only; otherwise >= batch_size")
    tie_luma: bool = setting(True, doc="keep the L encoder's first convolution a function of the luma "
                             "(`color.tie_to_luma_`), so RGB images are encoded as their gray versions")


@register_method
class CMC(SSLMethod):
    """Two views of an image, its L* channel and its a*b* channels, one encoder each.

    - Views: one geometry-only view (the recipe's crop and flip; CMC applies no colour
      augmentation, the channels are the views), converted to L*a*b* on the device.
    - Encoders: one per view, as in the paper, both of the configured architecture (the second
      a copy of the first at initialisation: the same starting weights, different inputs and
      gradients). The backbones take 3 channels: the L encoder (`backbone`, the one kept) sees
      L* / 100 replicated to 3 channels and normalised with the run's mean / std, i.e. the gray
      image, so it stays an RGB encoder; with `tie_luma` (the default) its first convolution
      is kept a function of the luma (`color.tie_to_luma_`, at initialisation and after every
      step), so evaluation feeds RGB as usual and the encoder sees exactly the gray version of
      the image, as in training; the ab encoder (`ab_backbone`) sees
      (a* / 110, b* / 110, 0), the third channel padded with zeros (its weights get no gradient).
      The paper evaluates the concatenation of both encoders' features; here only the L
      encoder is evaluated (the pipeline evaluates one RGB encoder).
    - Heads: a linear layer per view to `proj_dim`, L2-normalised (the paper's 128-d embedding).
    - Loss: `cmc_loss`, the symmetric softmax cross-view loss L(L -> ab) + L(ab -> L) at
      temperature 0.07, each anchor against the other view's embeddings of the global batch
      (gathered with gradients under data parallel) and a memory of the last `queue_size`
      embeddings of the other view.
    - Memory: two FIFO buffers (one per view, in the state_dict, so checkpointed), filled
      after each step with the global batch's detached embeddings (gathered from all ranks in
      batch order, like MoCo's keys, so every rank's memory equals the single-process one);
      random unit vectors at the start. Metrics: `pretext_accuracy` (the positive scores
      highest among the candidates), `embedding_std`.

    Deviations: the paper's memory bank holds one embedding per training image, updated with
    momentum 0.5 when the image is seen again, and samples 16384 negatives from it (NCE or
    softmax-NCE); the loop does not tell a method which dataset images a batch holds, so the
    memory here is a queue of the most recent embeddings (MoCo's form of the bank), used
    whole, with the softmax (NCE-softmax) loss the paper reports as better than NCE.
    """

    name: ClassVar[str] = "cmc"
    family: ClassVar[str] = "contrastive"
    Config: ClassVar[type] = CMCConfig

    queue_l: Tensor
    queue_ab: Tensor
    queue_ptr: Tensor

    def __init__(self, backbone, cfg: CMCConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.ab_backbone = copy.deepcopy(backbone)
        self.head_l = nn.Linear(self.feature_dim, cfg.proj_dim)
        self.head_ab = nn.Linear(self.feature_dim, cfg.proj_dim)
        size = cfg.queue_size
        self.register_buffer("queue_l", F.normalize(torch.randn(size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ab", F.normalize(torch.randn(size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("pixel_mean", torch.tensor(ctx.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(ctx.std).view(1, -1, 1, 1), persistent=False)
        self.after_step(0.0)  # the luma tie holds from the start (the kNN at init is the same encoder's)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Re-tie the L encoder's first convolution to the luma (the optimizer step moved it off)."""
        if self.cfg.tie_luma:
            tie_to_luma_(first_rgb_conv(self.backbone), self.ctx.std)

    @classmethod
    def check_settings(cls, cfg: CMCConfig, settings) -> None:
        if 0 < cfg.queue_size < settings.pretrain.batch_size:
            raise ConfigError(f"pretrain.cmc.queue_size ({cfg.queue_size}) must be 0 or at least pretrain.batch_size "
                              f"({settings.pretrain.batch_size}): every step stores the batch's embeddings")

    @classmethod
    def view_specs(cls, cfg: CMCConfig, ctx: TrainContext) -> list[ViewSpec]:
        """One view with the recipe's crop and flip, no colour operation; L* and a*b* are its views."""
        return [ViewSpec.from_augment(ctx.augment, ctx.view_size).geometry_only()]

    def split(self, view: Tensor) -> tuple[Tensor, Tensor]:
        """A normalised RGB view -> (the L encoder's input, the ab encoder's input), both (B, 3, H, W)."""
        dtype = view.dtype
        rgb = view * self.pixel_std.to(dtype) + self.pixel_mean.to(dtype)
        lab = rgb_to_lab(rgb.clamp(0, 1)).to(dtype)
        gray = (lab[:, :1] / 100).expand(-1, 3, -1, -1)
        x_l = (gray - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)
        x_ab = torch.cat([lab[:, 1:] / AB_SCALE, torch.zeros_like(lab[:, :1])], dim=1)
        return x_l, x_ab

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x_l, x_ab = self.split(batch.views[0])
        z_l = self.head_l(self.backbone(x_l))
        z_ab = self.head_ab(self.ab_backbone(x_ab))
        extra_l = extra_ab = None
        if distributed.world_size() > 1:
            wide = torch.promote_types(z_l.dtype, torch.float32)
            extra_l = distributed.others_with_grad(z_l.to(wide))
            extra_ab = distributed.others_with_grad(z_ab.to(wide))
        if self.cfg.queue_size:
            # the queues are updated in place below, before backward: autograd needs snapshots
            queue_l, queue_ab = self.queue_l.clone(), self.queue_ab.clone()
            extra_l = queue_l if extra_l is None else torch.cat([extra_l, queue_l.to(extra_l.dtype)])
            extra_ab = queue_ab if extra_ab is None else torch.cat([extra_ab, queue_ab.to(extra_ab.dtype)])
        loss, accuracy = cmc_loss(z_l, z_ab, self.cfg.temperature, extra_l, extra_ab, return_accuracy=True)
        if self.cfg.queue_size:
            wide = torch.promote_types(z_l.dtype, torch.float32)
            keys = torch.stack([F.normalize(z.detach().to(wide), dim=1) for z in (z_l, z_ab)])
            self._enqueue(distributed.all_gather(keys, dim=1))
        return StepOutput(loss, {"pretext_accuracy": accuracy, "embedding_std": embedding_std(z_l)})

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """Write (2, N, D) embeddings (L, ab) at the ring pointer, wrapping around; no host sync."""
        n, size = keys.shape[1], self.queue_l.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue_l.index_copy_(0, idx, keys[0].to(self.queue_l.dtype))
        self.queue_ab.index_copy_(0, idx, keys[1].to(self.queue_ab.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
