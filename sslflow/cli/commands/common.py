"""Arguments shared by subcommands: parameters from `params/`, a file and `--set`."""

from __future__ import annotations

import argparse

from sslflow.core.settings import load_params
from sslflow.ssl_models.config import Params


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", metavar="FILE",
                        help="YAML file overriding params/*.yaml (any subset of keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter, e.g. --set pretrain.lr=0.3 (repeatable)")


def params_from(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.overrides)
