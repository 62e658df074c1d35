"""Atomic checkpoints and the exported encoder.

A checkpoint is written to a temporary file in the same directory, fsynced, then renamed
over the previous one: a process killed at any instant (kill -9 included) leaves either the
old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslflow.ssl_models.backbones import SSLResNet, build_backbone


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path) -> None:
    """Temp files of a writer that was killed mid-save; never valid checkpoints."""
    if directory.is_dir():
        for f in directory.glob(".*.tmp"):
            f.unlink(missing_ok=True)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream the loop touches, so a resumed run draws the same numbers."""
    state = {
        "augment": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["augment"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def encoder_metadata(backbone: SSLResNet, image_size: int, mean, std) -> dict[str, Any]:
    return {
        "arch": backbone.arch,
        "width": backbone.width,
        "cifar_stem": backbone.cifar_stem,
        "feature_dim": backbone.feature_dim,
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
    }


def save_encoder(backbone: SSLResNet, run_dir: Path, image_size: int, mean, std) -> dict[str, Path]:
    """Write the backbone twice: a state dict with metadata (`encoder.pt`) and a
    `torch.export` program (`encoder.pt2`) that loads with plain PyTorch::

        encoder = torch.export.load("encoder.pt2").module()
        features = encoder(normalised_images)   # (N, 3, H, W) float -> (N, feature_dim)
    """
    meta = encoder_metadata(backbone, image_size, mean, std)
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    atomic_save({"meta": meta, "state_dict": state}, run_dir / "encoder.pt")
    cpu = build_backbone(meta["arch"], meta["width"], meta["cifar_stem"])
    cpu.load_state_dict(state)
    cpu.eval()
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(cpu, (example,), dynamic_shapes=({0: batch},))
    tmp = run_dir / f".encoder-{uuid.uuid4().hex}.tmp.pt2"  # torch.export wants the suffix
    torch.export.save(program, tmp)
    os.replace(tmp, run_dir / "encoder.pt2")
    return {"state_dict": run_dir / "encoder.pt", "exported": run_dir / "encoder.pt2"}


def load_encoder(path: Path) -> tuple[SSLResNet, dict[str, Any]]:
    """Rebuild the backbone saved by `save_encoder` (a run directory or `encoder.pt`)."""
    path = Path(path)
    file = path / "encoder.pt" if path.is_dir() else path
    blob = torch.load(file, map_location="cpu", weights_only=True)
    meta = blob["meta"]
    model = build_backbone(meta["arch"], meta["width"], meta["cifar_stem"])
    model.load_state_dict(blob["state_dict"])
    return model, meta
