"""Arguments shared by subcommands: the project, settings files and `--set` overrides."""

from __future__ import annotations

import argparse

from sslflow.core.settings import Settings, load_settings


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", metavar="FILE", action="append", default=None,
                        help="settings file(s) applied on the defaults instead of the project's params.yaml "
                             "(repeatable: later files win)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set pretrain.lr=0.3 (repeatable; the keys of "
                             "dvc exp run -S)")
    parser.add_argument("--project", metavar="DIR",
                        help="project directory: params.yaml, mlflow.db, optuna.db, data/, runs/, reports/ "
                             "(default: $SSLFLOW_PROJECT, else the current directory)")


def settings_from(args: argparse.Namespace) -> Settings:
    """The command's settings, loaded once: defaults -> --params (or params.yaml) -> --set."""
    return load_settings(args.params, args.overrides, project=args.project)
