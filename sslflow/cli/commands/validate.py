"""`sslflow validate`: check a published split, the gate before training.

First the files: every shard the index names must exist with its recorded shape and sha256
(a missing or damaged one: exit 2 naming it; `--repair` drops the damaged shards and forgets
their images, so that ingesting the source again restores them). Then the data suites
(Great Expectations). Exit 0 when everything holds, 2 with a one-line message naming the
failing files or expectations otherwise. JSON + Data Docs HTML go to `reports/`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sslflow.cli.commands.common import add_params_arguments, settings_from


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("validate", help="check a split of the image store against the data suites",
                              description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, type=Path, help="store root, e.g. data/store")
    p.add_argument("--split", default="train", help="split store under --store (default: train)")
    p.add_argument("--reports", type=Path, default=None, help="reports directory (default: pipeline.reports)")
    p.add_argument("--repair", action="store_true",
                   help="drop missing or damaged shards from the index and the manifest (then re-ingest the source)")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.ssl_models.store import ImageStore
    from sslflow.tasks.data.decode import DecodeOptions
    from sslflow.tasks.data.integrity import repair_split, require_sound
    from sslflow.tasks.data.validate import ValidationFailed, validate_split

    params = settings_from(args)
    c = params.ingest
    split_dir = args.store / args.split
    if args.repair:
        print(f"{split_dir}: {repair_split(split_dir, c.lock_wait_s)}")
    require_sound(split_dir, params.validate.checksums)
    store = ImageStore.open(split_dir)
    classes = list(c.classes) or (None if params.validate.allow_new_classes else store.classes)
    result = validate_split(split_dir, limits=DecodeOptions.of(c),
                            cfg=params.validate, classes=classes,
                            reports_dir=args.reports or params.path(params.pipeline.reports))
    if not result.success:
        raise ValidationFailed(result, prefix=f"{split_dir}: ")
    print(json.dumps(result.to_dict(), indent=1))
    return 0
