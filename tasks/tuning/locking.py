"""A named lock that lives in the Optuna storage, for what Optuna's API cannot do atomically.

Two tune workers that start together both saw a new study without a parent run and each
created one (the trials of one study split across two MLflow parents). Optuna has no
compare-and-set for study attributes, so the create-if-absent of the parent runs under this
lock, held where the study lives, so it works for every worker that can reach the study:

- PostgreSQL: a session advisory lock (`pg_advisory_lock`), bounded by `lock_timeout`;
- MySQL: `GET_LOCK(name, timeout)`;
- SQLite: an exclusive `flock` on `<database>.sslflow-lock` beside the database file (SQLite is
  one machine's file; its own write lock cannot be held across Optuna's connections).

    with storage_lock(storage, f"tune-parent:{study_name}"):
        ...  # read, decide, write
"""

from __future__ import annotations

import fcntl
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sslflow.core.errors import ServiceUnavailable


@contextmanager
def storage_lock(storage: Any, name: str, timeout_s: float = 120.0) -> Iterator[None]:
    """Hold lock `name` in the database behind `storage` (an Optuna `RDBStorage`)."""
    from sqlalchemy import text

    engine = storage.engine
    dialect = engine.dialect.name
    if dialect == "sqlite":
        with _file_lock(f"{engine.url.database}.sslflow-lock" if engine.url.database not in (None, "", ":memory:")
                        else None, name, timeout_s):
            yield
        return
    with engine.connect() as conn:
        if dialect == "postgresql":
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            conn.execute(text(f"SET lock_timeout = '{int(timeout_s * 1000)}ms'"))
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        elif dialect in ("mysql", "mariadb"):
            got = conn.execute(text("SELECT GET_LOCK(:n, :t)"), {"n": name[:64], "t": int(timeout_s)}).scalar()
            if got != 1:
                raise ServiceUnavailable(f"could not get lock {name!r} in the Optuna storage within {timeout_s:g} s")
            try:
                yield
            finally:
                conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name[:64]})
        else:  # an unknown database: no lock (the race stays possible there)
            yield


@contextmanager
def _file_lock(path: str | None, name: str, timeout_s: float) -> Iterator[None]:
    if path is None:  # an in-memory database lives in one process: nothing to race with
        yield
        return
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(f"could not get lock {name!r} ({path}) within {timeout_s:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
