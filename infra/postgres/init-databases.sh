#!/bin/bash
# Run once by the postgres image's entrypoint on an empty data directory (docker-compose.yml,
# Kubernetes): one plain role per service database (LOGIN, no superuser, no CREATEDB/CREATEROLE),
# owning only its database, CONNECT revoked from PUBLIC. The superuser (POSTGRES_USER) is for
# administration only. The native stack does the same in infra/stackctl.py (pg-setup).
# Passwords come from the environment or the mounted Secret and reach psql on stdin, never argv.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/secrets.sh" 2>/dev/null || . /sslflow/secrets.sh
quote() { printf "'%s'" "${1//\'/\'\'}"; }
for spec in $SSLFLOW_DATABASES; do   # database:PASSWORD_VARIABLE; the role has the database's name
    db=${spec%%:*}
    var=${spec#*:}
    [[ $db =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "init-databases: bad database name '$db'" >&2; exit 1; }
    pw=${!var:-}
    [[ -n $pw ]] || { echo "init-databases: $var is not set" >&2; exit 1; }
    psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres -q <<SQL
CREATE ROLE "$db" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD $(quote "$pw");
CREATE DATABASE "$db" OWNER "$db";
REVOKE ALL ON DATABASE "$db" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE "$db" TO "$db";
SQL
done
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres -q -c "REVOKE CONNECT ON DATABASE postgres FROM PUBLIC"
