"""Atomic checkpoints, read back without unpickling code, and the exported encoder.

A checkpoint is written to a temporary file in the same directory, fsynced, then renamed
over the previous one: a process killed at any instant (kill -9 included) leaves either the
old or the new checkpoint, never a torn one. Everything is serialised in memory first and
written by Python: PyTorch's C++ file writer aborted the whole process (exit 134) when the
disk filled up. A full disk is now a `DiskFull` (one line); files published together
(`publish`) are all written as temporaries before the first rename, so a full disk never
leaves `encoder.pt` without `encoder.pt2` and `metrics.json`.

Every file is read with `torch.load(..., weights_only=True)`: a checkpoint or encoder is data
(tensors, numbers, strings, lists, dicts), never code, so a crafted `last.pt` cannot run
anything. That is why the RNG states below are stored as tensors and plain numbers rather
than NumPy's pickled tuple.
"""

from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslflow.ssl_models.atomic import publish, remove_stale_temporaries
from sslflow.ssl_models.backbones import Backbone, backbone_from_metadata
from sslflow.ssl_models.errors import ConfigError, RunStateError

__all__ = ["ENCODER_FILE", "EXPORT_FILE", "atomic_save", "load_data", "load_encoder", "publish",
           "remove_stale_temporaries", "save_encoder", "torch_bytes"]

ENCODER_FILE, EXPORT_FILE = "encoder.pt", "encoder.pt2"


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save(obj)` to `path`, atomically."""
    publish(Path(path).parent, {Path(path).name: torch_bytes(obj)})


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_data(path: Path, what: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; an unreadable, truncated or non-data file is
    a `RunStateError` naming it (a pickle that would need code to load is refused, never run)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunStateError(f"{what} {path} does not exist") from None
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "Unsupported operand" in text or "not an allowed global" in text:
            raise RunStateError(f"{what} {path} holds Python objects that would run code when loaded; "
                                "refused without loading it (sslflow writes plain tensors and numbers)") from None
        raise RunStateError(f"{what} {path} is truncated or corrupt (not a torch file): delete it and resume "
                            "from an earlier copy, or start a new run") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        size = path.stat().st_size if path.exists() else 0
        reason = "empty" if size == 0 else f"truncated or corrupt ({type(e).__name__})"
        raise RunStateError(f"{what} {path} is {reason}: delete it and resume from an earlier copy, "
                            "or start a new run") from None


# ------------------------------------------------------------------------------------ RNG state
def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream the loop touches, as tensors and numbers (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "augment": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["augment"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ encoder
def encoder_metadata(backbone: Backbone, mean, std) -> dict[str, Any]:
    """The backbone's own metadata plus the normalisation its inputs need."""
    return {**backbone.metadata(), "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def save_encoder(backbone: Backbone, run_dir: Path, mean, std, *, export: bool = True,
                 extra: dict[str, bytes] | None = None) -> dict[str, Path]:
    """Write the backbone twice, together with `extra` files (`publish`): a state dict with
    metadata (`encoder.pt`) and, with `export`, a `torch.export` program (`encoder.pt2`) that
    loads with plain PyTorch::

        encoder = torch.export.load("encoder.pt2").module()
        features = encoder(normalised_images)   # (N, 3, H, W) float -> (N, feature_dim)
    """
    run_dir = Path(run_dir)
    meta = encoder_metadata(backbone, mean, std)
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    files = {ENCODER_FILE: torch_bytes({"meta": meta, "state_dict": state})}
    if export:
        cpu = backbone_from_metadata(meta)
        cpu.load_state_dict(state)
        cpu.eval()
        size = int(meta["image_size"])
        example = torch.randn(2, 3, size, size)
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(cpu, (example,), dynamic_shapes=({0: batch},))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        files[EXPORT_FILE] = buffer.getvalue()
    publish(run_dir, {**files, **(extra or {})})
    return {"state_dict": run_dir / ENCODER_FILE, **({"exported": run_dir / EXPORT_FILE} if export else {})}


def load_encoder(path: Path) -> tuple[Backbone, dict[str, Any]]:
    """Rebuild the backbone saved by `save_encoder` (a run directory or `encoder.pt`)."""
    path = Path(path)
    file = path / ENCODER_FILE if path.is_dir() else path
    blob = load_data(file, "encoder")
    if not isinstance(blob, dict) or "meta" not in blob or "state_dict" not in blob:
        raise RunStateError(f"{file} is not an sslflow encoder (no meta / state_dict)")
    meta = blob["meta"]
    if not isinstance(meta, dict) or not isinstance(blob["state_dict"], dict):
        raise RunStateError(f"{file} is not an sslflow encoder (meta and state_dict must be mappings)")
    try:
        model = backbone_from_metadata(meta)
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError, ConfigError) as e:
        detail = " ".join(str(e).replace("Error(s) in loading state_dict for", "").split())[:300]
        raise RunStateError(f"{file}: its metadata ({meta.get('name') or meta.get('arch')}) does not match its "
                            f"weights: {detail}") from None
    if "image_size" not in meta:
        meta = {**meta, "image_size": model.image_size}
    return model, meta
