"""`sslflow pretrain`: self-supervised pretraining of an encoder on a store or image folder.

Multi-GPU: run it under `torchrun --nproc-per-node N -m sslflow.cli pretrain ...` (see
docs/multi-gpu.md); `pretrain.batch_size` is then the global batch and only rank 0 prints.

A store larger than `--max-device-bytes` (`pretrain.max_device_bytes`; default a quarter of the
GPU's memory) streams from disk in the same batch order as a resident one, so a run resumes in
either mode.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from sslflow.cli.commands.common import add_params_arguments, settings_from
from sslflow.core.settings import Settings


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
    p.add_argument("--max-device-bytes", type=byte_size, metavar="SIZE",
                   help="keep the store on the device only up to this size (e.g. 8G, 512M, 0 = auto), "
                        "else stream it from disk in the same order: sets pretrain.max_device_bytes")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.ssl_models import distributed
    from sslflow.tasks.training.pretrain import pretrain

    params = settings_for(args)
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


def settings_for(args: argparse.Namespace) -> Settings:
    """The run's settings: `--max-device-bytes` is `--set pretrain.max_device_bytes=N`, applied last."""
    if args.max_device_bytes is not None:
        args.overrides = [*args.overrides, f"pretrain.max_device_bytes={args.max_device_bytes}"]
    return settings_from(args)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(text: str) -> int:
    """`8G`, `512MiB`, `1.5g`, `4096`: bytes (binary units: K = 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: a number of bytes with an optional unit "
                                         "K, M, G or T (binary), e.g. 8G")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
