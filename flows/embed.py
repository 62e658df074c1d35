"""The `embed` flow: embeddings of new data with the champion encoder, for batch jobs
(deployment `embed/on-demand`).

    from sslflow.flows.embed import embed_flow
    embed_flow(source="data/incoming", out="data/embeddings/incoming.parquet")   # models:/<model>@champion

A thin composition of `sslflow.tasks.serving` (load the encoder, embed the source into a
resumable Parquet table: a retried flow run continues where the failed one stopped) and
`sslflow.tasks.tracking.embeddings` (one MLflow run with the source and the table as dataset
inputs), ending with a markdown artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact


@flow(name="embed", log_prints=True)
def embed_flow(source: str, out: str, model: str | None = None, params_files: list[str] | None = None,
               overrides: list[str] | None = None, batch_size: int = 256, log_table: bool = True,
               project: str | None = None) -> dict[str, Any]:
    """Embed `source` (folder, split store or store root) into `out` with `model` (None =
    `models:/<tracking.model_name>@champion`); settings loaded once (`params_files`, `overrides`)."""
    from sslflow.core.settings import load_settings
    from sslflow.ssl_models.train import resolve_device
    from sslflow.tasks.serving.embed import embed_source
    from sslflow.tasks.serving.encoder import load_encoder_for_embedding
    from sslflow.tasks.tracking.backend import resolve_tracking_uri, scoped_tracking_uri
    from sslflow.tasks.tracking.embeddings import log_embeddings
    from sslflow.tasks.tracking.run import outages_as_one_line

    logger = get_run_logger()
    settings = load_settings(params_files, overrides or [], project=project)
    model = model or f"models:/{settings.tracking.model_name}@champion"
    uri = resolve_tracking_uri(settings)
    with scoped_tracking_uri(uri), outages_as_one_line(uri, f"loading {model}"):
        encoder, meta = load_encoder_for_embedding(model)
    summary = embed_source(encoder, meta, source, out, ingest=settings.ingest, batch_size=batch_size,
                           device=str(resolve_device(settings.device)), progress=False, log=logger.info)
    run_id = log_embeddings(settings, summary, log_table=log_table)
    rows = "\n".join(f"| {k} | {v} |" for k, v in (("model", model), ("source", source), ("out", out),
                                                    ("rows", summary.rows), ("embedded now", summary.embedded),
                                                    ("already there", summary.skipped),
                                                    ("quarantined", len(summary.quarantined)),
                                                    ("MLflow run", run_id)))
    create_markdown_artifact(key="embed-summary", markdown=f"# embed\n\n| | |\n|---|---|\n{_escape(rows)}\n")
    return {**summary.to_dict(), "mlflow_run_id": run_id}


def _escape(text: str) -> str:
    """User strings (paths, model names) in a markdown table: no HTML, no stray column breaks."""
    import html

    return "\n".join("| " + " | ".join(html.escape(c.strip()).replace("`", "\\`") for c in line.strip("|").split(" | "))
                     + " |" for line in text.splitlines())
