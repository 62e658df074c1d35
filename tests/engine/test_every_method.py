"""What every registered method must do through the real loop, whatever its family: learn
(finite loss, its own metrics logged), resume bit for bit after a crash and after a real
`kill -9`, and export an encoder that loads back. New methods are covered by registering."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import FAST, demo_profile, method_params
from sslflow.ssl_models.checkpoint import load_encoder
from sslflow.ssl_models.methods import METHODS
from sslflow.ssl_models.store import ImageStore
from sslflow.ssl_models.train import CHECKPOINT, Pretrainer

pytestmark = pytest.mark.usefixtures("single_thread")
ALL = sorted(METHODS)
#: `kill -9` + resume in `make test`: one method per kind of method state (a plain loss, an EMA
#: target, a queue and prototypes, a ViT with masking, a decoder with sampling). The crash-resume
#: test checks every method's state bitwise in-process; `make test-all` kills every method.
KILLED_IN_CI = {"simclr", "byol", "swav", "mae", "vae"}


class Recorder:
    def __init__(self, crash_at_step: int | None = None):
        self.steps, self.epochs, self.crash_at_step = [], [], crash_at_step

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))
        if step == self.crash_at_step:
            raise KeyboardInterrupt("simulated crash")

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, metrics))


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> ImageStore:
    """64 images of 16 px: two steps of 32 per epoch, so a resume test is a handful of steps."""
    from sslflow.tasks.data.demo import CLASSES, generate_demo

    images, labels = generate_demo(8, size=16, seed=3)
    store = ImageStore.create(tmp_path_factory.mktemp("tiny") / "train", 16, 16)
    store.add(images[:64], [CLASSES[i] for i in labels[:64]])
    return store


def same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.parametrize("method", ALL)
def test_learns_logs_its_metrics_and_exports(method, demo_stores, tmp_path):
    train, test = ImageStore.open(demo_stores["train"]), ImageStore.open(demo_stores["test"])
    rec = Recorder()
    params = method_params(method, "pretrain.eval_every=2")
    result = Pretrainer(train, params, tmp_path / "run", callbacks=[rec], eval_stores=(train, test),
                        progress_bar=False).fit()
    losses = [m["loss"] for _, m in rec.steps]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    probe = METHODS[method]
    extra = set(rec.steps[0][1]) - {"loss", "lr", "images_per_s", "epoch"}
    assert extra, f"{method} logs no metric of its own (pretext accuracy, collapse indicator, ...)"
    assert extra <= set(result.history.epochs[-1]), "epoch means of the method's metrics"
    assert "knn_top1" in result.metrics and probe.name == method
    encoder, meta = load_encoder(tmp_path / "run")
    x = torch.randn(2, 3, 16, 16)
    assert encoder.eval()(x).shape == (2, meta["feature_dim"])
    exported = torch.export.load(tmp_path / "run" / "encoder.pt2").module()
    torch.testing.assert_close(exported(x), encoder(x))


@pytest.mark.parametrize("method", ALL)
def test_resume_after_a_crash_is_bitwise(method, tiny_store, tmp_path):
    """Crash mid-epoch (step 4 of 6), resume from the step-3 checkpoint: the same weights and
    the same method state (queues, EMA targets, centres, prototypes) as an uninterrupted run."""
    store = tiny_store
    params = method_params(method, "pretrain.epochs=3", "pretrain.checkpoint_every=3", "pretrain.eval_every=0",
                           "pretrain.export=false")
    full = Pretrainer(store, params, tmp_path / "full", progress_bar=False).fit()
    with pytest.raises(KeyboardInterrupt):
        Pretrainer(store, params, tmp_path / "crash", callbacks=[Recorder(crash_at_step=4)],
                   progress_bar=False).fit()
    assert torch.load(tmp_path / "crash" / CHECKPOINT, weights_only=True)["position"] == {
        "epoch": 1, "batch_in_epoch": 1, "step": 3}
    resumed = Pretrainer(store, params, tmp_path / "crash", resume=True, progress_bar=False).fit()
    same_state(full.method.state_dict(), resumed.method.state_dict())
    assert resumed.history.epochs == full.history.epochs


@pytest.mark.slow
@pytest.mark.parametrize("method", [m if m in KILLED_IN_CI else pytest.param(m, marks=pytest.mark.extended)
                                    for m in ALL])
def test_kill_9_at_a_random_step_then_resume_is_bitwise(method, tiny_store, tmp_path):
    """`sslflow pretrain` in a real subprocess, checkpoint every step, SIGKILL after a random
    number of checkpoints; `--resume` in this process ends where an uninterrupted run ends."""
    store = tiny_store
    sets = [*FAST, f"pretrain.method={method}", "pretrain.epochs=3", "pretrain.checkpoint_every=1",
            "pretrain.eval_every=0", "pretrain.export=false"]
    params = method_params(method, *sets[len(FAST):])
    full = Pretrainer(store, params, tmp_path / "full", progress_bar=False).fit()

    run = tmp_path / "killed"
    profile = demo_profile(method)
    cmd = [sys.executable, "-m", "sslflow.cli", "pretrain", "--data", str(store.root), "--out", str(run),
           "--no-progress", *(["--params", str(profile)] if profile else ["--params", os.devnull]),
           *(a for s in sets for a in ("--set", s))]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    target = 1 + int(time.time() * 1000) % 4  # a step between 1 and 4 of 6
    deadline = time.monotonic() + 120
    step = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            step = torch.load(run / CHECKPOINT, weights_only=True)["position"]["step"]
        except (FileNotFoundError, RuntimeError, EOFError):
            step = 0
        if step >= target:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-2000:]}"
    assert step >= 1 and not (run / "encoder.pt").exists()

    resumed = Pretrainer(store, params, run, resume=True, progress_bar=False).fit()
    same_state(full.method.state_dict(), resumed.method.state_dict())
    assert not list((run / "checkpoints").glob(".*.tmp"))
