#!/bin/sh
# mlflow entrypoint (compose and Kubernetes): the basic-auth config from the environment / the
# mounted Secret, then `mlflow server` with the `mlflow` role's database, artifacts proxied to
# S3 with the mlflow-only S3 identity, Host-header allow list, basic auth behind the failed-login
# limit of infra/mlflow_auth_guard.py. The same flags as infra/local-stack.sh (launch_mlflow).
set -eu
. "$(dirname "$0")/secrets.sh"
require MLFLOW_DB_PASSWORD MLFLOW_AUTH_DB_PASSWORD MLFLOW_ADMIN_USER MLFLOW_ADMIN_PASSWORD MLFLOW_SECRET_KEY \
    MLFLOW_S3_ACCESS_KEY MLFLOW_S3_SECRET_KEY
pg=${POSTGRES_HOST:-postgres}:${POSTGRES_INTERNAL_PORT:-5432}
mdb=${MLFLOW_DB:-mlflow}
adb=${MLFLOW_AUTH_DB:-mlflow_auth}
umask 077
cat >/tmp/basic_auth.ini <<INI
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg2://${adb}:${MLFLOW_AUTH_DB_PASSWORD}@${pg}/${adb}
admin_username = ${MLFLOW_ADMIN_USER}
authorization_function = mlflow_auth_guard:authenticate_request
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL:-60}
INI
export MLFLOW_AUTH_CONFIG_PATH=/tmp/basic_auth.ini PYTHONPATH=/app/infra
export MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://${mdb}:${MLFLOW_DB_PASSWORD}@${pg}/${mdb}"
export MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_ADMIN_PASSWORD" MLFLOW_FLASK_SERVER_SECRET_KEY="$MLFLOW_SECRET_KEY"
export AWS_ACCESS_KEY_ID="$MLFLOW_S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$MLFLOW_S3_SECRET_KEY"
export AWS_DEFAULT_REGION="${S3_REGION:-us-east-1}" MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL:-http://s3:8333}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true
unset POSTGRES_PASSWORD S3_ACCESS_KEY S3_SECRET_KEY DVC_S3_ACCESS_KEY DVC_S3_SECRET_KEY PREFECT_AUTH_PASSWORD \
    PREFECT_DB_PASSWORD OPTUNA_DB_PASSWORD MLFLOW_USER_PASSWORD S3_JWT_KEY
exec mlflow server --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-1}" --serve-artifacts \
    --artifacts-destination "s3://${MLFLOW_BUCKET:-mlflow}/artifacts" \
    --allowed-hosts "mlflow,mlflow:5000,${MLFLOW_EXTRA_ALLOWED_HOSTS:-localhost}" --app-name basic-auth \
    --uvicorn-opts "--timeout-graceful-shutdown 5"
