"""Pytest fixtures for real services, started by `infra/local-stack.sh` (the same script a
developer runs), never mocked.

    def test_x(postgres_url): ...        # a fresh, empty PostgreSQL database for this test
    def test_y(native_stack): ...        # the whole stack: PostgreSQL, SeaweedFS S3, MLflow, Prefect, worker

One stack per test session: a temporary state directory, free ports and credentials written to
a temporary env file (mode 0600, so the script's env-file path is what the tests exercise),
stopped with `down` at the end of the session. `postgres_url` starts only PostgreSQL (about
2 s); `native_stack` starts the rest on demand. Run as root (CI), the stack runs its services as
two system accounts created for the session (SERVICE_OS_USER, WORKER_OS_USER) and deleted at
its end. The operator's `AWS_*` variables are set to fake values for every call of the script:
SeaweedFS must never adopt them (tests/stack/test_security.py checks).

When the PostgreSQL server binaries are missing the fixtures skip, unless
`SSLFLOW_REQUIRE_SERVICES` is set (CI sets it): then they fail, so a CI machine that lost
its PostgreSQL install cannot pass by skipping.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
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
    "MLFLOW_AUTH_DB", "PREFECT_DB", "OPTUNA_DB", "MLFLOW_DB_PASSWORD", "MLFLOW_AUTH_DB_PASSWORD",
    "PREFECT_DB_PASSWORD", "OPTUNA_DB_PASSWORD", "S3_PORT", "S3_MASTER_PORT", "S3_VOLUME_PORT", "S3_FILER_PORT",
    "S3_ADVERTISE", "S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_REGION", "MLFLOW_BUCKET", "DVC_BUCKET",
    "MLFLOW_S3_ACCESS_KEY", "MLFLOW_S3_SECRET_KEY", "DVC_S3_ACCESS_KEY", "DVC_S3_SECRET_KEY", "S3_JWT_KEY",
    "MLFLOW_PORT", "MLFLOW_ADMIN_USER", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY", "MLFLOW_USER",
    "MLFLOW_USER_PASSWORD", "MLFLOW_ALLOWED_HOSTS", "MLFLOW_WORKERS", "MLFLOW_AUTH_CACHE_TTL",
    "MLFLOW_AUTH_MAX_FAILURES", "MLFLOW_AUTH_FAILURE_WINDOW", "PREFECT_PORT", "PREFECT_UI_ENABLED",
    "PREFECT_AUTH_USER", "PREFECT_AUTH_PASSWORD", "PREFECT_WORK_POOL", "PREFECT_WORKER_QUERY_SECONDS",
    "SERVICE_OS_USER", "WORKER_OS_USER",
    "STACK_START_TIMEOUT",
)
#: what the operator's shell might hold: never an identity of SeaweedFS
OPERATOR_AWS = {"AWS_ACCESS_KEY_ID": "AKIAOPERATOR0000TEST", "AWS_SECRET_ACCESS_KEY": "operator-secret-not-for-s3"}


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


# ------------------------------------------------------------------------------------ accounts
def is_root() -> bool:
    return os.geteuid() == 0


def user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def delete_user(name: str) -> None:
    """Remove a system account the session created (and its leftover processes first)."""
    if not user_exists(name):
        return
    import pwd
    import signal

    uid = pwd.getpwnam(name).pw_uid
    for entry in Path("/proc").iterdir():  # processes of that account only, by pid
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
    subprocess.run(["userdel", name], capture_output=True, timeout=30)


def _traversable_by_others(path: Path) -> bool:
    """Can an account other than the owner reach and read `path` (x on every parent, r on it)?"""
    p = path.resolve()
    for parent in [*reversed(p.parents)]:
        if not os.stat(parent).st_mode & 0o001:
            return False
    return bool(os.stat(p).st_mode & 0o004)


def service_venv() -> str | None:
    """A virtual environment every account can run, when this one cannot be (its interpreter
    lives under a directory other accounts cannot enter, such as pyenv under /root): the system
    Python of the same version with this venv's site-packages added. None = this venv is fine.
    Only the test machine needs this; infra/local-stack.sh refuses such a venv with a clear message."""
    base = Path(sys.prefix)
    interpreter = Path(os.path.realpath(sys.executable))
    stdlib = Path(sysconfig.get_paths()["stdlib"]) / "os.py"
    if not is_root() or (_traversable_by_others(interpreter) and _traversable_by_others(stdlib)):
        return None
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/bin:/usr/local/bin")
    if system is None or not _traversable_by_others(Path(system)):
        return None
    target = Path(tempfile.gettempdir()) / f"sslflow-service-venv-{hashlib.sha1(str(base).encode()).hexdigest()[:10]}"
    marker = target / ".sslflow-service-venv"
    if not marker.is_file():
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([system, "-m", "venv", "--without-pip", str(target)], check=True, capture_output=True,
                       timeout=120)
        site = Path(sysconfig.get_paths()["purelib"])
        [own_site] = (target / "lib").glob("python*/site-packages")
        (own_site / "_sslflow_base_venv.pth").write_text(f"import site; site.addsitedir({str(site)!r})\n")
        for exe in (base / "bin").iterdir():
            dst = target / "bin" / exe.name
            if dst.exists() or exe.is_dir():
                continue
            head = exe.read_bytes()[:200]
            if head.startswith(f"#!{base}/bin/python".encode()):
                dst.write_text(f"#!{target}/bin/python\n" + exe.read_text().split("\n", 1)[1])
                dst.chmod(0o755)
            elif not exe.is_symlink():
                dst.symlink_to(exe)
        # redis (Prefect's server) uses asyncio.timeout from Python 3.11.3 on, before that the
        # async-timeout backport
        probe = subprocess.run([str(target / "bin" / "python"), "-c",
                                "import sys; sys.exit(sys.version_info < (3, 11, 3))"], capture_output=True, timeout=60)
        if probe.returncode != 0:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                            str(own_site), "async-timeout"], check=True, capture_output=True, timeout=300)
        target.chmod(0o755)
        marker.write_text(str(base))
    return str(target)


# ------------------------------------------------------------------------------------ the stack
@dataclass
class Stack:
    """One stack of the script: its state dir, env file and configuration."""

    state_dir: Path
    env_file: Path
    config: dict[str, str]
    started: set[str] = field(default_factory=set)
    venv: str | None = None

    def script_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CONFIG_KEYS}
        env.update(OPERATOR_AWS, SSLFLOW_STACK_DIR=str(self.state_dir), SSLFLOW_STACK_ENV=str(self.env_file))
        if self.venv:
            env["SSLFLOW_VENV"] = self.venv
        return env

    def run(self, *args: str, timeout: float = 240, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """`infra/local-stack.sh ARGS`; on failure (with `check`) the test fails with its output."""
        out = subprocess.run(["bash", str(STACK_SCRIPT), *args], env={**self.script_env(), **(env or {})},
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            pytest.fail(f"infra/local-stack.sh {' '.join(args)} exited {out.returncode}:\n"
                        f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}", pytrace=False)
        return out

    def set_config(self, **values: str) -> None:
        """Change values in the env file (as an operator edits it)."""
        self.config.update(values)
        self.env_file.write_text("# written by tests/services.py\n"
                                 + "".join(f"{k}={v}\n" for k, v in self.config.items()))
        self.env_file.chmod(0o600)

    def client_env(self) -> dict[str, str]:
        """The variables of `local-stack.sh env` (the ordinary MLflow user, Prefect API and auth
        string, the Optuna role's storage URL and password, the S3 endpoint; no key)."""
        import shlex

        env = {}
        for line in self.run("env").stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0] if value else ""
        return env

    def secrets(self) -> dict[str, str]:
        """The secrets the script generated (state dir, 0600)."""
        out = {}
        path = self.state_dir / "secrets" / "generated.env"
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            out[key] = value
        return {**out, **{k: v for k, v in self.config.items() if k in out and v}}

    def pids(self, service: str) -> tuple[int, int]:
        """(supervisor pid, service pid) of a running service."""
        sup = int((self.state_dir / "pids" / f"{service}.pid").read_text())
        child = int((self.state_dir / "pids" / f"{service}.child").read_text())
        return sup, child

    def supervisor_state(self, service: str) -> dict:
        return json.loads((self.state_dir / "pids" / f"{service}.state").read_text())

    def pg_url(self, database: str) -> str:
        """The superuser's URL (for the tests' own inspection; no service or client gets it)."""
        c = self.config
        return (f"postgresql+psycopg2://{c['POSTGRES_USER']}:{c['POSTGRES_PASSWORD']}@{c['STACK_HOST']}:"
                f"{c['POSTGRES_PORT']}/{database}")

    def connect(self, database: str = "postgres", user: str | None = None, password: str | None = None):
        import psycopg2

        c = self.config
        return psycopg2.connect(host=c["STACK_HOST"], port=int(c["POSTGRES_PORT"]), user=user or c["POSTGRES_USER"],
                                password=password if user else c["POSTGRES_PASSWORD"], dbname=database,
                                connect_timeout=5)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The session's stack configuration (nothing started yet); everything started is stopped
    and its state deleted at the end of the session."""
    # not pytest's tmp dirs: they are mode 0700, and the services run as other accounts under root
    state = Path(tempfile.mkdtemp(prefix="sslflow-stack-"))
    state.chmod(0o755)
    pg, s3, master, volume, filer, mlflow, prefect = free_ports(7)
    tag = uuid.uuid4().hex[:6]
    config = {
        "STACK_HOST": "127.0.0.1", "POSTGRES_PORT": str(pg), "POSTGRES_USER": "sslflow",
        "POSTGRES_PASSWORD": f"pg-{uuid.uuid4().hex[:16]}", "MLFLOW_DB": "mlflow", "MLFLOW_AUTH_DB": "mlflow_auth",
        "PREFECT_DB": "prefect", "OPTUNA_DB": "optuna", "S3_PORT": str(s3), "S3_MASTER_PORT": str(master),
        "S3_VOLUME_PORT": str(volume), "S3_FILER_PORT": str(filer),
        # the pattern of the Kubernetes manifest: SeaweedFS advertises a host name, not an address
        "S3_ADVERTISE": "localhost", "S3_ACCESS_KEY": f"sslflow-test-{tag}",
        "S3_SECRET_KEY": f"s3-{uuid.uuid4().hex[:20]}", "S3_REGION": "us-east-1", "MLFLOW_BUCKET": "mlflow",
        "DVC_BUCKET": "dvc", "MLFLOW_PORT": str(mlflow), "MLFLOW_ADMIN_USER": "admin",
        "MLFLOW_ADMIN_PASSWORD": f"mlflow-{uuid.uuid4().hex[:16]}", "MLFLOW_SECRET_KEY": uuid.uuid4().hex,
        "MLFLOW_WORKERS": "1", "PREFECT_PORT": str(prefect), "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORK_POOL": "sslflow-process", "PREFECT_WORKER_QUERY_SECONDS": "2", "STACK_START_TIMEOUT": "120",
        "SERVICE_OS_USER": f"sslsvc-{tag}", "WORKER_OS_USER": f"sslwrk-{tag}",
    }
    env_file = state / "stack.env"
    st = Stack(state, env_file, config, venv=service_venv())
    st.set_config()
    try:
        yield st
    finally:
        try:
            if st.started:
                st.run("down", timeout=180, check=False)
        finally:  # also when `down` hangs: delete_user kills what the accounts still run
            shutil.rmtree(state, ignore_errors=True)
            if is_root():
                for key in ("SERVICE_OS_USER", "WORKER_OS_USER"):
                    delete_user(config[key])


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
    PostgreSQL (basic auth) and a process worker. About 40-60 s on 2 cores."""
    require_or_skip(postgres_binaries() is not None, "PostgreSQL server binaries (pg_ctl, initdb) not found")
    stack.started.update({"postgres", "s3", "mlflow", "prefect", "worker"})
    stack.run("up", timeout=400)
    return stack


# ------------------------------------------------------------------------------------ other accounts
def run_as(user: str, *cmd: str, env: dict[str, str] | None = None, timeout: float = 60,
           stdin: str | None = None) -> subprocess.CompletedProcess:
    """CMD as the OS user `user` (runuser; needs root), with only PATH, HOME and `env` in its
    environment (never on its command line)."""
    base = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/tmp", "LANG": "C.UTF-8", **(env or {})}
    return subprocess.run(["runuser", "-u", user, "--", *cmd], env=base, capture_output=True, text=True,
                          timeout=timeout, input=stdin)


@pytest.fixture(scope="session", name="os_user")
def os_user_fixture() -> Iterator[str]:
    """A real, unprivileged OS account created for the session (no password, no shell, no
    credential of the stack), deleted at its end. Needs root (CI runs the suite as root; run as
    another user, the stack cannot separate accounts either): skipped otherwise."""
    if not is_root():
        pytest.skip("creating an OS user (and separating the stack's accounts) needs root")
    require_or_skip(shutil.which("useradd") is not None, "useradd not found")
    name = f"sslprobe-{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True, timeout=30)
    try:
        yield name
    finally:
        delete_user(name)
