"""Arguments shared by subcommands: the project, settings files and `--set` overrides."""

from __future__ import annotations

import argparse
import sys

from sslflow.core.project import PARAMS_FILE
from sslflow.core.settings import Settings, load_settings

#: Commands that say so when the project has no settings file (they would train the full-scale
#: GPU configuration). Only `run`, the quickstart's command: the others keep their error output
#: to one line (their docs and `sslflow settings` show the resolved values).
TRAINING_COMMANDS = frozenset({"run"})


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
    """The command's settings, loaded once: defaults -> --params (or params.yaml) -> --set.

    A training command in a project without `params.yaml` says so in one line: every entry
    point then runs the same built-in (GPU-sized) defaults, and the user learns how to get the
    CPU demo profile instead of waiting hours."""
    settings = load_settings(args.params, args.overrides, project=args.project)
    command = getattr(args, "command", None)
    if command in TRAINING_COMMANDS and args.params is None and not (settings.project / PARAMS_FILE).is_file():
        print(f"sslflow {command}: {settings.project} has no {PARAMS_FILE}: using the built-in defaults (the "
              "full-scale GPU configuration); for the CPU demo profile copy the repository's params.yaml "
              "there, or pass --params params/profiles/demo-<method>.yaml", file=sys.stderr)
    return settings
