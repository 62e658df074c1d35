"""Heartbeats of open MLflow runs, and the end of runs whose process died.

MLflow has no notion of a run's process: the run of a training killed with `kill -9` (or on a
host that lost power) stays RUNNING forever in the UI. Every run `tracking_run` opens carries
a heartbeat tag, refreshed every `tracking.heartbeat_s` by a thread of the process that holds
it; the next run opened in the same experiment ends the RUNNING runs whose heartbeat is older
than `tracking.orphan_after_s` as KILLED, tagged with why. Runs without the tag (written by
other tools, or tune's shared parent run) are never touched.

    with heartbeat(client, run_id, every_s=60):
        ...                                         # the run's work
    end_orphaned_runs(client, experiment_id, stale_after_s=900)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

log = logging.getLogger("sslflow")

TAG_HEARTBEAT = "sslflow.heartbeat"
TAG_ORPHANED = "sslflow.orphaned"


@contextmanager
def heartbeat(client: Any, run_id: str, every_s: float) -> Iterator[None]:
    """Refresh the run's heartbeat tag now and every `every_s` seconds until the block ends.
    A failed refresh (the server is down for a moment) is skipped: the next one may work, and
    the run's own calls report the outage."""
    stop = threading.Event()

    def beat() -> None:
        with suppress(Exception):
            client.set_tag(run_id, TAG_HEARTBEAT, str(int(time.time())))

    beat()

    def loop() -> None:
        while not stop.wait(every_s):
            beat()

    thread = threading.Thread(target=loop, name=f"mlflow-heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def end_orphaned_runs(client: Any, experiment_id: str, stale_after_s: float, *, keep: str | None = None) -> list[str]:
    """End the RUNNING runs of `experiment_id` whose heartbeat is older than `stale_after_s` as
    KILLED (tag `sslflow.orphaned` says why); `keep` = a run never to touch. Returns their ids."""
    now = time.time()
    ended = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=1000):
        raw = run.data.tags.get(TAG_HEARTBEAT)
        if run.info.run_id == keep or raw is None:
            continue
        try:
            last = float(raw)
        except ValueError:
            continue
        silent = now - last
        if silent < stale_after_s:
            continue
        why = (f"no heartbeat for {silent / 60:.0f} min (tracking.orphan_after_s {stale_after_s:g} s): its "
               f"process died without ending it; ended by a later run")
        with suppress(Exception):  # another process ended it meanwhile: fine
            client.set_tag(run.info.run_id, TAG_ORPHANED, why)
            client.set_terminated(run.info.run_id, status="KILLED", end_time=int(last * 1000))
            ended.append(run.info.run_id)
            log.warning("MLflow run %s (%s) was left RUNNING by a process that died: marked KILLED",
                        run.info.run_id, run.info.run_name)
    return ended
