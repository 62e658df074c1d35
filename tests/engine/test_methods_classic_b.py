"""Colorization, inpainting, CPC, Deep InfoMax and CMC: the sRGB -> Lab conversion and every loss
against plain loop implementations (float64 values and gradients), plus the pieces of the methods
a generic test cannot see (gamut bins, masks, patch grid, causal context, memory queue)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import method_params
from sslflow.ssl_models.color import lab_to_rgb, rgb_to_lab
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.losses.dense import (
    colorization_loss,
    colorization_regression_loss,
    masked_reconstruction_loss,
    nearest_bin,
    rebalancing_weights,
    soft_encode,
)
from sslflow.ssl_models.losses.infomax import cmc_loss, cpc_loss, dim_local_loss
from sslflow.ssl_models.methods import METHODS, Batch
from sslflow.ssl_models.methods.colorization import gamut_bins
from sslflow.ssl_models.methods.cpc import PatchGrid, patches
from sslflow.ssl_models.train import build_method, train_context

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = {"rtol": 1e-10, "atol": 1e-10}
NEW = ("colorization", "inpainting", "cpc", "dim", "cmc")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grads(loss: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, leaves)


def assert_same_value_and_grads(loss, ref, leaves):
    torch.testing.assert_close(loss, ref, **F64)
    for g, r in zip(grads(loss, *leaves), grads(ref, *leaves), strict=True):
        torch.testing.assert_close(g, r, **F64)


# ------------------------------------------------------------------------------------ sRGB -> Lab
def ref_lab(r: float, g: float, b: float, *, matrix=None, white=(0.95047, 1.0, 1.08883),
            eps=216 / 24389, kappa=24389 / 27) -> tuple[float, float, float]:
    """One pixel, the textbook way (the formulas skimage's `rgb2lab` writes out)."""
    matrix = matrix or ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750),
                        (0.0193339, 0.1191920, 0.9503041))

    def lin(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    rgb = [lin(c) for c in (r, g, b)]
    xyz = [sum(m * c for m, c in zip(row, rgb, strict=True)) / w for row, w in zip(matrix, white, strict=True)]

    def f(t):
        return t ** (1 / 3) if t > eps else (kappa * t + 16) / 116

    fx, fy, fz = (f(t) for t in xyz)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def test_rgb_to_lab_matches_the_published_values_of_the_primaries():
    # D65 L*a*b* of the sRGB primaries, white and black (Lindbloom's calculator, EasyRGB)
    rgb = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.float64)
    want = torch.tensor([[53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
                         [32.2970, 79.1875, -107.8602], [100, 0, 0], [0, 0, 0]], dtype=torch.float64)
    lab = rgb_to_lab(rgb.T.reshape(3, 5, 1)).reshape(3, 5).T
    torch.testing.assert_close(lab, want, rtol=0, atol=1e-3)


def test_rgb_to_lab_matches_a_per_pixel_reference_and_inverts():
    x = torch.rand(2, 3, 4, 5, generator=gen(), dtype=torch.float64)
    x[0, :, 0, 0] = torch.tensor([0.01, 0.02, 0.03])  # the linear segments of the gamma and of f
    lab = rgb_to_lab(x)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                want = torch.tensor(ref_lab(*x[b, :, i, j].tolist()), dtype=torch.float64)
                torch.testing.assert_close(lab[b, :, i, j], want, **F64)
    torch.testing.assert_close(lab_to_rgb(lab), x, rtol=0, atol=1e-12)
    # skimage's rounded constants (0.008856, 7.787 * 116, its 6-digit matrix) agree to ~1e-2
    skimage_matrix = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169),
                      (0.019334, 0.119193, 0.950227))
    sk = torch.tensor(ref_lab(*x[1, :, 2, 3].tolist(), matrix=skimage_matrix, eps=0.008856, kappa=7.787 * 116))
    torch.testing.assert_close(lab[1, :, 2, 3], sk.double(), rtol=0, atol=0.02)


def test_lab_conversion_is_safe_out_of_range_in_float32_and_batched_shapes():
    x = torch.randn(3, 3, 8, 8, generator=gen(1)) * 2  # a normalised view, far outside [0, 1]
    lab = rgb_to_lab(x)
    assert lab.dtype == torch.float32 and torch.isfinite(lab).all()
    assert lab[:, 0].min() >= 0 and lab[:, 0].max() <= 100 + 1e-4
    back = lab_to_rgb(torch.tensor([[[[50.0]], [[200.0]], [[-200.0]]]]))  # out of gamut: clipped
    assert torch.isfinite(back).all() and back.min() >= 0 and back.max() <= 1
    torch.testing.assert_close(rgb_to_lab(x.clamp(0, 1).half()).float(), rgb_to_lab(x.clamp(0, 1)), atol=0.3, rtol=0)


# ------------------------------------------------------------------------------------ colorization
def ref_soft_encode(ab_pixel, bins, k, sigma):
    d = [math.dist(ab_pixel, c) for c in bins.tolist()]
    order = sorted(range(len(d)), key=lambda q: d[q])[:k]
    w = [math.exp(-d[q] ** 2 / (2 * sigma**2)) for q in order]
    return order, [v / sum(w) for v in w]


def ref_colorization(logits, ab, bins, weights, k, sigma):
    b, _q, h, w = logits.shape
    total, n = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                idx, wt = ref_soft_encode(ab[i, :, y, x].tolist(), bins, k, sigma)
                e = torch.exp(logits[i, :, y, x])
                logp = torch.log(e / e.sum())
                pixel = -sum(wt[j] * logp[idx[j]] for j in range(k))
                total = total + (weights[idx[0]] if weights is not None else 1.0) * pixel
                n += 1
    return total / n


def ref_rebalancing(prior, bins, lam, sigma):
    q = len(prior)
    p = [v / sum(prior.tolist()) for v in prior.tolist()]
    c = bins.tolist()
    k = [[math.exp(-math.dist(c[a], c[r]) ** 2 / (2 * sigma**2)) for r in range(q)] for a in range(q)]
    col = [sum(k[a][r] for a in range(q)) for r in range(q)]
    smooth = [sum(k[a][r] / col[r] * p[r] for r in range(q)) for a in range(q)]
    w = [1 / ((1 - lam) * s + lam / q) for s in smooth]
    z = sum(s * v for s, v in zip(smooth, w, strict=True))
    return torch.tensor([v / z for v in w], dtype=torch.float64)


def small_bins() -> torch.Tensor:
    a, b = torch.meshgrid(torch.arange(-2, 2.0), torch.arange(-1, 2.0), indexing="ij")
    return torch.stack([a.flatten(), b.flatten()], 1).double() * 10  # 12 bins, grid 10


def test_rebalancing_weights_match_reference_and_have_expectation_one():
    bins = small_bins()
    prior = torch.rand(12, generator=gen(2), dtype=torch.float64) ** 3
    prior[3] = 0.0  # an empty bin still gets a finite weight
    for lam in (0.5, 0.2):
        w = rebalancing_weights(prior * 7, bins, lam, sigma=5.0)  # any scale
        torch.testing.assert_close(w, ref_rebalancing(prior, bins, lam, 5.0), **F64)
    torch.testing.assert_close(rebalancing_weights(prior, bins, 1.0), torch.ones(12, dtype=torch.float64), **F64)
    rare, common = prior.argmin(), prior.argmax()
    assert w[rare] > w[common]


def test_soft_encoding_and_nearest_bin():
    bins = small_bins()
    ab = torch.randn(2, 2, 3, 3, generator=gen(3), dtype=torch.float64) * 12
    idx, w = soft_encode(ab, bins, neighbours=5, sigma=5.0)
    assert idx.shape == w.shape == (18, 5)
    torch.testing.assert_close(w.sum(1), torch.ones(18, dtype=torch.float64), **F64)
    near = nearest_bin(ab, bins)
    assert torch.equal(near.flatten(), idx[:, 0])
    pix = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    for p, (i, wi) in enumerate(zip(idx, w, strict=True)):
        r_idx, r_w = ref_soft_encode(pix[p].tolist(), bins, 5, 5.0)
        assert i.tolist() == r_idx
        torch.testing.assert_close(wi, torch.tensor(r_w, dtype=torch.float64), **F64)


@pytest.mark.parametrize("rebalance", [True, False])
def test_colorization_loss_matches_reference(rebalance):
    bins = small_bins()
    logits = torch.randn(2, 12, 3, 2, generator=gen(4), dtype=torch.float64, requires_grad=True)
    ab = torch.randn(2, 2, 3, 2, generator=gen(5), dtype=torch.float64) * 12
    weights = rebalancing_weights(torch.rand(12, generator=gen(6), dtype=torch.float64), bins) if rebalance else None
    loss = colorization_loss(logits, ab, bins, weights, neighbours=3, sigma=5.0)
    ref = ref_colorization(logits, ab, bins, weights, 3, 5.0)
    assert_same_value_and_grads(loss, ref, [logits])
    assert loss.dtype == torch.float64
    assert colorization_loss(logits.float(), ab.float(), bins.float()).dtype == torch.float32


def test_colorization_regression_loss_matches_reference():
    pred = torch.randn(2, 2, 3, 3, generator=gen(7), dtype=torch.float64, requires_grad=True)
    ab = torch.randn(2, 2, 3, 3, generator=gen(8), dtype=torch.float64) * 30
    ref = sum(((pred[b, :, i, j] - ab[b, :, i, j]) / 100).pow(2).sum()
              for b in range(2) for i in range(3) for j in range(3)) / 18
    assert_same_value_and_grads(colorization_regression_loss(pred, ab), ref, [pred])


def test_gamut_bins_cover_srgb():
    bins = gamut_bins(10.0)
    assert bins.shape == (261, 2) and torch.equal(bins, torch.unique(bins, dim=0))
    assert (bins.remainder(10) == 0).all()
    lab = rgb_to_lab(torch.rand(3, 500, 1, generator=gen(9), dtype=torch.float64))
    d = torch.cdist(lab[1:].reshape(2, -1).T, bins).min(dim=1).values
    assert d.max() <= 5 * math.sqrt(2) + 1e-9  # every sRGB colour is within half a cell of a bin


# ------------------------------------------------------------------------------------ inpainting
def test_masked_reconstruction_loss_matches_reference_and_ignores_the_context():
    pred = torch.randn(3, 3, 4, 4, generator=gen(10), dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 3, 4, 4, generator=gen(11), dtype=torch.float64)
    mask = torch.rand(3, 1, 4, 4, generator=gen(12)) < 0.4
    mask[2] = False  # an image without a hole contributes 0
    ref = 0.0
    for b in range(3):
        cells = [(i, j) for i in range(4) for j in range(4) if mask[b, 0, i, j]]
        if cells:
            ref = ref + sum((pred[b, :, i, j] - target[b, :, i, j]).pow(2).sum() for i, j in cells) / (3 * len(cells))
    ref = ref / 3
    loss = masked_reconstruction_loss(pred, target, mask)
    assert_same_value_and_grads(loss, ref, [pred])
    (g,) = grads(masked_reconstruction_loss(pred, target, mask), pred)
    assert (g.masked_select(~mask.expand_as(g)) == 0).all()
    torch.testing.assert_close(masked_reconstruction_loss(pred, target, mask[:, 0]), loss, **F64)


def inpainting(mask: str, **sets):
    params = method_params("inpainting", f"pretrain.inpainting.mask={mask}",
                           *(f"pretrain.inpainting.{k}={v}" for k, v in sets.items()))
    return build_method(params, train_context(params, 16), torch.device("cpu"))


def test_inpainting_masks():
    center = inpainting("center", mask_fraction=0.5).masks(4, 16, torch.device("cpu"))
    assert center.shape == (4, 1, 16, 16) and center.sum() == 4 * 64
    assert center[:, :, 4:12, 4:12].all()
    method = inpainting("blocks", mask_fraction=0.5, num_blocks=4)
    torch.manual_seed(0)
    blocks = method.masks(6, 16, torch.device("cpu"))
    per_image = blocks.flatten(1).sum(1)
    assert (per_image <= 64).all() and (per_image >= 16).all()  # 4 blocks of 4x4, may overlap
    assert not torch.equal(blocks[0], blocks[1])  # per image
    torch.manual_seed(0)
    again = method.masks(6, 16, torch.device("cpu"))
    assert torch.equal(blocks, again)  # the global RNG, checkpointed by the loop


def test_inpainting_shard_keeps_its_rows_of_the_global_draw(monkeypatch):
    from sslflow.ssl_models import distributed

    method = inpainting("blocks")
    torch.manual_seed(1)
    whole = method.masks(8, 16, torch.device("cpu"))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        torch.manual_seed(1)
        assert torch.equal(method.masks(4, 16, torch.device("cpu")), whole[4 * rank:4 * rank + 4])


# ------------------------------------------------------------------------------------ CPC
def ref_cpc(preds, z, skip, extra=None):
    b, rows, cols, _d = z.shape
    cands = [z[n, r, c] for n in range(b) for r in range(rows) for c in range(cols)]
    cands += list(extra) if extra is not None else []
    step_losses = []
    for k, p in enumerate(preds, start=1):
        total, n_pred = 0.0, 0
        for n in range(b):
            for i in range(p.shape[1]):
                for j in range(cols):
                    scores = torch.stack([torch.dot(p[n, i, j], c) for c in cands])
                    pos = torch.dot(p[n, i, j], z[n, i + skip + k, j])
                    total = total - torch.log(torch.exp(pos) / torch.exp(scores).sum())
                    n_pred += 1
        step_losses.append(total / n_pred)
    return sum(step_losses) / len(step_losses)


@pytest.mark.parametrize("skip", [0, 1])
def test_cpc_loss_matches_reference(skip):
    b, rows, cols, d = 2, 4, 3, 5
    z = torch.randn(b, rows, cols, d, generator=gen(13), dtype=torch.float64, requires_grad=True)
    preds = [torch.randn(b, rows - skip - k, cols, d, generator=gen(14 + k), dtype=torch.float64,
                         requires_grad=True) for k in (1, 2)]
    extra = torch.randn(4, d, generator=gen(20), dtype=torch.float64, requires_grad=True)
    assert_same_value_and_grads(cpc_loss(preds, z, skip), ref_cpc(preds, z, skip), [z, *preds])
    assert_same_value_and_grads(cpc_loss(preds, z, skip, extra), ref_cpc(preds, z, skip, extra), [z, extra, *preds])
    loss, acc = cpc_loss(preds, z, skip, return_accuracy=True)
    torch.testing.assert_close(loss, cpc_loss(preds, z, skip), **F64)
    assert 0 <= float(acc) <= 1 and not acc.requires_grad


def test_cpc_patch_grid_and_causal_context():
    params = method_params("cpc")
    demo = PatchGrid.of(params.pretrain.cpc, 32)  # the demo geometry at 32 px: 2x2 patches of 16 px
    assert (demo.patch, demo.stride, demo.grid, demo.skip, demo.steps) == (16, 16, 2, 0, 1)
    cpc_config = METHODS["cpc"].Config
    g = PatchGrid.of(cpc_config(patch_fraction=0.5, stride_fraction=0.5), 32)  # overlapping: 1 row skipped
    assert (g.patch, g.stride, g.grid, g.skip, g.steps) == (16, 8, 3, 1, 1)
    default = PatchGrid.of(cpc_config(), 256)  # CPC's 64 px every 32 px on 256 px
    assert (default.patch, default.stride, default.grid, default.skip, default.steps) == (64, 32, 7, 1, 5)
    with pytest.raises(ConfigError, match="patch_fraction"):
        PatchGrid.of(cpc_config(patch_fraction=0.9), 32)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float64).view(2, 3, 32, 32)
    p = patches(x, g)
    assert p.shape == (2 * 9, 3, 16, 16)
    assert torch.equal(p[1 * 9 + 1 * 3 + 2], x[1, :, 8:24, 16:32])  # image 1, row 1, column 2

    method = build_method(params, train_context(params, 16), torch.device("cpu")).eval()
    z = torch.randn(2, method.feature_dim, 3, 3, generator=gen(21))
    changed = z.clone()
    changed[:, :, 2] += 1.0  # the last row
    with torch.no_grad():
        a, b = method.context(z), method.context(changed)
    assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.equal(a[:, :, 2], b[:, :, 2])


# ------------------------------------------------------------------------------------ Deep InfoMax
def ref_dim(local, glob, estimator, extra=None):
    locs = list(local) + (list(extra) if extra is not None else [])
    b, n_loc = glob.shape[0], local.shape[1]
    log2 = math.log(2.0)

    def sp(t):
        return torch.log1p(torch.exp(t))

    if estimator == "jsd":
        e_pos, n_pos, e_neg, n_neg = 0.0, 0, 0.0, 0
        for n in range(b):
            for m, loc in enumerate(locs):
                for p in range(n_loc):
                    u = torch.dot(glob[n], loc[p])
                    if m == n:
                        e_pos, n_pos = e_pos + (log2 - sp(-u)), n_pos + 1
                    else:
                        e_neg, n_neg = e_neg + (sp(-u) + u - log2), n_neg + 1
        return e_neg / n_neg - e_pos / n_pos
    total = 0.0
    for n in range(b):
        negs = [torch.dot(glob[n], loc[q]) for m, loc in enumerate(locs) if m != n for q in range(n_loc)]
        for p in range(n_loc):
            pos = torch.dot(glob[n], local[n, p])
            total = total - torch.log(torch.exp(pos) / (torch.exp(pos) + torch.exp(torch.stack(negs)).sum()))
    return total / (b * n_loc)


@pytest.mark.parametrize("estimator", ["jsd", "infonce"])
def test_dim_local_loss_matches_reference(estimator):
    local = torch.randn(3, 4, 5, generator=gen(22), dtype=torch.float64, requires_grad=True)
    glob = torch.randn(3, 5, generator=gen(23), dtype=torch.float64, requires_grad=True)
    extra = torch.randn(2, 4, 5, generator=gen(24), dtype=torch.float64, requires_grad=True)
    assert_same_value_and_grads(dim_local_loss(local, glob, estimator), ref_dim(local, glob, estimator),
                                [local, glob])
    assert_same_value_and_grads(dim_local_loss(local, glob, estimator, extra),
                                ref_dim(local, glob, estimator, extra), [local, glob, extra])
    with pytest.raises(ValueError, match="estimator"):
        dim_local_loss(local, glob, "nwj")


def test_dim_infonce_stays_finite_for_large_scores():
    local = torch.randn(4, 16, 8, generator=gen(25)) * 30
    glob = torch.randn(4, 8, generator=gen(26)) * 30
    for estimator in ("jsd", "infonce"):
        assert torch.isfinite(dim_local_loss(local, glob, estimator))


# ------------------------------------------------------------------------------------ CMC
def ref_cmc(z1, z2, t, extra_1=None, extra_2=None):
    def unit(v):
        return v / v.norm()

    def direction(anchors, positives, extra):
        cands = [unit(v) for v in positives] + ([unit(v) for v in extra] if extra is not None else [])
        total = 0.0
        for i, a in enumerate(anchors):
            a = unit(a)
            scores = torch.stack([torch.dot(a, c) / t for c in cands])
            total = total - torch.log(torch.exp(scores[i]) / torch.exp(scores).sum())
        return total / len(anchors)

    return (direction(z1, z2, extra_2) + direction(z2, z1, extra_1)) / 2


def test_cmc_loss_matches_reference():
    z1 = torch.randn(4, 6, generator=gen(27), dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 6, generator=gen(28), dtype=torch.float64, requires_grad=True)
    e1 = torch.randn(5, 6, generator=gen(29), dtype=torch.float64, requires_grad=True)
    e2 = torch.randn(3, 6, generator=gen(30), dtype=torch.float64, requires_grad=True)
    assert_same_value_and_grads(cmc_loss(z1, z2, 0.1), ref_cmc(z1, z2, 0.1), [z1, z2])
    assert_same_value_and_grads(cmc_loss(z1, z2, 0.2, e1, e2), ref_cmc(z1, z2, 0.2, e1, e2), [z1, z2, e1, e2])
    loss, acc = cmc_loss(z1, z2, 0.1, return_accuracy=True)
    torch.testing.assert_close(loss, cmc_loss(z1, z2, 0.1), **F64)
    _same, acc_same = cmc_loss(z1, z1, 0.05, return_accuracy=True)
    assert float(acc_same) == 1.0 and 0 <= float(acc) <= 1


def test_cmc_memory_is_a_checkpointed_fifo_and_at_least_a_batch():
    params = method_params("cmc", "pretrain.cmc.queue_size=40", "pretrain.batch_size=16")
    method = build_method(params, train_context(params, 16), torch.device("cpu"))
    state = method.state_dict()
    assert {"queue_l", "queue_ab", "queue_ptr"} <= state.keys() and state["queue_l"].shape == (40, 32)
    assert "ab_backbone.conv1.weight" in state and method.encoder() is method.backbone
    images = torch.randint(0, 256, (16, 16, 16, 3), generator=gen(31), dtype=torch.uint8)
    views = [torch.randn(16, 3, 16, 16, generator=gen(32))]
    before = method.queue_l.clone()
    method(Batch(views, images, params.augment.mean, params.augment.std), 0.0).loss.backward()
    assert int(method.queue_ptr) == 16
    assert torch.equal(method.queue_l[16:], before[16:]) and not torch.equal(method.queue_l[:16], before[:16])
    torch.testing.assert_close(method.queue_l[:16].norm(dim=1), torch.ones(16))
    with pytest.raises(ConfigError, match="queue_size"):
        METHODS["cmc"].check_settings(METHODS["cmc"].Config(queue_size=8), params)


# ------------------------------------------------------------------------------------ the methods
@pytest.mark.parametrize("name", NEW)
def test_registered_with_a_demo_profile_and_a_step_on_a_vit(name):
    """Each is selectable by name; the dense ones read a ViT's tokens as a map too."""
    assert METHODS[name].name == name
    params = method_params(name, "backbone.name=vit_tiny", "backbone.vit.patch_size=4")
    method = build_method(params, train_context(params, 16), torch.device("cpu"))
    views = [torch.randn(4, 3, s.size, s.size, generator=gen(33)) for s in method.views()]
    images = torch.randint(0, 256, (4, 16, 16, 3), generator=gen(34), dtype=torch.uint8)
    out = method(Batch(views, images, params.augment.mean, params.augment.std), 0.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.metrics
    assert all(m.ndim == 0 and not m.requires_grad for m in out.metrics.values())


@pytest.mark.parametrize(("name", "picture"), [("colorization", "colorization"), ("inpainting", "inpainting")])
def test_visualize_shows_inputs_outputs_and_originals(name, picture):
    params = method_params(name)
    method = build_method(params, train_context(params, 16), torch.device("cpu")).eval()
    images = torch.randint(0, 256, (10, 16, 16, 3), generator=gen(35), dtype=torch.uint8)
    pictures = method.visualize(Batch([], images, params.augment.mean, params.augment.std))
    grid = pictures[picture]
    assert grid.shape == (2 * 3 * 8, 3, 16, 16)  # 2 rows of 8 (the last padded) x (input, output, original)
    assert grid.min() >= 0 and grid.max() <= 1
    original = images.permute(0, 3, 1, 2).double() / 255
    torch.testing.assert_close(grid[16:24].double(), original[:8], rtol=0, atol=1e-6)
    assert (grid[40:].double()[2:] == 0).all()  # padding of the last row
    if name == "colorization":  # the gray input is gray
        assert torch.equal(grid[0:8, 0], grid[0:8, 1])


def test_colorization_prior_is_the_running_mean_of_the_batches():
    params = method_params("colorization")
    method = build_method(params, train_context(params, 16), torch.device("cpu"))
    assert method.bins.shape == (261, 2) and "bins" not in method.state_dict()
    hist = []
    for seed in (36, 37):
        images = torch.randint(0, 256, (8, 16, 16, 3), generator=gen(seed), dtype=torch.uint8)
        view = (images.permute(0, 3, 1, 2).float() / 255 - method.pixel_mean) / method.pixel_std
        method(Batch([view], images, params.augment.mean, params.augment.std), 0.0)
        near = nearest_bin(method.target_ab(method.to_lab(view)), method.bins)
        hist.append(torch.bincount(near.flatten(), minlength=261).float() / near.numel())
    torch.testing.assert_close(method.prior, (hist[0] + hist[1]) / 2)
    assert int(method.prior_batches) == 2


# ------------------------------------------------------------------------------------ design choices
def test_luma_tie_makes_the_encoder_see_the_gray_image():
    from sslflow.ssl_models.augment import GRAY_WEIGHTS, normalize
    from sslflow.ssl_models.color import first_rgb_conv, tie_to_luma_

    params = method_params("cmc")
    mean, std = params.augment.mean, params.augment.std
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        method = build_method(params, train_context(params, 16), torch.device("cpu")).eval()
    finally:
        torch.set_default_dtype(default)
    encoder = method.encoder()
    x = torch.rand(3, 3, 16, 16, generator=gen(40), dtype=torch.float64)
    w = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64)
    gray = (x * (w / w.sum()).view(1, 3, 1, 1)).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    with torch.no_grad():  # tied at initialisation: RGB is encoded as its gray version
        torch.testing.assert_close(encoder(normalize(x, mean, std)), encoder(normalize(gray, mean, std)),
                                   rtol=1e-5, atol=1e-6)
        conv = first_rgb_conv(method.ab_backbone)  # the ab encoder is not tied
        assert not torch.allclose(conv.weight[:, 0] / conv.weight[:, 1], conv.weight[:, 0, :1, :1] * 0 + 1)
        # re-tied after an optimizer step moved it
        first = first_rgb_conv(encoder)
        first.weight.add_(torch.randn(first.weight.shape, generator=gen(41), dtype=torch.float64))
        method.after_step(0.5)
        torch.testing.assert_close(encoder(normalize(x, mean, std)), encoder(normalize(gray, mean, std)),
                                   rtol=1e-5, atol=1e-6)
        # the response to gray images is kept, up to a constant per filter (removed by BatchNorm)
        conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
        g = normalize(gray, mean, std)
        before = conv(g)
        tie_to_luma_(conv, std)
        d = (before - conv(g))[:, :, 1:-1, 1:-1]
        torch.testing.assert_close(d, d[:, :, :1, :1].expand_as(d), rtol=0, atol=1e-6)


def test_inpainting_normalised_target_is_standardised_on_the_hole():
    method = inpainting("blocks", norm_target="true")
    x = torch.randn(4, 3, 16, 16, generator=gen(42), dtype=torch.float64) * 3 + 1
    torch.manual_seed(2)
    mask = method.masks(4, 16, torch.device("cpu"))
    t = method.target(x, mask)
    for b in range(4):
        hole = t[b][:, mask[b, 0]]
        torch.testing.assert_close(hole.mean(1), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9)
        torch.testing.assert_close(hole.var(1, correction=0), torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=0)
    assert torch.equal(inpainting("center").target(x, mask), x)


def test_cpc_patch_colour_augmentation_is_per_patch_and_sharded(monkeypatch):
    from sslflow.ssl_models import distributed

    params = method_params("cpc", "pretrain.cpc.patch_gray_prob=0.5")
    method = build_method(params, train_context(params, 16), torch.device("cpu"))
    mean, std = params.augment.mean, params.augment.std
    p = (torch.rand(40, 3, 8, 8, generator=gen(43)) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1)
    torch.manual_seed(3)
    whole = method.augment_patches(p, mean, std)
    rgb = whole * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    gray = (rgb[:, 0] - rgb[:, 1]).abs().amax(dim=(1, 2)) < 1e-5
    assert 5 < int(gray.sum()) < 35  # about half the patches, independently
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        torch.manual_seed(3)
        torch.testing.assert_close(method.augment_patches(p[20 * rank:20 * rank + 20], mean, std),
                                   whole[20 * rank:20 * rank + 20])


def test_dim_with_two_views_scores_each_global_against_the_other_views_locations():
    params = method_params("dim", "pretrain.dim.views=2", "pretrain.dim.estimator=infonce")
    method = build_method(params, train_context(params, 16), torch.device("cpu"))
    assert len(method.views()) == 2
    views = [torch.randn(6, 3, 16, 16, generator=gen(s)) for s in (44, 45)]
    images = torch.zeros(6, 16, 16, 3, dtype=torch.uint8)
    torch.manual_seed(0)
    loss = method(Batch(views, images, params.augment.mean, params.augment.std), 0.0).loss
    local, g = method.encode(torch.cat(views))
    want = (dim_local_loss(local[6:], g[:6], "infonce") + dim_local_loss(local[:6], g[6:], "infonce")) / 2
    torch.testing.assert_close(loss, want)
