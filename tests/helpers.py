"""Helpers shared by test modules (fixtures live in conftest.py): fast parameters, generated
images, a real Prefect server, process-group control."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CIFAR10_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"

# A narrow ResNet-18 on 16x16 images: a training step takes milliseconds on a CPU.
FAST_BASE = [
    "device=cpu",
    "backbone.resnet.width=8",
    "pretrain.epochs=2",
    "pretrain.batch_size=32",
    "pretrain.optimizer=sgd",
    "pretrain.lr=0.1",
    "pretrain.warmup_epochs=1",
    "pretrain.checkpoint_every=0",
    "pretrain.log_every=1",
    "pretrain.eval_every=1",
    "augment.local_crops=2",
    "augment.local_size=8",
    "eval.linear_epochs=5",
    "eval.finetune_epochs=1",
    "eval.batch_size=64",
]


def tiny_heads() -> list[str]:
    """Small heads for every registered method, by the field names' convention: `*hidden_dim` 64,
    other `*_dim` 32, `out_dim` / `queue_size` / `num_prototypes` 64."""
    import dataclasses

    from sslflow.ssl_models.methods import METHODS

    out = []
    for name, method in sorted(METHODS.items()):
        for f in dataclasses.fields(method.Config):
            if f.name in ("out_dim", "queue_size", "num_prototypes") or f.name.endswith("hidden_dim"):
                out.append(f"pretrain.{name}.{f.name}=64")
            elif f.name.endswith("_dim") and f.type in ("int", int):
                out.append(f"pretrain.{name}.{f.name}=32")
    return out


#: `--set` list for a fast CPU run of any method: FAST_BASE and tiny heads.
FAST = [*FAST_BASE, *tiny_heads()]


#: `--set` list for a tiny demo store (40 train / 20 test images of 16 px), no DVC.
TINY_DEMO = ["ingest.size=16", "ingest.min_side=8", "ingest.demo_train_per_class=4", "ingest.demo_test_per_class=2",
             "ingest.workers=1", "versioning.dvc=off", "validate.class_balance_tolerance=1.0"]


def fast_overrides(*overrides: str) -> list[str]:
    return [*FAST, *overrides]


def fast_params(*overrides: str):
    """Settings for a fast CPU run: the built-in defaults (never the project's params.yaml) + FAST."""
    from sslflow.core.settings import load_settings

    return load_settings([], fast_overrides(*overrides))


def demo_profile(method: str) -> Path | None:
    """`params/profiles/demo-<method>.yaml`: what a method needs besides the defaults (its backbone,
    optimizer, view sizes), the recipe its demo benchmark runs."""
    path = REPO / "params" / "profiles" / f"demo-{method}.yaml"
    return path if path.is_file() else None


def method_params(method: str, *overrides: str):
    """Fast settings for `method`: its demo profile (if any), then FAST and `overrides`."""
    from sslflow.core.settings import load_settings

    profile = demo_profile(method)
    return load_settings([profile] if profile else [], [*FAST, f"pretrain.method={method}", *overrides])


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_server(home: Path, timeout: float = 90.0, before_ready: Callable[[], None] | None = None
                   ) -> Iterator[dict]:
    """A real `prefect server start` (scheduler on, 1 s loop) in PREFECT_HOME `home` on a free
    port; yields {"api", "env" (with PREFECT_API_URL), "log"}; stopped (its process group) afterwards.
    `before_ready` runs while the server boots (work that does not need it)."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        if before_ready is not None:
            before_ready()
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"prefect server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"api": api, "env": {**env, "PREFECT_API_URL": api}, "log": log_path}
    finally:
        stop_process_group(proc)
        log.close()


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session), SIGKILL if it lingers."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def saturated_cpu(processes: int | None = None) -> Iterator[None]:
    """Busy-loop processes on every core for the block: races that only show on a loaded
    machine (a worker that starts seconds late) show here too."""
    n = processes or len(os.sched_getaffinity(0))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
