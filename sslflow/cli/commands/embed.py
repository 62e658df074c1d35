"""`sslflow embed`: embeddings of a folder of images or a store, as a Parquet table.

    sslflow embed --model models:/ssl-encoder@champion --source photos/ --out embeddings.parquet
    sslflow embed --model runs/demo --source data/store --out data/embeddings.parquet

Columns: path, sha256, split, label, embedding (docs/embeddings.md). Batched on the device
(`--device`, default the settings' `device`), a progress bar on a terminal (one line every
`--log-every` batches otherwise), resumable (run the same command again after a crash), bad
files quarantined with ingest's reasons into `<out>.quarantine.json`. The run is logged to
MLflow (source and table as dataset inputs, the table as an artifact) unless `--no-mlflow`.
"""

from __future__ import annotations

import argparse
import json

from sslflow.cli.commands.common import add_params_arguments, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed a folder or store with an encoder into a Parquet table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run directory, encoder.pt, or models:/NAME@ALIAS (MLflow)")
    p.add_argument("--source", required=True, help="image folder (<class>/*.jpg or *.jpg), split store, or store root")
    p.add_argument("--out", required=True, help="the table to write or complete (.parquet)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the settings' device; auto = cuda if available)")
    p.add_argument("--workers", type=int, default=0, help="decode processes for a folder (0 = all cores)")
    p.add_argument("--log-every", type=int, default=50, help="batches between progress lines when not on a terminal")
    p.add_argument("--no-progress", action="store_true", help="progress lines, never a bar")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    p.add_argument("--no-log-table", action="store_true", help="log to MLflow without uploading the table itself")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.core.errors import UserError
    from sslflow.ssl_models.train import resolve_device
    from sslflow.tasks.serving.embed import embed_source
    from sslflow.tasks.serving.encoder import load_encoder_for_embedding
    from sslflow.tasks.tracking.backend import resolve_tracking_uri, scoped_tracking_uri
    from sslflow.tasks.tracking.run import outages_as_one_line

    if args.batch_size < 1 or args.log_every < 1 or args.workers < 0:
        raise UserError("--batch-size and --log-every must be >= 1, --workers >= 0")
    settings = settings_from(args)
    device = resolve_device(args.device or settings.device)
    if str(args.model).startswith(("models:/", "runs:/")):
        uri = resolve_tracking_uri(settings)
        with scoped_tracking_uri(uri), outages_as_one_line(uri, f"loading {args.model}"):
            encoder, meta = load_encoder_for_embedding(args.model)
    else:
        encoder, meta = load_encoder_for_embedding(args.model)
    summary = embed_source(encoder, meta, args.source, args.out, ingest=settings.ingest, batch_size=args.batch_size,
                           device=str(device), workers=args.workers, progress=False if args.no_progress else None,
                           log_every=args.log_every)
    report = summary.to_dict()
    if not args.no_mlflow:
        from sslflow.tasks.tracking.embeddings import log_embeddings

        report["mlflow_run_id"] = log_embeddings(settings, summary, log_table=not args.no_log_table)
    report["quarantined"] = len(summary.quarantined)
    print(json.dumps(report, indent=1))
    return 0
