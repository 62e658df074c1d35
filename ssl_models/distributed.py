"""Data-parallel training across processes (torchrun), and no-ops when there is only one.

`torchrun --nproc-per-node N` (or `--nnodes M --rdzv-endpoint HOST:PORT` on several
machines) starts N processes with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
in their environment; `init_from_env` joins them into one process group (NCCL on CUDA, gloo
on the CPU) and each rank uses `cuda:LOCAL_RANK`. Without those variables (or with
WORLD_SIZE=1) nothing here communicates and every helper returns its input unchanged, so a
single-process run computes exactly what it computed before this module existed.

The helpers the methods need are collectives with the right autograd:

* `gather_with_grad` / `others_with_grad`: contrastive negatives from every rank. The
  backward all-reduces the gradient and returns this rank's slice, because every rank's loss
  depends on this rank's embeddings; a gather that drops those gradients (e.g. a plain
  `dist.all_gather`, or keeping only the local slice's gradient) silently trains a different
  objective than the single-process one.
* `all_gather` (no gradient): MoCo keys, so every rank enqueues the same keys.
* `all_reduce_mean`: DINO's centre, the loss accumulators.

`convert_sync_batchnorm` makes BatchNorm normalise over the global batch: torch's
`nn.SyncBatchNorm` on CUDA, `CPUSyncBatchNorm` (the same statistics, gathered with autograd)
with gloo on the CPU, where torch's version refuses to run.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "CPUSyncBatchNorm",
    "all_gather",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "convert_sync_batchnorm",
    "gather_with_grad",
    "init_from_env",
    "is_main",
    "launched",
    "local_device",
    "main_first",
    "others_with_grad",
    "process_group",
    "rank",
    "same_on_all_ranks",
    "world_size",
    "wrap_ddp",
]


# ------------------------------------------------------------------------------ process group
def launched() -> bool:
    """True in a process that torchrun started as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: torch.device) -> torch.device:
    """`cuda` means this rank's GPU, `cuda:LOCAL_RANK`, under torchrun; otherwise unchanged.

    An explicit `cuda:N` with several ranks would put them all on one GPU (NCCL refuses
    that), so it is an error rather than a silent override.
    """
    if not launched() or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"device={device} names one GPU, but every torchrun rank needs its own; "
                         "use device=cuda (each rank then takes cuda:LOCAL_RANK)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes; True if this call created it.

    Idempotent and a no-op without torchrun (or with one process), so the training code can
    call it unconditionally.
    """
    if not launched() or not dist.is_available() or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def cleanup() -> None:
    """Leave the process group (NCCL warns at exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """`init_from_env` for the duration of the block; destroyed only if this block created it."""
    created = init_from_env(device)
    try:
        yield
    finally:
        if created:
            cleanup()


def world_size() -> int:
    """Ranks in the process group; 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's RANK (0 when absent).

    The fallback lets code that runs before the group exists or after it is destroyed
    (the CLI printing its result) still tell rank 0 from the others.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that logs, evaluates and writes files."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, then the others (e.g. a cache only rank 0 should write)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def same_on_all_ranks(value: int, device: torch.device) -> bool:
    """Whether every rank passes the same integer (a cheap consistency check, one collective)."""
    if world_size() == 1:
        return True
    t = torch.tensor([value, -value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == -int(t[1])


# ------------------------------------------------------------------------------ collectives
class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks and keeps this rank's slice.

    Rank r's loss L_r depends on every rank's input through the gathered tensor; the total
    gradient of sum_r L_r with respect to this rank's input is the sum over ranks of each
    rank's gradient for this rank's slice. Combined with DDP's gradient averaging that is
    exactly the gradient of the mean loss, i.e. of the single-process loss on the whole batch.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:  # type: ignore[override]
        g = torch.stack(grads).contiguous()
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """(B, ...) on every rank -> (world * B, ...) in rank order, differentiable for all ranks."""
    if world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x))


def others_with_grad(x: Tensor) -> Tensor | None:
    """The other ranks' `x`, concatenated in rank order, with gradients flowing back to them.

    None on one process: the natural `extra_negatives` of `nt_xent_loss`.
    """
    n = world_size()
    if n == 1:
        return None
    everyone = gather_with_grad(x).unflatten(0, (n, x.shape[0]))
    keep = [r for r in range(n) if r != rank()]
    return everyone[keep].flatten(0, 1)


@torch.no_grad()
def all_gather(x: Tensor, dim: int = 0) -> Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order (no gradient); `x` on one process."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean of `x` over ranks (a new tensor); `x` itself on one process.

    SUM then divide, because gloo has no AVG reduction.
    """
    if world_size() == 1:
        return x
    out = x.clone()
    dist.all_reduce(out)
    return out.div_(world_size())


# ------------------------------------------------------------------------------ modules
class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch for gloo/CPU ranks, where `nn.SyncBatchNorm` refuses.

    Training mode with several ranks: every rank's per-channel mean, biased variance and
    count are gathered with gradients (one collective forward, one backward) and combined
    with the parallel-variance formula, as torch's CUDA kernel does; running statistics get
    the unbiased variance, as in `nn.BatchNorm`. Otherwise (eval mode, one process) it is
    plain BatchNorm. Deliberately not an `nn.SyncBatchNorm` subclass: DDP rejects those on
    CPU modules.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
        var_r, mean_r = torch.var_mean(input, dim=dims, correction=0)  # (C,) each
        count_r = torch.full_like(mean_r, input.numel() / input.shape[1])
        means, variances, counts = gather_with_grad(torch.stack([mean_r, var_r, count_r])[None]).unbind(1)
        counts = counts.detach()
        count = counts.sum(0)
        mean = (counts * means).sum(0) / count
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / count  # biased, over all ranks
        out = (input - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def _to_cpu_sync(bn: _BatchNorm) -> CPUSyncBatchNorm:
    """The same parameters and buffers (shared, not copied) in a CPUSyncBatchNorm."""
    new = CPUSyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        return _to_cpu_sync(module)
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `module` normalises over all ranks' samples; state_dict keys unchanged.

    Why: with per-rank BN, N ranks x B would normalise over B samples and differ from one
    process x N*B; synced BN keeps the objective independent of the number of ranks. The
    momentum/EMA copies are converted too, so their statistics stay identical on all ranks.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` with several ranks; `module` itself otherwise.

    No buffer sync before each forward: the buffers (BN running statistics, MoCo queue, DINO
    centre) are updated identically on every rank from synced statistics and gathered
    tensors, so re-broadcasting them from rank 0 every step would only cost a collective.
    (The flag is `forward_sync_buffers` in recent PyTorch, `broadcast_buffers` before.)
    """
    if world_size() == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=device_ids, **{flag: False})

