"""`sslflow ingest`: add what is new in a source to the image store as one validated batch.

Prints the batch summary as JSON on stdout (also written to `reports/ingest/<split>.json`);
progress goes to stderr. Exit 0: published or nothing new; 2: bad input or failed data
validation (the store is unchanged); 1: the batch is in, but `dvc push` failed (rerun later).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sslflow.cli.commands.common import add_params_arguments, settings_from


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest", help="add new images from a folder, torchvision dataset or the demo set",
        description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True,
                   help="a folder (<root>/<class>/... is labeled), demo, or torchvision:NAME (e.g. CIFAR10)")
    p.add_argument("--store", required=True, type=Path, help="store root, e.g. data/store (one store per split)")
    p.add_argument("--split", default="train", help="split store under --store (default: train)")
    p.add_argument("--size", type=int, default=None,
                   help="side of stored images for a new store (default: ingest.size; an existing store keeps its own)")
    p.add_argument("--reports", type=Path, default=None, help="reports directory (default: pipeline.reports)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: ingest.workers)")
    p.add_argument("--no-dvc", action="store_true", help="do not dvc add/push even inside a DVC repo")
    p.add_argument("--no-push", action="store_true", help="dvc add, but do not dvc push")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.core.errors import UserError
    from sslflow.tasks.data.ingest import ingest

    if args.size is not None and args.size <= 0:
        raise UserError(f"--size must be > 0; got {args.size}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0; got {args.workers}")
    settings = settings_from(args)
    reports = args.reports or settings.path(settings.pipeline.reports)
    summary = ingest(args.source, args.store, args.split, args.size, settings=settings,
                     reports_dir=reports,
                     dvc=False if args.no_dvc else None, push=False if args.no_push else None,
                     workers=args.workers)
    print(json.dumps(summary.to_dict(), indent=1, ensure_ascii=False))
    error = summary.versioning.get("error")
    if error:
        print(f"sslflow ingest: batch {summary.batch_id} is in the store, but {error}", file=sys.stderr)
        return 1
    return 0
