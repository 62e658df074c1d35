#!/usr/bin/env bash
# The sslflow service stack on one machine, without Docker: the same services as
# infra/docker-compose.yml, started as plain processes, each kept running by a supervisor.
#
#   infra/local-stack.sh init                      write the env file with fresh random secrets (mode 0600)
#   infra/local-stack.sh up [SERVICE...]           start (with dependencies); running ones are kept
#   infra/local-stack.sh down [SERVICE...]         stop (all when none is named); data stays in the state dir
#   infra/local-stack.sh status [SERVICE...]       one line per service, checks that touch the databases; exit 3 if one is not healthy
#   infra/local-stack.sh env                       client settings: eval "$(infra/local-stack.sh env)"
#   infra/local-stack.sh dvc-remote DIR            the DVC remote of project DIR on the stack's S3 (keys in .dvc/config.local, 0600)
#   infra/local-stack.sh rotate postgres|mlflow-admin|internal   apply a changed secret (see docs/services.md)
#   infra/local-stack.sh check                     validate the configuration only (secrets, file modes)
#   infra/local-stack.sh logs SERVICE | pgpass | restart [SERVICE...] | wipe
#   --insecure-dev (anywhere): accept placeholder/development secrets and a readable env file
#
# Services (dependency order): postgres (one plain role per database: mlflow, mlflow_auth,
# prefect, optuna), s3 (SeaweedFS; only its S3 gateway is usable without the stack's TLS client
# certificate and JWT keys), mlflow (`mlflow server`, basic auth with a failed-login limit,
# artifacts proxied to S3), prefect (`prefect server start`, basic auth), worker (a process worker
# on $PREFECT_WORK_POOL, run as an unprivileged user holding only what flows need).
#
# Configuration: infra/stack.env (git-ignored; `init` writes it, or copy infra/stack.env.example),
# or the file named by SSLFLOW_STACK_ENV. A variable already set in the environment wins over the
# file. Secrets the operator does not set (service database passwords, the MLflow pipeline user,
# the Prefect auth string, scoped S3 keys, SeaweedFS JWT key) are generated once into
# $STATE/secrets/generated.env (0600). State (data, logs, pids, secrets): SSLFLOW_STACK_DIR
# (default .stack/). Python tools come from SSLFLOW_VENV (default .venv).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO/infra/local-stack.sh"
SERVICES=(postgres s3 mlflow prefect worker)

die() { echo "local-stack: error: $*" >&2; exit 1; }
say() { echo "local-stack: $*" >&2; }

INSECURE_DEV=0
_args=()
for _a in "$@"; do
    if [[ $_a == --insecure-dev ]]; then INSECURE_DEV=1; else _args+=("$_a"); fi
done
set -- "${_args[@]}"

# ---------------------------------------------------------------------------------- configuration
load_env_file() {  # KEY=VALUE lines; the environment wins over the file
    local file=$1 line key val n=0
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line%$'\r'}
        [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
        if [[ ! $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
            die "$file:$n: not a KEY=VALUE line"   # the line itself may hold a secret: not echoed
        fi
        key=${BASH_REMATCH[2]}
        val=${BASH_REMATCH[3]}
        if [[ $val =~ ^\"(.*)\"$ || $val =~ ^\'(.*)\'$ ]]; then val=${BASH_REMATCH[1]}; fi
        [[ -n ${!key+x} ]] || export "$key=$val"
    done <"$file"
}

ENV_FILE=""
if [[ -n ${SSLFLOW_STACK_ENV:-} ]]; then
    [[ -f $SSLFLOW_STACK_ENV ]] || [[ ${_args[0]:-} == init ]] || die "SSLFLOW_STACK_ENV=$SSLFLOW_STACK_ENV does not exist"
    ENV_FILE=$SSLFLOW_STACK_ENV
elif [[ -f $REPO/infra/stack.env ]]; then
    ENV_FILE=$REPO/infra/stack.env
fi
[[ -n $ENV_FILE && -f $ENV_FILE ]] && load_env_file "$ENV_FILE"

# Defaults: development values, refused by `up` unless --insecure-dev.
: "${STACK_HOST:=127.0.0.1}"
: "${POSTGRES_PORT:=15432}"
: "${POSTGRES_USER:=sslflow}"                # the superuser: used by this script only
: "${POSTGRES_PASSWORD:=sslflow-dev-postgres}"
: "${POSTGRES_OS_USER:=postgres}"          # the account PostgreSQL runs as when this runs as root
: "${MLFLOW_DB:=mlflow}"                   # each database is owned by a role of the same name
: "${MLFLOW_AUTH_DB:=mlflow_auth}"
: "${PREFECT_DB:=prefect}"
: "${OPTUNA_DB:=optuna}"
: "${S3_PORT:=18333}"
: "${S3_MASTER_PORT:=19333}"
: "${S3_VOLUME_PORT:=18080}"
: "${S3_FILER_PORT:=18888}"               # gRPC ports are each HTTP port + 10000 (SeaweedFS's rule)
: "${S3_ADVERTISE:=}"                     # -ip of SeaweedFS (a name or address of this host); empty = STACK_HOST
: "${S3_ACCESS_KEY:=sslflow-dev}"          # the S3 admin identity: this script only
: "${S3_SECRET_KEY:=sslflow-dev-s3-secret}"
: "${S3_REGION:=us-east-1}"
: "${MLFLOW_BUCKET:=mlflow}"
: "${DVC_BUCKET:=dvc}"
: "${MLFLOW_PORT:=15000}"
: "${MLFLOW_ADMIN_USER:=admin}"
: "${MLFLOW_ADMIN_PASSWORD:=sslflow-dev-mlflow-admin}"
: "${MLFLOW_SECRET_KEY:=sslflow-dev-flask-secret}"
: "${MLFLOW_USER:=sslflow}"                # the ordinary MLflow user of workers and clients
: "${MLFLOW_ALLOWED_HOSTS:=}"              # empty = the stack host and localhost on MLFLOW_PORT
: "${MLFLOW_WORKERS:=1}"
: "${MLFLOW_AUTH_CACHE_TTL:=60}"          # seconds a verified password stays cached (0 = hash every request)
: "${MLFLOW_AUTH_MAX_FAILURES:=10}"       # failed logins per (address, user) ...
: "${MLFLOW_AUTH_FAILURE_WINDOW:=60}"     # ... within this many seconds, then HTTP 429
: "${PREFECT_PORT:=14200}"
: "${PREFECT_UI_ENABLED:=true}"
: "${PREFECT_AUTH_USER:=sslflow}"          # basic auth of the Prefect API: PREFECT_AUTH_USER:PREFECT_AUTH_PASSWORD
: "${PREFECT_WORK_POOL:=sslflow-process}"
: "${PREFECT_WORKER_QUERY_SECONDS:=10}"   # how often the worker asks the server for flow runs
: "${SERVICE_OS_USER:=sslflow-svc}"        # run as root: SeaweedFS, MLflow and Prefect run as this user ...
: "${WORKER_OS_USER:=sslflow-worker}"      # ... and the worker (with its flow runs) as this one
: "${STACK_START_TIMEOUT:=90}"             # seconds a service may take to become healthy

# Secrets the operator may set in the env file; otherwise generated once (hex) into the state dir.
GENERATED=(MLFLOW_DB_PASSWORD MLFLOW_AUTH_DB_PASSWORD PREFECT_DB_PASSWORD OPTUNA_DB_PASSWORD MLFLOW_USER_PASSWORD
           PREFECT_AUTH_PASSWORD MLFLOW_S3_ACCESS_KEY MLFLOW_S3_SECRET_KEY DVC_S3_ACCESS_KEY DVC_S3_SECRET_KEY
           S3_JWT_KEY)
OPERATOR_SECRETS=(POSTGRES_PASSWORD S3_ACCESS_KEY S3_SECRET_KEY MLFLOW_ADMIN_PASSWORD MLFLOW_SECRET_KEY)

STATE="${SSLFLOW_STACK_DIR:-$REPO/.stack}"
VENV="${SSLFLOW_VENV:-$REPO/.venv}"
[[ -n $S3_ADVERTISE ]] || S3_ADVERTISE=$STACK_HOST
[[ -n $MLFLOW_ALLOWED_HOSTS ]] || \
    MLFLOW_ALLOWED_HOSTS="$STACK_HOST,$STACK_HOST:$MLFLOW_PORT,localhost,localhost:$MLFLOW_PORT"

is_root() { [[ $EUID -eq 0 ]]; }

setup_state() {  # the state dir: traversable by the service accounts, everything below private
    umask 077
    mkdir -p "$STATE"
    STATE="$(cd "$STATE" && pwd)"
    if is_root; then chmod 711 "$STATE"; else chmod 700 "$STATE"; fi
    PIDS="$STATE/pids" LOGS="$STATE/logs" SECRETS="$STATE/secrets"
    mkdir -p "$PIDS" "$LOGS" "$SECRETS"
    chmod 700 "$PIDS" "$LOGS" "$SECRETS"
}
setup_state

tool() {  # the venv's executable NAME, else the one on PATH
    if [[ -x $VENV/bin/$1 ]]; then echo "$VENV/bin/$1"
    elif command -v "$1" >/dev/null; then command -v "$1"
    else die "$1 not found in $VENV/bin or on PATH (run \`make .venv/bin/sslflow\` or set SSLFLOW_VENV)"; fi
}

ctl() { "$(tool python)" "$REPO/infra/stackctl.py" "$@"; }   # secrets only through the environment

# ---------------------------------------------------------------------------------- secrets
kv_get() {  # kv_get FILE KEY: the value recorded in a KEY=VALUE file (exit 1 when absent)
    local file=$1 key=$2 line
    [[ -f $file ]] || return 1
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ ${line%%=*} == "$key" ]]; then printf '%s' "${line#*=}"; return 0; fi
    done <"$file"
    return 1
}

kv_set() {  # kv_set FILE KEY VALUE: replace or add, the file stays 0600
    local file=$1 key=$2 value=$3 tmp line
    tmp="$file.tmp.$$"
    (
        umask 077
        : >"$tmp"
        if [[ -f $file ]]; then
            while IFS= read -r line || [[ -n $line ]]; do
                [[ ${line%%=*} == "$key" ]] || printf '%s\n' "$line" >>"$tmp"
            done <"$file"
        fi
        printf '%s=%s\n' "$key" "$value" >>"$tmp"
    )
    mv -f "$tmp" "$file"
}

random_hex() { od -An -N"${1:-24}" -tx1 /dev/urandom | tr -d ' \n'; }

load_generated() {  # each GENERATED secret: the env file's value, else the recorded one, else a new one
    local name value file="$SECRETS/generated.env"
    for name in "${GENERATED[@]}"; do
        [[ -n ${!name:-} ]] && continue
        if ! value=$(kv_get "$file" "$name"); then
            value=$(random_hex 24)
            kv_set "$file" "$name" "$value"
        fi
        printf -v "$name" '%s' "$value"
    done
}
load_generated

check_config() {  # placeholder / development secrets and a readable env file are refused
    local flag=()
    ((INSECURE_DEV)) && flag=(--insecure-dev)
    if [[ -n $ENV_FILE && -f $ENV_FILE ]] && (($(stat -c '%a' "$ENV_FILE") % 100 != 0)); then
        if ((INSECURE_DEV)); then
            say "warning: $ENV_FILE is readable by other users (--insecure-dev)"
        else
            echo "local-stack: error: $ENV_FILE is readable by other users (mode $(stat -c '%a' "$ENV_FILE")): chmod 600 it" >&2
            exit 2
        fi
    fi
    local name
    # through the environment of one command (`env NAME=...` would put them on a command line)
    (
        for name in "${OPERATOR_SECRETS[@]}" "${GENERATED[@]}"; do export "${name?}"; done
        ctl check-secrets "${flag[@]}" "${OPERATOR_SECRETS[@]}" "${GENERATED[@]}"
    ) || { echo "local-stack: error: not starting (see above)" >&2; exit 2; }
    [[ $WORKER_OS_USER != "$SERVICE_OS_USER" ]] || die "WORKER_OS_USER and SERVICE_OS_USER must differ"
    [[ $WORKER_OS_USER != root && $SERVICE_OS_USER != root ]] || die "the services never run as root"
}

# ---------------------------------------------------------------------------------- URLs
pg_role_url() {  # pg_role_url DB [DRIVER]: the URL of the database's own role, with its password
    local var
    case $1 in
        "$MLFLOW_DB") var=MLFLOW_DB_PASSWORD ;;
        "$MLFLOW_AUTH_DB") var=MLFLOW_AUTH_DB_PASSWORD ;;
        "$PREFECT_DB") var=PREFECT_DB_PASSWORD ;;
        "$OPTUNA_DB") var=OPTUNA_DB_PASSWORD ;;
    esac
    echo "postgresql+${2:-psycopg2}://$1:${!var}@$STACK_HOST:$POSTGRES_PORT/$1"
}
s3_url() { echo "http://$STACK_HOST:$S3_PORT"; }
mlflow_url() { echo "http://$STACK_HOST:$MLFLOW_PORT"; }
prefect_api() { echo "http://$STACK_HOST:$PREFECT_PORT/api"; }

# ---------------------------------------------------------------------------------- accounts
svc_user() { if is_root; then echo "$SERVICE_OS_USER"; fi; }
worker_user() { if is_root; then echo "$WORKER_OS_USER"; fi; }
pg_user() { if is_root; then echo "$POSTGRES_OS_USER"; fi; }

ensure_os_user() {  # a system account without login shell or home, created when missing (as root)
    local user=$1
    [[ -n $user ]] || return 0
    id -u "$user" >/dev/null 2>&1 && return 0
    say "creating system user $user"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user" \
        || die "cannot create user $user (create it, or set SERVICE_OS_USER / WORKER_OS_USER)"
}

check_runnable() {  # the service account can run the venv's Python (its interpreter, its packages)
    local user=$1
    [[ -n $user ]] || return 0
    runuser -u "$user" -- "$(tool python)" -c "import psycopg2" >/dev/null 2>&1 && return 0
    die "user $user cannot run $(tool python) with its packages (a venv whose interpreter lives where other users cannot go, e.g. under /root?): build it from a Python every account can run (/usr/bin/python3 -m venv ...) and set SSLFLOW_VENV"
}

private_dir() {  # private_dir DIR [USER]: exists, mode 0700, owned by USER (as root)
    mkdir -p "$1"
    if [[ -n ${2:-} ]]; then
        [[ $(stat -c %U "$1") == "$2" ]] || chown -R "$2:" "$1"
    fi
    chmod 700 "$1"
}

# ---------------------------------------------------------------------------------- processes
service_env() {  # empty this (sub)shell's environment, then export PATH, the locale and K=V...
    local path="$VENV/bin:/usr/local/bin:/usr/bin:/bin" v
    for v in $(compgen -e); do export -n "$v" 2>/dev/null || true; done
    export PATH="$path" LANG=C.UTF-8 TZ=UTC PYTHONUNBUFFERED=1
    for v in "$@"; do export "${v?}"; done
}

spawn() {  # spawn NAME OS_USER SUPERVISOR_OPTIONS... -- CMD...: the supervised service, detached
    local name=$1 user=$2
    shift 2
    local -a as=()
    [[ -n $user ]] && as=(--user "$user")
    echo "supervise.py --name $name " >"$PIDS/$name.match"
    rm -f "$PIDS/$name.child" "$PIDS/$name.state"
    (umask 077; echo "=== $(date -u +%FT%TZ) starting $name" >>"$LOGS/$name.log")
    setsid "$(tool python)" "$REPO/infra/supervise.py" --name "$name" --state "$PIDS" "${as[@]}" "$@" \
        >>"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
}

alive() {  # process $1 runs (a zombie its parent has not reaped yet, e.g. under a subreaper that
    # only reaps at its end, has exited): /proc/PID/stat's state field, read without a fork
    local stat
    [[ $1 =~ ^[0-9]+$ ]] && read -r stat <"/proc/$1/stat" 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

pid_of() {  # the supervisor of service $1, if it runs
    local file="$PIDS/$1.pid" pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    alive "$pid" || return 1
    # a recycled pid belongs to another program: the command line must name our supervisor
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$(cat "$PIDS/$1.match" 2>/dev/null || echo .)" \
        || return 1
    echo "$pid"
}

not_running() {  # the status line of a service without a running process: stopped, or between two starts
    local sup
    if sup=$(pid_of "$1"); then
        printf '%-9s restarting  supervisor %s  (starts: %s)\n' "$1" "$sup" "$(starts_of "$1")"
    else
        printf '%-9s stopped\n' "$1"
    fi
    return 3
}

child_of() {  # the running service process of $1 (below its supervisor)
    local pid
    pid_of "$1" >/dev/null || return 1
    pid=$(cat "$PIDS/$1.child" 2>/dev/null) || return 1
    alive "$pid" && echo "$pid"
}

starts_of() {  # how often the supervisor started service $1 (1 before it reports)
    local n
    n=$(sed -n 's/.*"starts": \([0-9]*\).*/\1/p' "$PIDS/$1.state" 2>/dev/null || true)
    echo "${n:-1}"
}

port_busy() { (exec 3<>"/dev/tcp/$STACK_HOST/$1") 2>/dev/null; }

require_free_ports() {  # NAME=PORT ...: each must be free before a service binds it
    local kv
    for kv in "$@"; do
        if port_busy "${kv#*=}"; then
            die "port ${kv#*=} ($STACK_HOST, ${kv%%=*}) is already in use by another process: set ${kv%%=*} in the env file"
        fi
    done
}

stop_service() {  # TERM the supervisor (it stops the service and everything it started); KILL after a while
    local name=$1 pid i
    pid=$(pid_of "$name") || { rm -f "$PIDS/$name.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 900; i++)); do   # the supervisor's own grace (postgres: 60 s) plus a margin
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "$name (supervisor $pid) did not stop: killing its process group"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDS/$name.pid" "$PIDS/$name.child"
}

wait_until() {  # wait_until NAME TIMEOUT CHECK...: poll CHECK until it succeeds; fail with the log tail
    local name=$1 timeout=$2 deadline rc err="$STATE/.check.$$"
    shift 2
    deadline=$((SECONDS + timeout))
    while true; do
        rc=0
        "$@" >/dev/null 2>"$err" || rc=$?
        ((rc == 0)) && break
        if ((rc == 2)); then  # the check says waiting cannot help
            local msg
            msg=$(tail -n 1 "$err")
            rm -f "$err"
            die "$msg"
        fi
        if ! pid_of "$name" >/dev/null || (($(starts_of "$name") > 1)); then
            tail -n 25 "$LOGS/$name.log" >&2 || true
            stop_service "$name"
            die "$name exited during startup (log: $LOGS/$name.log)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 25 "$LOGS/$name.log" >&2 || true
            stop_service "$name"
            die "$name did not become healthy within $timeout s (log: $LOGS/$name.log; last check: $(tail -n 1 "$err"))"
        fi
        sleep 0.5
    done
    rm -f "$err"
}

# ---------------------------------------------------------------------------------- postgres
pg_bin() {
    local d
    if [[ -n ${PG_BIN:-} ]]; then
        [[ -x $PG_BIN/pg_ctl ]] || die "PG_BIN=$PG_BIN has no pg_ctl"
        echo "$PG_BIN"; return
    fi
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $d && -x $d/pg_ctl ]]; then echo "$d"; return; fi
    d=$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/x)")
    [[ -x $d/pg_ctl && -x $d/initdb ]] && { echo "$d"; return; }
    die "PostgreSQL server binaries not found (Debian: apt-get install postgresql; or set PG_BIN to the directory of pg_ctl)"
}

as_pg() {  # PostgreSQL refuses to run as root: run as POSTGRES_OS_USER then
    if is_root; then runuser -u "$POSTGRES_OS_USER" -- "$@"; else "$@"; fi
}

pg_data() { echo "$STATE/postgres/data"; }

pg_admin() {  # run CMD with libpq's variables for the superuser (this script's connections only)
    PGHOST=$STACK_HOST PGPORT=$POSTGRES_PORT PGUSER=$POSTGRES_USER PGPASSWORD=$POSTGRES_PASSWORD PGCONNECT_TIMEOUT=5 "$@"
}

pg_ready() { "$(pg_bin)/pg_isready" -q -h "$STACK_HOST" -p "$POSTGRES_PORT" || return 1; }

start_postgres() {
    local bin data
    bin=$(pg_bin)
    data=$(pg_data)
    if pid_of postgres >/dev/null; then say "postgres already running on $STACK_HOST:$POSTGRES_PORT"; ensure_databases; return; fi
    require_free_ports POSTGRES_PORT="$POSTGRES_PORT"
    if is_root; then
        id -u "$POSTGRES_OS_USER" >/dev/null 2>&1 || \
            die "running as root, PostgreSQL needs a non-root account: user $POSTGRES_OS_USER does not exist (create it, or set POSTGRES_OS_USER)"
    fi
    private_dir "$STATE/postgres" "$(pg_user)"
    as_pg test -w "$STATE/postgres" || \
        die "user $POSTGRES_OS_USER cannot write $STATE/postgres: every parent directory must be searchable by it (chmod o+x), or set SSLFLOW_STACK_DIR elsewhere"
    if [[ ! -f $data/PG_VERSION ]]; then
        say "postgres: initdb $data (superuser $POSTGRES_USER)"
        local pw="$STATE/postgres/.pwfile"
        (umask 077; printf '%s\n' "$POSTGRES_PASSWORD" >"$pw")
        if is_root; then chown "$POSTGRES_OS_USER" "$pw"; fi
        as_pg "$bin/initdb" -D "$data" -U "$POSTGRES_USER" --pwfile="$pw" --auth=scram-sha-256 \
            -E UTF8 --no-locale >>"$LOGS/postgres.log" 2>&1 \
            || { rm -f "$pw"; tail -n 20 "$LOGS/postgres.log" >&2; die "initdb failed (log: $LOGS/postgres.log)"; }
        rm -f "$pw"
        kv_set "$SECRETS/applied.env" POSTGRES_PASSWORD "$POSTGRES_PASSWORD"
        # TCP only (no Unix socket: no peer authentication for local users), enough connections
        # for two servers + workers, and no statement text in the log (ALTER ROLE ... PASSWORD)
        as_pg tee -a "$data/postgresql.conf" >/dev/null <<EOF
# --- infra/local-stack.sh
unix_socket_directories = ''
max_connections = 200
password_encryption = scram-sha-256
log_min_error_statement = panic
EOF
    fi
    say "postgres: starting on $STACK_HOST:$POSTGRES_PORT"
    (
        cd "$STATE/postgres"
        service_env
        spawn postgres "$(pg_user)" --stop-signal INT --grace 60 -- \
            "$bin/postgres" -D "$data" -p "$POSTGRES_PORT" -h "$STACK_HOST"
    )
    wait_until postgres "$STACK_START_TIMEOUT" pg_ready
    ensure_databases
}

ensure_databases() {  # one plain role per database (stackctl.py pg-setup); idempotent
    local db out
    for db in "$MLFLOW_DB" "$MLFLOW_AUTH_DB" "$PREFECT_DB" "$OPTUNA_DB"; do
        [[ $db =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "database name $db: letters, digits and _ only"
    done
    if ! out=$(
        export MLFLOW_DB_PASSWORD MLFLOW_AUTH_DB_PASSWORD PREFECT_DB_PASSWORD OPTUNA_DB_PASSWORD
        SSLFLOW_PG_SERVICES="$MLFLOW_DB:$MLFLOW_DB:MLFLOW_DB_PASSWORD $MLFLOW_AUTH_DB:$MLFLOW_AUTH_DB:MLFLOW_AUTH_DB_PASSWORD $PREFECT_DB:$PREFECT_DB:PREFECT_DB_PASSWORD $OPTUNA_DB:$OPTUNA_DB:OPTUNA_DB_PASSWORD" \
            pg_admin ctl pg-setup 2>&1
    ); then
        echo "$out" >&2
        if [[ $out == *"password authentication failed"* ]]; then
            die "postgres refuses POSTGRES_PASSWORD of the env file: after changing it, run \`$SELF rotate postgres\`"
        fi
        die "postgres: cannot set up the service roles and databases"
    fi
    kv_set "$SECRETS/applied.env" POSTGRES_PASSWORD "$POSTGRES_PASSWORD"
}

status_postgres() {
    local pid out
    pid=$(child_of postgres) || { not_running postgres; return 3; }
    if out=$(pg_admin ctl pg-check postgres 2>&1); then
        echo "postgres  running  pid $pid  $STACK_HOST:$POSTGRES_PORT  $out  (starts: $(starts_of postgres))  databases: $MLFLOW_DB $MLFLOW_AUTH_DB $PREFECT_DB $OPTUNA_DB"
    else
        echo "postgres  unhealthy  pid $pid  $STACK_HOST:$POSTGRES_PORT  $out"; return 3
    fi
}

# ---------------------------------------------------------------------------------- s3 (SeaweedFS)
s3_admin() { S3_ENDPOINT="$(s3_url)" S3_ACCESS_KEY="$S3_ACCESS_KEY" S3_SECRET_KEY="$S3_SECRET_KEY" S3_REGION="$S3_REGION" "$@"; }

s3_certificates() {  # a CA and one certificate for mutual TLS between SeaweedFS's parts (gRPC and HTTP)
    local conf=$1
    [[ -f $conf/node.crt && -f $conf/node.key && -f $conf/ca.crt ]] && return 0
    (
        umask 077
        cd "$conf"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt \
            -days 3650 -subj "/CN=sslflow-seaweedfs-ca" >/dev/null 2>&1
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout node.key -out node.csr \
            -subj "/CN=seaweedfs" >/dev/null 2>&1
        printf 'subjectAltName=DNS:localhost,DNS:%s,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' \
            "$(hostname)" >ext.cnf
        openssl x509 -req -in node.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out node.crt -days 3650 \
            -extfile ext.cnf >/dev/null 2>&1
        rm -f ca.key ca.srl node.csr ext.cnf   # nothing more is signed: the CA key is not kept
    ) || die "s3: openssl could not create the TLS certificates in $conf"
}

s3_config() {  # identities (admin: this script; mlflow: its bucket; dvc: its bucket) and security.toml
    local conf=$1 section
    (
        umask 077
        cat >"$conf/s3.json" <<EOF
{"identities": [
  {"name": "admin", "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
   "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
  {"name": "mlflow", "credentials": [{"accessKey": "$MLFLOW_S3_ACCESS_KEY", "secretKey": "$MLFLOW_S3_SECRET_KEY"}],
   "actions": ["Read:$MLFLOW_BUCKET", "List:$MLFLOW_BUCKET", "Tagging:$MLFLOW_BUCKET", "Write:$MLFLOW_BUCKET"]},
  {"name": "dvc", "credentials": [{"accessKey": "$DVC_S3_ACCESS_KEY", "secretKey": "$DVC_S3_SECRET_KEY"}],
   "actions": ["Read:$DVC_BUCKET", "List:$DVC_BUCKET", "Tagging:$DVC_BUCKET", "Write:$DVC_BUCKET"]}
]}
EOF
        {
            echo "# written by infra/local-stack.sh: JWTs on the volume and filer HTTP APIs, mutual TLS on every"
            echo "# internal port (HTTP and gRPC of master, volume, filer): only the S3 gateway is open to clients"
            for section in jwt.signing jwt.signing.read jwt.filer_signing jwt.filer_signing.read; do
                printf '[%s]\nkey = "%s"\nexpires_after_seconds = 10\n' "$section" "$S3_JWT_KEY"
            done
            printf '[access]\nui = false\n[filer.expose_directory_metadata]\nenabled = false\n'
            printf '[grpc]\nca = "%s/ca.crt"\n' "$conf"
            for section in grpc.master grpc.volume grpc.filer grpc.s3 grpc.client; do
                printf '[%s]\ncert = "%s/node.crt"\nkey = "%s/node.key"\n' "$section" "$conf" "$conf"
            done
            for section in https.master https.volume https.filer; do
                printf '[%s]\ncert = "%s/node.crt"\nkey = "%s/node.key"\nca = "%s/ca.crt"\n' "$section" "$conf" "$conf" "$conf"
            done
            printf '[https.client]\nenabled = true\ncert = "%s/node.crt"\nkey = "%s/node.key"\nca = "%s/ca.crt"\n' \
                "$conf" "$conf" "$conf"
        } >"$conf/security.toml"
    )
}

s3_stale_sockets() {  # SeaweedFS's gRPC Unix sockets have fixed paths in /tmp (served with mutual TLS):
    # one left by another account (an earlier run as another user) cannot be replaced and blocks the start
    local port sock owner
    owner=$(svc_user)
    owner=${owner:-$(id -un)}
    for port in $((S3_MASTER_PORT + 10000)) $((S3_VOLUME_PORT + 10000)) $((S3_FILER_PORT + 10000)) $((S3_PORT + 10000)); do
        for sock in /tmp/seaweedfs-*-grpc-"$port".sock; do
            [[ -S $sock ]] || continue
            [[ $(stat -c %U "$sock") == "$owner" ]] && continue
            if is_root; then rm -f "$sock"   # the port is free (checked): nobody serves it
            else die "s3: $sock belongs to user $(stat -c %U "$sock") (an earlier stack): remove it, or choose other S3_*_PORT values"; fi
        done
    done
}

start_s3() {
    local dir="$STATE/seaweedfs" weed user
    if pid_of s3 >/dev/null; then say "s3 already running on $(s3_url)"; ensure_buckets; return; fi
    weed=$(tool weed)
    user=$(svc_user)
    ensure_os_user "$user"
    require_free_ports S3_PORT="$S3_PORT" S3_MASTER_PORT="$S3_MASTER_PORT" S3_VOLUME_PORT="$S3_VOLUME_PORT" \
        S3_FILER_PORT="$S3_FILER_PORT"
    private_dir "$dir"
    mkdir -p "$dir/data" "$dir/conf" "$dir/sock"
    s3_certificates "$dir/conf"
    s3_config "$dir/conf"
    private_dir "$dir" "$user"
    if [[ -n $user ]]; then chown -R "$user:" "$dir/conf" "$dir/sock"; fi
    s3_stale_sockets
    say "s3: starting SeaweedFS (S3 gateway on $(s3_url); master, volume and filer need the stack's TLS certificate)"
    (
        cd "$dir"
        service_env HOME="$dir"   # nothing of the operator's environment (AWS_* never becomes an identity)
        # the filer's and the gateway's Unix sockets in the private state dir (default: /tmp, where any
        # local user could connect to them); logs to the service log only (default: files in /tmp)
        spawn s3 "$user" --grace 20 -- "$weed" -config_dir="$dir/conf" -logtostderr server -dir="$dir/data" \
            -ip="$S3_ADVERTISE" -ip.bind="$STACK_HOST" \
            -master.port="$S3_MASTER_PORT" -master.port.grpc=$((S3_MASTER_PORT + 10000)) \
            -master.volumeSizeLimitMB=256 -master.telemetry=false \
            -volume.port="$S3_VOLUME_PORT" -volume.port.grpc=$((S3_VOLUME_PORT + 10000)) -volume.max=64 \
            -volume.preStopSeconds=0 \
            -filer -filer.port="$S3_FILER_PORT" -filer.port.grpc=$((S3_FILER_PORT + 10000)) \
            -filer.localSocket="$dir/sock/filer.sock" \
            -s3 -s3.port="$S3_PORT" -s3.port.grpc=$((S3_PORT + 10000)) -s3.config="$dir/conf/s3.json" \
            -s3.localSocket="$dir/sock/s3.sock" -s3.port.iceberg=0 -s3.port.lance=0
    )
    # healthy = the gateway answers an authenticated ListBuckets (it needs master, volume and filer)
    wait_until s3 "$STACK_START_TIMEOUT" s3_admin ctl s3-check
    ensure_buckets
}

ensure_buckets() {
    local deadline=$((SECONDS + STACK_START_TIMEOUT))
    # a fresh volume server may refuse the first writes for a few seconds: retry until the deadline
    until s3_admin ctl s3-buckets "$MLFLOW_BUCKET" "$DVC_BUCKET" >>"$LOGS/s3.log" 2>&1; do
        ((SECONDS < deadline)) || { tail -n 20 "$LOGS/s3.log" >&2; die "s3: cannot create/write buckets $MLFLOW_BUCKET $DVC_BUCKET (log: $LOGS/s3.log)"; }
        sleep 1
    done
}

status_s3() {
    local pid out
    pid=$(child_of s3) || { not_running s3; return 3; }
    if out=$(s3_admin ctl s3-check 2>&1); then
        echo "s3        running  pid $pid  $(s3_url)  $out  (starts: $(starts_of s3))"
    else
        echo "s3        unhealthy  pid $pid  $(s3_url)  $out"; return 3
    fi
}

# ---------------------------------------------------------------------------------- mlflow
start_mlflow() { launch_mlflow && wait_pending; }

launch_mlflow() {  # spawn `mlflow server`; its health is awaited by wait_pending (so prefect starts meanwhile)
    local dir="$STATE/mlflow" mlflow user
    if pid_of mlflow >/dev/null; then say "mlflow already running on $(mlflow_url)"; PENDING+=(mlflow-user); return; fi
    pid_of postgres >/dev/null || die "mlflow needs postgres: start it first (infra/local-stack.sh up postgres)"
    pid_of s3 >/dev/null || die "mlflow needs s3: start it first (infra/local-stack.sh up s3)"
    mlflow=$(tool mlflow)
    user=$(svc_user)
    ensure_os_user "$user"
    check_runnable "$user"
    require_free_ports MLFLOW_PORT="$MLFLOW_PORT"
    private_dir "$dir" "$user"
    (umask 077; cat >"$dir/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $(pg_role_url "$MLFLOW_AUTH_DB")
admin_username = $MLFLOW_ADMIN_USER
# MLflow's basic auth behind a failed-login limit (infra/mlflow_auth_guard.py)
authorization_function = mlflow_auth_guard:authenticate_request
# cache each verified (user, password) for a minute: without it every request pays a PBKDF2 hash (~1 s on 2 cores)
auth_cache_ttl_seconds = $MLFLOW_AUTH_CACHE_TTL
EOF
    )
    if [[ -n $user ]]; then chown "$user:" "$dir/basic_auth.ini"; fi
    say "mlflow: starting on $(mlflow_url) (basic auth, artifacts proxied to s3://$MLFLOW_BUCKET)"
    (
        cd "$dir"
        # the database password travels in the environment, never on a command line (`ps` shows those)
        service_env HOME="$dir" PYTHONPATH="$REPO/infra" MLFLOW_AUTH_CONFIG_PATH="$dir/basic_auth.ini" \
            MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_ADMIN_PASSWORD" MLFLOW_FLASK_SERVER_SECRET_KEY="$MLFLOW_SECRET_KEY" \
            MLFLOW_S3_ENDPOINT_URL="$(s3_url)" AWS_ACCESS_KEY_ID="$MLFLOW_S3_ACCESS_KEY" \
            AWS_SECRET_ACCESS_KEY="$MLFLOW_S3_SECRET_KEY" AWS_DEFAULT_REGION="$S3_REGION" \
            MLFLOW_BACKEND_STORE_URI="$(pg_role_url "$MLFLOW_DB")" MLFLOW_DISABLE_TELEMETRY=true \
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_AUTH_MAX_FAILURES="$MLFLOW_AUTH_MAX_FAILURES" \
            MLFLOW_AUTH_FAILURE_WINDOW="$MLFLOW_AUTH_FAILURE_WINDOW"
        spawn mlflow "$user" --grace 15 -- "$mlflow" server --host "$STACK_HOST" --port "$MLFLOW_PORT" \
            --workers "$MLFLOW_WORKERS" --serve-artifacts --artifacts-destination "s3://$MLFLOW_BUCKET/artifacts" \
            --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" --app-name basic-auth \
            --uvicorn-opts "--timeout-graceful-shutdown 5"
    )
    PENDING+=(mlflow mlflow-user)
}

mlflow_as_admin() { MLFLOW_URL="$(mlflow_url)" MLFLOW_USER="$MLFLOW_ADMIN_USER" MLFLOW_PASSWORD="$MLFLOW_ADMIN_PASSWORD" "$@"; }

mlflow_healthy() {  # an authenticated API call that reads both databases; a refused admin password is fatal
    local out
    out=$(mlflow_as_admin ctl mlflow-check 2>&1) && return 0
    if [[ $out == "HTTP 401"* ]]; then
        echo "mlflow refuses MLFLOW_ADMIN_PASSWORD of the env file: after changing it, run \`$SELF rotate mlflow-admin\`" >&2
        return 2
    fi
    echo "$out" >&2
    return 1
}

ensure_mlflow_user() {  # the ordinary user of workers and clients (READ on everything, owns what it creates)
    MLFLOW_URL="$(mlflow_url)" MLFLOW_ADMIN_USER="$MLFLOW_ADMIN_USER" MLFLOW_ADMIN_PASSWORD="$MLFLOW_ADMIN_PASSWORD" \
        MLFLOW_NEW_USER="$MLFLOW_USER" MLFLOW_NEW_PASSWORD="$MLFLOW_USER_PASSWORD" ctl mlflow-ensure-user \
        || die "mlflow: cannot create or update user $MLFLOW_USER"
    kv_set "$SECRETS/applied.env" MLFLOW_ADMIN_PASSWORD "$MLFLOW_ADMIN_PASSWORD"
}

status_mlflow() {
    local pid out
    pid=$(child_of mlflow) || { not_running mlflow; return 3; }
    if out=$(mlflow_as_admin ctl mlflow-check 2>&1); then
        echo "mlflow    running  pid $pid  $(mlflow_url)  $out  (starts: $(starts_of mlflow))"
    else
        echo "mlflow    unhealthy  pid $pid  $(mlflow_url)  $out"; return 3
    fi
}

# ---------------------------------------------------------------------------------- prefect
start_prefect() { launch_prefect && wait_pending; }

prefect_auth() { echo "$PREFECT_AUTH_USER:$PREFECT_AUTH_PASSWORD"; }

launch_prefect() {
    local dir="$STATE/prefect" prefect user
    if pid_of prefect >/dev/null; then say "prefect already running on $(prefect_api)"; return; fi
    pid_of postgres >/dev/null || die "prefect needs postgres: start it first (infra/local-stack.sh up postgres)"
    prefect=$(tool prefect)
    user=$(svc_user)
    ensure_os_user "$user"
    check_runnable "$user"
    require_free_ports PREFECT_PORT="$PREFECT_PORT"
    private_dir "$dir" "$user"
    mkdir -p "$dir/home"
    if [[ -n $user ]]; then chown "$user:" "$dir/home"; fi
    say "prefect: starting server on $(prefect_api) (basic auth)"
    (
        cd "$dir"
        # concurrency leases (the retrain slot, tasks/pipeline/slot.py) on disk in PREFECT_HOME, not in
        # memory: after a crash and restart the repossessor still frees the slot of a run that died holding it
        service_env HOME="$dir/home" PREFECT_HOME="$dir/home" PREFECT_SERVER_ANALYTICS_ENABLED=false \
            PREFECT_UI_ENABLED="$PREFECT_UI_ENABLED" \
            PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem \
            PREFECT_API_DATABASE_CONNECTION_URL="$(pg_role_url "$PREFECT_DB" asyncpg)" \
            PREFECT_SERVER_API_AUTH_STRING="$(prefect_auth)" PREFECT_API_AUTH_STRING="$(prefect_auth)"
        spawn prefect "$user" --grace 20 -- "$prefect" server start --host "$STACK_HOST" --port "$PREFECT_PORT"
    )
    PENDING+=(prefect)
}

prefect_env() { PREFECT_API="$(prefect_api)" PREFECT_AUTH="$(prefect_auth)" "$@"; }

status_prefect() {
    local pid out
    pid=$(child_of prefect) || { not_running prefect; return 3; }
    if out=$(prefect_env ctl prefect-check 2>&1); then
        echo "prefect   running  pid $pid  $(prefect_api)  $out  (starts: $(starts_of prefect))"
    else
        echo "prefect   unhealthy  pid $pid  $(prefect_api)  $out"; return 3
    fi
}

# ---------------------------------------------------------------------------------- worker
optuna_storage() { echo "postgresql+psycopg2://$OPTUNA_DB@$STACK_HOST:$POSTGRES_PORT/$OPTUNA_DB"; }   # no password

pgpass_line() {  # ~/.pgpass format (':' and '\' escaped)
    local pw=${OPTUNA_DB_PASSWORD//\\/\\\\}
    pw=${pw//:/\\:}
    echo "$STACK_HOST:$POSTGRES_PORT:$OPTUNA_DB:$OPTUNA_DB:$pw"
}

client_env() {  # what a client or a flow run needs, and nothing more: no admin, no S3 key, no superuser
    printf 'export %s=%q\n' \
        MLFLOW_TRACKING_URI "$(mlflow_url)" \
        MLFLOW_TRACKING_USERNAME "$MLFLOW_USER" \
        MLFLOW_TRACKING_PASSWORD "$MLFLOW_USER_PASSWORD" \
        PREFECT_API_URL "$(prefect_api)" \
        PREFECT_API_AUTH_STRING "$(prefect_auth)" \
        SSLFLOW_TUNE_STORAGE "$(optuna_storage)" \
        PGPASSWORD "$OPTUNA_DB_PASSWORD" \
        AWS_ENDPOINT_URL_S3 "$(s3_url)"
}

start_worker() {
    local dir="$STATE/worker" prefect user
    if pid_of worker >/dev/null; then say "worker already running on pool $PREFECT_WORK_POOL"; return; fi
    pid_of prefect >/dev/null || die "worker needs prefect: start it first (infra/local-stack.sh up prefect)"
    prefect=$(tool prefect)
    user=$(worker_user)
    ensure_os_user "$user"
    check_runnable "$user"
    private_dir "$dir" "$user"
    mkdir -p "$dir/home" "$dir/tmp"
    (umask 077; pgpass_line >"$dir/pgpass")
    if [[ -n $user ]]; then chown -R "$user:" "$dir"; fi
    say "worker: process worker on pool $PREFECT_WORK_POOL${user:+ as user $user}"
    (
        cd "$dir/home"
        service_env HOME="$dir/home" TMPDIR="$dir/tmp" PREFECT_HOME="$dir/home" PREFECT_API_URL="$(prefect_api)" \
            PREFECT_API_AUTH_STRING="$(prefect_auth)" MLFLOW_TRACKING_URI="$(mlflow_url)" \
            MLFLOW_TRACKING_USERNAME="$MLFLOW_USER" MLFLOW_TRACKING_PASSWORD="$MLFLOW_USER_PASSWORD" \
            SSLFLOW_TUNE_STORAGE="$(optuna_storage)" PGPASSFILE="$dir/pgpass" AWS_ENDPOINT_URL_S3="$(s3_url)" \
            PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 \
            GX_ANALYTICS_ENABLED=false PREFECT_WORKER_QUERY_SECONDS="$PREFECT_WORKER_QUERY_SECONDS"
        # --stop-all: on `down` the flow runs get SIGTERM with the worker (it would wait for them)
        spawn worker "$user" --stop-all --grace 10 -- "$prefect" worker start --pool "$PREFECT_WORK_POOL" \
            --type process --name "local-stack-$(hostname)"
    )
    wait_until worker "$STACK_START_TIMEOUT" prefect_env ctl prefect-worker "$PREFECT_WORK_POOL"
}

status_worker() {
    local pid out
    pid=$(child_of worker) || { not_running worker; return 3; }
    if out=$(prefect_env ctl prefect-worker "$PREFECT_WORK_POOL" 2>&1); then
        echo "worker    running  pid $pid  pool $PREFECT_WORK_POOL  $out  user $(stat -c %U "/proc/$pid")  (starts: $(starts_of worker))"
    else
        echo "worker    unhealthy  pid $pid  pool $PREFECT_WORK_POOL  $out"; return 3
    fi
}

# ---------------------------------------------------------------------------------- DVC remote
dvc_remote() {  # the project's DVC remote `storage` on the stack's S3, scoped keys in .dvc/config.local
    local dir=${1:-}
    [[ -n $dir && -d $dir/.dvc ]] || die "usage: $0 dvc-remote DIR (a DVC repository: run \`dvc init\` there first)"
    dir=$(cd "$dir" && pwd)
    (
        cd "$dir"
        "$(tool dvc)" remote add -f -d storage "s3://$DVC_BUCKET/sslflow" >/dev/null
        "$(tool dvc)" remote modify storage endpointurl "$(s3_url)"
        "$(tool dvc)" remote modify storage region "$S3_REGION"
    )
    # the keys: written by Python from the environment (never `dvc remote modify --local`, whose
    # arguments `ps` would show), file mode 0600, owned by the project's owner
    DVC_CONFIG_LOCAL="$dir/.dvc/config.local" DVC_S3_ACCESS_KEY="$DVC_S3_ACCESS_KEY" \
        DVC_S3_SECRET_KEY="$DVC_S3_SECRET_KEY" "$(tool python)" - <<'PY'
import os
from configobj import ConfigObj
path = os.environ["DVC_CONFIG_LOCAL"]
old = os.umask(0o077)
cfg = ConfigObj(path if os.path.exists(path) else None)
cfg.filename = path
section = cfg.setdefault('remote "storage"', {})
section["access_key_id"] = os.environ["DVC_S3_ACCESS_KEY"]
section["secret_access_key"] = os.environ["DVC_S3_SECRET_KEY"]
cfg.write()
os.chmod(path, 0o600)
os.umask(old)
PY
    if is_root; then chown "$(stat -c %u:%g "$dir")" "$dir/.dvc/config" "$dir/.dvc/config.local"; fi
    say "dvc remote 'storage' = s3://$DVC_BUCKET/sslflow on $(s3_url); keys (bucket $DVC_BUCKET only) in $dir/.dvc/config.local"
}

# ---------------------------------------------------------------------------------- rotation
rotate() {
    local what=${1:-} old
    case $what in
        postgres)
            old=$(kv_get "$SECRETS/applied.env" POSTGRES_PASSWORD) || old=${POSTGRES_OLD_PASSWORD:-}
            [[ -n $old ]] || die "the password in effect is not recorded: set POSTGRES_OLD_PASSWORD"
            [[ $old != "$POSTGRES_PASSWORD" ]] || { say "POSTGRES_PASSWORD is unchanged: nothing to rotate"; return 0; }
            pid_of postgres >/dev/null || die "postgres is not running: start it first"
            PGHOST=$STACK_HOST PGPORT=$POSTGRES_PORT PGUSER=$POSTGRES_USER PGPASSWORD=$old \
                NEW_PASSWORD=$POSTGRES_PASSWORD ctl pg-set-password "$POSTGRES_USER" \
                || die "could not change the superuser's password"
            kv_set "$SECRETS/applied.env" POSTGRES_PASSWORD "$POSTGRES_PASSWORD"
            say "postgres: the superuser $POSTGRES_USER has the new POSTGRES_PASSWORD (no service uses it: nothing restarted)"
            ;;
        mlflow-admin)
            old=$(kv_get "$SECRETS/applied.env" MLFLOW_ADMIN_PASSWORD) || old=${MLFLOW_ADMIN_OLD_PASSWORD:-}
            [[ -n $old ]] || die "the password in effect is not recorded: set MLFLOW_ADMIN_OLD_PASSWORD"
            [[ $old != "$MLFLOW_ADMIN_PASSWORD" ]] || { say "MLFLOW_ADMIN_PASSWORD is unchanged: nothing to rotate"; return 0; }
            pid_of mlflow >/dev/null || die "mlflow is not running: start it first"
            MLFLOW_URL="$(mlflow_url)" MLFLOW_USER="$MLFLOW_ADMIN_USER" MLFLOW_PASSWORD="$old" \
                NEW_PASSWORD="$MLFLOW_ADMIN_PASSWORD" ctl mlflow-set-password || die "could not change the admin password"
            kv_set "$SECRETS/applied.env" MLFLOW_ADMIN_PASSWORD "$MLFLOW_ADMIN_PASSWORD"
            # a restart empties the server's cache of verified passwords (the old one would work for
            # MLFLOW_AUTH_CACHE_TTL seconds) and gives it the new value in its environment
            stop_service mlflow
            launch_mlflow
            wait_pending
            say "mlflow: admin $MLFLOW_ADMIN_USER has the new MLFLOW_ADMIN_PASSWORD; the server was restarted"
            ;;
        internal)
            # new generated secrets; `up` applies every one of them (roles, MLflow user, S3 identities,
            # JWT key and certificates, Prefect auth string): the services restart, clients re-read `env`
            local running=() s
            for s in s3 mlflow prefect worker; do pid_of "$s" >/dev/null && running+=("$s"); done
            mv -f "$SECRETS/generated.env" "$SECRETS/generated.env.previous" 2>/dev/null || true
            rm -f "$STATE/seaweedfs/conf/node.crt"
            "$SELF" down worker mlflow prefect s3
            if ((INSECURE_DEV)); then "$SELF" up --insecure-dev "${running[@]:-postgres}"; else "$SELF" up "${running[@]:-postgres}"; fi
            rm -f "$SECRETS/generated.env.previous"
            say "new service credentials are in effect: clients run \`eval \"\$($SELF env)\"\` and \`$SELF dvc-remote DIR\` again"
            ;;
        *) die "usage: $0 rotate postgres|mlflow-admin|internal (after editing the env file for the first two)" ;;
    esac
}

# ---------------------------------------------------------------------------------- commands
PENDING=()  # services launched whose health is not checked yet

wait_pending() {
    local s
    for s in "${PENDING[@]}"; do
        case $s in
            mlflow) wait_until mlflow "$STACK_START_TIMEOUT" mlflow_healthy ;;
            mlflow-user) ensure_mlflow_user ;;
            prefect) wait_until prefect "$STACK_START_TIMEOUT" prefect_env ctl prefect-check ;;
        esac
    done
    PENDING=()
}

canonical() {  # service name -> one of SERVICES (aliases: S3, seaweedfs, pg, postgresql, ...)
    case "${1,,}" in
        postgres | postgresql | pg) echo postgres ;;
        s3 | seaweedfs | weed) echo s3 ;;
        mlflow) echo mlflow ;;
        prefect) echo prefect ;;
        worker | prefect-worker) echo worker ;;
        *) die "unknown service '$1' (services: ${SERVICES[*]})" ;;
    esac
}

deps_of() {
    case $1 in
        mlflow) echo "postgres s3" ;;
        prefect) echo postgres ;;
        worker) echo "postgres prefect" ;;
        *) echo "" ;;
    esac
}

selected() {  # the named services (or all), canonical, in dependency order; $1 = with dependencies?
    local with_deps=$1 s d
    shift
    local -A want=()
    if (($# == 0)); then for s in "${SERVICES[@]}"; do want[$s]=1; done; fi
    for s in "$@"; do
        s=$(canonical "$s")
        want[$s]=1
        if [[ $with_deps == 1 ]]; then for d in $(deps_of "$s"); do want[$d]=1; done; fi
    done
    for s in "${SERVICES[@]}"; do [[ -n ${want[$s]:-} ]] && echo "$s"; done
    return 0
}

init_env_file() {  # the env file from the example, every secret a fresh random value, mode 0600
    local target=${SSLFLOW_STACK_ENV:-$REPO/infra/stack.env} line key
    [[ ! -e $target ]] || die "$target exists: not overwritten"
    (
        umask 077
        while IFS= read -r line || [[ -n $line ]]; do
            key=${line%%=*}
            if [[ $line != \#* && $line == *=* ]] && [[ " ${OPERATOR_SECRETS[*]} ${GENERATED[*]} " == *" $key "* ]]; then
                line="$key=$(random_hex 24)"
            fi
            printf '%s\n' "$line"
        done <"$REPO/infra/stack.env.example" >"$target"
    )
    say "wrote $target (mode 0600) with random secrets"
}

cmd=${1:-}
[[ -n $cmd ]] || { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
shift
case $cmd in up | start | down | stop | restart | status)
    for name in "$@"; do  # here, not inside $(selected ...), where `die` would only end a subshell
        canonical "$name" >/dev/null  # exits with the message when unknown
    done ;;
esac
case $cmd in
    up | start)
        check_config
        # mlflow and prefect are independent (both need postgres, mlflow s3): they start side by side
        for s in $(selected 1 "$@"); do
            case $s in
                mlflow | prefect) "launch_$s" ;;
                *) wait_pending; "start_$s" ;;
            esac
        done
        wait_pending
        rc=0
        for s in $(selected 1 "$@"); do "status_$s" || rc=3; done
        exit "$rc"
        ;;
    down | stop)
        # in parallel, PostgreSQL last (the servers close their connections first); SeaweedFS
        # alone takes ~15 s (its filer's gRPC shutdown), so it does not wait for the others
        mapfile -t todo < <(selected 0 "$@")
        for stage in "worker mlflow prefect s3" postgres; do
            jobs_=()
            for s in "${todo[@]}"; do
                [[ " $stage " == *" $s "* ]] || continue
                { stop_service "$s"; say "$s stopped"; } &
                jobs_+=($!)
            done
            for j in "${jobs_[@]}"; do wait "$j" || exit 1; done
        done
        ;;
    restart)
        flags=()
        ((INSECURE_DEV)) && flags=(--insecure-dev)
        "$SELF" down "$@"
        "$SELF" up "${flags[@]}" "$@"
        ;;
    status)
        rc=0
        for s in $(selected 0 "$@"); do "status_$s" || rc=3; done
        exit "$rc"
        ;;
    check)
        check_config
        say "configuration ok"
        ;;
    init)
        init_env_file
        ;;
    env)
        client_env
        ;;
    pgpass)
        pgpass_line
        ;;
    dvc-remote)
        dvc_remote "$@"
        ;;
    rotate)
        check_config
        rotate "$@"
        ;;
    logs)
        (($# == 1)) || die "usage: $0 logs SERVICE"
        tail -n 50 "$LOGS/$(canonical "$1").log"
        ;;
    wipe)
        "$SELF" down
        rm -rf "$STATE"
        say "removed $STATE"
        ;;
    *)
        die "unknown command '$cmd' (init|up|down|start|stop|restart|status|env|dvc-remote|rotate|check|logs|pgpass|wipe)"
        ;;
esac
