"""The training loop: outputs, metrics, refusal to resume with other settings, NaN. Every method's
learning and bit-exact resume (also after kill -9): tests/engine/test_every_method.py."""

from __future__ import annotations

import json
import re

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


def test_pretrain_writes_outputs_and_reports_metrics(tmp_path, demo_stores, capsys):
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
    # not a terminal: no bar, one progress line per epoch on stderr (epoch 0: the untrained encoder)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3 and lines[0].startswith("epoch 0/2  kNN ") and "(random init)" in lines[0]
    assert re.fullmatch(r"epoch 1/2  loss \d+\.\d{4}  kNN \d+\.\d\d  [\d,]+ img/s  ETA \w+", lines[1]), lines[1]
    assert re.fullmatch(r"epoch 2/2  loss .* img/s  done in \w+", lines[2]), lines[2]
    # the exported encoder loads with plain PyTorch and matches the state dict
    exported = torch.export.load(run / "encoder.pt2").module()
    model, meta = load_encoder(run)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(exported(x), model.eval()(x))
    assert meta["feature_dim"] == 64 and meta["image_size"] == 16


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


def test_a_non_finite_batchnorm_buffer_never_reaches_the_last_good_checkpoint(tmp_path, demo_stores):
    """BatchNorm statistics can overflow while the loss still looks finite: the checkpoint
    check covers buffers, so the last good checkpoint keeps finite statistics."""
    store = ImageStore.open(demo_stores["train"])
    params = fast_params("pretrain.checkpoint_every=2", "pretrain.log_every=1", "pretrain.eval_every=0")
    trainer = Pretrainer(store, params, tmp_path / "run", progress_bar=False)
    bn = next(m for m in trainer.method.modules() if isinstance(m, torch.nn.BatchNorm2d))

    class Overflow(Recorder):
        def on_step(self, step, metrics):
            if step >= 3:  # after the optimizer step: the loss of step 3 was finite
                bn.running_var.fill_(float("inf"))

    trainer.callbacks.append(Overflow())
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        trainer.fit()
    saved = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert saved["position"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["method"].values() if v.is_floating_point())


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
