"""The project directory: where a command finds its settings and keeps its state.

One rule for every command (`run`, `retrain`, `tune`, `promote`, `ui`, the flows, DVC stages):
the project is `--project DIR`, else the `SSLFLOW_PROJECT` environment variable, else the
current directory. It holds

    params.yaml    the project's settings (applied when no --params file is named)
    mlflow.db      MLflow tracking + registry on SQLite (+ mlartifacts/), unless tracking.uri says otherwise
    optuna.db      Optuna studies on SQLite, unless tune.storage says otherwise
    data/ runs/ reports/   the store, run directories and reports (pipeline.* settings, relative to it)

so a command run from another directory never starts a second registry beside the package.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from sslflow.core.errors import UserError

ENV = "SSLFLOW_PROJECT"
PARAMS_FILE = "params.yaml"
MLFLOW_DB = "mlflow.db"
OPTUNA_DB = "optuna.db"
#: A run name is one path component: it names `runs/<name>/` and the MLflow run.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def project_root(explicit: str | Path | None = None) -> Path:
    """`explicit` > `$SSLFLOW_PROJECT` > the current directory, as an absolute path."""
    chosen = explicit if explicit not in (None, "") else os.environ.get(ENV, "").strip() or Path.cwd()
    return Path(chosen).expanduser().resolve()


def default_tracking_uri(project: Path) -> str:
    return f"sqlite:///{(Path(project) / MLFLOW_DB).resolve()}"


def default_optuna_storage(project: Path) -> str:
    return f"sqlite:///{(Path(project) / OPTUNA_DB).resolve()}"


def run_name(name: str | None) -> str:
    """`name`, checked to be one safe path component (`../../x`, `a/b`, `.hidden` and control
    characters are refused in one line), or a timestamp when None."""
    if name is None or name == "":
        return time.strftime("%Y%m%d-%H%M%S")
    if not RUN_NAME.fullmatch(name) or ".." in name:
        raise UserError(f"run name {name!r} must be one path component: letters, digits, '.', '_', '+', '-' "
                        "(at most 128, starting with a letter or digit, no '..')")
    return name
