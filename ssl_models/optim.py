"""Optimisers and learning-rate schedule for pretraining: LARS, SGD, AdamW; warm-up + cosine.

LARS (You et al., 2017) as SimCLR/BYOL use it: SGD with momentum whose update of each weight
tensor is scaled by a trust ratio ||w|| / ||g||. Biases and BatchNorm parameters are
excluded from both weight decay and the trust ratio. The whole update is a handful of
`torch._foreach_*` calls with no host synchronisation (the trust ratio stays on the device).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD + momentum + weight decay + layer-wise trust ratio (`lars=False` groups skip it)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02, lars: bool = True) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "lars": lars}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars"]:
                w_norms = torch._foreach_norm(params)
                g_norms = torch._foreach_norm(grads)
                ratios = [
                    torch.where((w > 0) & (g > 0), group["eta"] * w / g, torch.ones_like(w))
                    for w, g in zip(w_norms, g_norms, strict=True)
                ]
                grads = torch._foreach_mul(grads, ratios)
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights get decay (and LARS adaptation); biases and norm parameters get neither.

    The default of `SSLMethod.param_groups`, for plain modules (fine-tuning, tests).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]


def build_optimizer(groups: nn.Module | list[dict], name: str, lr: float, momentum: float = 0.9,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)) -> Optimizer:
    """`lars` | `sgd` | `adamw` over parameter groups (`SSLMethod.param_groups`, or a module whose
    groups are then the default decay / no-decay split with `weight_decay`).

    Groups carry their own `weight_decay` and a `lars` flag (read by LARS only). AdamW decays
    decoupled from the gradient (Loshchilov & Hutter), the MAE / ViT convention.
    """
    if isinstance(groups, nn.Module):
        groups = param_groups(groups, weight_decay)
    groups = [dict(g) for g in groups if g["params"]]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    for g in groups:
        g.pop("lars", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    raise ValueError(f"unknown optimizer {name!r} (lars, sgd, adamw)")


class WarmupCosine:
    """lr multiplier: linear warm-up from ~0 over `warmup_steps`, then cosine decay to 0.

    A callable object (not a lambda) so `LambdaLR.state_dict()` saves it with the checkpoint.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - self.warmup_steps, span) / span))
