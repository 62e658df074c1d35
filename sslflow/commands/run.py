"""`sslflow run`: the main job end to end on embedded defaults.

Ingest the built-in demo set (or `--source`) into `data/store/{train,test}`, pretrain an
encoder with online kNN, evaluate it (kNN + linear probe) and say where everything is.
With the demo source the quickstart profile `params/profiles/demo.yaml` is applied first,
so the whole job takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sslflow.commands.common import add_params_arguments
from sslflow.params import PARAMS_DIR, load_params, split_overrides

DEMO_PROFILE = PARAMS_DIR / "profiles" / "demo.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="ingest -> pretrain -> evaluate, end to end", description=__doc__)
    p.add_argument("--source", default="demo", help="demo (default) or an image folder with train/ and test/")
    p.add_argument("--workdir", default=".", help="project directory (data/, runs/ go here)")
    p.add_argument("--run-name", help="name of the run directory under runs/ (default: a timestamp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tasks.evaluate import evaluate
    from tasks.ingest import ingest
    from tasks.ingest import load_params as load_ingest_params
    from tasks.pretrain import pretrain

    work = Path(args.workdir)
    engine_overrides, data_overrides = split_overrides(args.overrides)
    params = load_params(_params_files(args), engine_overrides)
    store = work / "data" / "store"
    data_params = load_ingest_params(args.params, data_overrides)
    for split in ("train", "test"):
        source = args.source if args.source == "demo" else str(Path(args.source) / split)
        summary = ingest(source, store, split, params=data_params, reports_dir=work / "reports")
        print(f"ingest {split}: {summary.accepted} new images, {summary.total_in_store} in the store")
    run_dir = work / "runs" / (args.run_name or time.strftime("%Y%m%d-%H%M%S"))
    t0 = time.perf_counter()
    result = pretrain(store / "train", run_dir, params, eval_train=store / "train", eval_test=store / "test",
                      progress_bar=not args.no_progress)
    report = evaluate(run_dir, store / "train", store / "test", params, ("knn", "linear"))
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{params.pretrain.method} / {params.pretrain.backbone} (width {params.pretrain.width}), "
          f"{params.pretrain.epochs} epochs in {minutes:.1f} min:")
    for key, value in report.metrics.items():
        print(f"  {key:<14} {value:6.2f}")
    if "knn_top1_at_init" in result.metrics:
        print(f"  (kNN top-1 of the randomly initialised encoder: {result.metrics['knn_top1_at_init']:.2f})")
    print(f"  final loss     {result.metrics['final_loss']:.4f}")
    print(f"\nrun directory: {run_dir}  (encoder.pt, encoder.pt2, metrics.json, evaluation.json)")
    return 0


def _params_files(args: argparse.Namespace) -> list[Path]:
    """The demo profile (for the demo source), then the user's --params on top."""
    files = [DEMO_PROFILE] if args.source == "demo" else []
    return files + ([Path(args.params)] if args.params else [])
