"""Helpers every loss shares: compute in (at least) float32, outside autocast."""

from __future__ import annotations

import torch
from torch import Tensor


def f32(x: Tensor) -> Tensor:
    """`x` in at least float32: bf16/fp16 are upcast, float64 stays (for exact reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def no_autocast(t: Tensor) -> torch.autocast:
    """A context that disables autocast on `t`'s device type, so matmuls stay in float32."""
    return torch.autocast(device_type=t.device.type, enabled=False)
