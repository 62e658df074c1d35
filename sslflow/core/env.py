"""Environment defaults for the libraries and services sslflow drives, set in one place.

No usage reporting from anything sslflow starts (Prefect's temporary server, MLflow, Great
Expectations, DVC), enough start-up time for Prefect's temporary local server on a busy
2-core machine, and sslflow's own logger attached to Prefect's run logs. Applied with
`os.environ.setdefault` when the `sslflow` package is imported, so an explicit setting always
wins and child processes inherit the same values. A child that
does not import sslflow (a `dvc` or `mlflow server` binary) gets them through `child_env()`.

Services that are down: the Prefect client also retries HTTP 500 (a Prefect server whose
database restarts answers 500 for a few seconds), within its bounded `PREFECT_CLIENT_MAX_RETRIES`;
and a log record that carries an sslflow `UserError` (bad input, a `ServiceUnavailable`) is
written without its traceback: the message is the one line the user needs (Prefect logs every
failed task and flow run with `exc_info`, which turned one outage into hundreds of lines).
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
    "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
    # concurrency leases on disk (PREFECT_HOME/concurrency_leases), not in a server's memory: a
    # temporary server's leases outlive it, so the retrain slot of a killed run can expire
    # (sslflow.tasks.pipeline.slot revokes them; a server with services does it itself)
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
}


def apply_defaults(environ: dict[str, str] | None = None) -> None:
    """Set every default that `environ` (the process environment) does not set yet; for the
    process itself also `one_line_user_errors()`."""
    target = os.environ if environ is None else environ
    for key, value in DEFAULTS.items():
        target.setdefault(key, value)
    if environ is None:
        one_line_user_errors()


def one_line_user_errors() -> None:
    """Log records whose exception is a `UserError` lose the traceback (their message says it
    all); every other exception keeps it. A record factory, so it holds for every logger and
    survives logging reconfiguration (Prefect's dictConfig). Installed once."""
    import logging

    old = logging.getLogRecordFactory()
    if getattr(old, "sslflow_one_line", False):
        return

    def factory(*args, **kwargs):
        record = old(*args, **kwargs)
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) and len(record.exc_info) > 1 else None
        if exc is not None:
            from sslflow.core.errors import UserError

            if isinstance(exc, UserError):
                record.exc_info = None
                record.exc_text = None
        return record

    factory.sslflow_one_line = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def child_env(**overrides: str) -> dict[str, str]:
    """The current environment with the defaults filled in, plus `overrides`: for subprocesses."""
    env = dict(os.environ)
    apply_defaults(env)
    env.update(overrides)
    return env
