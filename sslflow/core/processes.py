"""Child processes that die with their parent, and a parent that cleans up on SIGTERM.

A `kill -9` of `sslflow ingest` used to leave its decode workers blocked forever, and one of
`sslflow run` its temporary Prefect server. Linux lets a child ask for a signal when its
parent dies (`PR_SET_PDEATHSIG`); every long-lived child sslflow starts asks for one:

    Popen(cmd, preexec_fn=die_with_parent)                         # a server: SIGTERM, shuts down cleanly
    ProcessPoolExecutor(initializer=..., initargs=(os.getpid(), ...))  # then die_with_parent(pid, SIGKILL)

`terminate_gracefully()` turns SIGTERM into `SystemExit(143)`, so `finally:` blocks and
context managers (locks, temporary servers, MLflow runs) run as they do on Ctrl-C.
Elsewhere than Linux both are no-ops (the OS has no equivalent short of a job object).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from types import FrameType

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies; exit at once if the
    parent (`parent_pid`, when known) is already gone. Safe as a `preexec_fn`."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)


def terminate_gracefully() -> None:
    """SIGTERM raises `SystemExit(143)` in the main thread (the exit code of a process killed by
    SIGTERM), so cleanup runs instead of the process vanishing mid-write."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
