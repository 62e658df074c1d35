"""SSL methods on a tiny ResNet: forward/backward, EMA updates, queue, center, views, state."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import fast_params
from sslflow.ssl_models.heads import DINOHead, ProjectionMLP
from sslflow.ssl_models.methods import METHODS, Batch, SSLMethod, StepOutput
from sslflow.ssl_models.methods.byol import BYOL
from sslflow.ssl_models.methods.dino import DINO
from sslflow.ssl_models.methods.moco import MoCo
from sslflow.ssl_models.methods.simclr import SimCLR
from sslflow.ssl_models.train import build_method, train_context

BATCH, SIZE = 8, 16
# (target, online) submodule pairs of the momentum networks.
MOMENTUM_PAIRS = {
    "simclr": [],
    "moco": [("momentum_backbone", "backbone"), ("momentum_projector", "projector")],
    "byol": [("target_backbone", "backbone"), ("target_projector", "projector")],
    "dino": [("teacher_backbone", "backbone"), ("teacher_head", "head")],
}
COMMON = {f.name for f in dataclasses.fields(type(fast_params().pretrain))}
AUGMENT = {f.name for f in dataclasses.fields(type(fast_params().augment))}


def settings_for(name: str, **overrides):
    """Fast settings of method `name`; an override names a field of the method's section, of
    `pretrain` or of `augment` (in that order)."""
    method_fields = {f.name for f in dataclasses.fields(METHODS[name].Config)}
    sets = [f"pretrain.method={name}", f"pretrain.batch_size={BATCH}", "pretrain.epochs=10",
            f"pretrain.{name}.{'out_dim' if name == 'dino' else 'proj_dim'}={64 if name == 'dino' else 16}"]
    for key, value in overrides.items():
        if key == "seed":
            sets.append(f"seed={value}")
            continue
        section = (f"pretrain.{name}" if key in method_fields else "pretrain" if key in COMMON
                   else "augment" if key in AUGMENT else None)
        assert section is not None, key
        sets.append(f"{section}.{key}={value}")
    if name == "moco" and "queue_size" not in overrides:
        sets.append("pretrain.moco.queue_size=40")
    return fast_params(*sets)


def make(name: str, seed: int = 0, **overrides) -> SSLMethod:
    settings = settings_for(name, seed=seed, **overrides)
    return build_method(settings, train_context(settings, SIZE), torch.device("cpu"))


def make_batch(method: SSLMethod, seed: int = 1) -> Batch:
    """Random float views in the shapes of the method's recipe, and random raw images."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(BATCH, 3, s.size, s.size, generator=g) for s in method.views()]
    images = torch.randint(0, 256, (BATCH, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)
    return Batch(views, images, method.ctx.mean, method.ctx.std)


def loss_of(method: SSLMethod, batch: Batch, progress: float) -> torch.Tensor:
    out = method(batch, progress)
    assert isinstance(out, StepOutput)
    return out.loss


def is_target(name: str, method_name: str) -> bool:
    return any(name.startswith(t + ".") for t, _ in MOMENTUM_PAIRS[method_name])


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(params=sorted(MOMENTUM_PAIRS))
def name(request) -> str:
    return request.param


# ------------------------------------------------------------------------------- registry


def test_registry_names():
    assert {"simclr": SimCLR, "moco": MoCo, "byol": BYOL, "dino": DINO}.items() <= METHODS.items()


# ------------------------------------------------------------------------- forward/backward


def test_forward_backward_gradients(name):
    method = make(name)
    loss = loss_of(method, make_batch(method), 0.0)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    online_with_grad = 0
    for pname, p in method.named_parameters():
        if is_target(pname, name):
            assert not p.requires_grad and p.grad is None, pname
        elif p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            online_with_grad += 1
    heads = {"simclr": "projector", "moco": "projector", "byol": "predictor", "dino": "head"}[name]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in getattr(method, heads).parameters())
    assert online_with_grad > 0
    # The encoder kept after pretraining is the online backbone.
    assert method.encoder() is method.backbone


def test_forward_under_bf16_autocast(name):
    method = make(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(method, make_batch(method), 0.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in method.backbone.parameters())


def test_momentum_networks_start_equal_and_frozen(name):
    method = make(name)
    for target, online in MOMENTUM_PAIRS[name]:
        t_sd, o_sd = getattr(method, target).state_dict(), getattr(method, online).state_dict()
        assert t_sd.keys() == o_sd.keys()
        assert all(torch.equal(t_sd[k], o_sd[k]) for k in t_sd)
        assert not any(p.requires_grad for p in getattr(method, target).parameters())


# ------------------------------------------------------------------------------- EMA updates


@pytest.mark.parametrize("progress", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("method_name", ["moco", "byol", "dino"])
def test_after_step_moves_momentum_networks_exactly(method_name, progress):
    method = make(method_name, momentum=0.9)
    with torch.no_grad():  # make online != target, and the BN statistics too
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
        for _, online in MOMENTUM_PAIRS[method_name]:
            for mod in getattr(method, online).modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.running_mean.add_(1.0)
                    mod.num_batches_tracked.add_(3)
    # MoCo: constant momentum; BYOL/DINO: cosine schedule from 0.9 to 1.
    tau = 0.9 if method_name == "moco" else 1 - (1 - 0.9) * (math.cos(math.pi * progress) + 1) / 2
    before = {t: {k: v.clone() for k, v in getattr(method, t).named_parameters()}
              for t, _ in MOMENTUM_PAIRS[method_name]}
    method.after_step(progress)
    for target, online in MOMENTUM_PAIRS[method_name]:
        t_mod, o_mod = getattr(method, target), getattr(method, online)
        o_params = dict(o_mod.named_parameters())
        for k, v in t_mod.named_parameters():
            torch.testing.assert_close(v, tau * before[target][k] + (1 - tau) * o_params[k], msg=k)
            assert not v.requires_grad
        o_bufs = dict(o_mod.named_buffers())
        for k, v in t_mod.named_buffers():
            assert torch.equal(v, o_bufs[k]), k


def test_byol_dino_tau_schedule():
    for method_name in ("byol", "dino"):
        method = make(method_name, momentum=0.99)
        assert method.tau(0.0) == pytest.approx(0.99)
        assert method.tau(0.5) == pytest.approx(0.995)
        assert method.tau(1 - 1e-9) == pytest.approx(1.0, abs=1e-12)
        taus = [method.tau(p / 10) for p in range(10)]
        assert taus == sorted(taus)


# ------------------------------------------------------------------------------- MoCo queue


@pytest.mark.parametrize(("queue_size", "n"), [(12, 4), (10, 4), (7, 7), (9, 2)])
def test_moco_queue_ring_buffer(queue_size, n):
    method = make("moco", queue_size=queue_size, batch_size=2)
    assert method.queue.shape == (queue_size, 16)
    torch.testing.assert_close(method.queue.norm(dim=1), torch.ones(queue_size))
    pushed = []
    for step in range(7):
        keys = torch.nn.functional.normalize(torch.randn(n, 16), dim=1) + step  # distinct rows
        pushed.append(keys)
        method._enqueue(keys)
        total = (step + 1) * n
        assert method.queue_ptr.dtype == torch.long and method.queue_ptr.ndim == 0
        assert int(method.queue_ptr) == total % queue_size
        if total >= queue_size:
            last = torch.cat(pushed)[-queue_size:]
            # Oldest entry sits at the pointer; reading from there gives chronological order.
            assert torch.equal(torch.roll(method.queue, -int(method.queue_ptr), 0), last)
    with pytest.raises(ValueError):
        method._enqueue(torch.randn(queue_size + 1, 16))


def test_moco_forward_enqueues_both_views_keys():
    method = make("moco", queue_size=20)  # 2 * BATCH = 16 keys per step, 20 not a multiple
    batch = make_batch(method)
    method(batch, 0.0)
    with torch.no_grad():
        keys = [torch.nn.functional.normalize(
            method.momentum_projector(method.momentum_backbone(v)), dim=1) for v in batch.views]
    torch.testing.assert_close(method.queue[:16], torch.cat(keys))
    assert int(method.queue_ptr) == 16
    method(batch, 0.0)
    assert int(method.queue_ptr) == 12
    torch.testing.assert_close(torch.cat([method.queue[16:], method.queue[:12]]), torch.cat(keys))


def test_moco_rejects_queue_smaller_than_keys_per_step():
    with pytest.raises(ValueError, match="queue_size"):
        make("moco", queue_size=2 * BATCH - 1)
    make("moco", queue_size=2 * BATCH)


# ------------------------------------------------------------------------------- DINO


def test_dino_center_update():
    method = make("dino", center_momentum=0.8)
    with torch.no_grad():
        method.center.copy_(torch.randn_like(method.center))
    c0 = method.center.clone()
    batch = make_batch(method)
    with torch.no_grad():
        teacher = method.teacher_head(method.teacher_backbone(torch.cat(batch.views[:2])))
    method(batch, 0.0)
    expected = 0.8 * c0 + 0.2 * teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(method.center, expected)
    assert method.center.shape == (1, 64)


def test_dino_teacher_temperature_warmup():
    method = make("dino", epochs=10, teacher_temperature_warmup=0.04, teacher_temperature=0.07,
                  teacher_temperature_warmup_epochs=4)
    assert method.teacher_temperature(0.0) == pytest.approx(0.04)
    assert method.teacher_temperature(0.2) == pytest.approx(0.055)  # epoch 2 of 4
    assert method.teacher_temperature(0.4) == pytest.approx(0.07)
    assert method.teacher_temperature(0.9) == pytest.approx(0.07)
    no_warmup = make("dino", teacher_temperature_warmup_epochs=0, teacher_temperature=0.05)
    assert no_warmup.teacher_temperature(0.0) == pytest.approx(0.05)


def test_dino_loss_uses_warmed_up_teacher_temperature():
    kw = {"teacher_temperature_warmup": 0.04, "teacher_temperature": 0.5, "teacher_temperature_warmup_epochs": 5}
    a, b = make("dino", **kw), make("dino", **kw)
    batch = make_batch(a)
    assert not torch.equal(loss_of(a, batch, 0.0), loss_of(b, batch, 0.9))


def test_dino_one_backbone_call_per_resolution():
    method = make("dino", local_crops=3, local_size=8)
    calls: list[tuple[int, ...]] = []
    method.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    teacher_calls: list[tuple[int, ...]] = []
    method.teacher_backbone.register_forward_hook(lambda m, i, o: teacher_calls.append(tuple(i[0].shape)))
    method(make_batch(method), 0.0)
    assert calls == [(2 * BATCH, 3, SIZE, SIZE), (3 * BATCH, 3, 8, 8)]
    assert teacher_calls == [(2 * BATCH, 3, SIZE, SIZE)]


def test_dino_head_weight_norm():
    head = DINOHead(12, 20, hidden_dim=16, bottleneck_dim=8)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones_like(g))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(20))
    x = torch.randn(5, 12)
    out = head(x)
    assert out.shape == (5, 20) and out.abs().max() <= 1 + 1e-5  # cosine logits
    fresh = DINOHead(12, 20, hidden_dim=16, bottleneck_dim=8)
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(fresh(x), out)
    assert DINOHead(12, 20, 16, 8, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_projection_mlp_structure():
    mlp = ProjectionMLP(6, 10, 4, num_layers=3, last_bn=True)
    kinds = [type(m).__name__ for m in mlp.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert mlp(torch.randn(5, 6)).shape == (5, 4)
    plain = ProjectionMLP(6, 10, 4, use_bn=False)
    assert [type(m).__name__ for m in plain.net] == ["Linear", "ReLU", "Linear"]


# ------------------------------------------------------------------------------- views


def test_view_recipes():
    def recipe(cls, **aug):
        settings = fast_params(*(f"augment.{k}={v}" for k, v in aug.items()))
        return cls.view_specs(settings.pretrain.sections[cls.name], train_context(settings, 32)), settings.augment

    for cls in (SimCLR, MoCo):
        views, aug = recipe(cls)
        assert len(views) == 2 and views[0] == views[1]
        assert views[0].size == 32 and views[0].scale == aug.crop_scale
        assert views[0].solarize_prob == 0.0
        assert (views[0].flip_prob, views[0].jitter_prob, views[0].jitter_strength) == (
            aug.flip_prob, aug.jitter_prob, aug.strength)
    assert recipe(SimCLR)[0][0].blur_prob == 0.0
    (v1, v2), aug = recipe(BYOL)
    assert (v1.blur_prob, v1.solarize_prob) == (1.0, 0.0)
    assert (v2.blur_prob, v2.solarize_prob) == (0.1, 0.2)
    assert v1.size == v2.size == 32 and v1.scale == v2.scale == aug.crop_scale
    dino, aug = recipe(DINO, local_crops=6, local_size=12)
    assert len(dino) == 8
    assert [(v.size, v.scale) for v in dino[:2]] == [(32, aug.crop_scale)] * 2
    assert [(v.blur_prob, v.solarize_prob) for v in dino[:2]] == [(1.0, 0.0), (0.1, 0.2)]
    assert all(v == dino[2] for v in dino[2:])
    assert (dino[2].size, dino[2].scale, dino[2].blur_prob) == (12, aug.local_crop_scale, 0.5)
    assert len(recipe(DINO, local_crops=0)[0]) == 2
    # the global view size is a setting of its own (0 = the image size)
    assert recipe(SimCLR, global_size=24)[0][0].size == 24


# ------------------------------------------------------------------------------- state


def test_state_dict_round_trip_gives_identical_losses(name):
    a = make(name, seed=0)
    views = make_batch(a)
    loss_of(a, views, 0.1).backward()
    a.after_step(0.1)  # non-trivial queue/pointer/center/BN statistics/EMA weights
    b = make(name, seed=123)
    assert not torch.equal(loss_of(a, views, 0.2), loss_of(b, views, 0.2))
    b.load_state_dict(a.state_dict())
    keys = a.state_dict().keys()
    if name == "moco":
        assert {"queue", "queue_ptr"} <= keys
    if name == "dino":
        assert "center" in keys
    for _ in range(2):  # stateful forwards (queue, center, BN statistics) stay in lock-step
        la, lb = loss_of(a, views, 0.3), loss_of(b, views, 0.3)
        assert torch.equal(la, lb)
        a.after_step(0.3)
        b.after_step(0.3)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_simclr_optimisation_decreases_loss():
    method = make("simclr")
    views = make_batch(method)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for step in range(8):
        loss = loss_of(method, views, step / 8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step / 8)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# ------------------------------------------------------------------------------- contract v2


def test_every_method_returns_a_loss_and_device_side_metrics(name):
    method = make(name)
    out = method(make_batch(method), 0.0)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.metrics, "a method reports at least one indicator (collapse, accuracy, ...)"
    for key, value in out.metrics.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad, key


def test_param_groups_exclude_norms_biases_and_frozen_parameters(name):
    method = make(name)
    decay, no_decay = method.param_groups(1e-4)
    assert decay["weight_decay"] == 1e-4 and decay["lars"] and no_decay["weight_decay"] == 0 and not no_decay["lars"]
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert {id(p) for p in decay["params"] + no_decay["params"]} == trainable  # momentum copies are left out


def test_dino_freezes_its_last_layer_then_clips_gradients():
    method = make("dino", freeze_last_layer_epochs=1, clip_grad=0.01)  # 10 epochs: progress 0.1 = 1 epoch
    loss_of(method, make_batch(method), 0.0).backward()
    method.after_backward(0.05)  # epoch 0.5: frozen
    assert all(p.grad is None for p in method.head.last_layer.parameters())
    norms = [p.grad.norm() for p in method.parameters() if p.grad is not None]
    assert norms and max(norms) <= 0.01 + 1e-6  # every tensor's gradient clipped
    method.zero_grad()
    loss_of(method, make_batch(method), 0.2).backward()
    method.after_backward(0.2)  # epoch 2: the last layer learns again
    assert any(p.grad is not None for p in method.head.last_layer.parameters())


def test_moco_momentum_schedules():
    constant = make("moco", momentum=0.99)
    assert constant.tau(0.0) == constant.tau(0.7) == 0.99
    cosine = make("moco", momentum=0.99, momentum_schedule="cosine")
    assert cosine.tau(0.0) == pytest.approx(0.99) and cosine.tau(0.5) == pytest.approx(0.995)
