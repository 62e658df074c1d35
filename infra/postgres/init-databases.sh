#!/bin/bash
# Run once by the postgres image's entrypoint on an empty data directory (docker-compose.yml):
# one database per service, owned by POSTGRES_USER. The native stack does the same in
# infra/local-stack.sh (ensure_databases).
set -euo pipefail
for db in $SSLFLOW_DATABASES; do
    [[ $db =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "init-databases: bad database name '$db'" >&2; exit 1; }
    if [[ -z $(psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'") ]]; then
        psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres -c "CREATE DATABASE $db OWNER \"$POSTGRES_USER\""
    fi
done
