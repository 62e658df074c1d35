"""Batched, on-device SSL augmentation with per-image random parameters.

Why not torchvision.transforms.v2 on a batch: it draws *one* set of parameters for the whole
batch (every image gets the same crop, the same jitter), which destroys the diversity the SSL
objectives rely on; running it per image is a Python loop over the batch. Here every op takes
per-image parameter tensors of shape (B,) and works on the whole batch at once: one view of
a batch is about 35 image-sized elementwise kernels plus ~40 tiny ones on (B,)-sized
parameters in eager mode, and a handful of fused kernels under ``torch.compile``.

Rules the hot path keeps (the training loop never waits on augmentation):

* no host synchronisation: no ``.item()``, ``.tolist()``, ``bool(tensor)``, no boolean-mask
  indexing (data-dependent shapes), no Python loop over images;
* "apply with probability p" folds the per-image coin into the op's parameter (factor 1,
  shift 0, sigma 0 are the identity) or into a ``torch.where``; an op is skipped entirely only
  when its probability in the config is exactly 0 (a Python check, never a tensor check);
* all randomness comes from the ``torch.Generator`` the caller passes (on the images'
  device), in one ``torch.rand`` call per batch with a fixed column layout per view (see
  ``_U_*`` below), so restoring the generator state reproduces the views bit for bit;
* everything after that single draw is a pure function of (images, uniforms), which is what
  ``torch.compile`` wants (``BatchAugment(..., compile=True)``).

Pipeline of one view (SimCLR / BYOL / DINO recipes), top to bottom:

1. random resized crop + horizontal flip, in one ``grid_sample`` per batch;
2. colour jitter with probability ``cfg.jitter_prob``, in the **fixed** order
   brightness -> contrast -> saturation -> hue. torchvision's ColorJitter shuffles the order
   on every call; we fix it because a per-image random order would mean computing all
   orders (or branching per image), and a per-batch random order would break per-image
   independence. This is a deliberate deviation from the SimCLR recipe;
3. random grayscale (``cfg.grayscale_prob``), still 3 channels;
4. Gaussian blur (``view.blur_prob``, sigma uniform in ``cfg.blur_sigma``, in output pixels);
5. solarize (``view.solarize_prob``, threshold 0.5);
6. normalise with the run's mean / std; the result is float32, channels_last on CUDA
   (contiguous on the CPU, see `model_layout`).

Images are (B, H, W, 3) uint8 NHWC (the store's layout) and become float32 in [0, 1]; every
colour op takes and returns images in [0, 1], clamped like torchvision's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from sslflow.ssl_models.views import ViewSpec

__all__ = [
    "CROP_ATTEMPTS",
    "NUM_UNIFORMS",
    "BatchAugment",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_size",
    "crop_boxes_from_uniform",
    "eval_view",
    "gaussian_blur",
    "gaussian_kernels",
    "model_layout",
    "normalize",
    "random_grayscale",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "solarize",
    "to_float",
]

# torchvision's luma weights (ITU-R 601-2 as torchvision spells them: 0.2989, not 0.299), so
# that contrast / saturation / grayscale match torchvision.transforms.v2.functional exactly.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

CROP_ATTEMPTS = 10  # like torchvision's RandomResizedCrop

# Column layout of the per-view uniforms: u[:, i] for one view. Fixed, whichever ops are on,
# so the generator advances by the same amount every step and a recipe change never shifts
# the random stream of an unrelated op.
_U_AREA = slice(0, CROP_ATTEMPTS)  # area fraction of each crop attempt
_U_RATIO = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)  # log aspect ratio of each attempt
_U_POS = slice(2 * CROP_ATTEMPTS, 2 * CROP_ATTEMPTS + 2)  # crop position (x, y)
_U_CROP = slice(0, 2 * CROP_ATTEMPTS + 2)  # everything `crop_boxes_from_uniform` reads
_U_FLIP = 22
_U_JITTER = 23  # jitter on/off
_U_BRIGHTNESS, _U_CONTRAST, _U_SATURATION, _U_HUE = 24, 25, 26, 27
_U_GRAY = 28
_U_BLUR, _U_SIGMA = 29, 30
_U_SOLARIZE = 31
NUM_UNIFORMS = 32


# --------------------------------------------------------------------------------------------
# dtype / layout
# --------------------------------------------------------------------------------------------


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1], channels_last in memory.

    The permute is free (NHWC storage *is* channels_last NCHW) and the cast is fused into the
    division, so this is one kernel.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) images, got shape {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).div(255.0)  # uint8 / float -> default float dtype
    return x if x.dtype == torch.float32 else x.to(torch.float32)


@lru_cache(maxsize=64)
def _channel_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(1, C, 1, 1) float32 constant on `device`, built once per (values, device).

    Cached because building a CUDA tensor from Python numbers is a blocking host-to-device
    copy; after the first call it costs nothing.
    """
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device)


def model_layout(device: torch.device) -> torch.memory_format:
    """The memory layout of network inputs on `device`: channels_last on CUDA, where cuDNN's
    NHWC kernels pay; contiguous NCHW elsewhere. On the CPU, torch 2.14's channels_last
    convolution backward corrupts the heap for narrow networks at larger images (a ResNet-18
    with an 8-channel first stage on 96 px inputs aborts in 3 of 3 runs; width 64 or NCHW
    inputs run cleanly), and NCHW is as fast there anyway."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """(x - mean) / std per channel; returns a new float tensor in `model_layout` (channels_last
    on CUDA, contiguous elsewhere).

    `mean`/`std` are 3 numbers (cached as device constants) or tensors broadcastable to
    (1, 3, 1, 1). Writing straight into a buffer of the target layout makes the change free.
    """
    if not isinstance(mean, torch.Tensor):
        mean = _channel_constant(tuple(float(m) for m in mean), x.device)
    if not isinstance(std, torch.Tensor):
        std = _channel_constant(tuple(float(s) for s in std), x.device)
    layout = model_layout(x.device)
    if x.requires_grad:  # out= does not support autograd; keep the function usable anyway
        return ((x - mean) / std).contiguous(memory_format=layout)
    out = torch.empty_like(x, memory_format=layout)
    torch.sub(x, mean, out=out)
    return out.div_(std)


def eval_view(
    images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """No augmentation: (B, H, W, 3) uint8 -> normalised (B, 3, H, W) float32 in `model_layout`."""
    return normalize(to_float(images), mean, std)


# --------------------------------------------------------------------------------------------
# geometry: random resized crop + flip
# --------------------------------------------------------------------------------------------


def crop_boxes_from_uniform(
    u: torch.Tensor,
    scale: Sequence[float],
    ratio: Sequence[float],
    aspect: float = 1.0,
) -> torch.Tensor:
    """RandomResizedCrop boxes from uniforms `u` of shape (n, 2 * CROP_ATTEMPTS + 2).

    Returns (n, 4) boxes ``(x0, y0, x1, y1)`` in normalised image coordinates (0 = left/top
    edge, 1 = right/bottom edge). Semantics follow torchvision: each attempt draws an area
    fraction uniformly in `scale` and an aspect ratio (width / height, in pixels)
    log-uniformly in `ratio`; the first attempt that fits inside the image wins (all attempts
    are computed at once and the first valid one is picked with ``argmax``, no sync); if none
    fits, a central crop of the whole image clamped to the ratio range. `aspect` is the source
    image's width / height, which converts pixel ratios into normalised box sides.

    Deviation from torchvision: boxes are continuous (sub-pixel), not rounded to integer
    pixels, so the area/ratio ranges hold exactly and positions are uniform in [0, 1 - side).
    """
    lo, hi = float(scale[0]), float(scale[1])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = lo + (hi - lo) * u[:, _U_AREA]
    r = torch.exp(log_lo + (log_hi - log_lo) * u[:, _U_RATIO])
    # w_px / h_px = r and w_px * h_px = area * W * H  =>  w = sqrt(area r / aspect), h = ...
    w = torch.sqrt(area * r / aspect)
    h = torch.sqrt(area * aspect / r)
    fits = (w <= 1.0) & (h <= 1.0)
    first = fits.to(torch.int32).argmax(dim=1, keepdim=True)  # index of the first True (0 if none)
    any_fit = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # torchvision's fallback: the whole image, clamped to the ratio range, centred.
    if aspect < ratio[0]:
        fw, fh = 1.0, aspect / ratio[0]
    elif aspect > ratio[1]:
        fw, fh = ratio[1] / aspect, 1.0
    else:
        fw, fh = 1.0, 1.0
    w = torch.where(any_fit, w, fw)
    h = torch.where(any_fit, h, fh)
    x0 = torch.where(any_fit, (1.0 - w) * u[:, _U_POS.start], (1.0 - fw) / 2)
    y0 = torch.where(any_fit, (1.0 - h) * u[:, _U_POS.start + 1], (1.0 - fh) / 2)
    return torch.stack((x0, y0, x0 + w, y0 + h), dim=1)


def sample_crop_boxes(
    n: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
    device: torch.device | str,
    aspect: float = 1.0,
) -> torch.Tensor:
    """Draw `n` RandomResizedCrop boxes, (n, 4) normalised ``(x0, y0, x1, y1)``.

    Uses ``2 * CROP_ATTEMPTS + 2`` uniforms per box; see `crop_boxes_from_uniform`.
    """
    u = torch.rand((n, _U_CROP.stop), generator=generator, device=device)
    return crop_boxes_from_uniform(u, scale, ratio, aspect)


def _clamp_to_box(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, pixels: int) -> torch.Tensor:
    """Clamp (B, S) grid coordinates to the pixel centres of the box [lo, hi] (normalised image
    coordinates, `pixels` along this axis): in grid units [2 lo - 1 + 1/n, 2 hi - 1 - 1/n],
    collapsed onto the box's centre when the box is narrower than one pixel."""
    centre = lo + hi - 1.0
    first = torch.minimum(2.0 * lo - 1.0 + 1.0 / pixels, centre).unsqueeze(1)
    last = torch.maximum(2.0 * hi - 1.0 - 1.0 / pixels, centre).unsqueeze(1)
    return torch.minimum(torch.maximum(g, first), last)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop `boxes` (B, 4) out of `x` (B, C, H, W), resize to size x size, flip where `flip`.

    Each image gets its own sampling grid: output pixel centre t in (-1, 1) reads input
    coordinate ``centre + half_extent * t`` (``grid_sample``'s normalised coordinates), and
    the horizontal flip is a negated x extent, so crop + resize + flip is one ``grid_sample``
    for the whole batch. The grid is built with broadcasting rather than ``affine_grid``,
    whose batched matmul may run in TF32 on CUDA (sub-pixel jitter) and is slow on CPU.

    Interpolation: bilinear, ``align_corners=False`` (the pixel-centre convention of
    torchvision's Resize). Edges: every sample coordinate is clamped to the crop box's
    outermost pixel centres (half a pixel inside the box's edges), so the outermost output
    pixels repeat the crop's edge pixels and never blend in pixels outside the box, exactly
    as crop-then-resize does for a pixel-aligned box (``padding_mode="border"`` alone would
    clamp at the *image* border and read up to half a pixel beyond the box). A box narrower
    than one pixel samples its centre line. Downscaling is *not* antialiased (torchvision's
    tensor Resize antialiases by default): irrelevant when crops are upscaled (CIFAR-size
    SSL), a mild aliasing when a large crop is shrunk a lot.
    """
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    x0, y0, x1, y1 = boxes.to(x.dtype).unbind(1)
    sign = 1.0 - 2.0 * flip.to(x.dtype)
    t = torch.arange(size, device=x.device, dtype=x.dtype).mul_(2.0 / size).add_(1.0 / size - 1.0)
    gx = torch.addcmul((x0 + x1 - 1.0).unsqueeze(1), ((x1 - x0) * sign).unsqueeze(1), t)  # (B, S)
    gy = torch.addcmul((y0 + y1 - 1.0).unsqueeze(1), (y1 - y0).unsqueeze(1), t)
    gx = _clamp_to_box(gx, x0, x1, w)
    gy = _clamp_to_box(gy, y0, y1, h)
    grid = torch.stack((gx.unsqueeze(1).expand(b, size, size), gy.unsqueeze(2).expand(b, size, size)), dim=3)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------------------------
# colour: each op takes images in [0, 1] and per-image parameters of shape (B,)
# --------------------------------------------------------------------------------------------


def _per_image(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) parameter -> (B, 1, 1, 1), in the images' dtype, for broadcasting."""
    return p.to(x.dtype).view(-1, 1, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, torchvision's weights and operation order."""
    r, g, b = x.unbind(1)
    wr, wg, wb = GRAY_WEIGHTS
    return r.mul(wr).add_(g, alpha=wg).add_(b, alpha=wb).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * factor, clamped (torchvision: blend with black)."""
    return (x * _per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-image mean of the grayscale image (a constant), clamped.

    The mean of the luma equals the luma of the per-channel means, so one (B, 3) reduction
    replaces a grayscale pass.
    """
    m = x.mean(dim=(2, 3))  # (B, 3)
    wr, wg, wb = GRAY_WEIGHTS
    mean = (m[:, 0] * wr + m[:, 1] * wg + m[:, 2] * wb).view(-1, 1, 1, 1)
    return torch.lerp(mean, x, _per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image, clamped (factor 0 = grayscale, 1 = identity)."""
    return torch.lerp(rgb_to_grayscale(x), x, _per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]) per image: RGB -> HSV -> RGB.

    Same HSV model as torchvision (value = max, chroma = max - min, hue from the max channel
    with its tie-breaking r, then g, then b). A hue rotation keeps value and chroma, so the
    way back is the closed form ``c_n = max - chroma * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 * hue) mod 6`` and n = 5, 3, 1 for R, G, B: piecewise-identical to
    torchvision's six-sector table, without its gather. Grays (chroma 0) are unchanged.
    Shift 0 is the identity up to float rounding (~1e-7).
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    max_is_r = maxc == r
    # hue in sixths of a turn, times chroma: (g-b), (b-r) + 2c, (r-g) + 4c by max channel
    hue6 = torch.where(
        max_is_r, g - b, torch.where(maxc == g, (b - r).add_(chroma, alpha=2.0), (r - g).add_(chroma, alpha=4.0))
    )
    hue6.div_(torch.where(chroma > 0, chroma, 1.0)).add_((6.0 * shift.to(x.dtype)).view(-1, 1, 1))
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = hue6.unsqueeze(1) + n
    k = k - 6.0 * torch.floor(k / 6.0)  # k mod 6 (torch.remainder is slow on CPU)
    t = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), t, value=-1.0)


def random_grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Grayscale (replicated to 3 channels) where `apply` (B,) is True, else unchanged."""
    return torch.where(apply.view(-1, 1, 1, 1), rgb_to_grayscale(x), x)


def solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Where `apply` (B,) is True, invert pixels >= threshold (x -> 1 - x), as torchvision.

    Images left alone get an unreachable threshold (2) instead of a second mask pass.
    """
    thr = torch.where(apply, threshold, 2.0).to(x.dtype).view(-1, 1, 1, 1)
    return torch.where(x >= thr, 1.0 - x, x)


# --------------------------------------------------------------------------------------------
# blur
# --------------------------------------------------------------------------------------------


def blur_kernel_size(size: int) -> int:
    """Odd kernel side of about 10% of the view side, at least 3 (SimCLR: 23 for 224 px).

    At 32 px this is 3 taps, so sigmas above ~1 px are truncated (the blur saturates near
    a 3-tap box filter); that is SimCLR's rule, kept for all sizes.
    """
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B,) sigmas -> (B, kernel_size) normalised 1-D Gaussian taps.

    sigma 0 (or tiny) gives the delta kernel, i.e. the identity: that is how "blur with
    probability p" is applied without indexing a subset.
    """
    t = torch.arange(kernel_size, device=sigma.device, dtype=torch.float32) - kernel_size // 2
    s = sigma.to(torch.float32).clamp_min(1e-6).unsqueeze(1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _reflect_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Reflect padding (edge pixel not repeated, like F.pad "reflect") along `dim` via cat."""
    n = x.shape[dim]
    left = x.narrow(dim, 1, pad).flip(dim)
    right = x.narrow(dim, n - 1 - pad, pad).flip(dim)
    return torch.cat((left, x, right), dim=dim)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with a per-image sigma (B,), reflect padding.

    Same kernel and padding as torchvision's gaussian_blur (which takes one sigma per call).
    Small kernels (<= 7 taps, e.g. 3 taps for 32 px views) are a sum of shifted slices
    weighted per image: exact float32, a handful of fusable elementwise ops, much faster
    than a grouped convolution on CPU. Larger kernels (224 px views: 23 taps) use one
    depthwise ``conv2d`` per direction with groups = B*C, one kernel per plane; on CUDA,
    cuDNN may run it in TF32 when ``torch.backends.cudnn.allow_tf32`` is on (the default),
    ~1e-3 relative error, irrelevant for a random augmentation.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    b, c, h, w = x.shape
    pad = kernel_size // 2
    if pad >= min(h, w):
        raise ValueError(f"kernel_size {kernel_size} too large for {h}x{w} images (reflect padding)")
    k = gaussian_kernels(sigma, kernel_size).to(x.dtype)  # (B, K)
    if kernel_size <= 7:
        taps = k.view(b, 1, 1, 1, kernel_size)
        for dim, size in ((3, w), (2, h)):  # horizontal, then vertical
            xp = _reflect_pad(x, pad, dim)
            out = xp.narrow(dim, 0, size) * taps[..., 0]
            for j in range(1, kernel_size):
                out = out.addcmul_(xp.narrow(dim, j, size), taps[..., j])
            x = out
        return x
    kc = k.unsqueeze(1).expand(b, c, kernel_size).reshape(b * c, kernel_size)  # one kernel per plane
    y = x.contiguous().view(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), kc.view(b * c, 1, 1, kernel_size), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), kc.view(b * c, 1, kernel_size, 1), groups=b * c)
    return y.view(b, c, h, w)


# --------------------------------------------------------------------------------------------
# the batch augmenter
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ViewPlan:
    """Everything one view needs, as Python numbers (constants for torch.compile)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_prob: float
    jitter_prob: float
    jitter_range: tuple[float, float]  # brightness / contrast / saturation factors
    hue_max: float
    grayscale_prob: float
    blur_prob: float
    blur_sigma: tuple[float, float]
    blur_kernel: int
    solarize_prob: float


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _augment_view(x: torch.Tensor, u: torch.Tensor, plan: _ViewPlan) -> torch.Tensor:
    """One view of the float batch `x` (B, 3, H, W) in [0, 1] from its uniforms `u` (B, 32).

    Pure function of its inputs (no generator, no sync): safe to torch.compile.
    Returns images in [0, 1], not yet normalised.
    """
    aspect = x.shape[-1] / x.shape[-2]
    boxes = crop_boxes_from_uniform(u[:, _U_CROP], plan.scale, plan.ratio, aspect)
    y = resized_crop(x, boxes, u[:, _U_FLIP] < plan.flip_prob, plan.size)

    if plan.jitter_prob > 0 and (plan.jitter_range != (1.0, 1.0) or plan.hue_max > 0):
        on = u[:, _U_JITTER] < plan.jitter_prob  # off = neutral factor 1 / shift 0
        lo, hi = plan.jitter_range
        if plan.jitter_range != (1.0, 1.0):
            y = adjust_brightness(y, torch.where(on, _uniform(u[:, _U_BRIGHTNESS], lo, hi), 1.0))
            y = adjust_contrast(y, torch.where(on, _uniform(u[:, _U_CONTRAST], lo, hi), 1.0))
            y = adjust_saturation(y, torch.where(on, _uniform(u[:, _U_SATURATION], lo, hi), 1.0))
        if plan.hue_max > 0:
            y = adjust_hue(y, torch.where(on, _uniform(u[:, _U_HUE], -plan.hue_max, plan.hue_max), 0.0))
    if plan.grayscale_prob > 0:
        y = random_grayscale(y, u[:, _U_GRAY] < plan.grayscale_prob)
    if plan.blur_prob > 0:
        sigma = _uniform(u[:, _U_SIGMA], *plan.blur_sigma)
        y = gaussian_blur(y, torch.where(u[:, _U_BLUR] < plan.blur_prob, sigma, 0.0), plan.blur_kernel)
    if plan.solarize_prob > 0:
        y = solarize(y, u[:, _U_SOLARIZE] < plan.solarize_prob)
    return y


class BatchAugment:
    """Draws len(views) augmented views of a uint8 batch, per-image random parameters.

    ``aug(images, generator)`` with images (B, H, W, 3) uint8 on the device and a generator
    on the same device returns one float32 (B, 3, view.size, view.size) tensor per `ViewSpec`
    (channels_last on CUDA, contiguous elsewhere), normalised with `mean` / `std`. Multi-crop
    is just more ViewSpecs (sizes may differ); each carries its own recipe (see
    `ssl_models.views`), applied in the fixed order brightness -> contrast -> saturation ->
    hue (torchvision shuffles it; see the module docstring).

    Randomness: one ``torch.rand((len(views), B, NUM_UNIFORMS), generator=...)`` per call;
    view i reads row block i with the fixed column layout ``_U_*``. `compile=True` wraps the
    per-view pipeline (everything after the draw) in ``torch.compile``.
    """

    def __init__(self, views: Sequence[ViewSpec], mean: Sequence[float], std: Sequence[float], *,
                 compile: bool = False) -> None:
        if not views:
            raise ValueError("BatchAugment needs at least one ViewSpec")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.views = tuple(views)
        self.plans: tuple[_ViewPlan, ...] = tuple(
            _ViewPlan(
                size=int(v.size),
                scale=(float(v.scale[0]), float(v.scale[1])),
                ratio=(float(v.ratio[0]), float(v.ratio[1])),
                flip_prob=float(v.flip_prob),
                jitter_prob=float(v.jitter_prob),
                jitter_range=(max(0.0, 1.0 - 0.8 * v.jitter_strength), 1.0 + 0.8 * v.jitter_strength),
                hue_max=min(0.2 * v.jitter_strength, 0.5),
                grayscale_prob=float(v.grayscale_prob),
                blur_prob=float(v.blur_prob),
                blur_sigma=(float(v.blur_sigma[0]), float(v.blur_sigma[1])),
                blur_kernel=blur_kernel_size(int(v.size)),
                solarize_prob=float(v.solarize_prob),
            )
            for v in self.views
        )
        self._view_fn = torch.compile(_augment_view) if compile else _augment_view

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return self.apply(images, self.draw(images.shape[0], generator, images.device))

    def draw(self, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The call's single random draw: (len(views), batch, NUM_UNIFORMS) uniforms."""
        return torch.rand((len(self.plans), batch, NUM_UNIFORMS), generator=generator, device=device)

    @torch.no_grad()
    def apply(self, images: torch.Tensor, u: torch.Tensor) -> list[torch.Tensor]:
        """The views of uint8 `images` from their uniforms `u` (a pure function of both)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        # float32 throughout, even if the caller forgot to leave an autocast region
        with torch.autocast(images.device.type, enabled=False):
            x = to_float(images)
            return [
                normalize(self._view_fn(x, u[i], plan), self.mean, self.std)
                for i, plan in enumerate(self.plans)
            ]
