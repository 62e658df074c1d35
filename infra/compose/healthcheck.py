"""Health checks of the compose services and the Kubernetes probes that touch the databases
(`/health` of MLflow and Prefect answers 200 with PostgreSQL down):

    python infra/compose/healthcheck.py mlflow     an authenticated API call (auth + tracking database)
    python infra/compose/healthcheck.py prefect    /api/ready (the server's SELECT 1 on its database)
    python infra/compose/healthcheck.py worker     the worker's own /health (it fails when polling stops)

Credentials come from the environment or the mounted Secret (SSLFLOW_SECRETS_DIR), like the start
scripts'. Exit 0 healthy, 3 not.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stackctl  # infra/stackctl.py


def load_secrets() -> None:
    folder = os.environ.get("SSLFLOW_SECRETS_DIR")
    if folder and Path(folder).is_dir():
        for f in Path(folder).iterdir():
            if f.is_file() and f.name.isupper() and not os.environ.get(f.name):
                os.environ[f.name] = f.read_text().strip()


def main(what: str) -> int:
    load_secrets()
    if what == "mlflow":
        os.environ.setdefault("MLFLOW_URL", "http://127.0.0.1:5000")
        os.environ["MLFLOW_USER"] = os.environ.get("MLFLOW_ADMIN_USER", "admin")
        os.environ["MLFLOW_PASSWORD"] = os.environ.get("MLFLOW_ADMIN_PASSWORD", "")
        return stackctl.mlflow_check()
    if what == "prefect":
        os.environ.setdefault("PREFECT_API", "http://127.0.0.1:4200/api")
        os.environ["PREFECT_AUTH"] = f"{os.environ.get('PREFECT_AUTH_USER', 'sslflow')}:" \
                                     f"{os.environ.get('PREFECT_AUTH_PASSWORD', '')}"
        return stackctl.prefect_check()
    if what == "worker":
        status, body = stackctl.http("GET", "http://127.0.0.1:8080/health")
        return 0 if status == 200 else stackctl.fail(3, f"worker /health: HTTP {status} {body[:200]}")
    return stackctl.fail(2, f"unknown check {what}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
