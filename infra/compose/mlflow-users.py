"""One-shot (compose service `mlflow-users`, Kubernetes Job): the ordinary MLflow user of workers
and clients (MLFLOW_USER / MLFLOW_USER_PASSWORD), created or updated by the admin once the server
answers. The native stack does the same in infra/local-stack.sh."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stackctl
from healthcheck import load_secrets

if __name__ == "__main__":
    load_secrets()
    os.environ.setdefault("MLFLOW_URL", "http://mlflow:5000")
    os.environ["MLFLOW_NEW_USER"] = os.environ.get("MLFLOW_USER", "sslflow")
    os.environ["MLFLOW_NEW_PASSWORD"] = os.environ.get("MLFLOW_USER_PASSWORD", "")
    deadline = time.monotonic() + 300
    while (rc := stackctl.mlflow_ensure_user()) != 0 and time.monotonic() < deadline:
        time.sleep(3)
    sys.exit(rc)
