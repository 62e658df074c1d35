"""LARS against a plain per-tensor reference, parameter groups, and the lr schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sslflow.ssl_models.optim import LARS, WarmupCosine, build_optimizer, param_groups


def reference_lars_step(params, bufs, lr, momentum, wd, eta, adapt):
    """The textbook update, one tensor at a time."""
    for p, buf in zip(params, bufs, strict=True):
        g = p.grad + wd * p if wd else p.grad.clone()
        if adapt:
            w_norm, g_norm = p.norm(), g.norm()
            if w_norm > 0 and g_norm > 0:
                g = g * (eta * w_norm / g_norm)
        buf.mul_(momentum).add_(g)
        p.data.add_(buf, alpha=-lr)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def test_lars_matches_reference_over_several_steps():
    model, ref = _model(), _model()
    opt = LARS(param_groups(model, 1e-4), lr=0.5, momentum=0.9, eta=0.02)
    ref_groups = param_groups(ref, 1e-4)
    bufs = [[torch.zeros_like(p) for p in g["params"]] for g in ref_groups]
    x = torch.randn(16, 5)
    for _ in range(3):
        for m in (model, ref):
            m.zero_grad()
            m(x).pow(2).mean().backward()
        opt.step()
        with torch.no_grad():
            for g, b in zip(ref_groups, bufs, strict=True):
                reference_lars_step(g["params"], b, 0.5, 0.9, g["weight_decay"], 0.02, g["lars"])
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_bias_and_norm_parameters_get_no_decay_and_no_adaptation():
    groups = param_groups(_model(), 0.1)
    assert all(p.ndim == 2 for p in groups[0]["params"]) and groups[0]["lars"]
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_sgd_option_is_torch_sgd_with_the_same_groups():
    model = _model()
    opt = build_optimizer(model, "sgd", 0.1, 0.9, 5e-4)
    assert isinstance(opt, torch.optim.SGD) and [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "adam", 0.1, 0.9, 0.0)


def test_lars_state_dict_round_trip_continues_identically():
    a = _model()
    opt = LARS(param_groups(a, 1e-4), lr=0.1)
    x = torch.randn(8, 5)
    a(x).sum().backward()
    opt.step()
    b = copy.deepcopy(a)
    opt_b = LARS(param_groups(b, 1e-4), lr=0.1)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((a, opt), (b, opt_b)):
        m.zero_grad()
        m(x).sum().backward()
        o.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_warmup_cosine_schedule():
    s = WarmupCosine(warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0) and s(60) == pytest.approx(0.5)
    assert s(110) == pytest.approx(0.0, abs=1e-12) and s(500) == pytest.approx(0.0, abs=1e-12)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))
    assert WarmupCosine(0, 4)(2) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
