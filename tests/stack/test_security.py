"""The native stack (`infra/local-stack.sh`) against a local attacker: a real, unprivileged OS
user created for the session (`os_user`) and a second MLflow user. Nothing is mocked.

- Prefect: the API refuses requests without the auth string (no deployment, no flow run: no
  code runs as the worker); the worker runs as its own unprivileged account and holds only the
  client credentials.
- SeaweedFS: master, volume server and filer refuse anonymous HTTP and gRPC (mutual TLS, JWT);
  the objects survive the attempts; the S3 gateway refuses the operator's AWS_* variables.
- PostgreSQL: no way to the superuser (no Unix socket, its password unknown, the data dir
  closed); the client's optuna role reaches only its database and cannot run programs.
- MLflow: another ordinary user cannot write a user's runs or move its model's alias; the
  pipeline user is no admin; failed logins are rate-limited (HTTP 429, no hashing).
- Secrets: placeholder/development secrets and a readable env file are refused; state, env
  file, logs, .dvc/config.local are private; no secret on any command line or in any log;
  the two operator passwords rotate with one documented command each.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from services import OPERATOR_AWS, REPO, STACK_SCRIPT, Stack, os_user_fixture, postgres_binaries, run_as  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _http(method: str, url: str, auth: tuple[str, str] | None = None, body: dict | None = None,
          timeout: float = 15) -> tuple[int, str, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace"), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace"), {k.lower(): v for k, v in e.headers.items()}


def _secret_values(st: Stack) -> dict[str, str]:
    """Every secret of the stack: the operator's and the generated ones."""
    keys = ("POSTGRES_PASSWORD", "S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY")
    return {**{k: st.config[k] for k in keys}, **st.secrets()}


def _curl(user: str, *args: str) -> str:
    """The HTTP status curl gets as `user` ("000": no HTTP answer at all)."""
    out = run_as(user, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", *args)
    return out.stdout.strip() or "000"


# ------------------------------------------------------------------------------------ secrets hygiene
def test_placeholder_secrets_and_a_readable_env_file_are_refused(tmp_path):
    """`up` refuses the example's change-me values (exit 2, before anything starts), the built-in
    development defaults and a group-readable env file; --insecure-dev accepts them; `init`
    writes a 0600 file with random secrets that passes."""
    state = tmp_path / "state"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_", "MLFLOW_", "PREFECT_"))}

    def script(env_file: Path, *args: str) -> subprocess.CompletedProcess:
        env = {**base, "SSLFLOW_STACK_DIR": str(state), "SSLFLOW_STACK_ENV": str(env_file)}
        return subprocess.run(["bash", str(STACK_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)

    example = tmp_path / "example.env"
    shutil.copy(REPO / "infra" / "stack.env.example", example)
    example.chmod(0o600)
    up = script(example, "up", "postgres")
    assert up.returncode == 2, up.stderr
    assert "POSTGRES_PASSWORD is a placeholder" in up.stderr and "MLFLOW_ADMIN_PASSWORD is a placeholder" in up.stderr
    assert not list((state / "pids").glob("*.pid")) and not (state / "postgres").exists()  # nothing started
    dev = script(example, "check", "--insecure-dev")
    assert dev.returncode == 0 and "insecure development secrets accepted" in dev.stderr, dev.stderr

    fresh = tmp_path / "fresh.env"
    made = script(fresh, "init")
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert script(fresh, "check").returncode == 0
    values = dict(ln.split("=", 1) for ln in fresh.read_text().splitlines() if ln and not ln.startswith("#"))
    assert len(values["POSTGRES_PASSWORD"]) >= 32 and values["S3_JWT_KEY"]
    assert "change-me" not in "".join(values.values())
    fresh.chmod(0o644)
    readable = script(fresh, "up", "postgres")
    assert readable.returncode == 2 and "readable by other users" in readable.stderr and "chmod 600" in readable.stderr
    empty = tmp_path / "empty.env"  # nothing set: the built-in development defaults
    empty.write_text("")
    empty.chmod(0o600)
    defaults = script(empty, "check")
    assert defaults.returncode == 2 and "POSTGRES_PASSWORD is a placeholder or development value" in defaults.stderr


def test_state_env_file_and_logs_are_private(native_stack: Stack, os_user):
    st = native_stack
    assert stat.S_IMODE(st.env_file.stat().st_mode) == 0o600
    for sub in ("postgres", "seaweedfs", "mlflow", "prefect", "worker", "secrets", "logs", "pids"):
        assert stat.S_IMODE((st.state_dir / sub).stat().st_mode) == 0o700, sub
    for f in [*(st.state_dir / "secrets").iterdir(), *(st.state_dir / "logs").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f
    owners = {sub: (st.state_dir / sub).owner() for sub in ("postgres", "seaweedfs", "mlflow", "worker")}
    assert owners == {"postgres": "postgres", "seaweedfs": st.config["SERVICE_OS_USER"],
                      "mlflow": st.config["SERVICE_OS_USER"], "worker": st.config["WORKER_OS_USER"]}, owners
    for target in (st.env_file, st.state_dir / "secrets" / "generated.env",
                   st.state_dir / "seaweedfs" / "conf" / "node.key", st.state_dir / "mlflow" / "basic_auth.ini",
                   st.state_dir / "logs" / "mlflow.log"):
        out = run_as(os_user, "cat", str(target))
        assert out.returncode != 0 and "Permission denied" in out.stderr, (target, out)
    assert run_as(os_user, "ls", str(st.state_dir)).returncode != 0


def test_no_secret_on_a_command_line_or_in_a_log(native_stack: Stack):
    """`ps` shows every process's arguments to every local user; the logs are the operator's."""
    st = native_stack
    values = {k: v for k, v in _secret_values(st).items() if len(v) >= 8}
    leaks = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            leaks += [(entry.name, k, cmdline[:80]) for k, v in values.items() if v in cmdline]
    for log in (st.state_dir / "logs").iterdir():
        text = log.read_text(errors="replace")
        leaks += [(log.name, k) for k, v in values.items() if v in text]
    assert not leaks, leaks


# ------------------------------------------------------------------------------------ Prefect
def test_unprivileged_user_cannot_use_prefect_and_the_worker_holds_only_client_credentials(native_stack: Stack,
                                                                                           os_user):
    st = native_stack
    api = f"http://{st.config['STACK_HOST']}:{st.config['PREFECT_PORT']}/api"
    # what the attacker did: create a deployment / a flow run whose command the worker would run
    for path in ("/deployments/filter", "/flow_runs/", "/deployments/", "/work_pools/filter"):
        got = _curl(os_user, "-X", "POST", "-H", "Content-Type: application/json", "-d", "{}", f"{api}{path}")
        assert got == "401", (path, got)
    assert _curl(os_user, f"{api}/ready") == "200"  # the unauthenticated probe reveals nothing
    client = st.client_env()
    user, _, password = client["PREFECT_API_AUTH_STRING"].partition(":")
    assert _http("POST", f"{api}/deployments/filter", (user, password), {})[0] == 200
    assert _http("POST", f"{api}/deployments/filter", (user, "wrong"), {})[0] == 401

    # what `local-stack.sh env` gives a client: these variables and no admin secret, no S3 key
    client_keys = ("MLFLOW_USER_PASSWORD", "PREFECT_AUTH_PASSWORD", "OPTUNA_DB_PASSWORD")
    admin = {k: v for k, v in _secret_values(st).items() if k not in client_keys}
    assert set(client) == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                           "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "SSLFLOW_TUNE_STORAGE", "PGPASSWORD",
                           "AWS_ENDPOINT_URL_S3"}, sorted(client)
    assert client["MLFLOW_TRACKING_USERNAME"] != st.config["MLFLOW_ADMIN_USER"]
    assert not [k for k, v in admin.items() if any(v in x for x in client.values())]

    # the worker: its own unprivileged account, the client credentials and nothing else
    _, worker = st.pids("worker")
    status = (Path("/proc") / str(worker) / "status").read_text()
    uid = int(next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1])
    import pwd

    assert pwd.getpwuid(uid).pw_name == st.config["WORKER_OS_USER"] and uid != 0
    environ = dict(kv.split("=", 1) for kv in (Path("/proc") / str(worker) / "environ").read_bytes().decode()
                   .split("\0") if "=" in kv)
    assert environ["MLFLOW_TRACKING_USERNAME"] == st.config.get("MLFLOW_USER", "sslflow")
    assert not [k for k in environ if k.startswith("AWS_") and k != "AWS_ENDPOINT_URL_S3"], sorted(environ)
    held = [k for k, v in admin.items() if any(v in x for x in environ.values())]
    assert not held, held


# ------------------------------------------------------------------------------------ SeaweedFS
def test_seaweedfs_internal_ports_refuse_anonymous_http_and_grpc(native_stack: Stack, os_user):
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    st = native_stack
    c = st.config
    host = c["STACK_HOST"]
    s3_url = f"http://{host}:{c['S3_PORT']}"
    admin = boto3.client("s3", endpoint_url=s3_url, region_name=c["S3_REGION"], aws_access_key_id=c["S3_ACCESS_KEY"],
                         aws_secret_access_key=c["S3_SECRET_KEY"], config=Config(retries={"max_attempts": 1}))
    admin.put_object(Bucket=c["MLFLOW_BUCKET"], Key="artifacts/probe/champion.bin", Body=b"the champion")
    before = sorted(o["Key"] for o in admin.list_objects_v2(Bucket=c["MLFLOW_BUCKET"]).get("Contents", []))

    master, volume, filer = (f"{host}:{c[k]}" for k in ("S3_MASTER_PORT", "S3_VOLUME_PORT", "S3_FILER_PORT"))
    attempts = {
        "filer read": ("GET", f"http://{filer}/buckets/{c['MLFLOW_BUCKET']}/artifacts/probe/champion.bin"),
        "filer list": ("GET", f"http://{filer}/buckets/{c['MLFLOW_BUCKET']}/"),
        "filer write": ("PUT", f"http://{filer}/buckets/{c['MLFLOW_BUCKET']}/artifacts/probe/evil.bin"),
        "filer delete": ("DELETE", f"http://{filer}/buckets/{c['MLFLOW_BUCKET']}/artifacts/probe/champion.bin"),
        "master delete collection": ("GET", f"http://{master}/col/delete?collection={c['MLFLOW_BUCKET']}"),
        "master assign": ("GET", f"http://{master}/dir/assign"),
        "volume status": ("GET", f"http://{volume}/status"),
    }
    for what, (method, url) in attempts.items():
        for scheme_url in (url, url.replace("http://", "https://")):  # plain HTTP; TLS without a client certificate
            got = _curl(os_user, "-k", "-X", method, "--data-binary", "x", scheme_url) if method == "PUT" else \
                _curl(os_user, "-k", "-X", method, scheme_url)
            assert got in ("000", "400"), (what, scheme_url, got)  # 400: HTTP spoken to a TLS port
    for port in (int(c["S3_MASTER_PORT"]), int(c["S3_VOLUME_PORT"]), int(c["S3_FILER_PORT"]), int(c["S3_PORT"])):
        out = run_as(os_user, "openssl", "s_client", "-connect", f"{host}:{port + 10000}", "-quiet", stdin="",
                     timeout=30)
        assert "certificate required" in out.stderr or out.returncode != 0, (port + 10000, out.stderr[-300:])
    after = sorted(o["Key"] for o in admin.list_objects_v2(Bucket=c["MLFLOW_BUCKET"]).get("Contents", []))
    assert after == before and admin.get_object(Bucket=c["MLFLOW_BUCKET"],
                                                Key="artifacts/probe/champion.bin")["Body"].read() == b"the champion"
    admin.delete_object(Bucket=c["MLFLOW_BUCKET"], Key="artifacts/probe/champion.bin")

    # the gateway: the operator's AWS_* (set when the stack started) are no identity; anonymous is refused
    operator = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                            aws_access_key_id=OPERATOR_AWS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=OPERATOR_AWS["AWS_SECRET_ACCESS_KEY"],
                            config=Config(retries={"max_attempts": 1}))
    with pytest.raises(ClientError, match=r"InvalidAccessKeyId|AccessDenied|SignatureDoesNotMatch"):
        operator.list_buckets()
    assert _curl(os_user, f"{s3_url}/{c['MLFLOW_BUCKET']}/") in ("403", "401")
    _, weed = st.pids("s3")
    environ = (Path("/proc") / str(weed) / "environ").read_bytes().decode()
    assert "AWS_" not in environ


def test_dvc_remote_keys_are_private_and_reach_only_the_dvc_bucket(native_stack: Stack, tmp_path):
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    st = native_stack
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=project, check=True,
                   capture_output=True, timeout=120)
    st.run("dvc-remote", str(project))
    local = project / ".dvc" / "config.local"
    assert stat.S_IMODE(local.stat().st_mode) == 0o600
    secrets = st.secrets()
    assert secrets["DVC_S3_SECRET_KEY"] in local.read_text() and st.config["S3_SECRET_KEY"] not in local.read_text()
    assert "endpointurl" in (project / ".dvc" / "config").read_text()
    c = st.config
    dvc = boto3.client("s3", endpoint_url=f"http://{c['STACK_HOST']}:{c['S3_PORT']}", region_name=c["S3_REGION"],
                       aws_access_key_id=secrets["DVC_S3_ACCESS_KEY"],
                       aws_secret_access_key=secrets["DVC_S3_SECRET_KEY"], config=Config(retries={"max_attempts": 1}))
    dvc.put_object(Bucket=c["DVC_BUCKET"], Key="probe/x", Body=b"1")
    dvc.delete_object(Bucket=c["DVC_BUCKET"], Key="probe/x")
    for op in (lambda: dvc.list_objects_v2(Bucket=c["MLFLOW_BUCKET"]),
               lambda: dvc.put_object(Bucket=c["MLFLOW_BUCKET"], Key="artifacts/evil", Body=b"1")):
        with pytest.raises(ClientError, match="AccessDenied"):
            op()


# ------------------------------------------------------------------------------------ PostgreSQL
def test_postgres_superuser_is_out_of_reach_and_clients_get_the_optuna_role_only(native_stack: Stack, os_user):
    st = native_stack
    c = st.config
    psql = str(Path(postgres_binaries()) / "psql")
    conn = ["-h", c["STACK_HOST"], "-p", c["POSTGRES_PORT"], "-X", "-tA"]
    # no password, no socket, no data directory
    out = run_as(os_user, psql, *conn, "-U", c["POSTGRES_USER"], "-d", "postgres", "-w", "-c", "SELECT 1")
    assert out.returncode != 0 and ("password" in out.stderr), out.stderr
    assert run_as(os_user, "ls", str(st.state_dir / "postgres" / "data")).returncode != 0
    assert not Path("/var/run/postgresql", f".s.PGSQL.{c['POSTGRES_PORT']}").exists()

    # a client with the stack's client settings: the optuna role, a plain one
    client = st.client_env()
    assert client["SSLFLOW_TUNE_STORAGE"].endswith(f"optuna@{c['STACK_HOST']}:{c['POSTGRES_PORT']}/optuna")
    assert client["PGPASSWORD"] not in client["SSLFLOW_TUNE_STORAGE"]  # the URL holds no password (argv-safe)

    def as_client(db: str, sql: str) -> subprocess.CompletedProcess:
        return run_as(os_user, psql, *conn, "-U", "optuna", "-d", db, "-c", sql,
                      env={"PGPASSWORD": client["PGPASSWORD"]})

    ok = as_client("optuna", "SELECT rolsuper, rolcreaterole, rolcreatedb, pg_has_role('optuna', "
                             "'pg_execute_server_program', 'member') FROM pg_roles WHERE rolname = current_user")
    assert ok.returncode == 0 and ok.stdout.strip() == "f|f|f|f", (ok.stdout, ok.stderr)
    for sql in ("COPY (SELECT 1) TO PROGRAM 'id'", "CREATE TEMP TABLE t (x text); COPY t FROM PROGRAM 'id'"):
        program = as_client("optuna", sql)
        assert program.returncode != 0 and "pg_execute_server_program" in program.stderr, (sql, program.stderr)
    # nor read files of the server (pg_read_server_files) or lift its own rights
    for sql in ("SELECT pg_read_file('postgresql.conf')", "CREATE ROLE evil SUPERUSER", "ALTER ROLE optuna SUPERUSER"):
        refused = as_client("optuna", sql)
        assert refused.returncode != 0 and ("permission denied" in refused.stderr
                                            or "must be superuser" in refused.stderr), (sql, refused.stderr)
    for db in ("mlflow", "mlflow_auth", "prefect", "postgres"):
        denied = as_client(db, "SELECT 1")
        assert denied.returncode != 0 and "permission denied for database" in denied.stderr, (db, denied.stderr)
    alter = as_client("optuna", f"ALTER ROLE {c['POSTGRES_USER']} PASSWORD 'x'")
    assert alter.returncode != 0, alter.stdout


# ------------------------------------------------------------------------------------ MLflow
def _mlflow_admin(st: Stack) -> tuple[str, tuple[str, str]]:
    return (f"http://{st.config['STACK_HOST']}:{st.config['MLFLOW_PORT']}",
            (st.config["MLFLOW_ADMIN_USER"], st.config["MLFLOW_ADMIN_PASSWORD"]))


def _new_mlflow_user(st: Stack, prefix: str) -> tuple[str, str]:
    url, admin = _mlflow_admin(st)
    user, password = f"{prefix}-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    status, body, _ = _http("POST", f"{url}/api/2.0/mlflow/users/create", admin,
                            {"username": user, "password": password})
    assert status == 200, body
    return user, password


def test_mlflow_users_cannot_write_each_others_runs_or_move_the_champion(native_stack: Stack):
    st = native_stack
    url, _ = _mlflow_admin(st)
    client = st.client_env()
    pipeline = (client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"])
    api = f"{url}/api/2.0/mlflow"
    # the pipeline user (what `local-stack.sh env` gives clients and workers) creates its things
    status, body, _ = _http("POST", f"{api}/experiments/create", pipeline, {"name": f"owned-{uuid.uuid4().hex[:6]}"})
    assert status == 200, body
    experiment = json.loads(body)["experiment_id"]
    status, body, _ = _http("POST", f"{api}/runs/create", pipeline, {"experiment_id": experiment})
    run_id = json.loads(body)["run"]["info"]["run_id"]
    model = f"owned-model-{uuid.uuid4().hex[:6]}"
    assert _http("POST", f"{api}/registered-models/create", pipeline, {"name": model})[0] == 200
    assert _http("POST", f"{api}/model-versions/create", pipeline,
                 {"name": model, "source": f"runs:/{run_id}/model", "run_id": run_id})[0] == 200
    assert _http("POST", f"{api}/registered-models/alias", pipeline,
                 {"name": model, "alias": "champion", "version": "1"})[0] == 200

    intruder = _new_mlflow_user(st, "intruder")
    assert _http("GET", f"{api}/runs/get?run_id={run_id}", intruder)[0] == 200  # default permission: READ
    writes = {
        "log metric": ("POST", "runs/log-metric", {"run_id": run_id, "key": "evil", "value": 1.0, "timestamp": 0}),
        "tag run": ("POST", "runs/set-tag", {"run_id": run_id, "key": "evil", "value": "1"}),
        "delete run": ("POST", "runs/delete", {"run_id": run_id}),
        "move alias": ("POST", "registered-models/alias", {"name": model, "alias": "champion", "version": "1"}),
        "delete alias": ("DELETE", "registered-models/alias", {"name": model, "alias": "champion"}),
        "new version": ("POST", "model-versions/create", {"name": model, "source": "s3://evil/model"}),
    }
    for what, (method, path, body) in writes.items():
        assert _http(method, f"{api}/{path}", intruder, body)[0] == 403, what
    # and the pipeline user is no admin: no users, no permissions of others
    new_user = {"username": "x" + uuid.uuid4().hex[:6], "password": "y" * 16}
    assert _http("POST", f"{api}/users/create", pipeline, new_user)[0] == 403
    status, body, _ = _http("GET", f"{api}/model-versions/get?name={model}&version=1", pipeline)
    assert status == 200 and json.loads(body)["model_version"]["aliases"] == ["champion"]
    # the other stack modules count the registry's models and runs: leave nothing behind
    assert _http("DELETE", f"{api}/registered-models/delete", pipeline, {"name": model})[0] == 200
    assert _http("POST", f"{api}/experiments/delete", pipeline, {"experiment_id": experiment})[0] == 200


def test_mlflow_failed_logins_are_rate_limited(native_stack: Stack):
    st = native_stack
    url, _ = _mlflow_admin(st)
    probe = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    victim, password = _new_mlflow_user(st, "victim")
    limit = int(st.config.get("MLFLOW_AUTH_MAX_FAILURES", "10"))
    statuses = [_http("GET", probe, (victim, f"guess-{i}"))[0] for i in range(limit)]
    assert statuses == [401] * limit, statuses
    t0 = time.perf_counter()
    status, body, headers = _http("GET", probe, (victim, "guess-again"))
    refused_s = time.perf_counter() - t0
    assert status == 429 and int(headers["retry-after"]) >= 1, (status, body)
    assert _http("GET", probe, (victim, password))[0] == 429  # locked for the window, even the right password
    assert refused_s < 2.0  # no password hash for a refused attempt
    client = st.client_env()  # other users are not affected
    assert _http("GET", probe, (client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"]))[0] == 200


# ---------------------------------------------------------------------------- rotation (last: edits the env file)
def test_rotating_the_postgres_and_mlflow_admin_passwords(native_stack: Stack):
    """The documented procedure: put the new value in the env file, run `rotate ...`."""
    import psycopg2

    st = native_stack
    old_pg, new_pg = st.config["POSTGRES_PASSWORD"], f"pg-{uuid.uuid4().hex}"
    st.set_config(POSTGRES_PASSWORD=new_pg)
    out = st.run("rotate", "postgres")
    assert "new POSTGRES_PASSWORD" in out.stderr, out.stderr
    st.connect().close()  # the new one works ...
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        st.connect(user=st.config["POSTGRES_USER"], password=old_pg).close()  # ... the old one no more
    assert st.run("status", "postgres").returncode == 0
    assert "unchanged" in st.run("rotate", "postgres").stderr

    url, (admin, old_ml) = _mlflow_admin(st)
    new_ml = f"mlflow-{uuid.uuid4().hex}"
    st.set_config(MLFLOW_ADMIN_PASSWORD=new_ml)
    st.run("rotate", "mlflow-admin")
    probe = f"{url}/api/2.0/mlflow/users/get?username={admin}"
    assert _http("GET", probe, (admin, new_ml))[0] == 200
    assert _http("GET", probe, (admin, old_ml))[0] == 401
    assert st.run("status", "mlflow").returncode == 0
    client = st.client_env()
    assert _http("GET", f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                 (client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"]))[0] == 200
