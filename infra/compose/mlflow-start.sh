#!/bin/sh
# mlflow container entrypoint (docker-compose.yml): the basic-auth config from the environment,
# then `mlflow server` with the PostgreSQL backend (MLFLOW_BACKEND_STORE_URI), artifacts proxied
# to S3 (MLFLOW_ARTIFACTS_DESTINATION), Host-header allow list and basic auth. The same flags as
# infra/local-stack.sh (launch_mlflow).
set -eu
umask 077
cat >/tmp/basic_auth.ini <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL:-60}
INI
export MLFLOW_AUTH_CONFIG_PATH=/tmp/basic_auth.ini
exec mlflow server --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-1}" --serve-artifacts \
    --allowed-hosts "mlflow,mlflow:5000,${MLFLOW_EXTRA_ALLOWED_HOSTS}" --app-name basic-auth \
    --uvicorn-opts "--timeout-graceful-shutdown 5"
