"""sRGB <-> CIE L*a*b* (D65) on the device, for the methods that split colour from lightness.

Colorization predicts a*b* from L*; CMC contrasts the L* view of an image with its a*b* view.
The conversion is the standard one, written once here:

1. sRGB (IEC 61966-2-1) -> linear RGB: c / 12.92 up to 0.04045, ((c + 0.055) / 1.055)^2.4 above;
2. linear RGB -> XYZ with the sRGB primaries and the D65 white (`RGB_TO_XYZ`, the matrix as
   Lindbloom derives it from the primaries; its rows sum to the white point `D65_WHITE`);
3. XYZ -> L*a*b* relative to D65 with the exact CIE constants epsilon = (6/29)^3 = 216/24389
   and kappa = (29/3)^3 = 24389/27 (skimage and OpenCV round them to 0.008856 and 7.787 x 116):
   f(t) = t^(1/3) above epsilon, (kappa t + 16) / 116 below; L* = 116 f(Y) - 16,
   a* = 500 (f(X) - f(Y)), b* = 200 (f(Y) - f(Z)).

L* is in [0, 100]; a* and b* of sRGB colours lie in about [-86, 98] and [-108, 95]. Every
function takes and returns (..., 3, H, W) tensors (channel dimension -3), computes in at least
float32 outside autocast (a bf16 cube root would cost a unit of L*), uses only elementwise
operations with Python constants (no device constant is built per call, no host sync) and
keeps float64 for exact tests. Inputs are clamped to the valid range first, so an
out-of-range value (an interpolated view, a prediction) never produces a NaN.

`tie_to_luma_` keeps an encoder that is trained on gray images (the L* channel) a function of
the luma of what it sees, so that it is evaluated on RGB images exactly as on their gray versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sslflow.ssl_models.augment import GRAY_WEIGHTS

__all__ = ["D65_WHITE", "EPSILON", "KAPPA", "RGB_TO_XYZ", "XYZ_TO_RGB", "first_rgb_conv", "lab_to_rgb",
           "lab_to_xyz", "linear_to_srgb", "rgb_to_lab", "srgb_to_linear", "tie_to_luma_", "xyz_to_lab"]

#: linear sRGB -> CIE XYZ (D65), rows X, Y, Z (Lindbloom, from the sRGB primaries and D65).
RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
              (0.2126729, 0.7151522, 0.0721750),
              (0.0193339, 0.1191920, 0.9503041))


def _inverse(m: tuple[tuple[float, float, float], ...]) -> tuple[tuple[float, float, float], ...]:
    """The inverse of a 3x3 matrix (adjugate / determinant), in Python floats."""
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return ((((e * i - f * h) / det), ((c * h - b * i) / det), ((b * f - c * e) / det)),
            (((f * g - d * i) / det), ((a * i - c * g) / det), ((c * d - a * f) / det)),
            (((d * h - e * g) / det), ((b * g - a * h) / det), ((a * e - b * d) / det)))


#: Its exact inverse (Lindbloom publishes it rounded: 3.2404542, -1.5371385, ...), so that
#: `lab_to_rgb(rgb_to_lab(x)) == x` to float64 rounding.
XYZ_TO_RGB = _inverse(RGB_TO_XYZ)
#: The D65 reference white (X, Y, Z), the row sums of RGB_TO_XYZ.
D65_WHITE = (0.95047, 1.0, 1.08883)
EPSILON = 216 / 24389  # (6/29)^3
KAPPA = 24389 / 27  # (29/3)^3


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _mix(m: tuple[tuple[float, float, float], ...], x: Tensor) -> Tensor:
    """3x3 matrix times the channel vector of every pixel, with scalar multiply-adds (no matmul:
    exact in float64 and free of TF32/bf16 on CUDA)."""
    c0, c1, c2 = x.unbind(-3)
    return torch.stack([c0 * r[0] + c1 * r[1] + c2 * r[2] for r in m], dim=-3)


def srgb_to_linear(rgb: Tensor) -> Tensor:
    """Gamma-encoded sRGB in [0, 1] (clamped) -> linear RGB."""
    c = _f32(rgb).clamp(0.0, 1.0)
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(lin: Tensor) -> Tensor:
    """Linear RGB (clamped to [0, 1]) -> gamma-encoded sRGB."""
    c = _f32(lin).clamp(0.0, 1.0)
    return torch.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def xyz_to_lab(xyz: Tensor) -> Tensor:
    """CIE XYZ (Y of the white = 1) -> L*a*b* relative to D65."""
    def f(c: Tensor, white: float) -> Tensor:
        t = c.clamp_min(0.0) / white
        return torch.where(t > EPSILON, t.clamp_min(EPSILON) ** (1 / 3), (KAPPA * t + 16) / 116)

    fx, fy, fz = (f(c, w) for c, w in zip(_f32(xyz).unbind(-3), D65_WHITE, strict=True))
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_xyz(lab: Tensor) -> Tensor:
    """L*a*b* (D65) -> CIE XYZ; L* is clamped to [0, 100]."""
    lab = _f32(lab)
    l_star = lab.select(-3, 0).clamp(0.0, 100.0)
    fy = (l_star + 16) / 116
    fx = fy + lab.select(-3, 1) / 500
    fz = fy - lab.select(-3, 2) / 200

    def finv(f: Tensor) -> Tensor:
        return torch.where(f ** 3 > EPSILON, f ** 3, (116 * f - 16) / KAPPA)

    y = torch.where(l_star > KAPPA * EPSILON, fy ** 3, l_star / KAPPA)
    return torch.stack([finv(fx) * D65_WHITE[0], y * D65_WHITE[1], finv(fz) * D65_WHITE[2]], dim=-3)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """(..., 3, H, W) sRGB in [0, 1] -> (..., 3, H, W) L*a*b* (D65), in at least float32."""
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        return xyz_to_lab(_mix(RGB_TO_XYZ, srgb_to_linear(rgb)))


def lab_to_rgb(lab: Tensor) -> Tensor:
    """(..., 3, H, W) L*a*b* (D65) -> sRGB in [0, 1]; colours outside the sRGB gamut are clipped."""
    with torch.autocast(device_type=lab.device.type, enabled=False):
        return linear_to_srgb(_mix(XYZ_TO_RGB, lab_to_xyz(lab)))


def first_rgb_conv(module: nn.Module) -> nn.Conv2d:
    """The first convolution of `module` that reads 3 channels (a ResNet's `conv1`, a ViT's
    patch embedding): the layer that sees the colours."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            return m
    raise ValueError(f"{type(module).__name__} has no convolution over 3 input channels")


@torch.no_grad()
def tie_to_luma_(conv: nn.Conv2d, std: Sequence[float], weights: Sequence[float] = GRAY_WEIGHTS) -> None:
    """In place: make `conv` (which reads images normalised with `std`) see only their luma.

    Why: an encoder trained on gray images (R = G = B) gets no gradient for the colour
    differences of its first layer, which keep their random initial values; evaluated on
    colour images it then responds to colours it never learned about. With the weights of each
    filter tap tied to W_c = a w_c s_c (w the luma weights of `augment.rgb_to_grayscale`, s the
    normalisation std), the response to a normalised image is a * (sum_c w_c rgb_c - const):
    a function of its luma only. The encoder then computes on colour images exactly what it
    computes on their gray versions, and the conversion to gray travels with its weights (an
    exported encoder needs no extra step). a = sum_c W_c / s_c keeps the response to gray
    inputs (R = G = B), up to a constant that the following BatchNorm removes.
    """
    w = conv.weight
    total = sum(weights)  # torchvision's weights sum to 0.9999: normalised, so gray inputs map exactly
    scale = torch.tensor([wc / total * sc for wc, sc in zip(weights, std, strict=True)], dtype=w.dtype,
                         device=w.device)
    inv_std = torch.tensor([1 / sc for sc in std], dtype=w.dtype, device=w.device)
    a = torch.einsum("oc...,c->o...", w, inv_std)  # (out, kh, kw)
    w.copy_(a.unsqueeze(1) * scale.view(1, 3, *([1] * (w.ndim - 2))))
