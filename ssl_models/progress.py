"""One line per epoch: what a person watching a pretraining sees wherever its output goes.

A tqdm bar only draws on an interactive terminal; in a pipe, a CI log, `dvc repro`, `make demo`
under `tee` or a Prefect flow-run log it shows nothing for the whole run. So the trainer prints
one line per epoch everywhere (and above the bar on a terminal):

    epoch 12/40  loss 4.1234  kNN 56.30  1,234 img/s  ETA 1m23s

`loss` is the epoch's mean, `kNN` the online kNN top-1 when it was measured that epoch,
`img/s` the training rate of the epoch (without the kNN evaluation and the checkpoint), and
`ETA` the remaining epochs at the mean wall-clock time per epoch so far (evaluations included).
The lines go through `print(..., file=sys.stderr)`, so a Prefect task with `log_prints`
(the flows set it) sends them to the flow-run log as well. Pure formatting and timing: no torch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: short enough for a log line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def epoch_line(epoch: int, epochs: int, metrics: Mapping[str, Any], images_per_s: float | None = None,
               eta_s: float | None = None, total_s: float | None = None) -> str:
    """The line of one epoch; epoch 0 is the randomly initialised encoder (a kNN, no loss).
    The last epoch's line says how long the run took instead of an ETA."""
    parts = [f"epoch {epoch}/{epochs}"]
    if "loss" in metrics:
        parts.append(f"loss {float(metrics['loss']):.4f}")
    if "knn_top1" in metrics:
        parts.append(f"kNN {float(metrics['knn_top1']):.2f}" + (" (random init)" if epoch == 0 else ""))
    if images_per_s is not None:
        parts.append(f"{images_per_s:,.0f} img/s")
    if total_s is not None:
        parts.append(f"done in {duration(total_s)}")
    elif eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    return "  ".join(parts)


class EpochLines:
    """Prints `epoch_line` for each epoch the trainer finishes; `write` replaces the print (tests).

    `start_epoch`: where this process starts (a resumed run counts its ETA from there)."""

    def __init__(self, epochs: int, start_epoch: int = 0, write: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.epochs, self.start_epoch = epochs, start_epoch
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.t0 = clock()

    def __call__(self, epoch: int, metrics: Mapping[str, Any], *, images: int = 0, train_seconds: float = 0.0,
                 pause: AbstractContextManager[Any] | None = None) -> str:
        """Print the line of `epoch` (`images` trained in `train_seconds`); `pause` clears a
        progress bar while the line is printed (tqdm's `external_write_mode()`)."""
        rate = images / train_seconds if images and train_seconds > 0 else None
        elapsed, done = self.clock() - self.t0, epoch - self.start_epoch
        eta = elapsed / done * (self.epochs - epoch) if done > 0 else None
        total = elapsed if done > 0 and epoch >= self.epochs else None
        line = epoch_line(epoch, self.epochs, metrics, rate, eta, total)
        with pause or nullcontext():
            self.write(line)
        return line
