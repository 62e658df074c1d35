"""MoCo v3 and MAE (issue 13): their losses against plain references written from the papers'
pseudocode (float64 values and gradients), MAE's mask and target, the heads, the kept
encoder and the settings rules. Runs on a ViT-Tiny with 4 px patches on 16 px images."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import method_params
from sslflow.ssl_models.backbones import VisionTransformer
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.losses.contrastive_inbatch import mocov3_info_nce, mocov3_loss
from sslflow.ssl_models.losses.masked import mae_loss, normalized_pixel_target, patchify, unpatchify
from sslflow.ssl_models.methods import Batch
from sslflow.ssl_models.methods.mae import MAE
from sslflow.ssl_models.methods.mocov3 import MoCoV3
from sslflow.ssl_models.train import build_method, train_context

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE, BATCH = 16, 6


def make(name: str, *overrides: str):
    params = method_params(name, *overrides)
    return build_method(params, train_context(params, SIZE), torch.device("cpu"))


def batch_for(method, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(BATCH, 3, s.size, s.size, generator=g) for s in method.views()]
    images = torch.randint(0, 256, (BATCH, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)
    return Batch(views, images, method.ctx.mean, method.ctx.std)


# ------------------------------------------------------------------------------------ MoCo v3
def reference_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """Algorithm 1 of the paper, one query at a time: normalise, logits q.k / tau, the positive
    is the key of the same image, CrossEntropyLoss(...) * 2 * tau."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(q)):
        qi = q[i] / q[i].norm()
        logits = torch.stack([qi @ (kj / kj.norm()) for kj in k.detach()]) / tau
        total = total - (logits[i] - torch.logsumexp(logits, dim=0))
    return total / len(q) * 2 * tau


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_mocov3_loss_matches_the_papers_pseudocode_in_float64(tau):
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    got = mocov3_loss(q1, q2, k1, k2, tau)
    assert got.dtype == torch.float64
    want = reference_ctr(q1, k2, tau) + reference_ctr(q2, k1, tau)  # summed, as the paper
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    got_grads = torch.autograd.grad(got, (q1, q2))
    want_grads = torch.autograd.grad(want, (q1, q2))
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    got.detach_()
    loss = mocov3_loss(q1, q2, k1, k2, tau)
    loss.backward()
    assert k1.grad is None and k2.grad is None  # keys are a stop-gradient target


def test_mocov3_ranks_with_gathered_keys_average_to_the_whole_batch_loss():
    """Rank r's queries against the keys of every rank, positives at r x B + i: the mean over
    ranks (what DDP's gradient averaging optimises) is the single-process loss."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    whole = mocov3_info_nce(q, k, 0.2)
    parts = [mocov3_info_nce(q[r * 4:(r + 1) * 4], k, 0.2, offset=r * 4) for r in range(2)]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole, rtol=1e-12, atol=0)


def test_mocov3_heads_on_a_vit_and_a_frozen_patch_projection():
    method = make("mocov3", "pretrain.mocov3.frozen_patch_embed=true")
    assert isinstance(method.backbone, VisionTransformer)
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)  # 3 layers on a ViT
    last_bn = method.projector[-1]
    assert isinstance(last_bn, torch.nn.BatchNorm1d) and not last_bn.affine
    assert not isinstance(method.predictor[-1], torch.nn.BatchNorm1d)  # no BN on the predictor's output
    frozen = {id(p) for p in method.backbone.patch_embed.parameters()}
    assert not any(p.requires_grad for p in method.backbone.patch_embed.parameters())
    grouped = {id(p) for group in method.param_groups(0.1) for p in group["params"]}
    assert not frozen & grouped
    out = method(batch_for(method), 0.0)
    out.loss.backward()
    assert all(p.grad is None for p in method.backbone.patch_embed.parameters())
    assert method.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert set(out.metrics) == {"embedding_std"} and torch.isfinite(out.loss)


def test_mocov3_runs_on_a_resnet_and_refuses_a_frozen_patch_projection_there():
    method = make("mocov3", "backbone.name=resnet18", "pretrain.mocov3.frozen_patch_embed=false")
    assert sum(isinstance(m, torch.nn.Linear) for m in method.projector) == 2  # the paper's ResNet projector
    method(batch_for(method), 0.0).loss.backward()
    with pytest.raises(ConfigError, match=r"^pretrain\.mocov3\.frozen_patch_embed [^\n]*$"):
        method_params("mocov3", "backbone.name=resnet18", "pretrain.mocov3.frozen_patch_embed=true")


def test_mocov3_momentum_is_a_cosine_to_one():
    method = make("mocov3", "pretrain.mocov3.momentum=0.99")
    assert method.tau(0.0) == pytest.approx(0.99) and method.tau(0.5) == pytest.approx(0.995)
    assert method.tau(1.0) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ MAE
def reference_patches(img: torch.Tensor, p: int) -> torch.Tensor:
    """(C, H, W) -> (L, p * p * C): patches row by row, pixels row by row, channel last."""
    c, h, w = img.shape
    out = []
    for y in range(0, h, p):
        for x in range(0, w, p):
            out.append(torch.stack([img[ch, y + i, x + j] for i in range(p) for j in range(p) for ch in range(c)]))
    return torch.stack(out)


def reference_mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """The paper's loss, patch by patch: target = the patch standardised by its own mean and
    unbiased variance (+1e-6), squared error averaged over the patch, then over masked patches."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(len(imgs)):
        for i, patch in enumerate(reference_patches(imgs[b], p)):
            if mask[b, i] == 0:
                continue
            n = patch.numel()
            mu = patch.sum() / n
            var = ((patch - mu) ** 2).sum() / (n - 1)
            target = (patch - mu) / math.sqrt(var + 1e-6)
            total = total + ((pred[b, i] - target) ** 2).sum() / n
            count += 1
    return total / count


def test_patchify_layout_and_unpatchify_inverse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    patches = patchify(x, 4)
    assert patches.shape == (2, 4, 48)
    for b in range(2):
        torch.testing.assert_close(patches[b], reference_patches(x[b], 4), rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(patches, 4), x, rtol=0, atol=0)


def test_mae_loss_and_normalised_target_match_the_reference_in_float64():
    g = torch.Generator().manual_seed(2)
    imgs = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    pred = torch.randn(3, 4, 48, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.float64)
    got, per_patch = mae_loss(pred, patchify(imgs, 4), mask, norm_pix=True)
    want = reference_mae_loss(pred, imgs, mask, 4)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, pred)[0], torch.autograd.grad(want, pred)[0],
                               rtol=1e-10, atol=1e-14)
    assert per_patch.shape == (3, 4)
    target = normalized_pixel_target(patchify(imgs, 4))
    torch.testing.assert_close(target.mean(-1), torch.zeros(3, 4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(target.var(-1), torch.ones(3, 4, dtype=torch.float64), rtol=1e-5, atol=0)
    # without normalisation the target is the raw patches
    raw, _ = mae_loss(pred, patchify(imgs, 4), mask, norm_pix=False)
    expected = ((pred - patchify(imgs, 4)) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(raw, expected, rtol=1e-12, atol=0)


def test_mae_loss_ignores_the_visible_patches():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(4, 16, 48, generator=g, dtype=torch.float64)
    pred = torch.randn(4, 16, 48, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 16, generator=g) < 0.75).double()
    mask[:, 0], mask[:, 1] = 1, 0
    changed = pred + 100 * (1 - mask).unsqueeze(-1) * torch.randn(4, 16, 48, generator=g, dtype=torch.float64)
    assert mae_loss(changed, target, mask)[0] == mae_loss(pred, target, mask)[0]
    pred.requires_grad_(True)
    grad = torch.autograd.grad(mae_loss(pred, target, mask)[0], pred)[0]
    assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1].abs().sum(-1) > 0)


@pytest.mark.parametrize(("ratio", "keep"), [(0.75, 4), (0.5, 8), (0.9, 1)])
def test_mae_mask_has_the_requested_ratio_in_every_image(ratio, keep):
    method = make("mae", f"pretrain.mae.mask_ratio={ratio}")
    assert method.num_patches == 16  # 16 px / 4 px patches
    torch.manual_seed(0)
    ids, mask, restore = method.random_masking(64, torch.device("cpu"))
    assert ids.shape == (64, keep)
    assert torch.all(mask.sum(1) == 16 - keep)  # the same count per image
    assert torch.all(mask.gather(1, ids) == 0)  # kept = visible
    assert torch.all(ids.sort(1).values.diff(dim=1) > 0)  # distinct patches
    # the decoder's un-shuffle puts visible token j back at patch ids[:, j]
    assert torch.equal(restore.gather(1, ids), torch.arange(keep).expand(64, keep))
    # random per image: the masks differ between images and between draws
    assert len({tuple(m.tolist()) for m in mask}) > min(32, math.comb(16, keep) // 2)
    _, mask2, _ = method.random_masking(64, torch.device("cpu"))
    assert not torch.equal(mask, mask2)


def test_mae_encoder_sees_only_the_visible_patches():
    method = make("mae").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.manual_seed(5)
    keep, mask, _ = method.random_masking(2, x.device)
    hidden = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48), 4).bool()  # (B, 3, H, W) masked pixels
    y = torch.where(hidden, torch.randn_like(x) * 10, x)
    a, b = method.backbone.forward_features(x, keep), method.backbone.forward_features(y, keep)
    assert a.shape == (2, 1 + keep.shape[1], method.backbone.embed_dim)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mae_step_logs_visible_loss_and_trains_encoder_and_decoder():
    method = make("mae")
    out = method(batch_for(method), 0.0)
    assert set(out.metrics) == {"visible_loss"} and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_mae_kept_encoder_is_the_vit_without_the_decoder():
    method = make("mae")
    encoder = method.encoder()
    assert encoder is method.backbone and isinstance(encoder, VisionTransformer)
    assert not any("decoder" in k or "mask_token" in k for k in encoder.state_dict())
    assert not {id(p) for p in encoder.parameters()} & {id(p) for p in method.decoder.parameters()}
    assert any(k.startswith("decoder.") for k in method.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE)
    assert encoder.eval()(x).shape == (2, encoder.feature_dim)


def test_mae_views_are_crop_and_flip_with_maes_scale():
    method = make("mae", "pretrain.mae.crop_scale=[0.3, 1.0]")
    (view,) = method.views()
    assert view.scale == (0.3, 1.0) and view.flip_prob == 0.5
    assert view.jitter_prob == view.grayscale_prob == view.blur_prob == view.solarize_prob == 0.0


def test_mae_visualize_gives_inputs_masked_inputs_and_reconstructions():
    method = make("mae").eval()
    pictures = method.visualize(batch_for(method))
    assert set(pictures) == {"inputs", "masked", "reconstruction"}
    for grid in pictures.values():
        assert grid.shape == (BATCH, 3, SIZE, SIZE) and grid.min() >= 0 and grid.max() <= 1


def test_mae_refuses_a_resnet_and_a_bad_decoder_width_in_one_line():
    with pytest.raises(ConfigError, match=r"^backbone\.name must be a ViT [^\n]*$"):
        method_params("mae", "backbone.name=resnet18")
    with pytest.raises(ConfigError, match=r"^pretrain\.mae\.decoder_dim [^\n]*$"):
        method_params("mae", "pretrain.mae.decoder_dim=36", "pretrain.mae.decoder_heads=8")
    with pytest.raises(ConfigError, match=r"pretrain\.mae\.mask_ratio"):
        make("mae", "pretrain.mae.mask_ratio=0.99")  # 16 patches: none would stay visible
    assert isinstance(make("mae"), MAE) and isinstance(make("mocov3"), MoCoV3)
