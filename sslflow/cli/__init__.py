"""`sslflow`: one command line for every pipeline step.

Each subcommand lives in `sslflow/cli/commands/<name>.py` and exposes `register(subparsers)`,
which adds its parser and sets `func(args) -> int`. Errors a user can fix (bad settings,
missing paths, unusable data, a run directory that cannot be used as asked) print one line
and exit with code 2, without a traceback; a service that is down (MLflow, its artifact store,
Optuna's database, Prefect) one line and exit 3; a diverged training or a failed remote run 1.
Options are never abbreviated: `--sourc` is an error, not `--source`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading

from sslflow import __version__
from sslflow.core.errors import RemotePretrainFailed, ServiceUnavailable, UserError

COMMAND_MODULES = ("run", "ingest", "validate", "pretrain", "evaluate", "tune", "promote", "retrain", "deploy", "ui",
                   "settings", "compare", "runs", "embed", "select")


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching of long options (a typo must not pick another option)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'fix your input', not 'sslflow has a bug'."""
    from sslflow.ssl_models.errors import ConfigError, RunStateError
    from sslflow.ssl_models.evaluate import EvaluationError
    from sslflow.ssl_models.store import StoreError

    return (UserError, ConfigError, RunStateError, StoreError, EvaluationError)  # DiskFull: an OSError, below


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sslflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sslflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"sslflow.cli.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sslflow.core.processes import terminate_gracefully
    from sslflow.ssl_models.errors import TrainingDiverged

    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        terminate_gracefully()  # SIGTERM: locks released, temporary servers stopped, as on Ctrl-C
    try:
        return int(args.func(args) or 0)
    except ServiceUnavailable as e:
        print(f"sslflow {args.command}: error: {e}", file=sys.stderr)
        return 3
    except user_errors() as e:
        print(f"sslflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, RemotePretrainFailed) as e:
        print(f"sslflow {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        from sslflow.ssl_models.atomic import NO_SPACE

        if e.errno not in NO_SPACE:
            raise
        where = getattr(e, "path", None) or e.filename or "a file"
        print(f"sslflow {args.command}: error: no space left on device writing {where}: free some space and run "
              "again (what was being written was not published)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sslflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        down = _prefect_server_error(e)
        if down is None:
            raise
        print(f"sslflow {args.command}: error: {down}", file=sys.stderr)
        return 3


def _prefect_server_error(error: BaseException) -> str | None:
    """One line for a Prefect API that answers 5xx after the client's retries (its database is
    down: a service outage, exit 3, not a bug); None for anything else."""
    import httpx

    from sslflow.core.secrets import redact_uri

    if isinstance(error, httpx.HTTPStatusError) and error.response.status_code >= 500:
        api = redact_uri(str(error.request.url.copy_with(path="/api", query=None)))
        return (f"the Prefect API at {api} answered "
                f"{error.response.status_code} (its database may be down): retry when it is healthy")
    return None
