"""`sslflow`: one command line for every pipeline step.

Each subcommand lives in `sslflow/cli/commands/<name>.py` and exposes `register(subparsers)`,
which adds its parser and sets `func(args) -> int`. Errors a user can fix (bad params,
missing paths, unusable data) print one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sslflow import __version__
from sslflow.core.errors import RemotePretrainFailed, UserError

COMMAND_MODULES = ("run", "ingest", "validate", "pretrain", "evaluate", "tune", "promote", "retrain", "deploy", "ui")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'fix your input', not 'sslflow has a bug'."""
    from sslflow.ssl_models.evaluate import EvaluationError
    from sslflow.ssl_models.store import StoreError

    return (UserError, StoreError, EvaluationError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sslflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"sslflow.cli.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # No usage reporting from services sslflow starts itself (an explicit setting wins).
    for var in ("PREFECT_SERVER_ANALYTICS_ENABLED", "GX_ANALYTICS_ENABLED"):
        os.environ.setdefault(var, "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from sslflow.ssl_models.train import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_errors() as e:
        print(f"sslflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, RemotePretrainFailed) as e:
        print(f"sslflow {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sslflow {args.command}: interrupted", file=sys.stderr)
        return 130

