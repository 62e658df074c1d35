"""An embedding table in MLflow: one run with the source as a dataset input, the table as a
dataset input of context `embeddings` and as an artifact, and the counts as metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslflow.core.settings import Settings
from sslflow.tasks.tracking.run import tracking_run


def log_embeddings(settings: Settings, summary: Any, *, log_table: bool = True) -> str:
    """Log `summary` (`sslflow.tasks.serving.embed.EmbedSummary`) as one MLflow run; its id.

    `log_table=False` logs everything but the Parquet file itself (a table of millions of rows
    belongs in the store or a lake, its digest and schema in MLflow)."""
    import mlflow
    import pandas as pd

    out = Path(summary.out)
    rows = pd.read_parquet(out, columns=["path", "sha256", "split", "label"])
    with tracking_run(settings, run_name=f"embed {Path(summary.source).name}", log_params=False,
                      tags={"sslflow.step": "embed", "sslflow.model": summary.model}) as run:
        mlflow.log_params({"model": summary.model, "source": summary.source, "out": str(out),
                           "fingerprint": summary.fingerprint, "feature_dim": summary.feature_dim})
        mlflow.log_input(mlflow.data.from_pandas(rows, source=summary.source, name=Path(summary.source).name),
                         context="source")
        mlflow.log_input(mlflow.data.from_pandas(rows, source=str(out), name=out.name), context="embeddings")
        run.log_metrics({"rows": summary.rows, "embedded": summary.embedded, "skipped": summary.skipped,
                         "quarantined": len(summary.quarantined), "images_per_s": summary.images_per_s},
                        prefix="embed/")
        if log_table:
            run.log_artifact(out, "embeddings")
        quarantine = out.with_name(out.stem + ".quarantine.json")
        if quarantine.is_file():
            run.log_artifact(quarantine, "embeddings")
        return run.run_id
