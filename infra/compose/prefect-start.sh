#!/bin/sh
# Prefect server entrypoint (compose and Kubernetes): the `prefect` role's database and the basic
# auth string from the environment / the mounted Secret, leases on disk, then `prefect server start`.
set -eu
. "$(dirname "$0")/secrets.sh"
require PREFECT_DB_PASSWORD PREFECT_AUTH_PASSWORD
db=${PREFECT_DB:-prefect}
export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://${db}:${PREFECT_DB_PASSWORD}@${POSTGRES_HOST:-postgres}:${POSTGRES_INTERNAL_PORT:-5432}/${db}"
export PREFECT_SERVER_API_AUTH_STRING="${PREFECT_AUTH_USER:-sslflow}:${PREFECT_AUTH_PASSWORD}"
export PREFECT_API_AUTH_STRING="$PREFECT_SERVER_API_AUTH_STRING" PREFECT_SERVER_ANALYTICS_ENABLED=false
# concurrency leases (the retrain slot) on disk under PREFECT_HOME, not in the server's memory: after
# a restart of the server its repossessor still frees the slot of a run that died holding it
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem
unset POSTGRES_PASSWORD S3_ACCESS_KEY S3_SECRET_KEY MLFLOW_ADMIN_PASSWORD MLFLOW_DB_PASSWORD MLFLOW_AUTH_DB_PASSWORD \
    OPTUNA_DB_PASSWORD MLFLOW_USER_PASSWORD MLFLOW_S3_SECRET_KEY DVC_S3_SECRET_KEY S3_JWT_KEY MLFLOW_SECRET_KEY
exec prefect server start --host 0.0.0.0 --port 4200
