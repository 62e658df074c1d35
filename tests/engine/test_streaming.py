"""Stores larger than the device: streamed batches are the resident mode's batches, so a run
resumes bit for bit in either mode; bad shards are one clear error; the reader thread ends with
its iterator. Throughput and peak memory: benchmarks/streaming.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from helpers import fast_params
from sslflow.cli import build_parser
from sslflow.cli.commands.pretrain import byte_size, settings_for
from sslflow.ssl_models.checkpoint import load_data
from sslflow.ssl_models.store import DeviceBatches, ImageStore, StoreError
from sslflow.ssl_models.train import CHECKPOINT, Pretrainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")


def _store(root, n: int = 101, size: int = 4, parts=(13, 30, 31, 70)) -> ImageStore:
    """`n` random images in uneven shards (one of a single image); row id in the first pixel."""
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    store = ImageStore.create(root, size, size)
    for part in np.split(images, [p for p in parts if p < n]):
        store.add(part, [None] * len(part))
    return store


def _same(a, b) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype == torch.uint8 and x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x.cpu(), y.cpu()), f"batch {i} differs"


@pytest.mark.parametrize(("batch_size", "drop_last", "prefetch"), [(8, True, 1), (32, False, 3), (101, True, 2)])
def test_streamed_batches_are_the_resident_batches(tmp_path, batch_size, drop_last, prefetch):
    store = _store(tmp_path / "s")
    cpu = torch.device("cpu")
    resident = DeviceBatches(store, batch_size, cpu, seed=5, drop_last=drop_last)
    streamed = DeviceBatches(store, batch_size, cpu, seed=5, drop_last=drop_last, max_resident_bytes=0,
                             prefetch=prefetch)
    assert resident.resident and not streamed.resident and len(resident) == len(streamed)
    for epoch in range(3):
        _same(resident.epoch(epoch), streamed.epoch(epoch))
        _same(resident.epoch(epoch, start_batch=1), streamed.epoch(epoch, start_batch=1))  # resume mid-epoch
    seen = torch.cat(list(streamed.epoch(0)))[:, 0, 0, 0]
    assert len(seen) == (101 if not drop_last else len(streamed) * batch_size)


def test_each_rank_streams_its_slice_of_the_resident_global_batch(tmp_path):
    store = _store(tmp_path / "s")
    cpu = torch.device("cpu")
    single = list(DeviceBatches(store, 12, cpu, seed=2).epoch(1))
    ranks = [list(DeviceBatches(store, 12, cpu, seed=2, max_resident_bytes=0, rank=r, world_size=3).epoch(1))
             for r in range(3)]
    _same(single, [torch.cat(parts) for parts in zip(*ranks, strict=True)])


def test_stopping_early_ends_the_reader_thread(tmp_path):
    store = _store(tmp_path / "s")
    batches = DeviceBatches(store, 8, torch.device("cpu"), seed=0, max_resident_bytes=0, prefetch=2)
    it = batches.epoch(0)
    first = next(it)
    assert any(t.name == "sslflow-store-reader" for t in threading.enumerate())
    it.close()
    assert not any(t.name == "sslflow-store-reader" for t in threading.enumerate())
    kept = list(batches.epoch(0))  # a batch stays valid after the next ones are read
    assert torch.equal(first, kept[0])
    _same(DeviceBatches(store, 8, torch.device("cpu"), seed=0).epoch(0), kept)


def test_a_missing_or_truncated_shard_is_one_clear_error(tmp_path):
    store = _store(tmp_path / "s", n=40, parts=(20,))
    path = store.shards[1].images_path(store.root)
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # truncated: the header says more rows than the file holds
    batches = DeviceBatches(store, 8, torch.device("cpu"), seed=0, max_resident_bytes=0)
    with pytest.raises(StoreError, match=r"damaged.*sslflow validate --repair"):
        list(batches.epoch(0))
    path.unlink()
    with pytest.raises(StoreError, match=r"is missing: run `sslflow validate --store"):
        list(batches.epoch(0))
    with pytest.raises(StoreError, match="is missing"):
        DeviceBatches(store, 8, torch.device("cpu"), seed=0)  # resident mode loads it at once


def test_max_device_bytes_flag_sets_the_setting():
    args = build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", "--max-device-bytes", "1.5K",
                                      "--set", "pretrain.max_device_bytes=7"])
    assert args.max_device_bytes == 1536 and settings_for(args).pretrain.max_device_bytes == 1536
    assert byte_size("8GiB") == 8 << 30 and byte_size("0") == 0
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", "--max-device-bytes", "lots"])
    assert exit_info.value.code == 2


@cuda
def test_cuda_streamed_batches_are_the_resident_batches(tmp_path):
    store = _store(tmp_path / "s", n=300, size=8)
    device = torch.device("cuda")
    resident = DeviceBatches(store, 32, device, seed=1)
    streamed = DeviceBatches(store, 32, device, seed=1, max_resident_bytes=0, prefetch=3)
    assert not streamed.resident
    for epoch in range(2):
        batches = list(streamed.epoch(epoch))
        assert all(b.device.type == "cuda" for b in batches)
        _same(resident.epoch(epoch), batches)
    assert len(streamed._rings) == 1 and all(t.is_pinned() for t in streamed._rings[0])


# ------------------------------------------------------------------------------ training
SETS = ["pretrain.epochs=2", "pretrain.batch_size=16", "pretrain.checkpoint_every=1", "pretrain.eval_every=0",
        "pretrain.export=false"]


class CrashAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step, metrics):
        if step == self.step:
            raise KeyboardInterrupt("simulated crash")

    def on_epoch_end(self, epoch, metrics):
        pass


def test_a_run_killed_in_one_mode_resumes_bitwise_in_the_other(tmp_path):
    """Killed at step 2 (of 4) in one mode, resumed from the step-1 checkpoint (mid-epoch) in the
    other: both directions end with the uninterrupted resident run's state."""
    from sslflow.tasks.data.demo import CLASSES, generate_demo

    images, labels = generate_demo(4, size=16, seed=3)
    store = ImageStore.create(tmp_path / "train", 16, 16)
    for lo, hi in ((0, 10), (10, 23), (23, 32)):  # three shards: two steps of 16 per epoch
        store.add(images[lo:hi], [CLASSES[i] for i in labels[lo:hi]])
    resident, streamed = fast_params(*SETS), fast_params(*SETS, "pretrain.max_device_bytes=1")
    full = Pretrainer(store, resident, tmp_path / "full", progress_bar=False).fit()
    for first, then in ((streamed, resident), (resident, streamed)):
        run = tmp_path / f"{first.pretrain.max_device_bytes}-then-{then.pretrain.max_device_bytes}"
        trainer = Pretrainer(store, first, run, callbacks=[CrashAt(2)], progress_bar=False)
        assert trainer.batches.resident is (first is resident)
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        resumed = Pretrainer(store, then, run, resume=True, progress_bar=False)
        assert (resumed.epoch, resumed.batch_in_epoch, resumed.step) == (0, 1, 1)
        assert resumed.batches.resident is (then is resident)
        result = resumed.fit()
        assert load_data(run / CHECKPOINT, "checkpoint")["params"]["pretrain.max_device_bytes"] == (
            then.pretrain.max_device_bytes)
        for k, v in full.method.state_dict().items():
            assert torch.equal(v, result.method.state_dict()[k]), f"{k} differs"
        assert result.history.epochs == full.history.epochs
