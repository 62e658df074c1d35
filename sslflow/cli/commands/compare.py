"""`sslflow compare`: train several SSL methods on the same data and budget, side by side in MLflow.

    sslflow compare --methods simclr,byol,mae                 # the project's store, each method's demo profile
    sslflow compare --methods all --report reports/compare    # every method; table + chart also written there
    sslflow compare --methods simclr,moco --params params/profiles/cifar10-simclr.yaml --epochs 100 \\
                    --data data/cifar/train --eval-test data/cifar/test

Runs the `compare` Prefect flow: one MLflow parent run with one child run per method (each
pretrained with online kNN from the random initialisation, then kNN + linear probe), a table
(method, family, kNN, linear, random-init kNN, minutes, images/s) and a chart on the parent;
prints the table. Without `--params` each method uses `params/profiles/demo-<method>.yaml`;
with it, every method uses those files with `pretrain.method` set. `--set` and `--epochs` apply
to all. Exit code 1 when a method failed (the others are still trained and tabled).
"""

from __future__ import annotations

import argparse
import sys
import time

from sslflow.cli.commands.common import add_params_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train several methods on the same data, compared in one MLflow parent run",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", required=True, help="comma-separated method names, or all (docs/methods.md)")
    p.add_argument("--data", help="store or image folder to pretrain on (default: pipeline.store/train)")
    p.add_argument("--eval-train", help="labeled store/folder: kNN memory bank and linear-probe training set "
                                        "(default: --data)")
    p.add_argument("--eval-test", help="labeled store/folder: evaluation queries (default: pipeline.store/test)")
    p.add_argument("--epochs", type=int, help="the same number of epochs for every method (default: each "
                                              "profile's)")
    p.add_argument("--run-name", help="name of the parent run and of its folder under runs/ (default: a timestamp)")
    p.add_argument("--report", metavar="DIR", help="also write compare.md, compare.csv, compare.png there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.core.errors import UserError
    from sslflow.core.secrets import redact_uri
    from sslflow.tasks.pipeline.comparison import eval_inputs, parse_methods, plan
    from sslflow.tasks.tracking.backend import check_tracking_server, resolve_tracking_uri

    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    # bad settings, methods, paths or a server that is down: one line, before the flow. Not
    # `settings_from`: its "no params.yaml: built-in GPU defaults" warning does not apply here,
    # where each method without --params trains with its own demo profile.
    from sslflow.core.settings import load_settings

    base = load_settings(args.params, args.overrides, project=args.project)
    methods = parse_methods(args.methods)
    plan(methods, base, args.params, args.overrides, args.epochs)
    eval_inputs(base, args.data, args.eval_train, args.eval_test)
    check_tracking_server(resolve_tracking_uri(base), base.tracking.preflight_timeout_s)

    from sslflow.cli.temporary_server import prefect_api
    from sslflow.flows.compare import compare_flow

    t0 = time.perf_counter()
    with prefect_api():
        result = compare_flow(methods, data=args.data, eval_train=args.eval_train, eval_test=args.eval_test,
                              params_files=args.params, overrides=list(args.overrides), epochs=args.epochs,
                              run_name=args.run_name, report_dir=args.report, progress_bar=not args.no_progress,
                              project=str(base.project))
    print(f"\n{len(methods)} methods in {(time.perf_counter() - t0) / 60:.1f} min "
          f"(data version {result['data_version'] or 'unknown'}):\n")
    print(result["text_table"])
    print(f"MLflow: {redact_uri(result['tracking_uri'])}  parent run {result['mlflow_run_id']} "
          "(table, chart: artifacts comparison/; browse: sslflow ui)")
    print(f"run directories: {result['run_dir']}/<method>")
    if args.report:
        print(f"report: {args.report}/compare.md, compare.csv, compare.png")
    if result["failed"]:
        print(f"sslflow compare: error: {len(result['failed'])} of {len(methods)} methods failed: "
              f"{', '.join(result['failed'])} (see the table and their MLflow runs)", file=sys.stderr)
        return 1
    return 0
