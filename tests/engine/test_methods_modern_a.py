"""SwAV, SimSiam, Barlow Twins and VICReg: their losses against plain references written from
the papers' pseudocode (values and gradients in float64), Sinkhorn's marginals and its split
over ranks, and what each method does besides its loss (SwAV's prototypes and queue, SimSiam's
stop-gradient and collapse indicator, the redundancy terms' weights).

The generic checks (learning through the loop, bitwise resume after a crash and a kill -9,
2 gloo ranks = 1 process) run for these methods in test_every_method.py and test_distributed.py.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import free_port, method_params
from sslflow.ssl_models import distributed
from sslflow.ssl_models.errors import ConfigError
from sslflow.ssl_models.losses.clustering import sinkhorn_knopp, swav_loss
from sslflow.ssl_models.losses.redundancy import barlow_twins_loss, vicreg_loss
from sslflow.ssl_models.losses.siamese import negative_cosine_loss
from sslflow.ssl_models.methods import METHODS, Batch, embedding_std
from sslflow.ssl_models.store import ImageStore
from sslflow.ssl_models.train import CHECKPOINT, Pretrainer, build_method, train_context

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = {"rtol": 1e-10, "atol": 1e-12}


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """d loss / d input for each input; None where the input gets no gradient (a stop-gradient)."""
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def assert_same_value_and_gradient(fn, ref, *inputs: torch.Tensor) -> None:
    """fn(*inputs) == ref(*inputs) in float64, and so are their gradients."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    ys = [x.detach().clone().requires_grad_() for x in inputs]
    got, want = fn(*xs), ref(*ys)
    torch.testing.assert_close(got, want, **F64)
    for a, b in zip(grads(got, *xs), grads(want, *ys), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **F64)


# ---------------------------------------------------------------- plain references (float64)


def ref_sinkhorn(scores: torch.Tensor, eps: float, niters: int) -> torch.Tensor:
    """SwAV, Appendix A.1 (PyTorch-like pseudocode), verbatim: scaling vectors r/u and c/sum."""
    Q = torch.exp(scores / eps).T
    Q = Q / Q.sum()
    K, B = Q.shape
    r, c = torch.ones(K, dtype=Q.dtype) / K, torch.ones(B, dtype=Q.dtype) / B
    for _ in range(niters):
        u = Q.sum(dim=1)
        Q = Q * (r / u).unsqueeze(1)
        Q = Q * (c / Q.sum(dim=0)).unsqueeze(0)
    return (Q / Q.sum(dim=0, keepdim=True)).T


def ref_swav(scores: list[torch.Tensor], codes: list[torch.Tensor], t: float) -> torch.Tensor:
    """SwAV's official training loop: for each assignment crop, the mean over the other crops
    of the batch-mean cross-entropy between its codes and their softmax(x / T); then the mean."""
    total = 0.0
    for i, q in enumerate(codes):
        sub = 0.0
        for v, x in enumerate(scores):
            if v == i:
                continue
            ce = 0.0
            for b in range(x.shape[0]):
                e = torch.exp(x[b] / t)
                ce = ce - (q[b] * torch.log(e / e.sum())).sum()
            sub = sub + ce / x.shape[0]
        total = total + sub / (len(scores) - 1)
    return total / len(codes)


def ref_negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam, Algorithm 1: D(p, z) = -(normalize(p) * normalize(z.detach())).sum(dim=1).mean()."""
    z = z.detach()
    total = 0.0
    for i in range(p.shape[0]):
        total = total - (p[i] * z[i]).sum() / (p[i].pow(2).sum().sqrt() * z[i].pow(2).sum().sqrt())
    return total / p.shape[0]


def ref_barlow(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins, Algorithm 1, with the official code's BatchNorm (biased variance + eps)
    as the per-dimension normalisation: c_ij = sum_b a_bi b_bj / N; sum (1 - c_ii)^2 + lambda
    sum_{i != j} c_ij^2."""
    n, d = z1.shape

    def bn(z):
        cols = []
        for j in range(d):
            mean = z[:, j].sum() / n
            var = ((z[:, j] - mean) ** 2).sum() / n
            cols.append((z[:, j] - mean) / torch.sqrt(var + eps))
        return torch.stack(cols, dim=1)

    a, b = bn(z1), bn(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = (a[:, i] * b[:, j]).sum() / n
            loss = loss + ((1 - c) ** 2 if i == j else lambd * c**2)
    return loss


def ref_vicreg(z_a: torch.Tensor, z_b: torch.Tensor, lam: float, mu: float, nu: float) -> torch.Tensor:
    """VICReg, Algorithm 1, with the official code's halving of the variance term."""
    n, d = z_a.shape
    sim_loss = ((z_a - z_b) ** 2).sum() / (n * d)
    std_loss = 0.0
    cov_loss = 0.0
    for z in (z_a, z_b):
        std = torch.sqrt(z.var(dim=0) + 1e-4)
        std_loss = std_loss + torch.relu(1 - std).mean() / 2
        z = z - z.mean(dim=0)
        for i in range(d):
            for j in range(d):
                if i != j:
                    cov_loss = cov_loss + ((z[:, i] * z[:, j]).sum() / (n - 1)) ** 2 / d
    return lam * sim_loss + mu * std_loss + nu * cov_loss


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def cosines(n: int, k: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, k) cosines of unit embeddings against unit prototypes, what SwAV feeds Sinkhorn."""
    return unit(n, d, seed=seed) @ unit(k, d, seed=seed + 100).T


def centered_orthonormal(n: int, d: int) -> torch.Tensor:
    """(n, d) columns of mean 0, unit norm and mutually orthogonal (uncorrelated dimensions)."""
    a = torch.randn(n, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    q, _ = torch.linalg.qr(a - a.mean(0))  # combinations of centred columns stay centred
    return q


# ---------------------------------------------------------------- Sinkhorn-Knopp


@pytest.mark.parametrize(("eps", "iters"), [(0.05, 3), (0.1, 1), (0.03, 10)])
def test_sinkhorn_matches_the_paper_pseudocode(eps, iters):
    scores = cosines(12, 5, seed=1)
    torch.testing.assert_close(sinkhorn_knopp(scores, eps, iters), ref_sinkhorn(scores, eps, iters), **F64)


def test_sinkhorn_marginals():
    n, k = 24, 6
    scores = cosines(n, k, seed=2)
    scores[:, 0] = 1.0  # every sample closest to prototype 0: the collapse equipartition prevents
    q = sinkhorn_knopp(scores, 0.05, 3)
    assert q.shape == (n, k) and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n, dtype=q.dtype), **F64)  # each sample: a distribution
    # each prototype gets N/K of the samples: exactly at convergence, and after 3 iterations
    # already far closer than a per-sample softmax, which gives prototype 0 nearly everything
    plain = torch.softmax(scores / 0.05, dim=1)
    assert (q.sum(dim=0) - n / k).abs().max() < 0.25 * (plain.sum(dim=0) - n / k).abs().max()
    converged = sinkhorn_knopp(scores, 0.05, 1000)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((k,), n / k, dtype=q.dtype), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(n, dtype=q.dtype), **F64)


def test_sinkhorn_is_finite_where_exp_of_the_scores_would_overflow():
    scores = 0.6 + 0.4 * cosines(16, 4, seed=3)  # cosines in [0.2, 1]
    scores[0, 0] = 1.0
    assert torch.isinf(torch.exp(scores.float() / 0.01)).any()  # the official exp(s / eps) in float32
    q = sinkhorn_knopp(scores.float(), 0.01, 3)
    assert torch.isfinite(q).all() and q.dtype == torch.float32
    torch.testing.assert_close(q.double(), ref_sinkhorn(scores, 0.01, 3), rtol=1e-4, atol=1e-6)
    # far below the best cosine every weight underflows; the result stays finite (no 0 / 0)
    assert torch.isfinite(sinkhorn_knopp(cosines(16, 4, seed=3).float(), 0.002, 3)).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sinkhorn_knopp(scores.bfloat16(), 0.05, 3).dtype == torch.float32


class ThreadRanks:
    """`sum_over_ranks` for ranks simulated by threads: every rank deposits its tensor, all read
    the sum in rank order (what an all-reduce returns), then the slots are reused."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * n

    def reducer(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t
            self.barrier.wait()
            total = self.slots[0]
            for s in self.slots[1:]:
                total = total + s
            self.barrier.wait()
            return total
        return reduce


@pytest.mark.parametrize("split", [[6, 6], [3, 9], [4, 4, 4]])
def test_sinkhorn_split_over_ranks_equals_one_process(split):
    """Each rank passes its rows and the global count; the sums over ranks make the union's codes."""
    scores = cosines(sum(split), 5, seed=4)
    whole = sinkhorn_knopp(scores, 0.05, 3)
    parts = scores.split(split)
    ranks = ThreadRanks(len(split))
    out: list[torch.Tensor | None] = [None] * len(split)

    def run(r: int) -> None:
        out[r] = sinkhorn_knopp(parts[r], 0.05, 3, total_samples=len(scores), sum_over_ranks=ranks.reducer(r))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(split))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat(out), whole, **F64)
    # the global count matters: a rank normalising by its own rows alone gets other codes
    assert not torch.allclose(sinkhorn_knopp(parts[0], 0.05, 3), whole[: split[0]])


# ---------------------------------------------------------------- SwAV loss


def test_swav_loss_matches_the_official_loop_values_and_gradients():
    b, k, t = 5, 7, 0.1
    scores = [cosines(b, k, seed=s) for s in range(4)]  # 2 global + 2 local crops
    codes = [ref_sinkhorn(s, 0.05, 3) for s in scores[:2]]

    def ours(*xs):
        return swav_loss(list(xs), codes, t)

    def ref(*xs):
        return ref_swav(list(xs), codes, t)

    assert_same_value_and_gradient(ours, ref, *scores)
    # the composition SwAV trains: codes from Sinkhorn of the same scores, detached
    xs = [s.clone().requires_grad_() for s in scores]
    loss = swav_loss(xs, [sinkhorn_knopp(x, 0.05, 3) for x in xs[:2]], t)
    assert all(g is not None for g in grads(loss, *xs))


def test_swav_loss_takes_no_gradient_through_the_codes_and_checks_its_views():
    scores = [cosines(4, 3, seed=s).requires_grad_() for s in range(2)]
    codes = [torch.softmax(s.detach(), 1).requires_grad_() for s in scores]
    swav_loss(scores, codes, 0.1).backward()
    assert all(c.grad is None for c in codes) and all(s.grad is not None for s in scores)
    with pytest.raises(ValueError):
        swav_loss(scores[:1], codes[:1], 0.1)


# ---------------------------------------------------------------- SimSiam loss


def test_negative_cosine_matches_the_paper_values_and_gradients():
    g = torch.Generator().manual_seed(5)
    p, z = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert_same_value_and_gradient(negative_cosine_loss, ref_negative_cosine, p, z)
    symmetric = (negative_cosine_loss(p, z) + negative_cosine_loss(z, p)) / 2
    torch.testing.assert_close(symmetric, (ref_negative_cosine(p, z) + ref_negative_cosine(z, p)) / 2, **F64)


def test_negative_cosine_stop_gradient_and_limits():
    p = torch.randn(5, 8, requires_grad=True)
    z = (3 * p).detach().requires_grad_()
    assert negative_cosine_loss(p, z).item() == pytest.approx(-1, abs=1e-6)
    assert negative_cosine_loss(p, -z).item() == pytest.approx(1, abs=1e-6)
    negative_cosine_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


# ---------------------------------------------------------------- Barlow Twins loss


@pytest.mark.parametrize("lambd", [0.0051, 0.5])
def test_barlow_twins_matches_the_paper_values_and_gradients(lambd):
    g = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    assert_same_value_and_gradient(lambda a, b: barlow_twins_loss(a, b, lambd).loss,
                                   lambda a, b: ref_barlow(a, b, lambd), z1, z2)
    terms = barlow_twins_loss(z1, z2, lambd, scale=0.1)
    torch.testing.assert_close(terms.loss, 0.1 * (terms.on_diagonal + lambd * terms.off_diagonal), **F64)
    torch.testing.assert_close(barlow_twins_loss(z1, z2, 0.0).loss, terms.on_diagonal, **F64)


def test_barlow_twins_limits():
    # equal views with decorrelated dimensions: C = I (up to BN's eps), the loss ~0
    z = 3 * centered_orthonormal(64, 8) + 5
    assert barlow_twins_loss(z, z.clone(), 0.0051).loss.item() < 1e-6
    # every dimension a copy of one: the off-diagonal term is D (D - 1)
    col = torch.randn(64, 1, dtype=torch.float64)
    assert barlow_twins_loss(col.repeat(1, 8), col.repeat(1, 8), 1.0).off_diagonal.item() == pytest.approx(56, rel=1e-4)


# ---------------------------------------------------------------- VICReg loss


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 3.0, 0.5)])
def test_vicreg_matches_the_paper_values_and_gradients(weights):
    lam, mu, nu = weights
    g = torch.Generator().manual_seed(7)
    z1 = 0.5 * torch.randn(9, 4, generator=g, dtype=torch.float64)  # std < 1: the hinge is active
    z2 = 2.0 * torch.randn(9, 4, generator=g, dtype=torch.float64)
    assert_same_value_and_gradient(
        lambda a, b: vicreg_loss(a, b, invariance_weight=lam, variance_weight=mu, covariance_weight=nu).loss,
        lambda a, b: ref_vicreg(a, b, lam, mu, nu), z1, z2)
    t = vicreg_loss(z1, z2, invariance_weight=lam, variance_weight=mu, covariance_weight=nu)
    torch.testing.assert_close(t.loss, lam * t.invariance + mu * t.variance + nu * t.covariance, **F64)
    torch.testing.assert_close(t.invariance, F.mse_loss(z1, z2), **F64)


def test_vicreg_limits():
    z = 20 * centered_orthonormal(64, 8)  # uncorrelated, every std 20 / sqrt(63), above 1
    t = vicreg_loss(z, z.clone())
    assert t.invariance.item() == 0 and t.variance.item() == 0 and t.covariance.item() < 1e-20
    collapsed = vicreg_loss(torch.ones(16, 4, dtype=torch.float64), torch.ones(16, 4, dtype=torch.float64))
    assert collapsed.variance.item() == pytest.approx(1 - 1e-2)  # (1 - sqrt(0 + 1e-4)), both views halved


# ---------------------------------------------------------------- the methods

BATCH, SIZE = 8, 16


def make(name: str, *overrides: str, steps_per_epoch: int = 2):
    settings = method_params(name, f"pretrain.batch_size={BATCH}", "pretrain.epochs=4", *overrides)
    ctx = train_context(settings, SIZE, steps_per_epoch)
    return build_method(settings, ctx, torch.device("cpu"))


def make_batch(method, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(BATCH, 3, s.size, s.size, generator=g) for s in method.views()]
    images = torch.randint(0, 256, (BATCH, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)
    return Batch(views, images, method.ctx.mean, method.ctx.std)


def test_registered_with_their_families():
    assert {n: METHODS[n].family for n in ("swav", "simsiam", "barlow", "vicreg")} == {
        "swav": "clustering", "simsiam": "siamese", "barlow": "redundancy reduction",
        "vicreg": "redundancy reduction"}


def test_swav_views_are_two_global_and_the_local_crops_with_blur_everywhere():
    m = make("swav", "augment.local_crops=3", "pretrain.swav.blur_prob=0.3")
    views = m.views()
    assert [v.size for v in views] == [SIZE, SIZE, 8, 8, 8]
    assert all(v.blur_prob == 0.3 and v.solarize_prob == 0.0 for v in views)
    out = m(make_batch(m), 0.0)
    assert out.loss.ndim == 0 and {"embedding_std", "prototype_entropy"} <= set(out.metrics)


def test_swav_prototypes_are_unit_vectors_and_frozen_during_the_first_epoch():
    m = make("swav", "pretrain.swav.freeze_prototypes_epochs=1")  # 4 epochs of 2 steps
    w = m.prototypes.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    before = w.detach().clone()
    for step in range(4):
        progress = step / 8
        opt.zero_grad()
        m(make_batch(m, seed=step), progress).loss.backward()
        m.after_backward(progress)
        assert (w.grad is None) == (step < 2), step  # epoch 0: no gradient, the optimizer skips it
        opt.step()
        m.after_step(progress)
        torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]))  # normalised after each step
        assert torch.equal(w, before) == (step < 2), step


def test_swav_queue_fills_from_its_start_epoch_and_is_used_once_full():
    m = make("swav", "pretrain.swav.queue_size=16", "pretrain.swav.queue_start_epoch=1")
    # 2 steps per epoch, batch 8: filling from step 2, full (16 = 2 batches) from step 4
    assert [m.queue_filling(s / 8) for s in range(8)] == [False] * 2 + [True] * 6
    assert [m.queue_in_use(s / 8) for s in range(8)] == [False] * 4 + [True] * 4
    assert "queue" in m.state_dict() and m.queue.shape == (2, 16, 32)
    previous = m.queue.clone()
    for step in range(6):
        m(make_batch(m, seed=step), step / 8)
        if step < 2:
            assert not m.queue.any(), step
        else:  # the newest batch first, the older ones shifted back
            torch.testing.assert_close(m.queue.norm(dim=2)[:, :BATCH], torch.ones(2, BATCH))
            assert torch.equal(m.queue[:, BATCH:], previous[:, :BATCH])
        previous = m.queue.clone()
    # in use: the queued embeddings join the batch in Sinkhorn, only the batch's codes are kept
    scores = [cosines(BATCH, 64, d=32, seed=s).float() for s in (8, 9)]
    w = m.prototypes.weight.detach()
    codes = m._assignments(tuple(scores), w, 4 / 8)
    for i in range(2):
        with_queue = sinkhorn_knopp(torch.cat([m.queue[i] @ w.T, scores[i]]), m.cfg.epsilon, 3)[-BATCH:]
        torch.testing.assert_close(codes[i], with_queue)
        assert not torch.allclose(codes[i], sinkhorn_knopp(scores[i], m.cfg.epsilon, 3))
    assert all(torch.equal(a, sinkhorn_knopp(s, m.cfg.epsilon, 3)) for a, s in
               zip(m._assignments(tuple(scores), w, 3 / 8), scores, strict=True))  # not full yet


def test_swav_queue_must_hold_a_batch():
    with pytest.raises(ConfigError, match=r"pretrain\.swav\.queue_size"):
        method_params("swav", "pretrain.batch_size=32", "pretrain.swav.queue_size=16")
    method_params("swav", "pretrain.batch_size=32", "pretrain.swav.queue_size=0")  # no queue


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> ImageStore:
    """64 images of 16 px: two steps of 32 per epoch."""
    from sslflow.tasks.data.demo import CLASSES, generate_demo

    images, labels = generate_demo(8, size=16, seed=3)
    store = ImageStore.create(tmp_path_factory.mktemp("tiny") / "train", 16, 16)
    store.add(images[:64], [CLASSES[i] for i in labels[:64]])
    return store


class Snapshots:
    """The prototypes at each epoch end, of the trainer set after construction."""

    def __init__(self) -> None:
        self.trainer: Pretrainer | None = None
        self.prototypes: dict[int, torch.Tensor] = {}

    def on_step(self, step, metrics):
        assert {"embedding_std", "prototype_entropy"} <= set(metrics)

    def on_epoch_end(self, epoch, metrics):
        self.prototypes[epoch] = self.trainer.method.prototypes.weight.detach().clone()


def test_swav_through_the_loop_prototypes_frozen_then_learning(tiny_store, tmp_path):
    params = method_params("swav", "pretrain.epochs=2", "pretrain.eval_every=0", "pretrain.export=false")
    snaps = Snapshots()
    trainer = Pretrainer(tiny_store, params, tmp_path / "run", callbacks=[snaps], progress_bar=False)
    snaps.trainer = trainer
    initial = trainer.method.prototypes.weight.detach().clone()
    trainer.fit()
    assert torch.equal(snaps.prototypes[1], initial)  # epoch 1 (2 steps): frozen
    assert not torch.equal(snaps.prototypes[2], initial)
    torch.testing.assert_close(snaps.prototypes[2].norm(dim=1), torch.ones(initial.shape[0]))


def test_swav_resume_with_the_queue_in_use_is_bitwise(tiny_store, tmp_path):
    """Queue filling at steps 2-3 and in use from step 4; crash at step 4, resume from step 3."""
    params = method_params("swav", "pretrain.epochs=3", "pretrain.checkpoint_every=3", "pretrain.eval_every=0",
                           "pretrain.export=false", "pretrain.swav.queue_start_epoch=1")

    class Crash:
        def on_step(self, step, metrics):
            if step == 4:
                raise KeyboardInterrupt

        def on_epoch_end(self, epoch, metrics): ...

    full = Pretrainer(tiny_store, params, tmp_path / "full", progress_bar=False).fit()
    assert full.method.queue.any()
    with pytest.raises(KeyboardInterrupt):
        Pretrainer(tiny_store, params, tmp_path / "crash", callbacks=[Crash()], progress_bar=False).fit()
    assert torch.load(tmp_path / "crash" / CHECKPOINT, weights_only=True)["position"]["step"] == 3
    resumed = Pretrainer(tiny_store, params, tmp_path / "crash", resume=True, progress_bar=False).fit()
    a, b = full.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# SwAV under DDP with the queue in use (the generic test_distributed runs the demo profile,
# whose queue starts later): 2 gloo ranks x 16 follow 1 process x 32 for 4 float64 steps.
SWAV_QUEUE = ("pretrain.swav.queue_start_epoch=0", "pretrain.swav.queue_size=64", "pretrain.eval_every=0",
              "pretrain.export=false")


def _swav_float64_steps(store_dir: str, run_dir: Path, steps: int = 4) -> dict[str, torch.Tensor]:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trainer = Pretrainer(ImageStore.open(store_dir), method_params("swav", *SWAV_QUEUE), run_dir,
                             progress_bar=False)
        augment = trainer.augment
        trainer.augment = lambda images, g: [v.double() for v in augment(images, g)]
        for _, images in zip(range(steps), trainer.batches.epoch(0), strict=False):
            trainer.train_step(images)
        assert trainer.method.queue_in_use((steps - 1) / trainer.total_steps)
        return trainer.method.state_dict()
    finally:
        torch.set_default_dtype(default)


def _swav_rank(rank: int, port: int, store_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed.process_group(torch.device("cpu")):
        state = _swav_float64_steps(store_dir, Path(out_dir) / f"run{rank}")
        torch.save(state, Path(out_dir) / f"rank{rank}.pt")


def test_swav_with_the_queue_two_ranks_follow_one_process(demo_stores, tmp_path):
    mp.spawn(_swav_rank, args=(free_port(), str(demo_stores["train"]), str(tmp_path)), nprocs=2, join=True)
    single = _swav_float64_steps(str(demo_stores["train"]), tmp_path / "single")
    for r in range(2):
        state = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert state.keys() == single.keys()
        for k, v in single.items():
            if v.is_floating_point():
                assert (state[k] - v).norm() <= 1e-6 * v.norm() + 1e-9, k
            else:
                assert torch.equal(state[k], v), k


def test_simsiam_projector_ends_in_batchnorm_and_the_predictor_is_a_bottleneck():
    m = make("simsiam", "pretrain.simsiam.proj_layers=3", "pretrain.simsiam.pred_hidden_dim=8")
    bn = m.projector.net[-1]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine
    linears = [mod for mod in m.predictor.modules() if isinstance(mod, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(32, 8), (8, 32)]
    assert sum(isinstance(mod, torch.nn.Linear) for mod in m.projector.modules()) == 3
    batch = make_batch(m)
    out = m(batch, 0.0)
    z1 = m.projector(m.backbone(batch.views[0]))
    torch.testing.assert_close(out.metrics["embedding_std"], embedding_std(z1))
    assert -1 <= out.loss.item() <= 1


def test_simsiam_is_the_symmetric_loss_with_a_stop_gradient_on_the_targets():
    m = make("simsiam")
    batch = make_batch(m)
    params = [p for p in m.parameters() if p.requires_grad]
    got = grads(m(batch, 0.0).loss, *params)

    def manual(stop_gradient: bool) -> torch.Tensor:
        x1, x2 = batch.views
        z1, z2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
        t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
        p1, p2 = m.predictor(z1), m.predictor(z2)
        return -(F.cosine_similarity(p1, t2).mean() + F.cosine_similarity(p2, t1).mean()) / 2

    for a, b in zip(got, grads(manual(True), *params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    without = grads(manual(False), *params)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(got, without, strict=True))
    assert embedding_std(torch.ones(4, 8)).item() == 0  # the collapse indicator of a collapsed output


def test_barlow_and_vicreg_views_and_weights():
    for name in ("barlow", "vicreg"):
        m = make(name, f"pretrain.{name}.blur_probs=[0.7, 0.2]", f"pretrain.{name}.solarize_probs=[0.0, 0.3]")
        assert [(v.blur_prob, v.solarize_prob) for v in m.views()] == [(0.7, 0.0), (0.2, 0.3)]
    batch = make_batch(make("barlow"))
    only_on_diag = make("barlow", "pretrain.barlow.off_diagonal_weight=0", "pretrain.barlow.loss_scale=1")(batch, 0.0)
    torch.testing.assert_close(only_on_diag.loss, only_on_diag.metrics["on_diagonal"])
    scaled = make("barlow", "pretrain.barlow.off_diagonal_weight=0", "pretrain.barlow.loss_scale=0.1")(batch, 0.0)
    torch.testing.assert_close(scaled.loss, 0.1 * only_on_diag.loss)
    inv_only = make("vicreg", "pretrain.vicreg.variance_weight=0", "pretrain.vicreg.covariance_weight=0",
                    "pretrain.vicreg.invariance_weight=1")(batch, 0.0)
    torch.testing.assert_close(inv_only.loss, inv_only.metrics["invariance"])
    assert {"variance", "covariance", "embedding_std"} <= set(inv_only.metrics)


def test_redundancy_losses_see_each_view_in_its_own_backbone_call():
    """As the official code: BatchNorm statistics per view (not over the two views together)."""
    m = make("vicreg")
    calls = []
    m.backbone.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    m(make_batch(m), 0.0)
    assert calls == [BATCH, BATCH]
    assert math.isfinite(m(make_batch(m), 0.0).loss.item())
