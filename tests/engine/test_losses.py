"""The SSL losses against plain loop implementations, plus limits and precision behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from sslflow.ssl_models.losses import byol_loss, dino_loss, info_nce_loss, nt_xent_loss

DTYPES = [torch.float64, torch.float32]


pytestmark = pytest.mark.usefixtures("single_thread")


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.pow(2).sum().sqrt() * b.pow(2).sum().sqrt())


# ---------------------------------------------------------------- plain reference implementations


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float, extra: torch.Tensor | None = None):
    z = list(z1) + list(z2)
    negs = list(extra) if extra is not None else []
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        p = (i + b) % n
        num = torch.exp(cos(z[i], z[p]) / t)
        den = sum(torch.exp(cos(z[i], z[k]) / t) for k in range(n) if k != i)
        den = den + sum(torch.exp(cos(z[i], e) / t) for e in negs)
        total = total - torch.log(num / den)
    return total / n


def ref_info_nce(q, k, queue, t):
    total = 0.0
    for i in range(len(q)):
        qi = q[i] / q[i].norm()
        ki = k[i] / k[i].norm()
        pos = torch.exp(torch.dot(qi, ki) / t)
        neg = sum(torch.exp(torch.dot(qi, queue[j]) / t) for j in range(len(queue)))
        total = total - torch.log(pos / (pos + neg))
    return total / len(q)


def ref_byol(p, z):
    return sum(2 - 2 * cos(p[i], z[i]) for i in range(len(p))) / len(p)


def ref_dino(student, teacher, center, ts, tt):
    total, terms = 0.0, 0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            pair = 0.0
            for b in range(t.shape[0]):
                et = torch.exp((t[b] - center) / tt)
                pt = et / et.sum()
                es = torch.exp(s[b] / ts)
                log_ps = torch.log(es / es.sum())
                pair = pair - (pt * log_ps).sum()
            total = total + pair / t.shape[0]
            terms += 1
    return total / terms


# ------------------------------------------------------------------------------------ NT-Xent


@pytest.mark.parametrize("dtype", DTYPES)
def test_nt_xent_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g, dtype=dtype), torch.randn(6, 5, generator=g, dtype=dtype)
    for t in (0.1, 0.5, 1.0):
        torch.testing.assert_close(nt_xent_loss(z1, z2, t).double(), ref_nt_xent(z1, z2, t).double(),
                                   **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nt_xent_extra_negatives_match_reference(dtype):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(4, 5, generator=g, dtype=dtype), torch.randn(4, 5, generator=g, dtype=dtype)
    extra = torch.randn(7, 5, generator=g, dtype=dtype)
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.3, extra_negatives=extra).double(),
                               ref_nt_xent(z1, z2, 0.3, extra).double(), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nt_xent_gradient_matches_reference(dtype):
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(5, 4, generator=g, dtype=dtype, requires_grad=True)
    z2 = torch.randn(5, 4, generator=g, dtype=dtype, requires_grad=True)
    got = torch.autograd.grad(nt_xent_loss(z1, z2, 0.2), (z1, z2))
    want = torch.autograd.grad(ref_nt_xent(z1, z2, 0.2), (z1, z2))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol(dtype))


def test_nt_xent_limits():
    # Aligned positives, mutually orthogonal pairs: loss -> 0 as T -> 0.
    e = torch.eye(8)[:4]
    assert nt_xent_loss(e, e.clone(), 0.05).item() < 1e-6
    # Positives orthogonal but negatives aligned with the anchor: large loss.
    assert nt_xent_loss(e, torch.roll(e, 1, 0), 0.05).item() > 10
    # Uniformly random embeddings at T=1 in high dim: close to log(2B - 1).
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(16, 4096, generator=g), torch.randn(16, 4096, generator=g)
    assert abs(nt_xent_loss(z1, z2, 1.0).item() - math.log(31)) < 0.05
    # Scale invariance (cosine similarity).
    torch.testing.assert_close(nt_xent_loss(3 * z1, 0.5 * z2, 0.2), nt_xent_loss(z1, z2, 0.2))


# ------------------------------------------------------------------------------------ InfoNCE


@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce_matches_reference(dtype):
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(5, 6, generator=g, dtype=dtype), torch.randn(5, 6, generator=g, dtype=dtype)
    queue = torch.nn.functional.normalize(torch.randn(9, 6, generator=g, dtype=dtype), dim=1)
    for t in (0.07, 0.2, 1.0):
        torch.testing.assert_close(info_nce_loss(q, k, queue, t).double(),
                                   ref_info_nce(q, k, queue, t).double(), **tol(dtype))


def test_info_nce_keys_are_stop_gradient():
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3, requires_grad=True)
    queue = torch.nn.functional.normalize(torch.randn(6, 3), dim=1)
    info_nce_loss(q, k, queue, 0.2).backward()
    assert q.grad is not None and k.grad is None


def test_info_nce_limits():
    q = torch.eye(8)[:4]
    queue = torch.eye(8)[4:]  # orthogonal to every query
    assert info_nce_loss(q, q.clone(), queue, 0.05).item() < 1e-6
    # Positive orthogonal, one negative equal to the query: ~log(1 + exp(1/T)) large.
    assert info_nce_loss(q, torch.roll(q, 1, 0), torch.cat([q, queue]), 0.05).item() > 10


# ------------------------------------------------------------------------------------ BYOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_byol_matches_reference(dtype):
    g = torch.Generator().manual_seed(5)
    p, z = torch.randn(7, 4, generator=g, dtype=dtype), torch.randn(7, 4, generator=g, dtype=dtype)
    torch.testing.assert_close(byol_loss(p, z).double(), ref_byol(p, z).double(), **tol(dtype))


def test_byol_limits_and_stop_gradient():
    p = torch.randn(5, 8, requires_grad=True)
    z = (2 * p).detach().requires_grad_(True)
    assert abs(byol_loss(p, z).item()) < 1e-6
    assert abs(byol_loss(p, -z).item() - 4) < 1e-5
    byol_loss(p, torch.randn(5, 8) + z).backward()
    assert p.grad is not None and z.grad is None


# ------------------------------------------------------------------------------------ DINO


@pytest.mark.parametrize("dtype", DTYPES)
def test_dino_matches_reference(dtype):
    g = torch.Generator().manual_seed(6)
    b, k = 3, 10
    student = [torch.randn(b, k, generator=g, dtype=dtype) for _ in range(5)]
    teacher = [torch.randn(b, k, generator=g, dtype=dtype) for _ in range(2)]
    center = torch.randn(1, k, generator=g, dtype=dtype)
    for ts, tt in ((0.1, 0.04), (0.2, 0.07), (1.0, 1.0)):
        torch.testing.assert_close(dino_loss(student, teacher, center, ts, tt).double(),
                                   ref_dino(student, teacher, center[0], ts, tt).double(), **tol(dtype))


def test_dino_gradient_only_through_student():
    student = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(4, 6, requires_grad=True) for _ in range(2)]
    dino_loss(student, teacher, torch.zeros(6), 0.1, 0.04).backward()
    assert all(s.grad is not None for s in student)
    assert all(t.grad is None for t in teacher)


def test_dino_limits():
    # Teacher equals student distribution: the loss is the entropy; a one-hot sharp teacher
    # matched by a sharp student gives ~0.
    onehot = 50 * torch.eye(4)
    assert dino_loss([onehot, onehot], [onehot, onehot], torch.zeros(4), 0.1, 0.04).item() < 1e-6
    with pytest.raises(ValueError):
        dino_loss([onehot], [onehot], torch.zeros(4), 0.1, 0.04)


# ------------------------------------------------------------------------------------ precision


def test_losses_are_fp32_and_close_under_bf16_autocast():
    g = torch.Generator().manual_seed(7)
    z1, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1)
    s = [torch.randn(16, 32, generator=g) for _ in range(4)]
    center = torch.randn(1, 32, generator=g)
    cases = {
        "nt_xent": lambda a, b: nt_xent_loss(a, b, 0.1),
        "info_nce": lambda a, b: info_nce_loss(a, b, queue, 0.07),
        "byol": byol_loss,
        "dino": lambda a, b: dino_loss([a, b, *s[2:]], [b, a], center, 0.1, 0.04),
    }
    for name, fn in cases.items():
        a16, b16 = z1.bfloat16(), z2.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn(a16, b16)
        assert got.dtype == torch.float32, name
        # Same as fp32 math on the bf16-rounded inputs (autocast is off inside the loss) ...
        torch.testing.assert_close(got, fn(a16.float(), b16.float()), rtol=1e-5, atol=1e-5, msg=name)
        # ... and close to the full-precision loss.
        torch.testing.assert_close(got, fn(z1, z2), rtol=2e-2, atol=2e-2, msg=name)
