"""View recipes: how one augmented view of every image in a batch is drawn.

A `ViewSpec` carries the whole per-view pipeline (crop scale, ratio and output size, flip,
colour jitter, grayscale, blur, solarize), so a method states exactly what each of its views
is: SimCLR's two identical views, BYOL's asymmetric blur/solarize pair, DINO's global and
local crops, or a `raw` view (the image itself at the view size) for methods that want no
augmentation. `ssl_models.augment.BatchAugment` executes a list of them on the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ViewSpec:
    """One view: RandomResizedCrop + flip, then colour jitter -> grayscale -> blur -> solarize.

    Every probability is per image. Colour jitter follows SimCLR's strength s: brightness,
    contrast and saturation factors uniform in [max(0, 1 - 0.8 s), 1 + 0.8 s], hue shift
    uniform in [-0.2 s, 0.2 s] turns. Blur sigma is drawn in `blur_sigma` (pixels of the view).
    """

    size: int  # output side in pixels
    scale: tuple[float, float] = (1.0, 1.0)  # crop area range (fractions of the image)
    ratio: tuple[float, float] = (1.0, 1.0)  # crop aspect-ratio range (w / h)
    flip_prob: float = 0.0
    jitter_prob: float = 0.0
    jitter_strength: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.size <= 0 or not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"bad ViewSpec {self}: size > 0 and 0 < scale min <= max <= 1 required")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"bad ViewSpec {self}: crop ratio must satisfy 0 < min <= max")
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"bad ViewSpec {self}: {name} must be in [0, 1]")
        if self.jitter_strength < 0 or not 0 <= self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"bad ViewSpec {self}: jitter strength >= 0 and 0 <= blur sigma min <= max required")

    @classmethod
    def from_augment(cls, aug: Any, size: int, scale: tuple[float, float] | None = None,
                     **overrides: Any) -> ViewSpec:
        """The shared recipe of the `augment` settings at `size` (SimCLR's view), with `overrides`.

        `scale` None = `aug.crop_scale`; overrides name any field, e.g. `blur_prob=1.0`.
        """
        spec = cls(size=size, scale=tuple(scale or aug.crop_scale), ratio=tuple(aug.crop_ratio),
                   flip_prob=aug.flip_prob, jitter_prob=aug.jitter_prob, jitter_strength=aug.strength,
                   grayscale_prob=aug.grayscale_prob, blur_sigma=tuple(aug.blur_sigma))
        return dataclasses.replace(spec, **overrides) if overrides else spec

    @classmethod
    def raw(cls, size: int) -> ViewSpec:
        """No augmentation: the whole image, resized to `size` (the identity at the image's size)."""
        return cls(size=size)

    def geometry_only(self) -> ViewSpec:
        """The same crop and flip, no colour operation (pretext tasks that must see true colours)."""
        return dataclasses.replace(self, jitter_prob=0.0, jitter_strength=0.0, grayscale_prob=0.0,
                                   blur_prob=0.0, solarize_prob=0.0)


def global_and_local(aug: Any, size: int, *, global_blur: tuple[float, float] = (1.0, 0.1),
                     global_solarize: tuple[float, float] = (0.0, 0.2), local_blur: float = 0.5,
                     n_local: int | None = None) -> list[ViewSpec]:
    """Multi-crop (DINO/SwAV): 2 global views at `size` with the BYOL-style asymmetric blur and
    solarize, then `n_local` (default `aug.local_crops`) local views at `aug.local_size`."""
    globals_ = [ViewSpec.from_augment(aug, size, blur_prob=b, solarize_prob=s)
                for b, s in zip(global_blur, global_solarize, strict=True)]
    local = ViewSpec.from_augment(aug, aug.local_size, tuple(aug.local_crop_scale), blur_prob=local_blur)
    return globals_ + [local] * (aug.local_crops if n_local is None else n_local)


def symmetric_views(aug: Any, size: int, blur_prob: float = 0.0) -> list[ViewSpec]:
    """Two identically distributed views of the shared recipe (SimCLR, MoCo, ...)."""
    view = ViewSpec.from_augment(aug, size, blur_prob=blur_prob)
    return [view, view]
