"""MLflow basic auth with a limit on failed logins: the `authorization_function` of the
stack's MLflow server (basic_auth.ini: `authorization_function = mlflow_auth_guard:authenticate_request`;
the server runs with infra/ on PYTHONPATH). Used by infra/local-stack.sh, the compose file and
the Kubernetes manifests alike.

Every failed basic-auth login costs the server a PBKDF2 hash (about 0.1 s of CPU); without a
limit a local user can guess passwords as fast as the server hashes. Here each (client address,
username) pair may fail `MLFLOW_AUTH_MAX_FAILURES` times (default 10) within
`MLFLOW_AUTH_FAILURE_WINDOW` seconds (default 60); after that every request of that pair
gets HTTP 429 with `Retry-After`, without hashing, until the oldest failure leaves the window.
A successful login clears the pair's failures. Requests without credentials are answered as
MLflow does (401 with the basic-auth challenge).

The counters live in the server process: with `MLFLOW_WORKERS=N` the limit is per worker
process (at most N times the number). All users behind one address (the same host, a NAT)
share the address: someone guessing a user's password locks that user out from that address
for the window, never other users.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque

from flask import Response, request
from mlflow.server.auth import authenticate_request_basic_auth

MAX_FAILURES = int(os.environ.get("MLFLOW_AUTH_MAX_FAILURES", "10"))
WINDOW_S = float(os.environ.get("MLFLOW_AUTH_FAILURE_WINDOW", "60"))
MAX_TRACKED = 100_000  # pairs kept in memory; the oldest are dropped beyond this

_failures: dict[tuple[str, str], deque[float]] = {}
_lock = threading.Lock()


def _retry_after(key: tuple[str, str], now: float) -> int | None:
    """Seconds until `key` may try again, or None when it is under the limit."""
    q = _failures.get(key)
    if not q:
        return None
    while q and q[0] <= now - WINDOW_S:
        q.popleft()
    if not q:
        del _failures[key]
        return None
    if len(q) < MAX_FAILURES:
        return None
    return max(1, int(q[0] + WINDOW_S - now + 0.999))


def authenticate_request():
    auth = request.authorization
    if auth is None or MAX_FAILURES <= 0:
        return authenticate_request_basic_auth()
    key = (request.remote_addr or "-", auth.username or "")
    with _lock:
        wait = _retry_after(key, time.monotonic())
    if wait is not None:
        return Response(f"Too many failed logins for {key[1]!r}; retry in {wait} s\n", 429,
                        {"Retry-After": str(wait), "Content-Type": "text/plain"})
    result = authenticate_request_basic_auth()
    failed = isinstance(result, Response) and result.status_code == 401
    with _lock:
        if failed:
            if len(_failures) >= MAX_TRACKED and key not in _failures:
                _failures.pop(next(iter(_failures)))
            _failures.setdefault(key, deque()).append(time.monotonic())
        else:
            _failures.pop(key, None)
    return result
