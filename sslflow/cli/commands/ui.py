"""`sslflow ui`: the MLflow UI on the local tracking database (what `sslflow run` wrote).

The backend is `MLFLOW_TRACKING_URI`, else `tracking.uri`, else the project's `mlflow.db` with
artifacts in its `mlartifacts/`. Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from sslflow.cli.commands.common import add_params_arguments, settings_from
from sslflow.core.env import child_env
from sslflow.core.secrets import redact_uri


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the local tracking database", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    add_params_arguments(p)
    p.add_argument("--workdir", dest="project", help=argparse.SUPPRESS)  # the name before --project
    p.set_defaults(func=run)


def command(args: argparse.Namespace) -> list[str]:
    from sslflow.core.errors import UserError
    from sslflow.tasks.tracking.backend import artifact_location, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(settings_from(args))
    if uri.startswith(("http://", "https://")):
        raise UserError(f"the tracking URI {redact_uri(uri)} is a server: open it in a browser")
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UserError(f"no MLflow database at {db}: run `sslflow run` first (or pass --project)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    artifacts = artifact_location(uri)
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    return cmd


def run(args: argparse.Namespace) -> int:
    cmd = command(args)
    print(" ".join(cmd) if args.dry_run else f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C stops it)")
    if args.dry_run:
        return 0
    try:
        return subprocess.call(cmd, env=child_env())
    except KeyboardInterrupt:
        return 0
