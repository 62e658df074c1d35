"""Pytest fixtures for real services, started by `infra/local-stack.sh` (the same script a
developer runs), never mocked.

    def test_x(postgres_url): ...        # a fresh, empty PostgreSQL database for this test
    def test_y(native_stack): ...        # the whole stack: PostgreSQL, SeaweedFS S3, MLflow, Prefect, worker

One stack per test session: a temporary state directory, free ports and credentials written to
a temporary env file (so the script's env-file path is what the tests exercise), stopped with
`down` at the end of the session. `postgres_url` starts only PostgreSQL (about 2 s);
`native_stack` starts the rest on demand.

When the PostgreSQL server binaries are missing the fixtures skip, unless
`SSLFLOW_REQUIRE_SERVICES` is set (CI sets it): then they fail, so a CI machine that lost
its PostgreSQL install cannot pass by skipping.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STACK_SCRIPT = REPO / "infra" / "local-stack.sh"
REQUIRE_ENV = "SSLFLOW_REQUIRE_SERVICES"
# every variable the stack script reads from its env file (kept out of the inherited environment,
# where it would win over the file)
CONFIG_KEYS = (
    "STACK_HOST", "POSTGRES_PORT", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_OS_USER", "MLFLOW_DB",
    "MLFLOW_AUTH_DB", "PREFECT_DB", "OPTUNA_DB", "S3_PORT", "S3_MASTER_PORT", "S3_VOLUME_PORT", "S3_FILER_PORT",
    "S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_REGION", "MLFLOW_BUCKET", "DVC_BUCKET", "MLFLOW_PORT",
    "MLFLOW_ADMIN_USER", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY", "MLFLOW_ALLOWED_HOSTS", "MLFLOW_WORKERS",
    "MLFLOW_AUTH_CACHE_TTL",
    "PREFECT_PORT", "PREFECT_UI_ENABLED", "PREFECT_WORK_POOL", "STACK_START_TIMEOUT",
)


def postgres_binaries() -> str | None:
    """Directory of the PostgreSQL server binaries (`pg_ctl`, `initdb`), as the script finds them."""
    if os.environ.get("PG_BIN"):
        return os.environ["PG_BIN"] if Path(os.environ["PG_BIN"], "pg_ctl").is_file() else None
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if Path(d, "pg_ctl").is_file() and Path(d, "initdb").is_file():
            return d
    found = shutil.which("pg_ctl")
    return str(Path(found).parent) if found and shutil.which("initdb") else None


def require_or_skip(available: bool, reason: str) -> None:
    """Skip when a service cannot run here, unless CI demanded services (then fail loudly)."""
    if available:
        return
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason}, and {REQUIRE_ENV} is set: install it (see .ci/run)", pytrace=False)
    pytest.skip(f"{reason} (set {REQUIRE_ENV}=1 to make this a failure)")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports in 20000-44999 whose +10000 neighbour is free too (SeaweedFS
    puts each gRPC port at its HTTP port + 10000)."""
    rng = random.Random(os.getpid() ^ uuid.uuid4().int)
    out: list[int] = []
    while len(out) < n:
        p = rng.randrange(20000, 45000)
        if p in out or p + 10000 in out or p - 10000 in out:
            continue
        if _port_free(p) and _port_free(p + 10000):
            out.append(p)
    return out


@dataclass
class Stack:
    """One stack of the script: its state dir, env file and configuration."""

    state_dir: Path
    env_file: Path
    config: dict[str, str]
    started: set[str] = field(default_factory=set)

    def script_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CONFIG_KEYS}
        env.update(SSLFLOW_STACK_DIR=str(self.state_dir), SSLFLOW_STACK_ENV=str(self.env_file))
        return env

    def run(self, *args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
        """`infra/local-stack.sh ARGS`; on failure (with `check`) the test fails with its output."""
        out = subprocess.run(["bash", str(STACK_SCRIPT), *args], env=self.script_env(), capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            pytest.fail(f"infra/local-stack.sh {' '.join(args)} exited {out.returncode}:\n"
                        f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}", pytrace=False)
        return out

    def client_env(self) -> dict[str, str]:
        """The variables of `local-stack.sh env` (MLflow URI and credentials, Prefect API, S3...)."""
        env = {}
        for line in self.run("env").stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        return env

    def pg_url(self, database: str) -> str:
        c = self.config
        return (f"postgresql+psycopg2://{c['POSTGRES_USER']}:{c['POSTGRES_PASSWORD']}@{c['STACK_HOST']}:"
                f"{c['POSTGRES_PORT']}/{database}")

    def connect(self, database: str = "postgres"):
        import psycopg2

        c = self.config
        return psycopg2.connect(host=c["STACK_HOST"], port=int(c["POSTGRES_PORT"]), user=c["POSTGRES_USER"],
                                password=c["POSTGRES_PASSWORD"], dbname=database, connect_timeout=5)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The session's stack configuration (nothing started yet); everything started is stopped
    and its state deleted at the end of the session."""
    # not pytest's tmp dirs: they are mode 0700, and PostgreSQL runs as another user under root
    state = Path(tempfile.mkdtemp(prefix="sslflow-stack-"))
    state.chmod(0o755)
    pg, s3, master, volume, filer, mlflow, prefect = free_ports(7)
    config = {
        "STACK_HOST": "127.0.0.1", "POSTGRES_PORT": str(pg), "POSTGRES_USER": "sslflow",
        "POSTGRES_PASSWORD": f"pg-{uuid.uuid4().hex[:16]}", "MLFLOW_DB": "mlflow", "MLFLOW_AUTH_DB": "mlflow_auth",
        "PREFECT_DB": "prefect", "OPTUNA_DB": "optuna", "S3_PORT": str(s3), "S3_MASTER_PORT": str(master),
        "S3_VOLUME_PORT": str(volume), "S3_FILER_PORT": str(filer), "S3_ACCESS_KEY": "sslflow-test",
        "S3_SECRET_KEY": f"s3-{uuid.uuid4().hex[:20]}", "S3_REGION": "us-east-1", "MLFLOW_BUCKET": "mlflow",
        "DVC_BUCKET": "dvc", "MLFLOW_PORT": str(mlflow), "MLFLOW_ADMIN_USER": "admin",
        "MLFLOW_ADMIN_PASSWORD": f"mlflow-{uuid.uuid4().hex[:16]}", "MLFLOW_SECRET_KEY": uuid.uuid4().hex,
        "MLFLOW_WORKERS": "1", "PREFECT_PORT": str(prefect), "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORK_POOL": "sslflow-process", "STACK_START_TIMEOUT": "120",
    }
    env_file = state / "stack.env"
    env_file.write_text("# written by tests/services.py\n" + "".join(f"{k}={v}\n" for k, v in config.items()))
    st = Stack(state, env_file, config)
    try:
        yield st
    finally:
        if st.started:
            st.run("down", timeout=120, check=False)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_service(stack: Stack) -> Stack:
    """PostgreSQL of the session's stack, started once (`local-stack.sh up postgres`)."""
    require_or_skip(postgres_binaries() is not None, "PostgreSQL server binaries (pg_ctl, initdb) not found")
    stack.started.add("postgres")
    stack.run("up", "postgres")
    return stack


@pytest.fixture
def postgres_url(postgres_service: Stack) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database on the session's PostgreSQL, dropped after the
    test (connections still open are terminated)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    conn = postgres_service.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        yield postgres_service.pg_url(name)
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


@pytest.fixture(scope="session")
def native_stack(stack: Stack) -> Stack:
    """The whole stack (`local-stack.sh up`): PostgreSQL, SeaweedFS with its S3 gateway and
    buckets, `mlflow server` (PostgreSQL, S3 artifacts, basic auth), `prefect server` on
    PostgreSQL and a process worker. About 30-40 s on 2 cores."""
    require_or_skip(postgres_binaries() is not None, "PostgreSQL server binaries (pg_ctl, initdb) not found")
    stack.started.update({"postgres", "s3", "mlflow", "prefect", "worker"})
    stack.run("up", timeout=400)
    return stack
