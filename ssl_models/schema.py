"""Typed settings sections whose fields carry their domain, next to their definition.

A section is a frozen dataclass; each field is declared with `setting(default, domain=...,
resumable=..., doc=...)`, so its type (the annotation), its default, the values it accepts
and whether changing it lets a checkpoint resume are read in one place::

    @dataclass(frozen=True)
    class QueueConfig:
        size: int = setting(4096, domain=Range(lo=1), doc="negatives kept")
        momentum: float = setting(0.99, domain=Range(0, 1, hi_open=True))

        def check(self) -> None:            # cross-field rules, next to the fields
            ...

`build(cls, raw, prefix)` turns a mapping (YAML, `--set`) into a section: unknown keys (with
a did-you-mean), wrong types, non-finite floats and values outside a field's domain are a
`ConfigError` whose one-line message names the dotted key. Two kinds of fields hold
sub-sections: a nested dataclass, and a *registry* mapping (`registry_sections`): one
sub-section per registered name (a method, a backbone family), so a new method brings its own
section without any edit to the settings code.

Nothing here knows sslflow's sections; `ssl_models.config` declares the engine's,
`sslflow.core.settings` the pipeline's.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sslflow.ssl_models.errors import ConfigError

__all__ = [
    "Choices",
    "ConfigError",
    "Domain",
    "Each",
    "Pair",
    "Pattern",
    "Range",
    "as_dict",
    "build",
    "flatten",
    "registry_sections",
    "resumable_keys",
    "section",
    "setting",
    "validate",
]

#: Integers must fit in a signed 64-bit value (torch seeds, tensor sizes).
INT64_MAX = 2**63 - 1


# ------------------------------------------------------------------------------------ domains
class Domain:
    """What values a field accepts. `problem(value)` says why one is not, or None."""

    def problem(self, value: Any) -> str | None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _num(x: float) -> str:
    """A bound as people write it: 1, 0.5, 9223372036854775807 (not 9.22337e+18)."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**63 else f"{x:g}"


@dataclass(frozen=True)
class Range(Domain):
    """lo <= value <= hi (either bound optional, either end open)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def problem(self, value: Any) -> str | None:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return f"must be {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return f"must be {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return None

    def describe(self) -> str:
        lo = "" if self.lo is None else f"{'(' if self.lo_open else '['}{_num(self.lo)}"
        hi = "" if self.hi is None else f"{_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None and self.hi is not None:
            return f"{lo}, {hi}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {_num(self.hi)}" if self.hi is not None else "any"


#: Common ranges.
POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
PROBABILITY = Range(0, 1)
UNIT_OPEN_TOP = Range(0, 1, hi_open=True)  # momenta in [0, 1)


@dataclass(frozen=True)
class Choices(Domain):
    """One of a fixed list, or of a list computed when checked (a registry filled at import)."""

    options: tuple[Any, ...] | Callable[[], Iterable[Any]]

    def values(self) -> list[Any]:
        return list(self.options() if callable(self.options) else self.options)

    def problem(self, value: Any) -> str | None:
        allowed = self.values()
        if value in allowed:
            return None
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"must be one of {', '.join(str(a) for a in allowed)}{hint}"

    def describe(self) -> str:
        return " | ".join(str(a) for a in self.values())


@dataclass(frozen=True)
class Pattern(Domain):
    """A string matching `regex` in full; `description` says what that means to a person."""

    regex: str
    description: str

    def problem(self, value: Any) -> str | None:
        return None if re.fullmatch(self.regex, value) else f"must be {self.description}"

    def describe(self) -> str:
        return self.description


@dataclass(frozen=True)
class Each(Domain):
    """Every element of a tuple is in `domain`; optionally at least `min_len` elements."""

    domain: Domain
    min_len: int = 0

    def problem(self, value: Any) -> str | None:
        if len(value) < self.min_len:
            return f"needs at least {self.min_len} values"
        for v in value:
            p = self.domain.problem(v)
            if p:
                return f"values {p}"
        return None

    def describe(self) -> str:
        return f"each {self.domain.describe()}"


@dataclass(frozen=True)
class Pair(Domain):
    """A (low, high) pair with low <= high, both in `domain`."""

    domain: Domain

    def problem(self, value: Any) -> str | None:
        lo, hi = value
        for v in (lo, hi):
            p = self.domain.problem(v)
            if p:
                return f"values {p}"
        return None if lo <= hi else "must satisfy min <= max"

    def describe(self) -> str:
        return f"[min, max], min <= max, each {self.domain.describe()}"


# ------------------------------------------------------------------------------------ fields
def setting(default: Any, *, domain: Domain | None = None, resumable: bool = False, doc: str = "") -> Any:
    """A field of a settings section: default, domain, whether a changed value still resumes.

    `resumable=True`: a checkpoint written with another value may be resumed with this one
    (it changes how a run is observed or executed, not what it computes: device, logging).
    """
    meta = {"domain": domain, "resumable": resumable, "doc": doc}
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, *, resumable: bool = False, doc: str = "") -> Any:
    """A field holding a nested section (built from its own defaults)."""
    return dataclasses.field(default_factory=cls, metadata={"resumable": resumable, "doc": doc})


def registry_sections(registry: Callable[[], Mapping[str, type]], *, doc: str = "") -> Any:
    """A field holding one sub-section per registered name: `{name: ConfigClass()}`.

    In YAML the sub-sections sit beside the other keys of the parent (`pretrain.moco.queue_size`),
    the parent's `__getattr__` gives them as attributes; `registry()` is called when a section is
    built, after every plugin module has registered itself.
    """
    def defaults() -> types.MappingProxyType:
        return types.MappingProxyType({name: cls() for name, cls in registry().items()})
    return dataclasses.field(default_factory=defaults, metadata={"registry": registry, "doc": doc})


class RegistrySectionsMixin:
    """Attribute access to the registry sub-sections of a section: `cfg.moco` for `cfg.sections["moco"]`."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "sections":
            raise AttributeError(name)
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no setting or section {name!r}") from None


# ------------------------------------------------------------------------------------ building
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _registry_field(cls: type) -> dataclasses.Field | None:
    return next((f for f in _fields(cls).values() if "registry" in f.metadata), None)


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Section `cls` from a mapping of overrides (missing keys keep their defaults), validated."""
    obj = _build(cls, raw, prefix)
    validate(obj, prefix)
    return obj


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'settings'} must be a section (a mapping), got {raw!r}")
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    reg = _registry_field(cls)
    registered = dict(reg.metadata["registry"]()) if reg is not None else {}
    values: dict[str, Any] = {}
    sub_raw: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key in registered and key not in fields:
            sub_raw[key] = value
            continue
        if key not in fields or fields[key] is reg:
            raise ConfigError(unknown_key_message(prefix + key, [*fields, *registered], prefix))
        values[key] = _coerce(hints[key], value, prefix + key, fields[key])
    if reg is not None:
        values[reg.name] = types.MappingProxyType(
            {name: _build(sub_cls, sub_raw.get(name), f"{prefix}{name}.") for name, sub_cls in registered.items()})
    return cls(**values)


def unknown_key_message(key: str, known: Iterable[str], prefix: str = "") -> str:
    leaf = key[len(prefix):]
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return f"unknown setting {key}{hint}"


def _coerce(tp: Any, value: Any, key: str, f: dataclasses.Field | None = None) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin in (Mapping, dict):
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return types.MappingProxyType({str(k): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()})
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=True))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:
            return _coerce(args[0], value, key)
        raise TypeError(f"unsupported type {tp} for {key}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT64_MAX:
                raise ConfigError(f"{key} must fit in 64 bits; got {value}")
            return value
    elif tp is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, int | float) and not isinstance(number, bool):
            number = float(number)
            if not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number; got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # `--set pipeline.gpu_limit=4`: a name that happens to look numeric
    else:
        raise TypeError(f"unsupported type {tp} for {key}")
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key} must be {'a' if name != 'int' else 'an'} {name}, got {value!r}")


def validate(obj: Any, prefix: str = "") -> None:
    """Check every field against its domain, then each section's `check()`, depth first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")
            continue
        if "registry" in f.metadata:
            for name, sub in value.items():
                validate(sub, f"{prefix}{name}.")
            continue
        if isinstance(value, Mapping):
            for name, sub in value.items():
                if dataclasses.is_dataclass(sub):
                    validate(sub, f"{key}.{name}.")
            continue
        domain: Domain | None = f.metadata.get("domain")
        if domain is not None and value is not None:
            problem = domain.problem(value)
            if problem:
                raise ConfigError(f"{key} {problem}; got {_show(value)}")
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            if prefix and not str(e).startswith(prefix.rstrip(".")):
                raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None
            raise


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


# ------------------------------------------------------------------------------------ views
def as_dict(obj: Any) -> Any:
    """A section as plain nested dicts/lists (registry sub-sections inline), for JSON/YAML/MLflow."""
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if "registry" in f.metadata:
                out.update({name: as_dict(sub) for name, sub in value.items()})
            else:
                out[f.name] = as_dict(value)
        return out
    if isinstance(obj, Mapping):
        return {str(k): as_dict(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [as_dict(v) for v in obj]
    return obj


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"pretrain": {"lr": 0.3}}` -> `{"pretrain.lr": 0.3}` (the dotted keys of `--set`)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resumable_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted keys (prefixes for whole sections) whose change still lets a checkpoint resume."""
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if f.metadata.get("resumable"):
            out.add(key)
        elif dataclasses.is_dataclass(hints.get(f.name)):
            out |= resumable_keys(hints[f.name], f"{key}.")
        elif "registry" in f.metadata:
            for name, sub in f.metadata["registry"]().items():
                out |= resumable_keys(sub, f"{prefix}{name}.")
    return out


def describe(cls: type, prefix: str = "") -> list[tuple[str, Any, str, str]]:
    """(dotted key, default, domain, doc) of every field: the reference table of the docs."""
    rows: list[tuple[str, Any, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if "registry" in f.metadata:
            for name, sub in f.metadata["registry"]().items():
                rows += describe(sub, f"{prefix}{name}.")
        elif dataclasses.is_dataclass(hints.get(f.name)):
            rows += describe(hints[f.name], f"{key}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            domain = f.metadata.get("domain")
            rows.append((key, as_dict(default), domain.describe() if domain else "", f.metadata.get("doc", "")))
    return rows
