"""One settings tree, one loader: `load_settings(files, overrides)` at every entry point.

    settings = load_settings()                                  # defaults + <project>/params.yaml
    settings = load_settings(["params/profiles/cifar10-byol.yaml"], ["pretrain.lr=0.3"])
    settings.pretrain.byol.momentum, settings.tracking.uri, settings.tune.space["lr"]

Order, later wins: the defaults declared next to each field (`sslflow.ssl_models.config` for
the engine's sections, `sslflow.core.sections` for the pipeline's) -> the settings files ->
the `--set key=value` overrides. When no file is named, the project's `params.yaml` is the one
file (the project directory is the current one, `--project DIR` or `SSLFLOW_PROJECT`); naming
`--params` files replaces it, so a profile is applied on the defaults, not on the demo.

Dotted keys are the same everywhere: `--set`, `dvc exp run -S`, the Optuna search space and
the MLflow params of a run. Unknown keys (with a did-you-mean, and the new home of a key
that moved), wrong types, non-finite numbers and values outside a field's domain stop the
command with one line naming the key (`ConfigError`, exit code 2), before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sslflow.core.errors import UserError
from sslflow.core.project import PARAMS_FILE, project_root
from sslflow.core.sections import (
    IngestConfig,
    PipelineConfig,
    PromotionConfig,
    TrackingConfig,
    TuneConfig,
    ValidateConfig,
    VersioningConfig,
)
from sslflow.ssl_models.config import EngineSettings, engine_flat
from sslflow.ssl_models.schema import ConfigError, as_dict, build, flatten, section

#: Keys of sslflow < 0.2 and where they live now (named in the error instead of a bare "unknown").
MOVED_KEYS = {
    "pretrain.backbone": "backbone.name",
    "pretrain.width": "backbone.resnet.width",
    "pretrain.temperature": "pretrain.<method>.temperature",
    "pretrain.queue_size": "pretrain.moco.queue_size",
    "pretrain.proj_hidden_dim": "pretrain.<method>.proj_hidden_dim",
    "pretrain.proj_dim": "pretrain.<method>.proj_dim",
    "pretrain.pred_hidden_dim": "pretrain.byol.pred_hidden_dim",
    "pretrain.ema_momentum": "pretrain.<method>.momentum",
    "pretrain.dino_out_dim": "pretrain.dino.out_dim",
    "pretrain.teacher_temperature": "pretrain.dino.teacher_temperature",
    "pretrain.teacher_temperature_warmup": "pretrain.dino.teacher_temperature_warmup",
    "pretrain.teacher_temperature_warmup_epochs": "pretrain.dino.teacher_temperature_warmup_epochs",
    "pretrain.center_momentum": "pretrain.dino.center_momentum",
}




@dataclasses.dataclass(frozen=True)
class Settings(EngineSettings):
    """Every section of sslflow: the engine's (seed, device, augment, backbone, pretrain, eval)
    and the pipeline's. `project` is where relative paths point (set by the loader)."""

    ingest: IngestConfig = section(IngestConfig, resumable=True)
    validate: ValidateConfig = section(ValidateConfig, resumable=True)
    versioning: VersioningConfig = section(VersioningConfig, resumable=True)
    tracking: TrackingConfig = section(TrackingConfig, resumable=True)
    promotion: PromotionConfig = section(PromotionConfig, resumable=True)
    pipeline: PipelineConfig = section(PipelineConfig, resumable=True)
    tune: TuneConfig = section(TuneConfig, resumable=True)
    project: Path = dataclasses.field(default_factory=Path.cwd, compare=False, repr=False,
                                      metadata={"doc": "not a setting: the project directory"})

    def check(self) -> None:
        """Cross-section rules of the pipeline, on top of the engine's: the promotion gate must
        compare a metric that the configured protocols produce (refused before pretraining)."""
        super().check()
        protocol = self.promotion.metric.rsplit("_", 1)[0]
        if protocol not in self.eval.protocols:
            raise ConfigError(f"promotion.metric {self.promotion.metric} needs the {protocol!r} protocol, but "
                              f"eval.protocols is {list(self.eval.protocols)}: add it or pick another metric")

    def path(self, relative: str | Path) -> Path:
        """A settings path (`pipeline.store`, `tune.runs`, ...) resolved against the project."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else self.project / p

    def flat(self) -> dict[str, Any]:
        """Every setting as a dotted key (the MLflow params of a run): the engine's with only the
        active method's and backbone family's sections, then the pipeline's."""
        out = engine_flat(self)
        for f in dataclasses.fields(Settings):
            if f.name not in EngineSettings.__dataclass_fields__ and f.name != "project":
                out.update(flatten({f.name: as_dict(getattr(self, f.name))}))
        return out

    def nested(self) -> dict[str, Any]:
        """The settings as plain nested dicts (what a settings file holds)."""
        return {k: v for k, v in as_dict(self).items() if k != "project"}

    def updated(self, overrides: Iterable[str]) -> Settings:
        """These settings with `--set`-style overrides applied (validated like any load)."""
        return _build(merge(self.nested(), _normalise(parse_set(list(overrides)), "--set")), self.project)


# ------------------------------------------------------------------------------------ files
def read_yaml(path: str | Path) -> dict[str, Any]:
    """A settings file as a mapping of sections; any problem is one `UserError` line naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"settings file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"settings file {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise UserError(f"settings file {path} is not a text (UTF-8 YAML) file") from None
    except OSError as e:
        raise UserError(f"settings file {path} cannot be read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"settings file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"settings file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `overlay` into a copy of `base`."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


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


def default_files(project: Path) -> list[Path]:
    """The files applied when none is named: the project's `params.yaml`, if it has one."""
    candidate = project / PARAMS_FILE
    return [candidate] if candidate.is_file() else []


def load_settings(files: str | Path | Sequence[str | Path] | None = None, overrides: Iterable[str] = (), *,
                  project: str | Path | None = None) -> Settings:
    """Defaults -> `files` (None = the project's params.yaml) -> `overrides`; validated.

    Relative `files` are relative to the current directory, as on a command line.
    """
    root = project_root(project)
    if files is None:
        paths = default_files(root)
    else:
        paths = [Path(files)] if isinstance(files, str | Path) else [Path(f) for f in files]
    raw = {k: v for k, v in as_dict(Settings()).items() if k != "project"}
    for path in paths:
        raw = merge(raw, _normalise(read_yaml(path), str(path)))
    raw = merge(raw, _normalise(parse_set(list(overrides)), "--set"))
    return _build(raw, root)


def _build(raw: Mapping[str, Any], project: Path) -> Settings:
    try:
        settings = build(Settings, raw)
    except ConfigError as e:
        raise ConfigError(_with_moved_hint(str(e))) from None
    object.__setattr__(settings, "project", project)
    return settings


def _normalise(data: dict[str, Any], where: str) -> dict[str, Any]:
    """YAML spellings that are not the field's type: `dvc: off` reads as False."""
    versioning = data.get("versioning")
    if isinstance(versioning, dict) and isinstance(versioning.get("dvc"), bool):
        data = {**data, "versioning": {**versioning, "dvc": "on" if versioning["dvc"] else "off"}}
    tracking = data.get("tracking")
    if isinstance(tracking, dict) and "uri" in tracking and tracking["uri"] is None:
        data = {**data, "tracking": {**tracking, "uri": ""}}
    if "project" in data:
        raise UserError(f"{where}: 'project' is not a setting; pass --project DIR or set SSLFLOW_PROJECT")
    return data


def _with_moved_hint(message: str) -> str:
    """An unknown key's message, with where it moved or the closest key anywhere in the tree."""
    if not message.startswith("unknown setting ") or "did you mean" in message:
        return message
    key = message.split()[2]
    if key in MOVED_KEYS:
        return f"unknown setting {key}: it moved to {MOVED_KEYS[key]}"
    known = list(Settings().flat()) + list(flatten(Settings().nested()))  # the active sections first
    # the same leaf in the same section, the active method first: pretrain.temprature -> pretrain.simclr.temperature
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(known) if k.split(".")[0] == key.split(".")[0]}
    close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)]
    close = close or difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return f"unknown setting {key} (did you mean {close[0]}?)" if close else message


__all__ = ["MOVED_KEYS", "Settings", "load_settings", "merge", "parse_set", "read_yaml"]
