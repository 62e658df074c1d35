"""`sslflow promote`: make a registered encoder version the champion by hand (override the gate).

The old champion gets alias `previous`, so a rollback is `sslflow promote --version <previous>`.
The tracking URI comes from `MLFLOW_TRACKING_URI`, else `tracking.uri` in params/tracking.yaml,
else the embedded `sqlite:///<project>/mlflow.db`.
"""

from __future__ import annotations

import argparse

from sslflow.cli.commands.common import add_params_arguments, settings_from
from sslflow.core.secrets import redact_uri


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("promote", help="set the champion alias of the registered encoder by hand",
                              description=__doc__.splitlines()[0])
    p.add_argument("--version", required=True, type=int, metavar="N", help="model version to promote")
    p.add_argument("--model", help="registered model name (default: tracking.model_name, ssl-encoder)")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from sslflow.tasks.tracking.backend import check_tracking_server, resolve_tracking_uri
    from sslflow.tasks.tracking.registry import promote_by_hand

    settings = settings_from(args)
    uri = resolve_tracking_uri(settings)
    check_tracking_server(uri, settings.tracking.preflight_timeout_s)
    name = args.model or settings.tracking.model_name
    d = promote_by_hand(name, args.version, MlflowClient(tracking_uri=uri))
    previous = f"; version {d.champion_version} is now 'previous'" if d.champion_version else ""
    print(f"{name} version {d.version} is now 'champion' ({redact_uri(uri)}){previous}")
    return 0
