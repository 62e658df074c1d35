"""Load `params/*.yaml`, overlay a params file and `--set key=value` overrides, validate types.

Dotted keys are the same ones `dvc exp run -S` uses (`pretrain.lr`, `augment.strength`, `seed`).
Every key is checked against the dataclasses in `ssl_models.config`: unknown or missing keys
and values of the wrong type are a `UserError` naming the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sslflow.core.errors import UserError
from sslflow.ssl_models.config import Params

PARAMS_DIR = Path(__file__).resolve().parents[2] / "params"
BASE_FILES = ("pretrain.yaml", "evaluate.yaml")
# Sections read by other loaders (tasks/ingest.py): one params file may hold them all.
DATA_SECTIONS = frozenset({"ingest", "validate", "versioning"})
# Sections of a shared params file that the engine loader skips (their own loaders read them).
NON_ENGINE_SECTIONS = DATA_SECTIONS | {"pipeline", "tracking", "promotion", "tune"}


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"params file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise UserError(f"params file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"params file {path} must hold a mapping of sections")
    return data


def merge(base: dict[str, Any], overlay: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Deep-merge `overlay` into a copy of `base`; `where` names the source in errors."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value, where)
        else:
            out[key] = value
    return out


def merged_sections(cls: type, base_file: Path, params_file: str | Path | None = None,
                    overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Raw values for dataclass `cls`, whose fields are top-level sections (e.g. `tracking`,
    `promotion`): `base_file`, then those sections of a shared `params_file`, then the `--set`
    entries under them; pass the result to `build`. Other sections and entries belong to
    other loaders and are left alone."""
    sections = {f.name for f in dataclasses.fields(cls)}
    raw = read_yaml(base_file)
    if params_file is not None:
        overlay = read_yaml(Path(params_file))
        raw = merge(raw, {k: v for k, v in overlay.items() if k in sections}, str(params_file))
    mine = [o for o in overrides if o.split(".", 1)[0].strip() in sections]
    return merge(raw, parse_set(mine), "--set")


def parse_set(assignments: Iterable[str]) -> dict[str, Any]:
    """`["pretrain.lr=0.3", "seed=1"]` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {p} is not a section")
        node[leaf] = value
    return out


def load_params(params_files: str | Path | Sequence[str | Path] | None = None, overrides: Iterable[str] = (),
                params_dir: Path = PARAMS_DIR) -> Params:
    """Defaults from `params_dir`, then each of `params_files` in order, then `overrides`."""
    raw: dict[str, Any] = {}
    for name in BASE_FILES:
        raw = merge(raw, read_yaml(params_dir / name), name)
    if isinstance(params_files, str | Path):
        params_files = [params_files]
    for file in params_files or ():
        raw = merge(raw, read_yaml(Path(file)), str(file))
    raw = merge(raw, parse_set(overrides), "--set")
    params = build(Params, {k: v for k, v in raw.items() if k not in NON_ENGINE_SECTIONS}, prefix="")
    check_semantics(params)
    return params


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from `raw`, checking keys and value types recursively."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{prefix.rstrip('.') or 'params'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise UserError(f"unknown parameter {prefix}{key}{hint}")
    missing = [k for k in fields if k not in raw]
    if missing:
        raise UserError(f"missing parameter {prefix}{missing[0]}")
    values = {k: coerce(hints[k], raw[k], f"{prefix}{k}") for k in fields}
    return cls(**values)


def coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise UserError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], v, key) for v in value)
        if len(value) != len(args):
            raise UserError(f"{key} must have {len(args)} values, got {value!r}")
        return tuple(coerce(a, v, key) for a, v in zip(args, value, strict=True))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported type {tp} for {key}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported type {tp} for {key}")
    raise UserError(f"{key} must be {tp.__name__}, got {value!r}")


def check_semantics(p: Params) -> None:
    """Cross-field checks that types alone cannot express, each naming its key."""
    from sslflow.ssl_models.backbones import ARCHS
    from sslflow.ssl_models.methods import METHODS

    pt, aug, ev = p.pretrain, p.augment, p.eval
    choices = {
        "pretrain.method": (pt.method, sorted(METHODS)),
        "pretrain.backbone": (pt.backbone, sorted(ARCHS)),
        "pretrain.optimizer": (pt.optimizer, ["lars", "sgd"]),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    if not (p.device in ("auto", "cpu", "cuda") or p.device.startswith("cuda:")):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {p.device!r}")
    bad = [proto for proto in ev.protocols if proto not in ("knn", "linear", "finetune")]
    if bad:
        raise UserError(f"eval.protocols: unknown protocol {bad[0]!r} (knn, linear, finetune)")
    positive = {
        "pretrain.epochs": pt.epochs, "pretrain.batch_size": pt.batch_size, "pretrain.lr": pt.lr,
        "pretrain.temperature": pt.temperature, "pretrain.queue_size": pt.queue_size,
        "pretrain.log_every": pt.log_every, "pretrain.width": pt.width,
        "eval.knn_k": ev.knn_k, "eval.knn_temperature": ev.knn_temperature,
        "augment.local_size": aug.local_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key} must be > 0; got {value}")
    if pt.batch_size < 2:
        raise UserError("pretrain.batch_size must be at least 2 (contrastive pairs)")
    for key, value in {"pretrain.ema_momentum": pt.ema_momentum,
                       "pretrain.center_momentum": pt.center_momentum}.items():
        if not 0.0 <= value < 1.0:
            raise UserError(f"{key} must be in [0, 1); got {value}")
    for key, (lo, hi) in {"augment.crop_scale": aug.crop_scale,
                          "augment.local_crop_scale": aug.local_crop_scale}.items():
        if not 0.0 < lo <= hi <= 1.0:
            raise UserError(f"{key} must satisfy 0 < min <= max <= 1; got [{lo}, {hi}]")
    for key, value in {"augment.flip_prob": aug.flip_prob, "augment.jitter_prob": aug.jitter_prob,
                       "augment.grayscale_prob": aug.grayscale_prob}.items():
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{key} must be a probability in [0, 1]; got {value}")
    if aug.strength < 0:
        raise UserError(f"augment.strength must be >= 0; got {aug.strength}")
    if pt.method == "moco" and pt.queue_size < 2 * pt.batch_size:
        raise UserError(f"pretrain.queue_size ({pt.queue_size}) must be at least 2 x pretrain.batch_size "
                        f"({2 * pt.batch_size}) for MoCo: every step enqueues the keys of both views")
