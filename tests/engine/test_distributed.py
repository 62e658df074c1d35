"""Data-parallel pretraining on the CPU: 2 gloo processes behave like 1 process with the whole batch.

One spawn of 2 ranks (module fixture) runs the collective checks, step 0 of every method in
float32 (the production path) and a few whole steps of every method in float64, saving
what each rank saw and computed; the tests compare that with a single process on the global
batch. A real `torchrun` run is then killed after an epoch and resumed with one process.
Kept small (width 8, 16 px, global batch 32) for a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import FAST, fast_params, method_params
from sslflow.cli import main as cli_main
from sslflow.ssl_models import distributed
from sslflow.ssl_models.methods import METHODS
from sslflow.ssl_models.store import DeviceBatches, ImageStore
from sslflow.ssl_models.train import CHECKPOINT, Pretrainer

WORLD = 2
ALL_METHODS = STEP0_METHODS = tuple(sorted(METHODS))
FLOAT64_STEPS = 3
WITHOUT_BATCHNORM = {"mae"}  # a ViT encoder and decoder: LayerNorm only, nothing to sync
GATHER_ROWS, GATHER_DIM = 3, 4
# float32 with another summation order (per-rank sums, synced BN) differs by ~5e-5 of a
# gradient's norm; a missing gradient path or unsynced statistics by orders of magnitude more.
# Gradients are compared against the norm of the whole gradient (a BatchNorm bias whose
# gradient nearly cancels has a tiny norm of its own: up to 4e-3 relative for rotation's and
# MAE's ResNet stems at step 0), and the float64 trajectory test holds every method to 1e-6
FLOAT32_TOL = 1e-3
# float64: MoCo and DINO round their targets to float32, hence not 1e-12
FLOAT64_TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Below this norm a difference is rounding, not an error: e.g. the gradient of a bias that a
#: following BatchNorm cancels is zero up to float32 rounding (~1e-8 per entry), on every rank.
ABS_TOL = 1e-6


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the size of a difference relative to the tensor's (0 if both are 0)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if b.norm() > 0 else float(a.norm())


def _assert_close_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float,
                          scale: float | None = None) -> None:
    """Each tensor within `tol` of its own norm, or of `scale` (e.g. the whole gradient's norm)."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        if value.is_floating_point():
            diff = float((got[name].double() - value.double()).norm())
            assert diff <= tol * (scale if scale is not None else float(value.double().norm())) + ABS_TOL, \
                f"{name}: relative error {_rel_err(got[name], value):.2e}"
        else:
            assert torch.equal(got[name], value), name


# ------------------------------------------------------------------------------ rank workers
def _gather_weights(rank: int) -> torch.Tensor:
    """Rank `rank`'s loss weights on the gathered tensor (known to every process)."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(WORLD * GATHER_ROWS, GATHER_DIM, generator=g, dtype=torch.float64)


def _rank_input(rank: int) -> torch.Tensor:
    return torch.arange(GATHER_ROWS * GATHER_DIM, dtype=torch.float64).view(GATHER_ROWS, GATHER_DIM) + 100 * rank


def _dropping_gather(x: torch.Tensor) -> torch.Tensor:
    """The known bug: all_gather, then put the local tensor back, so only its own loss reaches it."""
    parts = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _dropping_others(x: torch.Tensor) -> torch.Tensor:
    keep = [r for r in range(WORLD) if r != dist.get_rank()]
    return _dropping_gather(x).unflatten(0, (WORLD, -1))[keep].flatten(0, 1)


def _gather_grads(rank: int, gather) -> dict[str, torch.Tensor]:
    x = _rank_input(rank).requires_grad_()
    gathered = gather(x)
    (gathered * _gather_weights(rank)).sum().backward()
    return {"gathered": gathered.detach(), "grad": x.grad}


def _trainer(method: str, store_dir: str, run_dir: Path) -> Pretrainer:
    params = method_params(method, "pretrain.eval_every=0", "pretrain.export=false")
    return Pretrainer(ImageStore.open(store_dir), params, run_dir, progress_bar=False)


def _step0(method: str, store_dir: str, run_dir: Path) -> dict:
    """One forward/backward of the real Pretrainer on this rank's part of batch 0 (float32)."""
    trainer = _trainer(method, store_dir, run_dir)
    images = next(trainer.batches.epoch(0))
    loss = trainer.forward_backward(images, 0.0).loss
    return {
        "images": images,
        "loss": distributed.all_reduce_mean(loss.detach()),
        "grads": {n: p.grad for n, p in trainer.method.named_parameters() if p.grad is not None},
        "state": trainer.method.state_dict(),  # after the forward: queue, BN running statistics
        "sync_bn": sum(isinstance(m, distributed.CPUSyncBatchNorm) for m in trainer.method.modules()),
    }


class _Float64Views:
    """The trainer's augmentation with its views cast to float64 (the model is built in float64)."""

    def __init__(self, augment) -> None:
        self.augment = augment

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return [v.double() for v in self.augment(images, generator)]


def _float64_steps(method: str, store_dir: str, run_dir: Path) -> dict[str, torch.Tensor]:
    """The method's state after FLOAT64_STEPS full training steps (optimizer, EMA, queue, centre)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trainer = _trainer(method, store_dir, run_dir)
        trainer.augment = _Float64Views(trainer.augment)
        for _, images in zip(range(FLOAT64_STEPS), trainer.batches.epoch(0), strict=False):
            trainer.train_step(images)
        return trainer.method.state_dict()
    finally:
        torch.set_default_dtype(default)


def _worker(rank: int, port: int, store_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = Path(out_dir)
    with distributed.process_group(torch.device("cpu")):
        results: dict = {
            "gather": _gather_grads(rank, distributed.gather_with_grad),
            "dropping_gather": _gather_grads(rank, _dropping_gather),
            "others": distributed.others_with_grad(_rank_input(rank)),
        }
        for method in STEP0_METHODS:
            results[method] = _step0(method, store_dir, out / method)
        # the SimCLR check run with the known bug, to show that the check catches it
        distributed.others_with_grad, real = _dropping_others, distributed.others_with_grad
        try:
            results["simclr_dropping_gather"] = _step0("simclr", store_dir, out / "simclr-bug")
        finally:
            distributed.others_with_grad = real
        results["float64"] = {m: _float64_steps(m, store_dir, out / f"{m}-f64") for m in ALL_METHODS}
        torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, demo_stores) -> list[dict]:
    """What each of 2 spawned gloo ranks saw and computed (one spawn for the whole module)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(demo_stores["train"]), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------ collectives
def test_gather_with_grad_sums_every_ranks_gradient(two_ranks):
    """d(sum_r L_r)/dx_r = sum over ranks of their weights on x_r's rows; the known bug keeps only its own."""
    full = torch.cat([_rank_input(r) for r in range(WORLD)])
    total_weight = sum(_gather_weights(r) for r in range(WORLD))
    for r, res in enumerate(two_ranks):
        rows = slice(r * GATHER_ROWS, (r + 1) * GATHER_ROWS)
        torch.testing.assert_close(res["gather"]["gathered"], full)
        torch.testing.assert_close(res["gather"]["grad"], total_weight[rows])
        # the check has teeth: a gather that drops the other ranks' gradients fails it
        assert not torch.allclose(res["dropping_gather"]["grad"], total_weight[rows])
        torch.testing.assert_close(res["others"], _rank_input(1 - r))


# ------------------------------------------------------------------------------ equality with 1 process
@pytest.mark.parametrize("method", STEP0_METHODS)
def test_two_ranks_equal_one_process_with_the_whole_batch_at_step_0(two_ranks, method, demo_stores, tmp_path):
    """2 ranks x B == 1 process x 2B (float32): images, loss, gradients, the method's state after it."""
    single = _step0(method, str(demo_stores["train"]), tmp_path / "single")
    ranks = [res[method] for res in two_ranks]
    if method not in WITHOUT_BATCHNORM:
        assert all(r["sync_bn"] > 0 for r in ranks)  # BatchNorm is synced under DDP
    # each rank got its half of the global batch: disjoint and together the same images
    assert torch.equal(torch.cat([r["images"] for r in ranks]), single["images"])
    torch.testing.assert_close(ranks[0]["loss"], single["loss"], rtol=1e-5, atol=0)
    gradient_norm = float(torch.cat([g.double().flatten() for g in single["grads"].values()]).norm())
    _assert_close_tensors(ranks[0]["grads"], single["grads"], FLOAT32_TOL, scale=gradient_norm)
    for name, grad in ranks[0]["grads"].items():  # DDP: the same averaged gradient on every rank
        assert torch.equal(grad, ranks[1]["grads"][name]), name
    for r in ranks:  # MoCo queue (the gathered keys), synced BN running statistics
        _assert_close_tensors(r["state"], single["state"], FLOAT32_TOL)
    if method == "simclr":  # the same check fails for negatives gathered without their gradients
        with pytest.raises(AssertionError, match="relative error"):
            _assert_close_tensors(two_ranks[0]["simclr_dropping_gather"]["grads"], single["grads"], FLOAT32_TOL,
                                  scale=gradient_norm)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_two_ranks_follow_the_one_process_trajectory_in_float64(two_ranks, method, demo_stores, tmp_path):
    """Whole steps (optimizer, EMA targets, MoCo queue, DINO centre): identical up to rounding."""
    single = _float64_steps(method, str(demo_stores["train"]), tmp_path / "single")
    for res in two_ranks:
        _assert_close_tensors(res["float64"][method], single, FLOAT64_TOL)


# ------------------------------------------------------------------------------ sharding
@pytest.mark.parametrize("resident", [True, False])
def test_each_rank_gets_a_disjoint_slice_of_the_global_batch(tmp_path, resident):
    store = ImageStore.create(tmp_path / "s", 4, 4)
    images = np.zeros((40, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(40)  # row id in a pixel
    for part in np.split(images, [13, 30]):  # three shards
        store.add(part, [None] * len(part))
    budget = None if resident else 0

    def ids(rank: int, world: int, start: int = 0) -> list[list[int]]:
        batches = DeviceBatches(store, 8, torch.device("cpu"), seed=3, max_resident_bytes=budget,
                                rank=rank, world_size=world)
        assert len(batches) == 5  # global batches: the same steps per epoch for any number of ranks
        return [b[:, 0, 0, 0].tolist() for b in batches.epoch(1, start)]

    single, halves = ids(0, 1), [ids(r, WORLD) for r in range(WORLD)]
    assert [h0 + h1 for h0, h1 in zip(*halves, strict=True)] == single
    seen = [{i for batch in h for i in batch} for h in halves]
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 20
    assert ids(1, WORLD, start=3) == halves[1][3:]  # resume mid-epoch
    with pytest.raises(ValueError, match="not divisible by 3 ranks"):
        DeviceBatches(store, 8, torch.device("cpu"), seed=3, rank=0, world_size=3)


def test_not_launched_means_one_process_and_no_op_collectives(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    x = torch.randn(3, 2)
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather_with_grad(x) is x and distributed.all_gather(x) is x
    assert distributed.all_reduce_mean(x) is x and distributed.others_with_grad(x) is None
    assert not distributed.init_from_env(torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="every torchrun rank needs its own"):
        distributed.local_device(torch.device("cuda:0"))


# ------------------------------------------------------------------------------ torchrun
RUN = ("pretrain.method=moco", "pretrain.epochs=6", "pretrain.eval_every=6")  # 5 steps per epoch


def _cli(out: Path, stores: dict[str, Path], *extra: str) -> list[str]:
    return ["pretrain", "--data", str(stores["train"]), "--out", str(out), "--no-progress",
            "--eval-train", str(stores["train"]), "--eval-test", str(stores["test"]),
            *(a for kv in (*FAST, *RUN) for a in ("--set", kv)), *extra]


def _child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            children.append(int(stat.parent.name))
    return children


def _wait_for_epoch(checkpoint: Path, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["position"]["epoch"] >= 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"no epoch-end checkpoint (torchrun exit code {proc.poll()}):\n{log.read_text()[-3000:]}")


def test_torchrun_two_ranks_killed_after_an_epoch_resumes_on_one_process(tmp_path, demo_stores, capsys):
    """`sslflow pretrain` under torchrun (2 gloo ranks), kill -9 after an epoch, `--resume` in this process."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
                "-m", "sslflow.cli"]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*launcher, *_cli(run, demo_stores)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_epoch(run / CHECKPOINT, proc, log)
    finally:  # kill -9 both ranks (torchrun starts each in its own session), then torchrun
        for pid in _child_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
    assert not (run / "encoder.pt").exists(), "the run finished before it was killed"
    killed = torch.load(run / CHECKPOINT, weights_only=True)
    assert killed["world_size"] == WORLD
    epoch = killed["position"]["epoch"]
    assert killed["position"] == {"epoch": epoch, "batch_in_epoch": 0, "step": 5 * epoch}

    # end to end (torchrun, CLI, fit in float32) the first epoch is the single-process one
    class StopAfterEpoch1:
        def on_step(self, step, metrics): ...

        def on_epoch_end(self, e, metrics):
            if e == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Pretrainer(ImageStore.open(demo_stores["train"]), fast_params(*RUN), tmp_path / "single",
                   callbacks=[StopAfterEpoch1()], progress_bar=False).fit()
    single = torch.load(tmp_path / "single" / CHECKPOINT, weights_only=True)
    two_rank_loss = next(e["loss"] for e in killed["history"]["epochs"] if e["epoch"] == 1)
    # float32 rounding grows over the 5 steps (about 5e-4 here); the exact check is the float64 test above
    assert two_rank_loss == pytest.approx(single["history"]["epochs"][0]["loss"], rel=5e-3)
    assert killed["history"]["epochs"][0]["epoch"] == 0 and "knn_top1" in killed["history"]["epochs"][0]  # rank 0

    capsys.readouterr()
    assert cli_main(_cli(run, demo_stores, "--resume")) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[: printed.rindex("}") + 1])
    assert metrics["steps"] == 30 and metrics["epochs"] == 6
    history = json.loads((run / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == list(range(7))  # 0: kNN at init, by rank 0 of 2
    assert "knn_top1" in history["epochs"][-1] and (run / "encoder.pt2").is_file()
    assert torch.load(run / CHECKPOINT, weights_only=True)["world_size"] == 1
