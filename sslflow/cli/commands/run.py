"""`sslflow run`: the main job end to end on the project's settings.

Ingest the built-in demo set (or `--source`) into the store (`pipeline.store`, train and test
splits), then run the `train` Prefect flow (validate -> pretrain with online kNN -> evaluate
kNN + linear probe -> log to MLflow -> register -> promotion gate) and say where everything
is. Everything lives in the project directory (the current one, `--project DIR` or
`SSLFLOW_PROJECT`): its params.yaml (in this repository the CPU demo profile, so the whole
job takes a few minutes on 2 CPU cores), mlflow.db (open it with `sslflow ui`), data/,
runs/, reports/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sslflow.cli.commands.common import add_params_arguments, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="ingest -> train flow (pretrain, evaluate, register), end to end",
                       description=__doc__)
    p.add_argument("--source", default="demo", help="demo (default) or an image folder with train/ and test/")
    p.add_argument("--run-name", help="name of the run directory under runs/ (default: a timestamp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_params_arguments(p)
    p.add_argument("--workdir", dest="project", help=argparse.SUPPRESS)  # the name before --project
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.core.project import run_name
    from sslflow.tasks.data.ingest import ingest
    from sslflow.tasks.tracking.backend import check_tracking_server, resolve_tracking_uri
    from sslflow.tasks.tracking.run import backbone_label

    settings = settings_from(args)  # bad settings: one line, before anything runs
    name = run_name(args.run_name)
    project = settings.project
    project.mkdir(parents=True, exist_ok=True)
    settings.path(settings.pipeline.incoming).mkdir(parents=True, exist_ok=True)  # where retrain looks next
    check_tracking_server(resolve_tracking_uri(settings), settings.tracking.preflight_timeout_s)
    store = settings.path(settings.pipeline.store)
    reports = settings.path(settings.pipeline.reports)
    data_version = None
    for split in ("train", "test"):
        source = args.source if args.source == "demo" else str(Path(args.source) / split)
        summary = ingest(source, store, split, settings=settings, reports_dir=reports)
        data_version = summary.data_version
        print(f"ingest {split}: {summary.accepted} new images, {summary.total_in_store} in the store")

    from sslflow.cli.temporary_server import prefect_api
    from sslflow.flows.train import train_flow

    t0 = time.perf_counter()
    with prefect_api():
        result = train_flow(store=str(store), params_files=args.params, overrides=list(args.overrides),
                            run_name=name, data_version=data_version, progress_bar=not args.no_progress,
                            project=str(project))
    minutes = (time.perf_counter() - t0) / 60
    pm = result["pretrain_metrics"]
    print(f"\n{settings.pretrain.method} / {backbone_label(settings)}, {settings.pretrain.epochs} epochs, "
          f"train flow in {minutes:.1f} min:")
    for key, value in result["metrics"].items():
        print(f"  {key:<14} {value:6.2f}")
    if "knn_top1_at_init" in pm:
        print(f"  (kNN top-1 of the randomly initialised encoder: {pm['knn_top1_at_init']:.2f})")
    print(f"  final loss     {pm['final_loss']:.4f}")
    print(f"\nrun directory: {result['run_dir']}  (encoder.pt, encoder.pt2, metrics.json, evaluation.json)")
    print(f"MLflow:        {result['tracking_uri']}  run {result['mlflow_run_id']}  (browse: sslflow ui)")
    print(f"registry:      {result['model_name']} version {result['model_version']}: {result['decision']} "
          f"({result['reason']})")
    return 0
