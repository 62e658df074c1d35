"""The retrain slot: one Prefect global concurrency slot, held under a lease a dead holder loses.

    with retrain_slot("sslflow-retrain", timeout_s=30, lease_s=120) as waited_s:
        ...  # decide and train: no other retrain is in here
    # SlotBusy when another live run holds it for longer than timeout_s

The holder renews its lease every `0.75 * lease_s` seconds while it lives (Prefect does this
in a thread). A holder killed with `kill -9` stops renewing, and its slot comes free once the
lease expires:

- on a Prefect server (`prefect server start`, the stack's, Prefect Cloud) the server's
  repossessor service revokes expired leases every 15 s;
- a temporary local server (no `PREFECT_API_URL`) runs no repossessor, and its leases would die
  with it while the slot stays taken: sslflow stores leases on disk
  (`PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE`, see `sslflow.core.env`) and, before waiting,
  revokes the expired ones of its own limit that it can see there, before and every
  `REAP_EVERY_S` during its wait, one reaper at a time (a server's repossessor doing the same
  at once is harmless: a decrement stops at 0, and the limit has one slot).

So a killed retrain blocks the next ones for at most `lease_s` (+15 s on a server, + `REAP_EVERY_S`
with a temporary one), never forever.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

log = logging.getLogger("sslflow")

FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
REAP_EVERY_S = 10.0  # while waiting for the slot, look for expired leases this often


class SlotBusy(Exception):
    """Another live run held the slot for longer than the wait allowed."""


def ensure_limit(name: str, limit: int = 1) -> None:
    """Create global concurrency limit `name` with `limit` slots unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        with suppress(ObjectAlreadyExists):  # another run created it meanwhile
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


@contextmanager
def retrain_slot(name: str, timeout_s: float, lease_s: float) -> Iterator[float]:
    """Hold the one slot of limit `name` (created on first use); yields the seconds waited.

    The wait is cut into turns of at most `REAP_EVERY_S`, and expired leases are reaped before
    each turn: a holder killed while this run waits frees the slot within this very wait."""
    from prefect.concurrency.sync import concurrency

    ensure_limit(name, 1)
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while True:
        reap_expired_leases(name)
        turn = max(min(REAP_EVERY_S, deadline - time.monotonic()), 0.5)
        slot = concurrency(name, occupy=1, timeout_seconds=turn, strict=True, lease_duration=lease_s)
        try:
            slot.__enter__()
            break
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise SlotBusy(f"another retrain run holds the {name!r} slot (waited {timeout_s:g} s; a holder "
                               f"that died frees it within pipeline.lock_lease_s = {lease_s:g} s)") from None
    try:
        yield time.monotonic() - t0
    finally:
        slot.__exit__(None, None, None)


def reap_expired_leases(name: str) -> int:
    """Revoke the expired leases on limit `name` kept on this machine's disk (where a temporary
    local server keeps them); returns how many slots came free."""
    from prefect.settings import get_current_settings

    if get_current_settings().server.concurrency.lease_storage != FILESYSTEM_LEASES:
        return 0
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage

    storage = ConcurrencyLeaseStorage()
    storage.storage_path.mkdir(parents=True, exist_ok=True)
    with get_client(sync_client=True) as client, open(storage.storage_path / ".sslflow-reaper.lock", "a") as lock:
        limit_id = client.read_global_concurrency_limit_by_name(name).id
        fcntl.flock(lock, fcntl.LOCK_EX)  # one reaper at a time: a lease is revoked once
        freed = 0
        for lease_id in anyio.run(storage.read_expired_lease_ids, 1000):
            lease: Any = anyio.run(storage.read_lease, lease_id)
            if lease is None or limit_id not in lease.resource_ids:
                continue
            client.release_concurrency_slots_with_lease(lease_id)  # decrements the slot, revokes the lease
            holder = getattr(lease.metadata, "holder", None)
            log.warning("freed the %r slot of a retrain run that died holding it (lease %s, %s, expired %s)",
                        name, lease_id, holder or "holder unknown", lease.expiration.isoformat(timespec="seconds"))
            freed += 1
        return freed
