"""The service definitions (infra/): the native stack script and the fixtures other tests use
(PostgreSQL), the compose file (validated by Compose itself), the Prefect work-pool base job
templates (rendered as a worker renders them), the Kubernetes manifests and the image."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
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

    status = st.run("status", "postgres")
    assert "postgres  running" in status.stdout and st.config["POSTGRES_PORT"] in status.stdout
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
SECRET_KEYS = ("POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY")


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
    assert set(services) == {"postgres", "seaweedfs", "buckets", "mlflow", "prefect-server", "worker-cpu",
                             "worker-gpu"}
    # every secret in the rendered file is the env file's value, and the raw file holds no secret literal
    raw = COMPOSE.read_text()
    example = _example()
    for key in SECRET_KEYS:
        assert example[key] not in raw, key
    rendered_envs = {name: s.get("environment", {}) for name, s in services.items()}
    assert rendered_envs["postgres"]["POSTGRES_PASSWORD"] == values["POSTGRES_PASSWORD"]
    assert rendered_envs["seaweedfs"]["S3_SECRET_KEY"] == values["S3_SECRET_KEY"]
    assert rendered_envs["mlflow"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == values["MLFLOW_ADMIN_PASSWORD"]
    assert rendered_envs["mlflow"]["MLFLOW_FLASK_SERVER_SECRET_KEY"] == values["MLFLOW_SECRET_KEY"]
    assert rendered_envs["worker-cpu"]["MLFLOW_TRACKING_PASSWORD"] == values["MLFLOW_ADMIN_PASSWORD"]
    secretish = ("PASSWORD", "SECRET", "ACCESS_KEY", "_URI", "_URL", "STORAGE")
    for name, env in rendered_envs.items():
        for key, value in env.items():
            if any(s in key for s in secretish) and "postgres" in str(value):
                assert values["POSTGRES_PASSWORD"] in value, (name, key)  # a DSN built from the env file
            if key.endswith(("PASSWORD", "SECRET_KEY", "SECRET_ACCESS_KEY")):
                assert value in {values[k] for k in SECRET_KEYS}, (name, key, value)
    # MLflow: PostgreSQL backend, proxied S3 artifacts; its start script sets Host allow list and auth
    ml = rendered_envs["mlflow"]
    assert ml["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://") and \
        ml["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    start = (INFRA / "compose" / "mlflow-start.sh").read_text()
    assert "--allowed-hosts" in start and "--app-name basic-auth" in start and "--serve-artifacts" in start
    assert rendered_envs["prefect-server"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    # the GPU worker: NVIDIA runtime and a device request
    gpu = services["worker-gpu"]
    assert gpu["runtime"] == "nvidia" and gpu["profiles"] == ["gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and str(device["count"]) == "1"
    assert "gpu" not in services["worker-cpu"].get("deploy", {}).get("resources", {}).get("reservations", {})


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD"])
def test_compose_refuses_to_render_without_a_secret(tmp_path, missing):
    env_file, _ = _env_file(tmp_path, drop=missing)
    out = _compose_config(env_file)
    assert out.returncode != 0 and missing in out.stderr, out.stderr


def test_every_setting_is_documented_once_in_the_example():
    code = "\n".join(ln for ln in COMPOSE.read_text().splitlines() if not ln.lstrip().startswith("#"))
    names = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", code))
    script = (INFRA / "local-stack.sh").read_text()
    script_names = set(re.findall(r': "\$\{([A-Z_][A-Z0-9_]*):=', script))
    example = _example()
    assert names <= set(example), names - set(example)
    assert script_names <= set(example), script_names - set(example)
    assert set(example) <= names | script_names, set(example) - names - script_names  # nothing stale
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


# ------------------------------------------------------------------------------------ Kubernetes, image
def test_kubernetes_manifests_take_secrets_from_the_secret_in_order():
    import yaml

    docs = [d for d in yaml.safe_load_all((INFRA / "k8s" / "sslflow-services.yaml").read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for needed in [("StatefulSet", "postgres"), ("StatefulSet", "seaweedfs"), ("Deployment", "mlflow"),
                   ("Deployment", "prefect-server"), ("Deployment", "prefect-worker-cpu"),
                   ("Deployment", "prefect-worker-k8s"), ("Job", "sslflow-buckets")]:
        assert needed in kinds, needed
    example = _example()
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            defined: set[str] = set()
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "sslflow-secrets" and ref["key"] in example, e
                else:
                    # $(VAR) only expands for variables defined earlier in the same list
                    assert set(re.findall(r"\$\(([A-Z_]+)\)", e["value"])) <= defined, e
                    assert not any(e["name"].endswith(s) for s in ("PASSWORD", "SECRET_KEY", "ACCESS_KEY_ID")), e
                defined.add(e["name"])


def test_dockerfile_builds_on_a_cuda_pytorch_base_with_the_pinned_set():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base and base.group(1).startswith("pytorch/pytorch:") and "cuda" in base.group(1)
    torch_pin = re.search(r"^torch==(\S+)", (REPO / "requirements" / "constraints.txt").read_text(), re.M)
    assert torch_pin and base.group(1).split(":")[1].startswith(torch_pin.group(1) + "-")  # same torch as CI
    assert "-c requirements/constraints.txt" in text and "FROM ${BASE_IMAGE}" in text
