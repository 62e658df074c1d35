"""The training loop: it learns, resumes exactly (also after kill -9) and stops on NaN."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import fast_params
from sslflow.ssl_models.checkpoint import load_encoder
from sslflow.ssl_models.store import ImageStore
from sslflow.ssl_models.train import CHECKPOINT, Pretrainer, TrainingDiverged


class Recorder:
    def __init__(self, crash_at_step: int | None = None):
        self.steps, self.epochs, self.crash_at_step = [], [], crash_at_step

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))
        if step == self.crash_at_step:
            raise KeyboardInterrupt("simulated crash")

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, metrics))


def _weights(run_dir):
    return load_encoder(run_dir)[0].state_dict()


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_pretrain_writes_outputs_and_reports_metrics(tmp_path, demo_stores):
    train, test = ImageStore.open(demo_stores["train"]), ImageStore.open(demo_stores["test"])
    rec = Recorder()
    result = Pretrainer(train, fast_params(), tmp_path / "run", callbacks=[rec],
                        eval_stores=(train, test), progress_bar=False).fit()
    run = tmp_path / "run"
    for name in ("encoder.pt", "encoder.pt2", "metrics.json", "history.json", "params.json", CHECKPOINT):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 10 and 0 <= metrics["knn_top1"] <= 100 and metrics["final_loss"] > 0
    assert [e for e, _ in rec.epochs] == [0, 1, 2] and "knn_top1" in rec.epochs[-1][1]  # 0: at init
    assert metrics["knn_top1_at_init"] == rec.epochs[0][1]["knn_top1"]
    assert len(rec.steps) == 10 and {"loss", "lr", "images_per_s"} <= set(rec.steps[0][1])
    assert result.metrics == metrics
    # the exported encoder loads with plain PyTorch and matches the state dict
    exported = torch.export.load(run / "encoder.pt2").module()
    model, meta = load_encoder(run)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(exported(x), model.eval()(x))
    assert meta["feature_dim"] == 64 and meta["image_size"] == 16


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "dino"])
def test_resume_after_crash_gives_identical_weights(tmp_path, demo_stores, method):
    """Crash mid-epoch (step 7 of 10), resume from the step-6 checkpoint: same weights."""
    store = ImageStore.open(demo_stores["train"])
    params = fast_params(f"pretrain.method={method}", "pretrain.checkpoint_every=3", "pretrain.eval_every=0")
    full = Pretrainer(store, params, tmp_path / "full", progress_bar=False).fit()
    with pytest.raises(KeyboardInterrupt):
        Pretrainer(store, params, tmp_path / "crash", callbacks=[Recorder(crash_at_step=7)],
                   progress_bar=False).fit()
    ckpt = torch.load(tmp_path / "crash" / CHECKPOINT, weights_only=True)
    assert ckpt["position"] == {"epoch": 1, "batch_in_epoch": 1, "step": 6}
    resumed = Pretrainer(store, params, tmp_path / "crash", resume=True, progress_bar=False).fit()
    _assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "crash"))
    # the method's own state too: queues, EMA targets, centres
    for (k, a), b in zip(full.method.state_dict().items(), resumed.method.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert resumed.history.epochs == full.history.epochs


def test_kill_9_at_a_random_moment_then_resume_matches_uninterrupted(tmp_path, demo_stores):
    """A real subprocess killed with SIGKILL while training (checkpoint every step)."""
    base = [sys.executable, "-m", "sslflow.cli", "pretrain", "--data", str(demo_stores["train"]), "--no-progress",
            "--set", "device=cpu", "--set", "backbone.resnet.width=8", "--set", "pretrain.epochs=6",
            "--set", "pretrain.batch_size=32", "--set", "pretrain.optimizer=sgd", "--set", "pretrain.lr=0.1",
            "--set", "pretrain.moco.proj_hidden_dim=64", "--set", "pretrain.moco.proj_dim=32",
            "--set", "pretrain.method=moco", "--set", "pretrain.moco.queue_size=64",
            "--set", "pretrain.checkpoint_every=1", "--set", "pretrain.eval_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*base, "--out", str(tmp_path / "full")], check=True, env=env, capture_output=True, timeout=300)

    run = tmp_path / "killed"
    proc = subprocess.Popen([*base, "--out", str(run)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / CHECKPOINT).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "encoder.pt").exists(), "the run finished before it was killed"
    step = torch.load(run / CHECKPOINT, weights_only=True)["position"]["step"]
    assert 1 <= step < 30

    done = subprocess.run([*base, "--out", str(run), "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _assert_same_weights(_weights(tmp_path / "full"), _weights(run))
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path, demo_stores):
    store = ImageStore.open(demo_stores["train"])
    params = fast_params("pretrain.checkpoint_every=2", "pretrain.log_every=1", "pretrain.eval_every=0")
    trainer = Pretrainer(store, params, tmp_path / "run", progress_bar=False)
    forward = trainer.method.forward

    def poisoned(batch, progress):
        out = forward(batch, progress)
        if trainer.step >= 5:
            out.loss = out.loss * float("nan")
        return out

    trainer.method.forward = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss became NaN/inf before step 6 .*last good checkpoint"):
        trainer.fit()
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert ckpt["position"]["step"] == 5  # the end of epoch 1; steps 1-5 were finite
    assert all(torch.isfinite(v).all() for v in ckpt["method"].values() if v.is_floating_point())


def test_resume_refuses_changed_params_and_existing_run(tmp_path, demo_stores):
    store = ImageStore.open(demo_stores["train"])
    Pretrainer(store, fast_params("pretrain.epochs=1"), tmp_path / "run", progress_bar=False).fit()
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        Pretrainer(store, fast_params("pretrain.epochs=1"), tmp_path / "run", progress_bar=False)
    with pytest.raises(ValueError, match=r"cannot resume: settings differ .*pretrain.lr: 0.1 -> 0.2"):
        Pretrainer(store, fast_params("pretrain.epochs=1", "pretrain.lr=0.2"), tmp_path / "run", resume=True)
    grown = ImageStore.create(tmp_path / "grown", store.height, store.width)
    grown.add(store.images(), [None] * len(store))
    grown.add(store.images()[:32], [None] * 32)
    with pytest.raises(ValueError, match=r"the training data changed since the checkpoint \(160 -> 192 images\)"):
        Pretrainer(grown, fast_params("pretrain.epochs=1"), tmp_path / "run", resume=True)
