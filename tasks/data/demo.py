"""The built-in demo set: small labeled images that need no network.

Ten classes of shapes and textures (disc, square, triangle, ring, cross, three stripe
orientations, checkerboard, dot grid) with random colours, position, size, rotation of the
pattern phase and pixel noise. Colour carries no class information, so a model has to learn
shape and texture: exactly the invariance SimCLR-style augmentation teaches. A random-init
encoder scores well above chance with kNN already; SSL pretraining adds clearly on top.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = (
    "disc", "square", "triangle", "ring", "cross",
    "hstripes", "vstripes", "dstripes", "checker", "dots",
)


def _mask(kind: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Foreground mask of one image; yy/xx are pixel-centre coordinates in [-1, 1]."""
    cy, cx = rng.uniform(-0.25, 0.25, size=2)
    r = rng.uniform(0.45, 0.75)
    y, x = (yy - cy) / r, (xx - cx) / r
    period = rng.uniform(0.3, 0.5)
    phase = rng.uniform(0, 2 * np.pi)
    inside = (np.abs(x) < 1) & (np.abs(y) < 1)
    if kind == "disc":
        return x**2 + y**2 < 1
    if kind == "square":
        return inside
    if kind == "triangle":
        return (y < 0.8) & (y > 1.7 * np.abs(x) - 0.9)
    if kind == "ring":
        d = np.sqrt(x**2 + y**2)
        return (d < 1) & (d > 0.55)
    if kind == "cross":
        return inside & ((np.abs(x) < 0.28) | (np.abs(y) < 0.28))
    if kind == "hstripes":
        return np.sin(yy * 2 * np.pi / period + phase) > 0
    if kind == "vstripes":
        return np.sin(xx * 2 * np.pi / period + phase) > 0
    if kind == "dstripes":
        return np.sin((xx + yy) * 2 * np.pi / (period * 1.4) + phase) > 0
    if kind == "checker":
        return (np.sin(xx * 2 * np.pi / period + phase) > 0) ^ (np.sin(yy * 2 * np.pi / period + phase) > 0)
    if kind == "dots":
        return (np.sin(xx * 2 * np.pi / period + phase) + np.sin(yy * 2 * np.pi / period + phase)) > 1.2
    raise ValueError(kind)


def generate_demo(n_per_class: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, size, size, 3), labels int64 (N,)) in class-interleaved order."""
    rng = np.random.default_rng(seed)
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    n = n_per_class * len(CLASSES)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    for i, label in enumerate(labels):
        mask = _mask(CLASSES[label], yy, xx, rng)[..., None]
        fg, bg = rng.uniform(0, 255, size=(2, 3))
        while np.abs(fg - bg).sum() < 150:  # keep the shape visible
            fg, bg = rng.uniform(0, 255, size=(2, 3))
        img = np.where(mask, fg, bg) + rng.normal(0, 12, size=(size, size, 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return images, labels


def write_demo_folder(root: str | Path, n_per_class: int, size: int = 32, seed: int = 0) -> Path:
    """Write the demo set as `<root>/<class>/<index>.png` (the folder layout sslflow ingests)."""
    from PIL import Image

    root = Path(root)
    images, labels = generate_demo(n_per_class, size, seed)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        d = root / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    return root
