"""Networks the SSL methods put on top of the backbone, and their momentum (EMA) copies.

`ProjectionMLP` is the SimCLR/MoCo/BYOL projector and BYOL predictor; `DINOHead` is DINO's
bottleneck MLP with a weight-normalised prototype layer. The momentum helpers are shared by
MoCo (key encoder), BYOL (target) and DINO (teacher), so that the methods stay independent of
each other.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


class ProjectionMLP(nn.Module):
    """`num_layers` linear layers: (Linear-BN-ReLU) x (num_layers - 1), then Linear [-BN].

    Hidden linears have no bias when followed by BN (BN's shift replaces it). `last_bn` adds
    an affine-free BN on the output (SimCLR v2 / MoCo v3 style); `use_bn=False` gives the
    BN-free Linear-ReLU-...-Linear head of MoCo v2.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 last_bn: bool = False, use_bn: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ProjectionMLP needs num_layers >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not use_bn))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_dim) -> (N, out_dim)."""
        return self.net(x)


class DINOHead(nn.Module):
    """DINO projection head: MLP (GELU) -> L2-normalised bottleneck -> prototype logits.

    The last layer is weight-normalised (`w = g * v / ||v||` per output row, through
    `torch.nn.utils.parametrizations.weight_norm`, so the state dict round-trips) with its
    norm g fixed to 1 and frozen when `norm_last_layer` (the DINO default, which stabilises
    training): the logits are then cosine similarities to K prototypes.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead needs num_layers >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):  # DINO's init (timm's trunc_normal_, std 0.02)
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_dim) features -> (N, out_dim) logits."""
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of `module` (same weights and buffers, `requires_grad=False`)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """In place: target_params <- tau * target_params + (1 - tau) * online_params.

    Buffers (BatchNorm running statistics) are copied from the online network, so a target
    used in eval mode has statistics that match its weights as well as the online ones do.
    One fused `_foreach` kernel per list; no host synchronisation.
    """
    t_params, o_params = list(target.parameters()), list(online.parameters())
    t_bufs, o_bufs = list(target.buffers()), list(online.buffers())
    if len(t_params) != len(o_params) or len(t_bufs) != len(o_bufs):
        raise ValueError("ema_update_: target and online networks have different structures")
    torch._foreach_lerp_(t_params, o_params, 1.0 - tau)
    if t_bufs:
        torch._foreach_copy_(t_bufs, o_bufs)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL/DINO EMA schedule: tau = 1 - (1 - base) * (cos(pi * progress) + 1) / 2.

    tau = base at progress 0 and rises to 1 at progress 1 (the target freezes as training ends).
    """
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
