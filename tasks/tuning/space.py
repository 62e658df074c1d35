"""What `sslflow tune` searches: the `tune` section of params, the search space, and the
best configuration written back as a params file.

The space lives in `params/tune.yaml` (`tune.space`): named entries, each a dotted params key
(`pretrain.temperature`, or `augment.crop_scale[0]` for one element of a list) with a range
or a list of choices. Sampled values become `--set` overrides on top of the base params, so
every trial is validated by the same loader as any run (a bad range is a one-line error).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sslflow.core.errors import UserError
from sslflow.core.settings import PARAMS_DIR, build, merged_sections, read_yaml

PARAMS_FILE = "tune.yaml"
SECTION = "tune"
_INDEXED = re.compile(r"^(?P<key>[\w.]+)\[(?P<index>\d+)\]$")


@dataclass(frozen=True)
class TuneConfig:
    study: str
    storage: str
    trials: int
    timeout_s: float
    budget_epochs: int
    baseline_trial: bool
    holdout_fraction: float
    sampler: str
    sampler_seed: int
    startup_trials: int
    pruner: str
    pruner_startup_trials: int
    pruner_warmup_epochs: int
    heartbeat_interval_s: int
    grace_period_s: int
    max_retries: int
    runs: str
    output: str
    train_best: bool


@dataclass(frozen=True)
class SearchDim:
    """One searched parameter: a float/int range or a list of choices."""

    name: str
    param: str  # dotted params key, optionally with [index] for a list element
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()  # empty = every method

    def applies_to(self, method: str) -> bool:
        return not self.methods or method in self.methods

    def suggest(self, trial: Any) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.param, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            return trial.suggest_int(self.param, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.param, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class TuneParams:
    tune: TuneConfig
    space: tuple[SearchDim, ...]


@dataclass(frozen=True)
class _Sections:  # the top-level sections `merged_sections` collects for this loader
    tune: dict


def load_tune_params(params_file: str | Path | None = None, overrides: Iterable[str] = (),
                     params_dir: Path = PARAMS_DIR) -> TuneParams:
    """`params/tune.yaml`, then the `tune` section of `params_file`, then `tune.*` overrides.
    Unknown keys, wrong types and empty or malformed ranges are a `UserError` naming the key."""
    raw = merged_sections(_Sections, Path(params_dir) / PARAMS_FILE, params_file, overrides).get(SECTION)
    if not isinstance(raw, Mapping):
        raise UserError("params: the tune section must be a mapping")
    raw = dict(raw)
    space_raw = raw.pop("space", None)
    cfg: TuneConfig = build(TuneConfig, raw, prefix="tune.")
    _check_config(cfg)
    space = parse_space(space_raw)
    return TuneParams(cfg, space)


def _check_config(c: TuneConfig) -> None:
    if not c.study.strip():
        raise UserError("tune.study must not be empty")
    positive = {"tune.trials": c.trials, "tune.budget_epochs": c.budget_epochs,
                "tune.heartbeat_interval_s": c.heartbeat_interval_s, "tune.grace_period_s": c.grace_period_s}
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key} must be > 0; got {value}")
    for key, value in {"tune.timeout_s": c.timeout_s, "tune.max_retries": c.max_retries,
                       "tune.startup_trials": c.startup_trials,
                       "tune.pruner_startup_trials": c.pruner_startup_trials,
                       "tune.pruner_warmup_epochs": c.pruner_warmup_epochs}.items():
        if value < 0:
            raise UserError(f"{key} must be >= 0; got {value}")
    if c.grace_period_s <= c.heartbeat_interval_s:
        raise UserError(f"tune.grace_period_s ({c.grace_period_s}) must exceed tune.heartbeat_interval_s "
                        f"({c.heartbeat_interval_s}): a live trial would be failed between two heartbeats")
    if not 0.0 <= c.holdout_fraction < 1.0:
        raise UserError(f"tune.holdout_fraction must be in [0, 1); got {c.holdout_fraction}")
    if c.sampler not in ("tpe", "random"):
        raise UserError(f"tune.sampler must be tpe or random; got {c.sampler!r}")
    if c.pruner not in ("median", "hyperband", "none"):
        raise UserError(f"tune.pruner must be median, hyperband or none; got {c.pruner!r}")


_DIM_KEYS = {"param", "low", "high", "log", "type", "choices", "methods", "enabled"}


def parse_space(raw: Any) -> tuple[SearchDim, ...]:
    """`tune.space` -> the enabled dimensions; each entry is checked and named in errors."""
    if not isinstance(raw, Mapping) or not raw:
        raise UserError("tune.space must be a mapping of named entries (see params/tune.yaml)")
    dims = []
    for name, entry in raw.items():
        where = f"tune.space.{name}"
        if not isinstance(entry, Mapping):
            raise UserError(f"{where} must be a mapping with param and low/high or choices")
        unknown = sorted(set(entry) - _DIM_KEYS)
        if unknown:
            raise UserError(f"unknown parameter {where}.{unknown[0]} ({', '.join(sorted(_DIM_KEYS))})")
        if entry.get("enabled", True) is False:
            continue
        dims.append(_parse_dim(str(name), entry, where))
    if not dims:
        raise UserError("tune.space: every entry is disabled; nothing to search")
    params = [d.param for d in dims]
    if len(set(params)) != len(params):
        raise UserError(f"tune.space: a parameter appears twice ({', '.join(params)})")
    return tuple(dims)


def _parse_dim(name: str, e: Mapping[str, Any], where: str) -> SearchDim:
    param = e.get("param")
    if not isinstance(param, str) or not param.strip():
        raise UserError(f"{where}.param must name a params key, e.g. pretrain.temperature")
    methods = e.get("methods") or []
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise UserError(f"{where}.methods must be a list of method names")
    if "choices" in e:
        choices = e["choices"]
        if not isinstance(choices, list) or not choices or any(isinstance(c, list | dict) for c in choices):
            raise UserError(f"{where}.choices must be a non-empty list of values")
        if {"low", "high", "log"} & set(e):
            raise UserError(f"{where}: give either choices or low/high, not both")
        return SearchDim(name, param, choices=tuple(choices), methods=tuple(methods))
    low, high, log = e.get("low"), e.get("high"), e.get("log", False)
    kind = e.get("type", "float")
    if kind not in ("float", "int"):
        raise UserError(f"{where}.type must be float or int; got {kind!r}")
    for key, value in (("low", low), ("high", high)):
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            with suppress(ValueError):
                value = float(value)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise UserError(f"{where}.{key} must be a number; got {value!r}")
        if key == "low":
            low = float(value)
        else:
            high = float(value)
    if not isinstance(log, bool):
        raise UserError(f"{where}.log must be true or false")
    if not low < high:
        raise UserError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0; got {low}")
    return SearchDim(name, param, low, high, log, kind == "int", methods=tuple(methods))


# ------------------------------------------------------------------------------------ values
def sample(trial: Any, space: Sequence[SearchDim], base_method: str) -> dict[str, Any]:
    """Suggest every dimension that applies to the trial's method ({param: value}).

    The method itself may be searched: it is suggested first, so `methods` filters of the
    other entries (temperature only for contrastive methods, queue only for MoCo) follow it.
    """
    values: dict[str, Any] = {}
    method = base_method
    for dim in space:
        if dim.param == "pretrain.method":
            method = values[dim.param] = dim.suggest(trial)
    for dim in space:
        if dim.param != "pretrain.method" and dim.applies_to(method):
            values[dim.param] = dim.suggest(trial)
    return values


def base_point(space: Sequence[SearchDim], base: Mapping[str, Any]) -> dict[str, Any]:
    """The base configuration's value of every dimension that applies to its method (what
    `tune.baseline_trial` enqueues as the study's first trial)."""
    method = str(base["pretrain.method"])
    point = {}
    for dim in space:
        if not dim.applies_to(method) and dim.param != "pretrain.method":
            continue
        m = _INDEXED.match(dim.param)
        point[dim.param] = base[m["key"]][int(m["index"])] if m else base[dim.param]
    return point


def as_overrides(values: Mapping[str, Any], base: Mapping[str, Any]) -> list[str]:
    """`{param: value}` -> `--set` strings; an indexed key replaces one element of the base
    list (`augment.crop_scale[0]=0.3` with base [0.08, 1.0] -> `augment.crop_scale=[0.3, 1.0]`)."""
    lists: dict[str, list[Any]] = {}
    out = []
    for param, value in values.items():
        m = _INDEXED.match(param)
        if m is None:
            out.append(f"{param}={_yaml_scalar(value)}")
            continue
        key, index = m["key"], int(m["index"])
        current = lists.setdefault(key, list(base.get(key, [])))
        if not isinstance(base.get(key), list | tuple) or index >= len(current):
            raise UserError(f"tune.space: {param}: {key} is not a list with an element {index}")
        current[index] = value
    out += [f"{key}={yaml.safe_dump(v, default_flow_style=True).strip()}" for key, v in lists.items()]
    return out


def _yaml_scalar(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def nested_values(values: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """`{param: value}` as a nested params mapping (what a params file holds)."""
    from sslflow.core.settings import parse_set

    return parse_set(as_overrides(values, base))


def write_best_params(path: str | Path, values: Mapping[str, Any], base: Mapping[str, Any], *,
                      base_file: str | Path | None, header: Sequence[str]) -> Path:
    """Write the best configuration as a params file, ready for `--params` or DVC.

    The file is `base_file` (if any) with the best values set in it; when `path` is that file
    itself (e.g. `params.yaml` of the DVC pipeline) only the tuned keys change and its
    comments stay (ruamel round-trip, as `dvc exp run -S` does). Written atomically.
    """
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 120
    path = Path(path)
    doc: Any = {}
    if base_file is not None and Path(base_file).is_file():
        doc = rt.load(Path(base_file).read_text()) or {}
    if not isinstance(doc, Mapping):
        raise UserError(f"{base_file} must hold a mapping of sections")
    _deep_set(doc, nested_values(values, base))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    comment = "\n".join([f"Best configuration written by `sslflow tune` ({stamp}):", *header])
    if hasattr(doc, "yaml_set_start_comment") and Path(base_file or "").resolve() != path.resolve():
        doc.yaml_set_start_comment(comment)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        if not hasattr(doc, "yaml_set_start_comment"):
            f.write("".join(f"# {line}\n" for line in comment.splitlines()))
        rt.dump(doc, f)
    tmp.replace(path)
    read_yaml(path)  # what we wrote must load
    return path


def _deep_set(doc: Any, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, Mapping):
            if not isinstance(doc.get(key), Mapping):
                doc[key] = {}
            _deep_set(doc[key], value)
        elif isinstance(value, list) and isinstance(doc.get(key), list):
            doc[key][:] = value  # keep the list's flow style and comments
        else:
            doc[key] = value


def base_values(files: Sequence[str | Path], overrides: Iterable[str]) -> dict[str, Any]:
    """The flat base params (what an indexed key's list defaults to)."""
    from sslflow.core.settings import load_params
    from sslflow.ssl_models.config import as_dict, flatten

    return flatten(as_dict(load_params(list(files), overrides)))

