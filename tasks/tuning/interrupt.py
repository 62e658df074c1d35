"""Ctrl-C during a study stops it at the next training step, not inside a database write.

SIGINT raises KeyboardInterrupt wherever the main thread is. During a study that is often inside
a write to the MLflow or Optuna database (metrics are flushed at every epoch end, exactly when a
checkpoint appears): an SQLite transaction cut there keeps its write lock, and the trial's own
cleanup (re-enqueue, close the MLflow run) then waits on that lock until it times out. So the
first Ctrl-C only asks to stop; the training loop stops at its next step or epoch boundary
(after the epoch's metrics are written), and a new trial does not start. A second Ctrl-C stops
at once, as before.

    stop = StopRequest()
    with stop.on_sigint():
        study.optimize(...)   # the Pretrainer gets `stop` as a callback; an Optuna callback stops new trials
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class StopRequest:
    """A stop asked for by the first Ctrl-C; a training-loop callback (`on_step`, `on_epoch_end`)."""

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.check()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.check()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C: now
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def on_sigint(self) -> Iterator[StopRequest]:
        """Route SIGINT to this request while inside (main thread only: elsewhere signals are
        not ours to handle, and Ctrl-C keeps its default)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
