"""The service definitions (infra/): the native stack script and the fixtures other tests use
(PostgreSQL, its per-service roles), the compose file (validated by Compose itself, its secret
check run as compose would run it), the Prefect work-pool base job templates (rendered as a
worker renders them), the Kubernetes manifests (headless SeaweedFS service, Secrets mounted as
files, non-root pods with limits and probes, network policies) and the image."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services import REPO, STACK_SCRIPT, Stack, require_or_skip


# ------------------------------------------------------------------------------------ PostgreSQL
def _tables(url: str) -> list[str]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        return sqlalchemy.inspect(engine).get_table_names()
    finally:
        engine.dispose()


@pytest.mark.parametrize("round_", [1, 2])
def test_postgres_url_is_a_fresh_database_per_test(postgres_url, round_):
    """Both rounds create the same table: the second would fail if it saw the first's database."""
    import sqlalchemy

    assert postgres_url.startswith("postgresql+psycopg2://") and "127.0.0.1" in postgres_url
    assert _tables(postgres_url) == []
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE marker (round integer)"))
        conn.execute(sqlalchemy.text("INSERT INTO marker VALUES (:r)"), {"r": round_})
    engine.dispose()
    assert _tables(postgres_url) == ["marker"]


def test_stack_postgres_has_the_service_databases_and_survives_a_restart(postgres_service: Stack):
    st = postgres_service
    conn = st.connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database")
        names = {r[0] for r in cur.fetchall()}
        assert {"mlflow", "mlflow_auth", "prefect", "optuna"} <= names, names
        cur.execute("SELECT current_setting('listen_addresses'), current_setting('port')")
        assert cur.fetchone() == ("127.0.0.1", st.config["POSTGRES_PORT"])
        cur.execute("DROP DATABASE IF EXISTS keepme")
        cur.execute("CREATE DATABASE keepme")
    conn.close()
    with st.connect("keepme") as c, c.cursor() as cur:
        cur.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
    c.close()

    # one plain role per service database, owning it; CONNECT is not public
    with st.connect() as c, c.cursor() as cur:
        cur.execute("SELECT d.datname, r.rolname, r.rolsuper, r.rolcreatedb, r.rolcreaterole, "
                    "has_database_privilege('optuna', d.datname, 'CONNECT') FROM pg_database d "
                    "JOIN pg_roles r ON r.oid = d.datdba "
                    "WHERE d.datname IN ('mlflow', 'mlflow_auth', 'prefect', 'optuna')")
        rows = {r[0]: r[1:] for r in cur.fetchall()}
    c.close()
    assert rows == {db: (db, False, False, False, db == "optuna") for db in ("mlflow", "mlflow_auth", "prefect",
                                                                              "optuna")}, rows

    # a table an older stack created as the superuser: `up` hands it to the database's role
    with st.connect("optuna") as c, c.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS legacy; CREATE TABLE legacy (id serial PRIMARY KEY)")
    c.close()

    status = st.run("status", "postgres")
    assert "postgres  running" in status.stdout and st.config["POSTGRES_PORT"] in status.stdout
    assert "database ok" in status.stdout
    st.run("down", "postgres")
    stopped = st.run("status", "postgres", check=False)
    assert stopped.returncode == 3 and "postgres  stopped" in stopped.stdout
    with pytest.raises(Exception, match=r"(?i)connect|refused"):
        st.connect().close()
    st.run("up", "postgres")  # same state dir: the data is still there
    with st.connect("keepme") as c, c.cursor() as cur:
        cur.execute("SELECT x FROM t")
        assert cur.fetchall() == [(42,)]
    c.close()
    with st.connect("optuna") as c, c.cursor() as cur:
        cur.execute("SELECT c.relname, r.rolname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
                    "WHERE c.relname IN ('legacy', 'legacy_id_seq')")
        assert sorted(cur.fetchall()) == [("legacy", "optuna"), ("legacy_id_seq", "optuna")]
        cur.execute("DROP TABLE legacy")
    c.close()


def _alive(pid: int) -> bool:
    """A live process (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def test_supervisor_restarts_a_service_that_gives_up_and_stops_what_it_left(tmp_path):
    """infra/supervise.py, as the stack runs every service: a command that exits on its own (a
    worker's "Service exceeded error threshold" after a database outage exits 1) is started
    again with back-off; whatever it left behind (a flow run of a dead worker) is stopped before
    the next start; SIGTERM stops the service and all its descendants for good."""
    import json
    import signal
    import time

    state = tmp_path / "pids"
    state.mkdir()
    orphans = tmp_path / "orphans"
    # each start leaves a `sleep` behind (re-parented to the supervisor, a child subreaper) and gives up
    cmd = f'sleep 300 & echo $! >> {orphans}; echo "Service exceeded error threshold." >&2; sleep 0.5; exit 1'
    sup = subprocess.Popen([sys.executable, str(INFRA / "supervise.py"), "--name", "svc", "--state", str(state),
                            "--max-delay", "1", "--grace", "5", "--", "bash", "-c", cmd],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = json.loads((state / "svc.state").read_text()) if (state / "svc.state").is_file() else {}
            if status.get("starts", 0) >= 3:
                break
            time.sleep(0.2)
        assert status.get("starts", 0) >= 3, status
        left = [int(p) for p in orphans.read_text().split()]
        # every start but the running one: its leftover was stopped before the next start
        assert len(left) >= 2 and not [p for p in left[:-1] if _alive(p)], [(p, _alive(p)) for p in left]
        assert status["last_exit"] in (1, None)
        sup.send_signal(signal.SIGTERM)
        out, _ = sup.communicate(timeout=30)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert sup.returncode == 0
    assert "exited with status 1; starting it again" in out and "stopped" in out, out[-2000:]
    assert not [p for p in (int(p) for p in orphans.read_text().split()) if _alive(p)]  # nothing outlives it
    assert not (state / "svc.child").exists()


def test_stack_script_rejects_unknown_services_and_commands(stack: Stack):
    bad = stack.run("up", "redis", check=False)
    assert bad.returncode != 0 and "unknown service 'redis'" in bad.stderr
    bad = stack.run("explode", check=False)
    assert bad.returncode != 0 and "unknown command 'explode'" in bad.stderr
    usage = subprocess.run(["bash", str(STACK_SCRIPT)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "up [SERVICE...]" in usage.stdout


# ------------------------------------------------------------------------------------ compose
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
EXAMPLE = INFRA / "stack.env.example"
SECRET_KEYS = ("POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY",
               "MLFLOW_DB_PASSWORD", "MLFLOW_AUTH_DB_PASSWORD", "PREFECT_DB_PASSWORD", "OPTUNA_DB_PASSWORD",
               "MLFLOW_USER_PASSWORD", "PREFECT_AUTH_PASSWORD", "MLFLOW_S3_ACCESS_KEY", "MLFLOW_S3_SECRET_KEY",
               "DVC_S3_ACCESS_KEY", "DVC_S3_SECRET_KEY", "S3_JWT_KEY")
#: what a worker (and so every flow it runs) must never hold
ADMIN_KEYS = ("POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY",
              "MLFLOW_DB_PASSWORD", "MLFLOW_AUTH_DB_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_S3_SECRET_KEY",
              "DVC_S3_SECRET_KEY", "S3_JWT_KEY")


def _example() -> dict[str, str]:
    out = {}
    for line in EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _compose_config(env_file: Path) -> subprocess.CompletedProcess:
    """`docker-compose config`: Compose's own parser, schema and interpolation (Debian's
    docker-compose package; .ci/run installs it). No Docker engine is needed for `config`."""
    exe = shutil.which("docker-compose")
    require_or_skip(exe is not None, "docker-compose (Debian package docker-compose) not found")
    return subprocess.run([exe, "--env-file", str(env_file), "-f", str(COMPOSE), "config"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def _env_file(tmp_path: Path, drop: str | None = None) -> tuple[Path, dict[str, str]]:
    """The example with a fresh random value for every secret (optionally one key left out)."""
    values = {**_example(), **{k: f"{k.lower()}-{uuid.uuid4().hex}" for k in SECRET_KEYS}}
    values.pop(drop, None)
    path = tmp_path / "stack.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path, values


def test_compose_file_validates_and_takes_every_secret_from_the_env_file(tmp_path):
    import yaml

    env_file, values = _env_file(tmp_path)
    out = _compose_config(env_file)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    services = cfg["services"]
    assert set(services) == {"preflight", "postgres", "seaweedfs", "s3", "buckets", "mlflow", "mlflow-users",
                             "prefect-server", "worker-cpu", "worker-gpu"}
    # the raw file holds no secret literal; every rendered secret is the env file's value
    raw = COMPOSE.read_text()
    example = _example()
    for key in SECRET_KEYS:
        assert not example[key] or example[key] not in raw, key
    envs = {name: s.get("environment", {}) for name, s in services.items()}
    assert envs["postgres"]["POSTGRES_PASSWORD"] == values["POSTGRES_PASSWORD"]
    assert envs["mlflow"]["MLFLOW_ADMIN_PASSWORD"] == values["MLFLOW_ADMIN_PASSWORD"]
    assert envs["mlflow"]["MLFLOW_SECRET_KEY"] == values["MLFLOW_SECRET_KEY"]
    for name, env in envs.items():
        for key, value in env.items():
            if key in values and key in SECRET_KEYS:
                assert value == values[key], (name, key)
    # least privilege: the workers hold the client credentials only; MLflow the mlflow-only S3 identity
    for worker in ("worker-cpu", "worker-gpu"):
        assert not set(ADMIN_KEYS) & set(envs[worker]), (worker, set(ADMIN_KEYS) & set(envs[worker]))
        assert not [k for k in envs[worker] if k.startswith("AWS_") and k != "AWS_ENDPOINT_URL_S3"], envs[worker]
        assert envs[worker]["MLFLOW_USER_PASSWORD"] == values["MLFLOW_USER_PASSWORD"]
        assert services[worker]["init"] is True and any("/work" in str(v) for v in services[worker]["volumes"])
    assert not {"S3_ACCESS_KEY", "S3_SECRET_KEY", "POSTGRES_PASSWORD"} & set(envs["mlflow"])
    assert envs["mlflow"]["MLFLOW_S3_SECRET_KEY"] == values["MLFLOW_S3_SECRET_KEY"]
    assert set(envs["seaweedfs"]) == {"S3_JWT_KEY", "SEAWEEDFS_IP"}
    # SeaweedFS's master/volume/filer: the internal network only, nothing published; the gateway is
    assert set(services["seaweedfs"]["networks"]) == {"storage"} and "ports" not in services["seaweedfs"]
    assert cfg["networks"]["storage"]["internal"] is True
    assert set(services["s3"]["networks"]) == {"default", "storage"}
    assert all("storage" not in s.get("networks", {}) for n, s in services.items() if n not in ("seaweedfs", "s3"))
    # every service: pinned image, no capabilities, no privilege gain; long-running ones restart,
    # have a health check (the database-touching ones for MLflow, Prefect, PostgreSQL) and limits
    one_shot = {"preflight", "buckets", "mlflow-users"}
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"], name
        if name in one_shot:
            continue
        assert svc["restart"] == "unless-stopped" and "healthcheck" in svc and "mem_limit" in svc, name
        assert svc["depends_on"], name  # after the preflight check (directly or through a dependency)
    assert "healthcheck.py" in str(services["mlflow"]["healthcheck"]["test"]) and \
        "mlflow" in services["mlflow"]["healthcheck"]["test"]
    assert "prefect" in services["prefect-server"]["healthcheck"]["test"]
    assert "SELECT 1" in str(services["postgres"]["healthcheck"]["test"])
    for name in ("postgres", "seaweedfs"):
        assert services[name]["depends_on"]["preflight"]["condition"] == "service_completed_successfully"
    # what the host sees: PostgreSQL, the S3 gateway, MLflow and the Prefect API, on STACK_HOST only;
    # no SeaweedFS internal port, no worker health port, no host network, nothing privileged
    published = set()
    for name, svc in services.items():
        assert "expose" not in svc and svc.get("network_mode") in (None, "none"), name
        assert not svc.get("privileged") and svc.get("user") not in ("root", "0", "0:0"), name
        for port in svc.get("ports", []):
            host_ip, host_port, container = str(port).split(":")
            assert host_ip == values["STACK_HOST"], (name, port)
            published.add((name, int(container.split("/")[0]), host_port))
    assert published == {("postgres", 5432, values["POSTGRES_PORT"]), ("s3", 8333, values["S3_PORT"]),
                         ("mlflow", 5000, values["MLFLOW_PORT"]), ("prefect-server", 4200, values["PREFECT_PORT"])}, \
        published
    start = (INFRA / "compose" / "mlflow-start.sh").read_text()
    assert "--allowed-hosts" in start and "--app-name basic-auth" in start and "--serve-artifacts" in start
    assert "mlflow_auth_guard:authenticate_request" in start
    # the Prefect server (compose and Kubernetes run this script) keeps concurrency leases on disk, as
    # natively: a restarted server still frees the retrain slot of a run that died holding it
    leases = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem"
    assert leases in (INFRA / "compose" / "prefect-start.sh").read_text()
    assert leases in (INFRA / "local-stack.sh").read_text()
    assert "prefect-start.sh" in str(services["prefect-server"]["entrypoint"])
    # the GPU worker: NVIDIA runtime and a device request
    gpu = services["worker-gpu"]
    assert gpu["runtime"] == "nvidia" and gpu["profiles"] == ["gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and str(device["count"]) == "1"
    assert "gpu" not in services["worker-cpu"].get("deploy", {}).get("resources", {}).get("reservations", {})


def test_compose_preflight_refuses_placeholder_secrets(tmp_path):
    """The `preflight` service, run as compose runs it (its rendered command and environment, here
    without a container): the example's change-me values fail it, fresh random values pass."""
    import yaml

    bad = tmp_path / "bad.env"
    bad.write_text("".join(f"{k}={v or 'change-me-' + k.lower()}\n" for k, v in _example().items()))
    good, _ = _env_file(tmp_path)
    results = {}
    for name, env_file in (("bad", bad), ("good", good)):
        out = _compose_config(env_file)
        assert out.returncode == 0, out.stderr
        pre = yaml.safe_load(out.stdout)["services"]["preflight"]
        cmd = [sys.executable if c == "python" else c.replace("/app/", f"{REPO}/") for c in pre["command"]]
        results[name] = subprocess.run(cmd, env={"PATH": "/usr/bin:/bin", **pre["environment"]},
                                       capture_output=True, text=True, timeout=60)
    assert results["good"].returncode == 0, results["good"].stderr
    assert results["bad"].returncode == 2 and "POSTGRES_PASSWORD is a placeholder" in results["bad"].stderr


def test_start_scripts_parse_and_read_secrets_from_mounted_files(tmp_path):
    """The compose/Kubernetes entrypoints: valid sh; `secrets.sh` turns the files of a mounted
    Secret into variables (the environment wins, odd names are skipped) and `require` stops with
    exit 2 naming what is missing."""
    for script in [*(INFRA / "compose").glob("*.sh"), INFRA / "postgres" / "init-databases.sh"]:
        shell = "bash" if script.name == "init-databases.sh" else "sh"
        assert subprocess.run([shell, "-n", str(script)], capture_output=True).returncode == 0, script
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "PREFECT_AUTH_PASSWORD").write_text("from-file")
    (secrets / "MLFLOW_USER_PASSWORD").write_text("from-file")
    (secrets / "not-a-name").write_text("x")
    code = f'. {INFRA / "compose" / "secrets.sh"}; echo "$PREFECT_AUTH_PASSWORD $MLFLOW_USER_PASSWORD"; require NOPE'
    out = subprocess.run(["sh", "-c", code], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "SSLFLOW_SECRETS_DIR": str(secrets),
                              "MLFLOW_USER_PASSWORD": "from-env"})
    assert out.stdout.strip() == "from-file from-env" and out.returncode == 2 and "NOPE is not set" in out.stderr


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD", "S3_JWT_KEY"])
def test_compose_refuses_to_render_without_a_secret(tmp_path, missing):
    env_file, _ = _env_file(tmp_path, drop=missing)
    out = _compose_config(env_file)
    assert out.returncode != 0 and missing in out.stderr, out.stderr


def test_every_setting_is_documented_once_in_the_example():
    code = "\n".join(ln for ln in COMPOSE.read_text().splitlines() if not ln.lstrip().startswith("#"))
    names = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", code))
    script = (INFRA / "local-stack.sh").read_text()
    script_names = set(re.findall(r': "\$\{([A-Z_][A-Z0-9_]*):=', script))
    generated = set(re.search(r"^GENERATED=\(([^)]*)\)", script, re.M).group(1).split())
    example = _example()
    assert names <= set(example), names - set(example)
    assert (script_names | generated) <= set(example), (script_names | generated) - set(example)
    assert set(example) <= names | script_names | generated, set(example) - names - script_names  # nothing stale
    assert generated <= set(SECRET_KEYS) and all(not example[k] for k in generated)  # empty = generated natively
    lines = [ln.split("=")[0] for ln in EXAMPLE.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == len(set(lines))


def test_env_file_is_git_ignored():
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert {"/infra/stack.env", "/infra/.env", "/.stack/"} <= set(ignored)


# ------------------------------------------------------------------------------------ Prefect work pools
def _placeholders(template) -> set[str]:
    from prefect.utilities.templating import find_placeholders

    return {p.name for p in find_placeholders(template)}


def _render(pool: dict, values: dict) -> dict:
    """What a worker does with a base job template: defaults, then the deployment's values."""
    from prefect.utilities.templating import apply_values

    props = pool["variables"]["properties"]
    merged = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    return apply_values(pool["job_configuration"], {**merged, **values})


@pytest.mark.parametrize("name", ["docker-gpu-pool.json", "kubernetes-gpu-pool.json"])
def test_work_pool_templates_are_valid_and_use_every_variable(name):
    import jsonschema

    pool = json.loads((INFRA / "prefect" / name).read_text())
    assert set(pool) == {"job_configuration", "variables"}
    schema = pool["variables"]
    jsonschema.Draft202012Validator.check_schema(schema)
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    jsonschema.validate(defaults, schema)
    used = _placeholders(pool["job_configuration"])
    # a placeholder without a variable renders as nothing; a variable never referenced is dropped
    assert used == set(schema["properties"]), (used ^ set(schema["properties"]))


def test_docker_pool_requests_gpus():
    pool = json.loads((INFRA / "prefect" / "docker-gpu-pool.json").read_text())
    rendered = _render(pool, {"gpu_count": 2, "image": "sslflow:test"})
    [req] = rendered["container_create_kwargs"]["device_requests"]
    assert req == {"driver": "nvidia", "count": 2, "capabilities": [["gpu"]]}
    assert rendered["image"] == "sslflow:test"
    assert _render(pool, {})["container_create_kwargs"]["device_requests"][0]["count"] == 1


def test_kubernetes_pool_sets_gpu_limit_node_selector_and_tolerations():
    pool = json.loads((INFRA / "prefect" / "kubernetes-gpu-pool.json").read_text())
    rendered = _render(pool, {"gpu_limit": 4, "node_selector": {"gpu": "a100"}})
    spec = rendered["job_manifest"]["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert spec["nodeSelector"] == {"gpu": "a100"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    default = _render(pool, {})["job_manifest"]["spec"]["template"]["spec"]
    assert default["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert default["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # flow-run pods: the shared project volume, the client-only Secret as environment, non-root
    job = _render(pool, {})["job_manifest"]["spec"]["template"]
    assert job["metadata"]["labels"] == {"sslflow/client": "true"}
    assert job["spec"]["volumes"] == [{"name": "work", "persistentVolumeClaim": {"claimName": "sslflow-work"}}]
    container = job["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "sslflow-flow-run"}}]
    assert container["volumeMounts"] == [{"name": "work", "mountPath": "/work"}]
    assert job["spec"]["securityContext"]["runAsNonRoot"] is True


# ------------------------------------------------------------------------------------ Kubernetes, image
def _k8s_docs() -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all((INFRA / "k8s" / "sslflow-services.yaml").read_text()) if d]


def test_kubernetes_manifests_mount_secrets_as_files_and_harden_every_pod():
    docs = _k8s_docs()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for needed in [("StatefulSet", "postgres"), ("StatefulSet", "seaweedfs"), ("Deployment", "mlflow"),
                   ("Deployment", "prefect-server"), ("Deployment", "prefect-worker-cpu"),
                   ("Deployment", "prefect-worker-k8s"), ("Job", "sslflow-buckets"), ("Job", "sslflow-mlflow-users"),
                   ("PersistentVolumeClaim", "sslflow-work"), ("NetworkPolicy", "default-deny-ingress")]:
        assert needed in kinds, needed
    example = _example()
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            image = c["image"]
            assert ":" in image and not image.endswith(":latest"), (name, image)  # pinned
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]) and c["resources"]["requests"], name
            if d["kind"] != "Job":
                assert "livenessProbe" in c, name
            defined: set[str] = set()
            for e in c.get("env", []):
                # no secret as an environment value: Secrets are files
                assert "secretKeyRef" not in str(e.get("valueFrom", {})), (name, e)
                assert not any(e["name"].endswith(x) for x in ("PASSWORD", "SECRET_KEY", "ACCESS_KEY_ID")), (name, e)
                if "value" in e:  # $(VAR) only expands for variables defined earlier in the same list
                    assert set(re.findall(r"\$\(([A-Z_]+)\)", e["value"])) <= defined, (name, e)
                defined.add(e["name"])
            mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
            if "secrets" in mounts:
                secret = volumes["secrets"]["secret"]
                assert secret["secretName"] == "sslflow-secrets" and secret["defaultMode"] == 0o400, name
                assert all(i["key"] in example and i["key"] == i["path"] for i in secret["items"]), name
                assert mounts["secrets"]["readOnly"] is True
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("SSLFLOW_SECRETS_DIR") == mounts["secrets"]["mountPath"] or \
                    any(str(v).startswith(mounts["secrets"]["mountPath"]) for v in env.values()), name
    # workers never get the admin's or the services' secrets
    by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")}
    for worker in ("prefect-worker-cpu", "prefect-worker-k8s"):
        items = {i["key"] for v in by_name[worker]["spec"]["template"]["spec"]["volumes"]
                 if "secret" in v for i in v["secret"]["items"]}
        assert not items & set(ADMIN_KEYS), (worker, items & set(ADMIN_KEYS))
    cpu = by_name["prefect-worker-cpu"]["spec"]["template"]["spec"]
    assert {"name": "work", "persistentVolumeClaim": {"claimName": "sslflow-work"}} in cpu["volumes"]
    [pvc] = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kubernetes_seaweedfs_finds_itself_through_a_headless_service_and_policies_fence_it():
    """SeaweedFS's parts connect to the -ip they advertise on every port: a ClusterIP service with
    8333 only cannot carry that; the StatefulSet's headless service gives the pod's own address.
    The native stack runs the same pattern (-ip a host name, S3_ADVERTISE=localhost in the tests)."""
    docs = _k8s_docs()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    headless = services["seaweedfs-internal"]["spec"]
    assert headless["clusterIP"] == "None" and {p["port"] for p in headless["ports"]} >= {9333, 19333, 8080, 18080,
                                                                                         8888, 18888}
    assert [p["port"] for p in services["seaweedfs"]["spec"]["ports"]] == [8333]  # clients: the gateway only
    [sts] = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "seaweedfs"]
    assert sts["spec"]["serviceName"] == "seaweedfs-internal"
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SEAWEEDFS_IP"]["value"] == "$(POD_NAME).seaweedfs-internal.$(POD_NAMESPACE).svc.cluster.local"
    assert '-ip="$ip"' in (INFRA / "compose" / "seaweedfs-start.sh").read_text()
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    internal = {9333, 19333, 8080, 18080, 8888, 18888}
    for rule in policies["seaweedfs"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        if ports & internal:
            assert rule["from"] == [{"podSelector": {"matchLabels": {"app": "seaweedfs"}}}], rule
        else:
            assert ports == {8333}
    assert [p["port"] for r in policies["postgres"]["ingress"] for p in r["ports"]] == [5432]


def test_kubernetes_exposes_nothing_outside_the_cluster_and_every_policy_selects_real_pods():
    """No NodePort/LoadBalancer, host network or host port; every pod of the manifests (and the
    GPU pool's flow-run pods) is covered by a policy, and every selector of a policy matches
    pods that exist (a typo would silently deny or allow nothing)."""
    docs = _k8s_docs()
    pool = json.loads((INFRA / "prefect" / "kubernetes-gpu-pool.json").read_text())
    flow_run_labels = _render(pool, {})["job_manifest"]["spec"]["template"]["metadata"]["labels"]
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in docs
            if d["kind"] in ("Deployment", "StatefulSet", "Job")}
    labels = [p["metadata"]["labels"] for p in pods.values()] + [flow_run_labels]
    for d in docs:
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]
    for name, pod in pods.items():
        spec = pod["spec"]
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for c in spec["containers"]:
            assert not any("hostPort" in p for p in c.get("ports", [])), name
            assert not c["securityContext"].get("privileged"), name
            assert c["securityContext"].get("readOnlyRootFilesystem") is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # only the Kubernetes worker talks to the API server (it creates the flow-run Jobs)
        assert spec.get("automountServiceAccountToken") is False or spec.get("serviceAccountName") == "prefect-worker"
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]

    def matches(selector: dict, pod_labels: dict) -> bool:
        return all(pod_labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    for pol in policies:
        spec = pol["spec"]
        assert spec["policyTypes"] == ["Ingress"], pol["metadata"]["name"]
        assert any(matches(spec["podSelector"], lb) for lb in labels), pol["metadata"]["name"]
        for rule in spec.get("ingress", []):
            for source in rule["from"]:
                assert set(source) == {"podSelector"}, source  # no ipBlock / namespaceSelector: in-namespace only
                assert any(matches(source["podSelector"], lb) for lb in labels), (pol["metadata"]["name"], source)
    # each server accepts its clients only; the one-shot Jobs and the workers accept nothing
    allowed = {pol["metadata"]["name"]: pol["spec"] for pol in policies if pol["spec"].get("ingress")}
    assert set(allowed) == {"postgres", "seaweedfs", "mlflow", "prefect-server"}
    assert [p["port"] for r in allowed["prefect-server"]["ingress"] for p in r["ports"]] == [4200]
    assert [p["port"] for r in allowed["mlflow"]["ingress"] for p in r["ports"]] == [5000]


def test_dockerfile_builds_on_a_cuda_pytorch_base_with_the_pinned_set():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base and base.group(1).startswith("pytorch/pytorch:") and "cuda" in base.group(1)
    torch_pin = re.search(r"^torch==(\S+)", (REPO / "requirements" / "constraints.txt").read_text(), re.M)
    assert torch_pin and base.group(1).split(":")[1].startswith(torch_pin.group(1) + "-")  # same torch as CI
    assert "-c requirements/constraints.txt" in text and "FROM ${BASE_IMAGE}" in text
    # the servers, the workers and their flow runs: a non-root user (compose runs the image as is)
    assert re.findall(r"^USER (\S+)", text, re.M) == ["sslflow"]
