"""The `compare` flow's decisions, as plain functions: which methods, with which settings, on what data.

A comparison trains several methods on one data version with one budget. Each method's
settings are, in order: the named `--params` files (with `pretrain.method` set to the method),
or else the method's own demo profile `params/profiles/demo-<method>.yaml` (complete on its
own: backbone, optimiser, heads tuned for the demo set); then the `--set` overrides and
`epochs` for every method. Every child logs where the parent does: the parent's `tracking.*`
section is imposed on the children. All settings are resolved (and a bad one refused in one
line) before anything trains.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from sslflow.core.errors import UserError
from sslflow.core.settings import Settings, load_settings

#: The order of `--methods all`: the first four methods, the modern families (issue 13), the classic ones (14).
ORDER = ("simclr", "moco", "byol", "dino", "swav", "simsiam", "barlow", "vicreg", "mocov3", "mae",
         "autoencoder", "vae", "rotation", "jigsaw", "colorization", "inpainting", "cpc", "dim", "cmc")
PROFILE_DIR = Path("params") / "profiles"
#: The source checkout's profiles (tasks/pipeline/ -> the repository root), after the project's own.
REPO_PROFILES = Path(__file__).resolve().parents[2] / PROFILE_DIR


@dataclass(frozen=True)
class Child:
    """One method of a comparison and the settings it trains with."""

    method: str
    family: str
    settings: Settings
    source: str  # the profile or params files it came from


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """`"simclr,byol"` or a list -> registered method names, in order, once each; `all` = every
    registered method. An unknown name is one line with a did-you-mean."""
    import difflib

    from sslflow.ssl_models.methods import METHODS

    items = [s.strip() for part in ([spec] if isinstance(spec, str) else spec) for s in str(part).split(",")]
    items = [s for s in items if s]
    if items == ["all"]:
        return [m for m in ORDER if m in METHODS] + sorted(set(METHODS) - set(ORDER))
    out: list[str] = []
    for name in items:
        if name not in METHODS:
            close = difflib.get_close_matches(name, list(METHODS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(sorted(METHODS))} or all"
            raise UserError(f"unknown method {name!r}{hint}")
        if name not in out:
            out.append(name)
    if len(out) < 1:
        raise UserError("--methods names no method: e.g. --methods simclr,byol (or all)")
    return out


def demo_profile(method: str, project: Path) -> Path:
    """`params/profiles/demo-<method>.yaml` of the project, else of the source checkout."""
    for root in (project / PROFILE_DIR, REPO_PROFILES):
        path = root / f"demo-{method}.yaml"
        if path.is_file():
            return path
    raise UserError(f"no demo profile for {method} (looked for {project / PROFILE_DIR}/demo-{method}.yaml and "
                    f"{REPO_PROFILES}/demo-{method}.yaml): pass the settings with --params FILE")


def with_tracking(settings: Settings, tracking_from: Settings) -> Settings:
    """`settings` with the `tracking.*` section of `tracking_from` (same server, experiment)."""
    overrides = [f"tracking.{f.name}={json.dumps(getattr(tracking_from.tracking, f.name))}"
                 for f in fields(tracking_from.tracking)]
    return settings.updated(overrides)


def plan(methods: Sequence[str], base: Settings, params_files: Sequence[str | Path] | None,
         overrides: Sequence[str], epochs: int | None = None) -> list[Child]:
    """The settings of every method (see the module docstring), all checked before any training."""
    from sslflow.ssl_models.methods import METHODS

    common = [*overrides, *([f"pretrain.epochs={int(epochs)}"] if epochs else [])]
    children = []
    for method in methods:
        if params_files:
            files, source = list(params_files), ", ".join(str(p) for p in params_files)
        else:
            profile = demo_profile(method, base.project)
            files, source = [profile], str(profile)
        settings = load_settings(files, [f"pretrain.method={method}", *common], project=base.project)
        children.append(Child(method, METHODS[method].family, with_tracking(settings, base), source))
    return children


def eval_inputs(base: Settings, data: str | Path | None, eval_train: str | Path | None,
                eval_test: str | Path | None) -> tuple[Path, Path, Path]:
    """(data, eval-train, eval-test): the project's store (`pipeline.store`) train and test splits
    by default; eval-train defaults to the training data. Each must exist (one line otherwise)."""
    store = base.path(base.pipeline.store)
    paths = (Path(data) if data else store / "train",
             Path(eval_train) if eval_train else (Path(data) if data else store / "train"),
             Path(eval_test) if eval_test else store / "test")
    for flag, path in zip(("--data", "--eval-train", "--eval-test"), paths, strict=True):
        if not path.exists():
            raise UserError(f"{flag} {path} does not exist: ingest images first (sslflow ingest --source demo "
                            f"--store {store} --split train / --split test, or sslflow run)")
    return paths


__all__ = ["ORDER", "Child", "demo_profile", "eval_inputs", "parse_methods", "plan", "with_tracking"]
