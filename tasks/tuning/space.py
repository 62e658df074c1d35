"""What `sslflow tune` searches, and the best configuration written back as a settings file.

The space is the `tune.space` setting: named entries, each a dotted settings key with a range
or a list of choices (`SearchDimConfig` in `sslflow.core.sections`). A key may name the
trial's method (`pretrain.{method}.temperature`) or one element of a list
(`augment.crop_scale[0]`). Sampled values become `--set` overrides on top of the base
settings, so every trial is validated like any run (a bad range is a one-line error).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sslflow.core.errors import UserError
from sslflow.core.settings import read_yaml

_INDEXED = re.compile(r"^(?P<key>[\w.]+)\[(?P<index>\d+)\]$")
METHOD_PLACEHOLDER = "{method}"


@dataclass(frozen=True)
class SearchDim:
    """One searched parameter: a float/int range or a list of choices."""

    name: str
    param: str  # dotted settings key, maybe with {method} and/or an [index]
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()  # empty = every method

    def applies_to(self, method: str) -> bool:
        return not self.methods or method in self.methods

    def key(self, method: str) -> str:
        """The dotted key for a trial of `method` (`{method}` filled in)."""
        return self.param.replace(METHOD_PLACEHOLDER, method)

    def suggest(self, trial: Any, method: str) -> Any:
        key = self.key(method)
        if self.choices:
            return trial.suggest_categorical(key, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            return trial.suggest_int(key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(key, self.low, self.high, log=self.log)


def search_space(settings: Any) -> tuple[SearchDim, ...]:
    """The enabled entries of `tune.space` (already validated by the settings loader)."""
    return tuple(SearchDim(name, d.param, d.low, d.high, d.log, d.type == "int", tuple(d.choices), tuple(d.methods))
                 for name, d in settings.tune.space.items() if d.enabled)


# ------------------------------------------------------------------------------------ values
def sample(trial: Any, space: Sequence[SearchDim], base_method: str) -> dict[str, Any]:
    """Suggest every dimension that applies to the trial's method ({key: value}).

    The method itself may be searched: it is suggested first, so the `methods` filters and
    `{method}` keys of the other entries (temperature only for contrastive methods, queue only
    for MoCo) follow it.
    """
    values: dict[str, Any] = {}
    method = base_method
    for dim in space:
        if dim.param == "pretrain.method":
            method = values[dim.param] = dim.suggest(trial, method)
    for dim in space:
        if dim.param != "pretrain.method" and dim.applies_to(method):
            values[dim.key(method)] = dim.suggest(trial, method)
    return values


def _value(settings: Any, key: str) -> Any:
    """The value of dotted `key` (with an optional [index]) in `settings`."""
    flat = settings.flat()
    m = _INDEXED.match(key)
    if m:
        return flat[m["key"]][int(m["index"])]
    if key not in flat:
        raise UserError(f"tune.space: {key} is not a setting")
    return flat[key]


def base_point(space: Sequence[SearchDim], settings: Any) -> dict[str, Any]:
    """The base configuration's value of every dimension that applies to its method (what
    `tune.baseline_trial` enqueues as the study's first trial)."""
    method = settings.pretrain.method
    return {dim.key(method): _value(settings, dim.key(method)) for dim in space
            if dim.applies_to(method) or dim.param == "pretrain.method"}


def as_overrides(values: Mapping[str, Any], settings: Any) -> list[str]:
    """`{key: value}` -> `--set` strings; an indexed key replaces one element of the base
    list (`augment.crop_scale[0]=0.3` with base [0.08, 1.0] -> `augment.crop_scale=[0.3, 1.0]`)."""
    lists: dict[str, list[Any]] = {}
    out = []
    flat = settings.flat()
    for param, value in values.items():
        m = _INDEXED.match(param)
        if m is None:
            out.append(f"{param}={_yaml_scalar(value)}")
            continue
        key, index = m["key"], int(m["index"])
        base = flat.get(key)
        current = lists.setdefault(key, list(base) if isinstance(base, list | tuple) else [])
        if index >= len(current):
            raise UserError(f"tune.space: {param}: {key} is not a list with an element {index}")
        current[index] = value
    out += [f"{key}={yaml.safe_dump(v, default_flow_style=True).strip()}" for key, v in lists.items()]
    return out


def _yaml_scalar(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def nested_values(values: Mapping[str, Any], settings: Any) -> dict[str, Any]:
    """`{key: value}` as a nested settings mapping (what a settings file holds)."""
    from sslflow.core.settings import parse_set

    return parse_set(as_overrides(values, settings))


def write_best_params(path: str | Path, values: Mapping[str, Any], settings: Any, *,
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
    _deep_set(doc, nested_values(values, settings))
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
