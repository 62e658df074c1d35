"""The temporary Prefect server of a command that runs flows without `PREFECT_API_URL`.

Prefect starts one by itself when no API is configured, but a `kill -9` of the command left
it running forever. `sslflow run`, `retrain` and `tune` start it here instead, the same way
Prefect does (uvicorn serving `prefect.server.api.server:create_app`, ephemeral mode, the
project's `PREFECT_HOME` database), as a child that gets SIGTERM when the command dies
(`die_with_parent`) and is stopped when the command ends, fails, or gets SIGTERM / SIGINT.

With `PREFECT_API_URL` set (a `prefect server start`, the stack's server, Prefect Cloud)
nothing is started.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path

from sslflow.core.errors import ServiceUnavailable
from sslflow.core.processes import die_with_parent


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _drain() -> None:
    """Send the queued log lines and events before the server stops (as Prefect's test harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with suppress(Exception):  # a worker never started, or the server went away: nothing to send
            worker.drain_all(timeout=10)


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Yield the API URL of a temporary server started for this block (None when one is configured)."""
    import httpx
    import prefect
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    current = get_current_settings()
    if current.api.url:
        yield None
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **current.to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    log = Path(current.home) / "temporary-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    parent = os.getpid()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: die_with_parent(parent))
    try:
        deadline = time.monotonic() + current.server.ephemeral.startup_timeout_seconds
        with httpx.Client() as client:
            while True:
                if proc.poll() is not None:
                    raise ServiceUnavailable(f"the temporary Prefect server exited with code {proc.returncode}; "
                                             f"see {log}")
                try:
                    if client.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(f"the temporary Prefect server did not answer within "
                                             f"{current.server.ephemeral.startup_timeout_seconds:g} s; see {log}")
                time.sleep(0.2)
        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url  # for child processes
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _drain()
        finally:
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
