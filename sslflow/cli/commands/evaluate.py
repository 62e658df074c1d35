"""`sslflow evaluate`: kNN, linear-probe and fine-tune accuracy of a pretrained encoder."""

from __future__ import annotations

import argparse

from sslflow.cli.commands.common import add_params_arguments, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate an encoder on a labeled train/test pair",
                       description=__doc__)
    p.add_argument("--encoder", required=True, help="run directory of `sslflow pretrain` (or its encoder.pt)")
    p.add_argument("--train", required=True, help="labeled store or folder: kNN bank / probe training set")
    p.add_argument("--test", required=True, help="labeled store or folder: held-out evaluation set")
    p.add_argument("--protocol", help="comma-separated subset of knn,linear,finetune "
                                      "(default: eval.protocols in params)")
    p.add_argument("--output", help="JSON report path (default: ENCODER/evaluation.json)")
    p.add_argument("--metrics", metavar="FILE", help="also write the numbers alone as JSON (dvc metrics)")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.core.errors import UserError
    from sslflow.tasks.training.evaluate import evaluate

    params = settings_from(args)
    protocols = None
    if args.protocol:
        protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
        unknown = [p for p in protocols if p not in ("knn", "linear", "finetune")]
        if unknown or not protocols:
            raise UserError(f"--protocol: unknown protocol {unknown[0] if unknown else ''!r} "
                            "(choose from knn, linear, finetune)")
    report = evaluate(args.encoder, args.train, args.test, params, protocols, args.output)
    if args.metrics:
        from sslflow.tasks.training.dvc_export import evaluation_metrics

        evaluation_metrics(report, args.metrics)
    for key, value in report.metrics.items():
        print(f"{key:<16} {value:6.2f}")
    for name, description in report.protocols.items():
        print(f"  {name}: {description}")
    return 0
