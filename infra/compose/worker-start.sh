#!/bin/sh
# Prefect worker entrypoint (compose and Kubernetes): the client credentials flows need and nothing
# more (the ordinary MLflow user, the Prefect auth string, the `optuna` role; no admin, no S3 key,
# no superuser), then `prefect worker start ARGS...` with its health endpoint on :8080 (the
# liveness check: it fails when the worker stops polling the server).
set -eu
. "$(dirname "$0")/secrets.sh"
require PREFECT_AUTH_PASSWORD MLFLOW_USER_PASSWORD OPTUNA_DB_PASSWORD
db=${OPTUNA_DB:-optuna}
export PREFECT_API_AUTH_STRING="${PREFECT_AUTH_USER:-sslflow}:${PREFECT_AUTH_PASSWORD}"
export MLFLOW_TRACKING_USERNAME="${MLFLOW_USER:-sslflow}" MLFLOW_TRACKING_PASSWORD="$MLFLOW_USER_PASSWORD"
export SSLFLOW_TUNE_STORAGE="postgresql+psycopg2://${db}@${POSTGRES_HOST:-postgres}:${POSTGRES_INTERNAL_PORT:-5432}/${db}"
export PGPASSWORD="$OPTUNA_DB_PASSWORD"
export PREFECT_WORKER_WEBSERVER_HOST=0.0.0.0 PREFECT_WORKER_WEBSERVER_PORT=8080
unset POSTGRES_PASSWORD S3_ACCESS_KEY S3_SECRET_KEY MLFLOW_ADMIN_PASSWORD MLFLOW_DB_PASSWORD MLFLOW_AUTH_DB_PASSWORD \
    PREFECT_DB_PASSWORD MLFLOW_S3_ACCESS_KEY MLFLOW_S3_SECRET_KEY DVC_S3_ACCESS_KEY DVC_S3_SECRET_KEY S3_JWT_KEY \
    MLFLOW_SECRET_KEY OPTUNA_DB_PASSWORD PREFECT_AUTH_PASSWORD MLFLOW_USER_PASSWORD SSLFLOW_SECRETS_DIR
exec prefect worker start --with-healthcheck "$@"
