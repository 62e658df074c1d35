"""Variational autoencoder (Kingma & Welling, 2014) with a beta weight (Higgins et al., 2017)
and a linear KL warm-up (Bowman et al., 2016; Sønderby et al., 2016)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from sslflow.ssl_models import distributed
from sslflow.ssl_models.losses.generative import gaussian_kl, reconstruction_loss, reparameterize
from sslflow.ssl_models.methods import register_method
from sslflow.ssl_models.methods.autoencoder import ConvDecoder, ReconstructionMixin
from sslflow.ssl_models.methods.base import Batch, SSLMethod, StepOutput, TrainContext
from sslflow.ssl_models.schema import NON_NEGATIVE, Range, setting

DIM = Range(1, 1 << 16)
#: log-variances are clamped to this range before use (exp overflows / vanishes beyond it)
LOGVAR_RANGE = (-30.0, 20.0)


def global_rows(local_rows: int, draw: Callable[[int], Tensor]) -> Tensor:
    """`draw(n)` for the rows of the whole global batch (n = local_rows x ranks), this rank's slice.

    Why: every rank holds the same global RNG state (the checkpoint keeps it), so drawing only
    its own `local_rows` would give each rank the numbers of rows 0.. of the single-process
    batch; drawing the global batch's and keeping rank r's rows (r * local_rows ...) makes N
    ranks draw exactly what one process draws, and leaves the RNG in the same state.
    """
    world = distributed.world_size()
    if world == 1:
        return draw(local_rows)
    r = distributed.rank()
    return draw(local_rows * world)[r * local_rows:(r + 1) * local_rows]


@dataclass(frozen=True)
class VAEConfig:
    """`pretrain.vae.*`"""

    latent_dim: int = setting(128, domain=DIM, doc="dimensions of the latent z (the posterior is "
                              "a diagonal Gaussian predicted from the pooled features)")
    decoder_dim: int = setting(32, domain=DIM, doc="channels of the decoder's finest stage (x2 per coarser "
                               "stage, at most x8)")
    target_norm: bool = setting(False, doc="reconstruct each image standardised per channel (its colour "
                                "offset and contrast removed) instead of its pixels; no output sigmoid")
    beta: float = setting(1.0, domain=NON_NEGATIVE, doc="weight of the KL term (1 = the ELBO; beta-VAE > 1)")
    kl_warmup_epochs: float = setting(10.0, domain=NON_NEGATIVE,
                                      doc="the KL weight grows linearly from 0 to beta over these epochs; 0 = none")


@register_method
class VAE(ReconstructionMixin, SSLMethod):
    """Backbone -> (mu, log sigma^2) -> z = mu + sigma * eps -> convolutional decoder; ELBO loss.

    - Posterior: a linear layer on the backbone's pooled features gives mu and log sigma^2 of a
      diagonal Gaussian over `latent_dim` dimensions (log sigma^2 clamped to [-30, 20]).
    - Sample: the reparameterisation trick with eps ~ N(0, I) drawn on the device from the
      global RNG (checkpointed, so resume is bitwise) for the whole global batch, each rank
      keeping its rows (`global_rows`), so N ranks draw what one process draws.
    - Decoder: the autoencoder's `ConvDecoder` from z, matched to the view size, sigmoid output.
    - Loss per image: summed squared error over the pixels (the Gaussian decoder's negative
      log-likelihood with sigma^2 = 1/2, up to a constant) + w(t) * KL(q(z|x) || N(0, I)) in
      nats, with w(t) = beta * min(1, epoch / kl_warmup_epochs) (linear warm-up); averaged over
      images and divided by the number of pixels (3 x H x W) of an image, i.e. the negative
      ELBO per pixel: the optimum is the ELBO's, the gradients are the size of a per-pixel MSE
      (the learning rates of the other methods apply). Metrics: `reconstruction` (that sum),
      `reconstruction_mse` (per pixel, comparable with the autoencoder's), `kl`, `kl_weight`.
    - Input and target: one geometry-only view (crop + flip, no colour operation), as the
      autoencoder. `visualize`: the un-augmented images above their reconstructions from the
      posterior mean, and `samples` decoded from z ~ N(0, I) (a fixed seed).
    - The encoder kept is the backbone (mu is a linear function of its pooled features).

    Deviations: the paper's encoder and decoder are MLPs with a Bernoulli or learned-variance
    Gaussian decoder; here a convolutional backbone and decoder with a fixed-variance Gaussian
    decoder (beta trades it off: beta < 1 is a sharper decoder). The warm-up is linear in
    epochs (Bowman et al. anneal with a sigmoid over steps). Data parallel: per-image means,
    synced BN, the noise of the global batch.
    """

    name: ClassVar[str] = "vae"
    family: ClassVar[str] = "generative"
    Config: ClassVar[type] = VAEConfig

    def __init__(self, backbone, cfg: VAEConfig, ctx: TrainContext) -> None:
        super().__init__(backbone, cfg, ctx)
        self.posterior = nn.Linear(self.feature_dim, 2 * cfg.latent_dim)
        self.decoder = ConvDecoder(cfg.latent_dim, ctx.view_size, cfg.decoder_dim, sigmoid=not cfg.target_norm)
        self._register_stats()

    def kl_weight(self, progress: float) -> float:
        """w(t) = beta * min(1, epochs done / kl_warmup_epochs) (beta without warm-up)."""
        warmup = self.cfg.kl_warmup_epochs
        ramp = min(1.0, self.ctx.epoch(progress) / warmup) if warmup > 0 else 1.0
        return self.cfg.beta * ramp

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z | x), each (B, latent_dim)."""
        mu, logvar = self.posterior(self.backbone(x)).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def reconstruct(self, x: Tensor) -> Tensor:
        """The decoder's image from the posterior mean (no sampling)."""
        return self.decoder(self.encode(x)[0])

    def forward(self, batch: Batch, progress: float) -> StepOutput:
        x = batch.views[0]
        mu, logvar = self.encode(x)
        dtype = torch.promote_types(mu.dtype, torch.float32)
        eps = global_rows(mu.shape[0], lambda n: torch.randn(n, mu.shape[1], device=mu.device, dtype=dtype))
        x_hat = self.decoder(reparameterize(mu, logvar, eps))
        rec = reconstruction_loss(x_hat, self.target(x), "sum")
        kl = gaussian_kl(mu, logvar)
        weight = self.kl_weight(progress)
        pixels = x[0].numel()
        loss = (rec + weight * kl) / pixels  # the negative ELBO per pixel: the same optimum, MSE-sized gradients
        return StepOutput(loss, {
            "reconstruction": rec.detach(),
            "reconstruction_mse": rec.detach() / pixels,
            "kl": kl.detach(),
            "kl_weight": torch.full((), weight, device=loss.device),  # a fill, not a host-to-device copy
        })

    @torch.no_grad()
    def visualize(self, batch: Batch) -> dict[str, Tensor]:
        """`reconstructions` (see the autoencoder) and `samples`: 2 rows of 8 decoded prior samples."""
        pictures = super().visualize(batch)
        device = batch.images.device
        g = torch.Generator(device).manual_seed(0)
        z = torch.randn(16, self.cfg.latent_dim, generator=g, device=device)
        samples = self.decoder(z).float()
        if self.cfg.target_norm:  # standardised images: mean grey, +-2 standard deviations to black / white
            samples = (0.5 + samples / 4).clamp(0, 1)
        pictures["samples"] = samples
        return pictures

