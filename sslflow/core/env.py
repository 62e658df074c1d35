"""Environment defaults for the libraries and services sslflow drives, set in one place.

No usage reporting from anything sslflow starts (Prefect's temporary server, MLflow, Great
Expectations, DVC), enough start-up time for Prefect's temporary local server on a busy
2-core machine, and sslflow's own logger attached to Prefect's run logs. Applied with
`os.environ.setdefault` when the `sslflow` package is imported, so an explicit setting always
wins and child processes inherit the same values. A child that
does not import sslflow (a `dvc` or `mlflow server` binary) gets them through `child_env()`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

DEFAULTS: Mapping[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    # sslflow's own log lines (the "sslflow" logger: per-epoch progress, data pulls) reach the
    # Prefect flow-run log when they are written inside a flow or task run
    "PREFECT_LOGGING_EXTRA_LOGGERS": "sslflow",
}


def apply_defaults(environ: dict[str, str] | None = None) -> None:
    """Set every default that `environ` (the process environment) does not set yet."""
    target = os.environ if environ is None else environ
    for key, value in DEFAULTS.items():
        target.setdefault(key, value)


def child_env(**overrides: str) -> dict[str, str]:
    """The current environment with the defaults filled in, plus `overrides`: for subprocesses."""
    env = dict(os.environ)
    apply_defaults(env)
    env.update(overrides)
    return env
