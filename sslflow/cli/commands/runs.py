"""`sslflow runs`: the recent runs in a terminal (name, method, data version, kNN, linear, promotion, alias).

Reads whatever tracking URI is configured (`MLFLOW_TRACKING_URI`, else `tracking.uri`, else the
project's mlflow.db) and the experiment `tracking.experiment`, newest run first. The same
figures are the columns of the MLflow UI's runs table (`sslflow ui`).
"""

from __future__ import annotations

import argparse

from sslflow.cli.commands.common import add_params_arguments, settings_from
from sslflow.core.secrets import redact_uri


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("runs", help="list the recent runs: method, data version, kNN, linear, promotion",
                              description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=20, metavar="N", help="show the N newest runs (default 20)")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.core.errors import UserError
    from sslflow.tasks.tracking.backend import check_tracking_server, resolve_tracking_uri
    from sslflow.tasks.tracking.listing import format_runs, recent_runs

    if args.limit < 1:
        raise UserError(f"--limit must be at least 1; got {args.limit}")
    settings = settings_from(args)
    uri = resolve_tracking_uri(settings)
    check_tracking_server(uri, settings.tracking.preflight_timeout_s)
    rows = recent_runs(settings, args.limit)
    where = f"experiment {settings.tracking.experiment!r} on {redact_uri(uri)}"
    if not rows:
        print(f"no runs yet in {where}: `sslflow run` trains one")
        return 0
    print(format_runs(rows))
    print(f"({len(rows)} newest of {where}; kNN / linear: top-1 % of the evaluation)")
    return 0
