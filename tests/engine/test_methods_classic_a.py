"""The generative and pretext methods of issue 14 (autoencoder, VAE, RotNet, jigsaw): their losses
against plain references (float64, values and gradients) and the geometry the methods draw
(rotations, tiles, gaps, jitter, permutation sets). The loop-level checks (learning, resume,
DDP) are the generic ones in test_every_method.py and test_distributed.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers import fast_params
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.losses.generative import gaussian_kl, reconstruction_loss, reparameterize
from sslflow.ssl_models.losses.pretext import pretext_classification_loss
from sslflow.ssl_models.methods import METHODS, Batch
from sslflow.ssl_models.methods.autoencoder import ConvDecoder, inputs_above_outputs, upsampling_plan
from sslflow.ssl_models.methods.jigsaw import (
    TileGrid,
    extract_tiles,
    maximal_hamming_permutations,
    standardize_tiles,
)
from sslflow.ssl_models.methods.rotation import rotate_all
from sslflow.ssl_models.train import build_method, train_context

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = {"rtol": 1e-10, "atol": 1e-12}
SIZE, BATCH = 16, 6


def make(name: str, *sets: str, size: int = SIZE):
    params = fast_params(f"pretrain.method={name}", f"pretrain.batch_size={BATCH}", "pretrain.epochs=10", *sets)
    return build_method(params, train_context(params, size, steps_per_epoch=5), torch.device("cpu"))


def batch_for(method, seed: int = 0, size: int = SIZE) -> Batch:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(BATCH, 3, s.size, s.size, generator=g) for s in method.views()]
    images = torch.randint(0, 256, (BATCH, size, size, 3), generator=g, dtype=torch.uint8)
    return Batch(views, images, method.ctx.mean, method.ctx.std)


def grads(loss: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


# ------------------------------------------------------------------------------------ references
def ref_reconstruction(x_hat, x, reduction):
    total = 0.0
    for b in range(x.shape[0]):
        per_image = sum((x_hat[b][idx] - x[b][idx]) ** 2 for idx in itertools.product(*map(range, x.shape[1:])))
        total = total + (per_image / x[b].numel() if reduction == "mean" else per_image)
    return total / x.shape[0]


def ref_kl(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) = log(1 / sigma) + (sigma^2 + mu^2) / 2 - 1/2, per dimension."""
    total = 0.0
    for b in range(mu.shape[0]):
        for j in range(mu.shape[1]):
            sigma = torch.exp(logvar[b, j] / 2)
            total = total + torch.log(1 / sigma) + (sigma**2 + mu[b, j] ** 2) / 2 - 0.5
    return total / mu.shape[0]


def ref_cross_entropy(logits, target):
    total = 0.0
    for i in range(logits.shape[0]):
        total = total - torch.log(torch.exp(logits[i, target[i]]) / torch.exp(logits[i]).sum())
    return total / logits.shape[0]


# ------------------------------------------------------------------------------------ generative losses
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reconstruction_loss_matches_reference(reduction):
    g = torch.Generator().manual_seed(0)
    x_hat = torch.rand(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.rand(3, 2, 3, 3, generator=g, dtype=torch.float64)
    got, want = reconstruction_loss(x_hat, x, reduction), ref_reconstruction(x_hat, x, reduction)
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(grads(got, (x_hat,))[0], grads(want, (x_hat,))[0], **F64)
    # the two reductions differ by the pixel count only; a perfect reconstruction costs 0
    assert reconstruction_loss(x, x, reduction).item() == 0
    torch.testing.assert_close(reconstruction_loss(x_hat, x, "sum"), reconstruction_loss(x_hat, x, "mean") * 18)


def test_reconstruction_loss_target_is_data_and_precision_is_float32():
    x_hat = torch.rand(2, 3, 4, 4, requires_grad=True)
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    reconstruction_loss(x_hat, x).backward()
    assert x_hat.grad is not None and x.grad is None
    assert reconstruction_loss(x_hat.bfloat16(), x.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="reduction"):
        reconstruction_loss(x_hat, x, "max")
    with pytest.raises(ValueError, match="shape"):
        reconstruction_loss(x_hat, x[:, :2])


def test_gaussian_kl_matches_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    got, want = gaussian_kl(mu, logvar), ref_kl(mu, logvar)
    torch.testing.assert_close(got, want, **F64)
    for a, b in zip(grads(got, (mu, logvar)), grads(want, (mu, logvar)), strict=True):
        torch.testing.assert_close(a, b, **F64)
    q = torch.distributions.Normal(mu.detach(), torch.exp(logvar.detach() / 2))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(got.detach(), torch.distributions.kl_divergence(q, p).sum(1).mean(), **F64)
    # zero exactly at the prior
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0


def test_reparameterisation_is_mu_plus_sigma_eps_and_differentiable():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(3, 4, generator=g, dtype=torch.float64)
    z = reparameterize(mu, logvar, eps)
    sigma = torch.exp(logvar / 2)
    torch.testing.assert_close(z, mu + sigma * eps, **F64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)  # d(sum w z)/dmu = w, /dlogvar = w eps sigma / 2
    d_mu, d_logvar = grads((w * z).sum(), (mu, logvar))
    torch.testing.assert_close(d_mu, w, **F64)
    torch.testing.assert_close(d_logvar, (w * eps * sigma / 2).detach(), **F64)
    # the samples have the posterior's moments
    many = reparameterize(torch.full((1,), 1.5), torch.full((1,), math.log(0.25)),
                          torch.randn(200_000, 1, generator=g))
    assert abs(many.mean().item() - 1.5) < 0.01 and abs(many.std().item() - 0.5) < 0.01


# ------------------------------------------------------------------------------------ autoencoder, VAE
@pytest.mark.parametrize(("size", "plan"), [(16, (4, 2)), (28, (7, 2)), (32, (4, 3)), (33, (5, 3)),
                                            (96, (6, 4)), (224, (7, 5)), (4, (4, 0)), (3, (3, 0))])
def test_the_decoder_is_matched_to_the_view_size(size, plan):
    assert upsampling_plan(size) == plan
    decoder = ConvDecoder(10, size, width=4).eval()
    out = decoder(torch.randn(2, 10))
    assert out.shape == (2, 3, size, size) and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", ["autoencoder", "vae"])
def test_generative_methods_reconstruct_their_view_and_show_it(name):
    method = make(name)
    batch = batch_for(method)
    (view,) = method.views()
    assert view.size == SIZE and view.jitter_prob == view.grayscale_prob == view.blur_prob == 0  # crop + flip
    target = method.target(batch.views[0])  # the view, back in [0, 1]
    mean, std = torch.tensor(method.ctx.mean).view(1, 3, 1, 1), torch.tensor(method.ctx.std).view(1, 3, 1, 1)
    torch.testing.assert_close(target, (batch.views[0] * std + mean).clamp(0, 1))
    out = method(batch, 0.5)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert {"reconstruction_mse"} <= set(out.metrics) and all(m.ndim == 0 for m in out.metrics.values())
    method.eval()
    pictures = method.visualize(batch_for(method))
    grid = pictures["reconstructions"]
    assert grid.shape == (2 * BATCH, 3, SIZE, SIZE) and grid.min() >= 0 and grid.max() <= 1
    torch.testing.assert_close(grid[:BATCH], batch.raw())  # un-augmented inputs first, reconstructions below
    if name == "vae":
        assert pictures["samples"].shape == (16, 3, SIZE, SIZE)


def test_inputs_sit_above_their_outputs_in_rows_of_8():
    a, b = torch.arange(10.0).view(10, 1, 1, 1), -torch.arange(10.0).view(10, 1, 1, 1)
    rows = inputs_above_outputs(a, b).flatten().tolist()
    assert rows == [*range(8), *(-i for i in range(8)), 8, 9, -8, -9]


def test_vae_loss_is_the_per_pixel_negative_elbo_with_a_linear_kl_warm_up():
    method = make("vae", "pretrain.vae.beta=2.0", "pretrain.vae.kl_warmup_epochs=4")
    assert method.kl_weight(0.0) == 0 and method.kl_weight(0.2) == pytest.approx(1.0)  # epoch 2 of 4
    assert method.kl_weight(0.4) == method.kl_weight(0.9) == 2.0
    assert make("vae", "pretrain.vae.kl_warmup_epochs=0").kl_weight(0.0) == 1.0
    batch = batch_for(method)
    torch.manual_seed(7)
    out = method(batch, 0.1)  # epoch 1 of 4: weight 0.5
    torch.manual_seed(7)  # the same noise, by hand
    x = batch.views[0]
    mu, logvar = method.encode(x)
    eps = torch.randn(mu.shape)
    x_hat = method.decoder(mu + torch.exp(logvar / 2) * eps)
    rec = ((x_hat - method.target(x)) ** 2).flatten(1).sum(1).mean()
    kl = ref_kl(mu, logvar)
    pixels = 3 * SIZE * SIZE
    torch.testing.assert_close(out.loss, (rec + 0.5 * kl) / pixels, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["kl"], kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["reconstruction_mse"], rec.detach() / pixels, rtol=1e-5, atol=1e-6)
    assert out.metrics["kl_weight"].item() == 0.5


# ------------------------------------------------------------------------------------ pretext loss
def test_pretext_classification_matches_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(4, (7,), generator=g)
    loss, accuracy = pretext_classification_loss(logits, target)
    want = ref_cross_entropy(logits, target)
    torch.testing.assert_close(loss, want, **F64)
    torch.testing.assert_close(grads(loss, (logits,))[0], grads(want, (logits,))[0], **F64)
    right = sum(int(logits[i].argmax() == target[i]) for i in range(7))
    assert accuracy.item() == pytest.approx(right / 7) and not accuracy.requires_grad
    assert pretext_classification_loss(logits.bfloat16(), target)[0].dtype == torch.float32


# ------------------------------------------------------------------------------------ rotation
def test_rotations_are_exact_quarter_turns_with_their_labels():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, 5, generator=g)
    rotated, labels = rotate_all(x)
    assert rotated.shape == (8, 3, 5, 5) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    n = 5
    for k in range(4):
        for b in range(2):
            out = rotated[k * 2 + b]
            for i, j in itertools.product(range(n), range(n)):
                # k counter-clockwise quarter turns: pixel (i, j) comes from
                src = [(i, j), (j, n - 1 - i), (n - 1 - i, n - 1 - j), (n - 1 - j, i)][k]
                assert torch.equal(out[:, i, j], x[b][:, src[0], src[1]])


def test_rotation_method_classifies_the_4_rotations_of_every_image():
    method = make("rotation")
    batch = batch_for(method)
    out = method(batch, 0.0)
    rotated, labels = rotate_all(batch.views[0])
    want, accuracy = pretext_classification_loss(method.classifier(method.backbone(rotated)), labels)
    torch.testing.assert_close(out.loss, want)
    assert out.metrics["pretext_accuracy"].item() == accuracy.item()
    assert method.views()[0].jitter_prob == 0
    assert make("rotation", "pretrain.rotation.color_augment=true").views()[0].jitter_prob > 0
    assert isinstance(make("rotation", "pretrain.rotation.hidden_dim=0").classifier, torch.nn.Linear)


# ------------------------------------------------------------------------------------ jigsaw
def hamming(a, b) -> int:
    return sum(int(x != y) for x, y in zip(a, b, strict=True))


def test_permutation_set_has_maximal_hamming_distance_greedily():
    """Noroozi & Favaro's Algorithm 1 on 4 tiles (24 permutations), checked exhaustively: each
    new permutation maximises the minimum distance to the ones chosen before it."""
    perms = maximal_hamming_permutations(4, 12, seed=0).tolist()
    every = list(itertools.permutations(range(4)))
    assert len({tuple(p) for p in perms}) == 12 and all(sorted(p) == [0, 1, 2, 3] for p in perms)
    for k in range(1, 12):
        best = max(min(hamming(c, p) for p in perms[:k]) for c in every if list(c) not in perms[:k])
        assert min(hamming(perms[k], p) for p in perms[:k]) == best


@pytest.mark.parametrize(("count", "promised"), [(100, 6), (30, 7)])
def test_permutation_set_of_9_tiles_keeps_the_promised_minimum_distance(count, promised):
    perms = maximal_hamming_permutations(9, count, seed=0)
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    d.fill_diagonal_(9)
    assert int(d.min()) >= promised
    assert (d.sum() - 9 * count) / (count * (count - 1)) > 7.9  # the paper's average, about 8
    assert torch.equal(perms, maximal_hamming_permutations(9, count, seed=0))  # a function of the seed
    assert not torch.equal(perms, maximal_hamming_permutations(9, count, seed=1))
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())


@pytest.mark.parametrize(("size", "grid", "fraction"), [(32, 3, 0.85), (16, 3, 0.85), (33, 3, 0.7), (17, 2, 0.5)])
def test_tiles_lie_in_their_cells_with_bounded_gaps_and_jitter(size, grid, fraction):
    geo = TileGrid(size, grid, fraction)
    assert geo.tile == max(1, math.floor(fraction * (size // grid))) and geo.jitter == geo.cell - geo.tile
    g = torch.Generator().manual_seed(5)
    offsets = torch.randint(geo.jitter + 1, (50, geo.n_tiles, 2), generator=g)
    corners = geo.corners(offsets).tolist()
    for image in corners:
        for p, (y, x) in enumerate(image):
            row, col = divmod(p, grid)
            top, left = geo.margin + row * geo.cell, geo.margin + col * geo.cell
            assert top <= y <= top + geo.jitter and left <= x <= left + geo.jitter  # inside its cell
            assert y + geo.tile <= size and x + geo.tile <= size
            if col + 1 < grid:  # horizontal gap to the right neighbour
                gap = image[p + 1][1] - (x + geo.tile)
                assert 0 <= gap <= 2 * geo.jitter
            if row + 1 < grid:
                gap = image[p + grid][0] - (y + geo.tile)
                assert 0 <= gap <= 2 * geo.jitter
    # extraction is plain slicing
    x = torch.randn(50, 3, size, size, generator=g)
    tiles = extract_tiles(x, geo.corners(offsets), geo.tile)
    assert tiles.shape == (50, geo.n_tiles, 3, geo.tile, geo.tile)
    for b in (0, 17, 49):
        for p, (y, x0) in enumerate(corners[b]):
            assert torch.equal(tiles[b, p], x[b, :, y:y + geo.tile, x0:x0 + geo.tile])


def test_tiles_are_standardised_per_channel():
    tiles = 3 + 2 * torch.randn(4, 9, 3, 8, 8, dtype=torch.float64)
    out = standardize_tiles(tiles)
    torch.testing.assert_close(out.mean(dim=(-2, -1)), torch.zeros(4, 9, 3, dtype=torch.float64))
    torch.testing.assert_close(out.var(dim=(-2, -1), unbiased=False), torch.ones(4, 9, 3, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)


def test_jigsaw_puzzles_are_shuffled_by_the_drawn_permutation():
    """Pixels that hold their own coordinates: each slot's tile tells which cell it came from and
    at which offset, so the slot -> cell map must be the drawn permutation of the set."""
    method = make("jigsaw", "pretrain.jigsaw.num_permutations=24", "pretrain.jigsaw.tile_norm=false", size=32)
    geo = method.geometry
    assert (geo.cell, geo.tile, geo.jitter, geo.margin) == (10, 8, 2, 1)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    x = torch.stack([ys, xs, ys * 0]).expand(40, 3, 32, 32)
    shuffled, k = method.puzzles(x)
    assert shuffled.shape == (40, 9, 3, 8, 8) and k.shape == (40,) and k.min() >= 0 and k.max() < 24
    seen_offsets = set()
    for b in range(40):
        for slot in range(9):
            y0, x0 = int(shuffled[b, slot, 0, 0, 0]), int(shuffled[b, slot, 1, 0, 0])
            cell = (y0 - geo.margin) // geo.cell * 3 + (x0 - geo.margin) // geo.cell
            assert cell == method.permutations[k[b], slot]
            seen_offsets.add(((y0 - geo.margin) % geo.cell, (x0 - geo.margin) % geo.cell))
    assert seen_offsets == set(itertools.product(range(3), range(3)))  # every jitter in [0, 2] occurs
    assert len(set(k.tolist())) > 10  # the permutation is drawn per image


def test_jigsaw_forward_resizes_tiles_and_keeps_its_permutation_set_in_the_checkpoint():
    method = make("jigsaw", "pretrain.jigsaw.num_permutations=24", "pretrain.jigsaw.tile_size=12")
    seen = []
    method.backbone.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    out = method(batch_for(method), 0.0)
    assert seen == [(BATCH * 9, 3, 12, 12)] and torch.isfinite(out.loss)
    assert 0 <= out.metrics["pretext_accuracy"].item() <= 1
    assert torch.equal(method.state_dict()["permutations"], maximal_hamming_permutations(9, 24, 0))


def test_jigsaw_settings_are_checked():
    with pytest.raises(ConfigError, match="num_permutations"):
        fast_params("pretrain.method=jigsaw", "pretrain.jigsaw.grid=2", "pretrain.jigsaw.num_permutations=25")
    with pytest.raises(ConfigError, match="patch_size"):
        fast_params("pretrain.method=jigsaw", "backbone.name=vit_tiny", "backbone.vit.patch_size=4",
                    "pretrain.jigsaw.tile_size=10")


def test_the_four_methods_are_registered_in_their_families():
    assert {n: METHODS[n].family for n in ("autoencoder", "vae", "rotation", "jigsaw")} == {
        "autoencoder": "generative", "vae": "generative", "rotation": "pretext", "jigsaw": "pretext"}
