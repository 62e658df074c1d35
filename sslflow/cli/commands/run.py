"""`sslflow run`: the main job end to end on embedded defaults.

Ingest the built-in demo set (or `--source`) into `data/store/{train,test}`, then run the
`train` Prefect flow (validate -> pretrain with online kNN -> evaluate kNN + linear probe ->
log to MLflow -> register -> promotion gate) and say where everything is. With the demo
source the quickstart profile `params/profiles/demo.yaml` is applied first, so the whole job
takes a few minutes on 2 CPU cores. MLflow: `MLFLOW_TRACKING_URI`, else `tracking.uri`, else
`<workdir>/mlflow.db` (open it with `sslflow ui`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from sslflow.cli.commands.common import add_params_arguments
from sslflow.core.settings import PARAMS_DIR, load_params

DEMO_PROFILE = PARAMS_DIR / "profiles" / "demo.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="ingest -> train flow (pretrain, evaluate, register), end to end",
                       description=__doc__)
    p.add_argument("--source", default="demo", help="demo (default) or an image folder with train/ and test/")
    p.add_argument("--workdir", default=".", help="project directory (data/, runs/, mlflow.db go here)")
    p.add_argument("--run-name", help="name of the run directory under runs/ (default: a timestamp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_params_arguments(p)
    p.set_defaults(func=run)


def tracking_overrides(workdir: Path, params_file: str | None, overrides: list[str]) -> list[str]:
    """`tracking.uri=sqlite:///<workdir>/mlflow.db` unless the environment, the params file or
    `--set` name a tracking URI (the library default is the project directory's database)."""
    from sslflow.tasks.tracking.track import load_tracking_params

    if os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        return []
    if load_tracking_params(params_file, overrides).tracking.uri.strip():
        return []
    return [f"tracking.uri=sqlite:///{(workdir / 'mlflow.db').resolve()}"]


def run(args: argparse.Namespace) -> int:
    from sslflow.tasks.data.ingest import ingest
    from sslflow.tasks.data.ingest import load_params as load_ingest_params
    from sslflow.tasks.pipeline.decisions import partition_overrides
    from sslflow.tasks.tracking.track import check_tracking_server, load_tracking_params, resolve_tracking_uri

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides) + tracking_overrides(work, args.params, args.overrides)
    ov = partition_overrides(overrides)
    files = _params_files(args)
    params = load_params(files, ov["engine"])  # bad params: one line, before anything runs
    tp = load_tracking_params(args.params, ov["tracking"])
    check_tracking_server(resolve_tracking_uri(tp.tracking), tp.tracking.preflight_timeout_s)
    store = work / "data" / "store"
    data_params = load_ingest_params(args.params, ov["data"])
    data_version = None
    for split in ("train", "test"):
        source = args.source if args.source == "demo" else str(Path(args.source) / split)
        summary = ingest(source, store, split, params=data_params, reports_dir=work / "reports")
        data_version = summary.data_version
        print(f"ingest {split}: {summary.accepted} new images, {summary.total_in_store} in the store")

    from sslflow.flows.train import train_flow

    t0 = time.perf_counter()
    result = train_flow(store=str(store), params_files=[str(f) for f in files], overrides=overrides,
                        run_name=args.run_name or time.strftime("%Y%m%d-%H%M%S"), runs_dir=str(work / "runs"),
                        reports_dir=str(work / "reports"), protocols=["knn", "linear"], data_version=data_version,
                        progress_bar=not args.no_progress)
    minutes = (time.perf_counter() - t0) / 60
    pm = result["pretrain_metrics"]
    print(f"\n{params.pretrain.method} / {params.pretrain.backbone} (width {params.pretrain.width}), "
          f"{params.pretrain.epochs} epochs, train flow in {minutes:.1f} min:")
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


def _params_files(args: argparse.Namespace) -> list[Path]:
    """The demo profile (for the demo source), then the user's --params on top."""
    files = [DEMO_PROFILE] if args.source == "demo" else []
    return files + ([Path(args.params)] if args.params else [])
