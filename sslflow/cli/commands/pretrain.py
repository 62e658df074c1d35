"""`sslflow pretrain`: self-supervised pretraining of an encoder on a store or image folder.

Multi-GPU: run it under `torchrun --nproc-per-node N -m sslflow.cli pretrain ...` (see
docs/multi-gpu.md); `pretrain.batch_size` is then the global batch and only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sslflow.cli.commands.common import add_params_arguments, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain an encoder with an SSL method (docs/methods.md)",
                       description=__doc__)
    p.add_argument("--data", required=True, help="image store or image folder (<class>/*.jpg or *.jpg)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, encoder, metrics.json")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--eval-train", help="labeled store/folder: kNN memory bank for online evaluation")
    p.add_argument("--eval-test", help="labeled store/folder: queries for online kNN evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--metrics", metavar="FILE", help="also write the run's reproducible metrics (no wall-clock "
                   "figures) as JSON, e.g. for dvc metrics")
    p.add_argument("--plots", metavar="DIR", help="also write loss.csv and knn.csv per epoch, e.g. for dvc plots")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.ssl_models import distributed
    from sslflow.tasks.training.pretrain import pretrain

    params = settings_from(args)
    result = pretrain(args.data, args.out, params, resume=args.resume, eval_train=args.eval_train,
                      eval_test=args.eval_test, progress_bar=not args.no_progress)
    if not distributed.is_main():  # torchrun: the other ranks trained, rank 0 reports
        return 0
    if args.metrics or args.plots:
        from sslflow.tasks.training.dvc_export import export

        export(args.out, args.metrics or Path(args.out) / "dvc-metrics.json", args.plots or Path(args.out) / "plots")
    print(json.dumps(result.metrics, indent=1))
    print(f"encoder: {Path(args.out) / 'encoder.pt'} (state dict) and encoder.pt2 (torch.export)")
    return 0
