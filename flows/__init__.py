"""Prefect flows of the pipeline: `train`, `retrain` (scheduled), `pretrain` (GPU pool), `tune` and their deployments.

Safe defaults for a laptop or CI before Prefect is imported: no analytics, and enough time
for the temporary local server a flow starts when no `PREFECT_API_URL` is set.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
