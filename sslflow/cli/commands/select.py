"""`sslflow select`: which unlabeled images to label next, as a CSV.

    sslflow select --n 500 --out selection.csv                       # champion, data/store/train
    sslflow select --n 100 --model runs/demo --store data/store --out picks.csv --drift-weighted

k-center greedy over the encoder's embeddings of the split's unlabeled images (labeled ones
count as already covered): N labels that cover the data instead of repeating its dense
regions. `--drift-weighted` favours the clusters that the images added since the last training
fill more than the earlier ones did. Columns: rank, index (row in the store), path (as
ingested), sha256, weight. The CSV is logged to MLflow as an artifact unless `--no-mlflow`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sslflow.cli.commands.common import add_params_arguments, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("select", help="pick N unlabeled images to label next (k-center greedy on embeddings)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, required=True, help="how many images to pick")
    p.add_argument("--model", help="run directory, encoder.pt or models:/NAME@ALIAS (default: the champion)")
    p.add_argument("--store", help="image store root (default: pipeline.store)")
    p.add_argument("--split", default="train", help="split to pick from (default train)")
    p.add_argument("--out", required=True, help="the CSV to write")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the settings' device)")
    p.add_argument("--drift-weighted", action="store_true",
                   help="favour regions the images added since the last training drifted to")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the selection to MLflow")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.core.errors import UserError
    from sslflow.ssl_models.store import ImageStore
    from sslflow.ssl_models.train import resolve_device
    from sslflow.tasks.pipeline.drift import load_champion
    from sslflow.tasks.serving.select import select_from_store

    if args.n < 1:
        raise UserError(f"--n must be >= 1 (got {args.n})")
    out = Path(args.out)
    if out.suffix != ".csv":
        raise UserError(f"--out {out}: name a .csv file")
    settings = settings_from(args)
    split_dir = settings.path(args.store or settings.pipeline.store) / args.split
    if not ImageStore.is_store(split_dir):
        raise UserError(f"{split_dir} is not an image store (sslflow ingest first, or --store/--split)")
    device = str(resolve_device(args.device or settings.device))
    encoder, meta = load_champion(settings, args.model)
    reference = None
    if args.drift_weighted:
        from sslflow.tasks.pipeline.decisions import last_training, trained_on

        reference = trained_on(last_training(settings))
        if reference is None:
            raise UserError("--drift-weighted: no registered training with a data.train_images tag to compare with")
    picked = select_from_store(split_dir, encoder, args.n, device=device, seed=settings.seed,
                               drift_reference=reference, clusters=settings.pipeline.drift_clusters)
    out.parent.mkdir(parents=True, exist_ok=True)
    picked.to_csv(out, index=False)
    unlabeled = int((ImageStore.open(split_dir).labels() < 0).sum())
    line = f"select: {len(picked)} of {unlabeled} unlabeled images in {split_dir} -> {out}"
    if not args.no_mlflow:
        line += f" (MLflow run {_log(settings, out, meta, args, len(picked))})"
    print(line)
    return 0


def _log(settings, out: Path, meta: dict, args: argparse.Namespace, picked: int) -> str:
    import mlflow

    from sslflow.tasks.tracking.backend import resolve_tracking_uri, scoped_tracking_uri
    from sslflow.tasks.tracking.run import outages_as_one_line

    uri = resolve_tracking_uri(settings)
    with scoped_tracking_uri(uri), outages_as_one_line(uri, "logging the selection"):
        mlflow.set_experiment(settings.tracking.experiment)
        with mlflow.start_run(run_name="select", tags={"sslflow.kind": "selection"}) as run:
            mlflow.log_params({"n": args.n, "model": str(meta.get("model_ref")), "split": args.split,
                               "drift_weighted": args.drift_weighted})
            mlflow.log_metric("selected", picked)
            mlflow.log_artifact(str(out))
        return run.info.run_id
