"""Prefect flows of the pipeline: `train`, `retrain` (scheduled), `pretrain` (GPU pool), `tune` and their deployments.

Flows only compose the steps of `sslflow.tasks` (their Prefect task wrappers live in
`sslflow.tasks.pipeline.steps`); a flow holds no logic that a test could not reach without Prefect.
"""
