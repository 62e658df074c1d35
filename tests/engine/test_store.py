"""The image store: format, atomic publishing and device batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import random_images
from sslflow.ssl_models.store import DeviceBatches, ImageStore, StoreBusy, StoreError


def test_add_publish_and_read_back(tmp_path):
    store = ImageStore.create(tmp_path / "s", 16, 16)
    a, b = random_images(5, seed=1), random_images(3, seed=2)
    store.add(a, ["cat", None, "dog", "cat", None])
    store.add(b, ["bird", "dog", None])
    again = ImageStore.open(tmp_path / "s")
    assert len(again) == 8 and again.classes == ["cat", "dog", "bird"]
    np.testing.assert_array_equal(again.images(), np.concatenate([a, b]))
    np.testing.assert_array_equal(again.labels(), [0, -1, 1, 0, -1, 2, 1, -1])
    assert again.num_labeled() == 5


def test_unpublished_shards_are_invisible_and_swept(tmp_path):
    store = ImageStore.create(tmp_path / "s", 16, 16)
    store.add(random_images(4), [None] * 4)
    with store.writing():
        orphan = store.write_shard(random_images(2), np.array([-1, -1]))  # a writer that crashed before publish
    assert len(ImageStore.open(tmp_path / "s")) == 4
    store.add(random_images(1), [None])
    assert not orphan.images_path(store.root).exists()
    assert len(ImageStore.open(tmp_path / "s")) == 5


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="is not an image store"):
        ImageStore.open(tmp_path)
    store = ImageStore.create(tmp_path / "s", 16, 16)
    with pytest.raises(StoreError, match=r"expected uint8 images of shape \(N, 16, 16, 3\)"):
        store.add(random_images(2, size=8), [None, None])
    with pytest.raises(StoreError, match="already holds a store"):
        ImageStore.create(tmp_path / "s", 16, 16)
    with pytest.raises(StoreError, match="holds 16x16 images, not 32x32"):
        ImageStore.open_or_create(tmp_path / "s", 32, 32)
    (tmp_path / "s" / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        ImageStore.open(tmp_path / "s")


@pytest.mark.parametrize("resident", [True, False])
def test_device_batches_are_reproducible_permutations(tmp_path, resident):
    store = ImageStore.create(tmp_path / "s", 4, 4)
    images = np.arange(40 * 48, dtype=np.int64).reshape(40, 4, 4, 3).astype(np.uint8)
    images[:, 0, 0, 0] = np.arange(40)  # row id in a pixel
    for part in np.split(images, [13, 30]):  # three shards
        store.add(part, [None] * len(part))
    batches = DeviceBatches(store, 8, torch.device("cpu"), seed=3, max_resident_bytes=None if resident else 0)
    assert batches.resident is resident and len(batches) == 5
    ids = [b[:, 0, 0, 0].tolist() for b in batches.epoch(0)]
    assert sorted(i for batch in ids for i in batch) == list(range(40))  # every image once per epoch
    assert [b[:, 0, 0, 0].tolist() for b in batches.epoch(0)] == ids  # same (seed, epoch): same order
    assert [b[:, 0, 0, 0].tolist() for b in batches.epoch(0, start_batch=2)] == ids[2:]  # resume
    assert [b[:, 0, 0, 0].tolist() for b in batches.epoch(1)] != ids


def test_device_batches_reject_stores_smaller_than_a_batch(tmp_path):
    store = ImageStore.create(tmp_path / "s", 4, 4)
    with pytest.raises(StoreError, match="is empty"):
        DeviceBatches(store, 8, torch.device("cpu"), seed=0)
    store.add(random_images(3, size=4), [None] * 3)
    with pytest.raises(StoreError, match="fewer than one batch of 8"):
        DeviceBatches(store, 8, torch.device("cpu"), seed=0)


def test_index_is_plain_json(tmp_path):
    store = ImageStore.create(tmp_path / "s", 8, 8)
    store.add(random_images(2, size=8), ["a", "b"])
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    assert meta["count"] == 2 and meta["classes"] == ["a", "b"] and meta["height"] == 8


def test_writing_needs_the_lock_and_publishing_needs_the_files(tmp_path):
    store = ImageStore.create(tmp_path / "s", 16, 16)
    with pytest.raises(StoreError, match="needs its writer lock"):
        store.write_shard(random_images(2), np.array([-1, -1]))
    with store.writing():
        shard = store.write_shard(random_images(2), np.array([-1, -1]))
        shard.images_path(store.root).unlink()  # lost before publication
        with pytest.raises(StoreError, match="shard files missing"):
            store.publish([shard], [])
    assert len(ImageStore.open(tmp_path / "s")) == 0


def test_the_writer_lock_excludes_a_second_writer_until_released(tmp_path):
    a = ImageStore.create(tmp_path / "s", 16, 16)
    b = ImageStore.open(tmp_path / "s")
    with a.writing(), pytest.raises(StoreBusy, match="another process is writing"), b.writing(wait_s=0.3):
        pass
    with b.writing():
        b.add(random_images(1), [None])  # re-entrant for the same object
    assert len(ImageStore.open(tmp_path / "s")) == 1


def test_verify_finds_missing_and_damaged_shards_and_repair_drops_them(tmp_path):
    store = ImageStore.create(tmp_path / "s", 16, 16)
    keep = store.add(random_images(3, seed=1), ["a", "b", "a"])
    lost = store.add(random_images(2, seed=2), ["b", None])
    hurt = store.add(random_images(4, seed=3), [None] * 4)
    assert store.verify() == []
    lost.images_path(store.root).unlink()
    data = bytearray(hurt.images_path(store.root).read_bytes())
    data[-1] ^= 0xFF  # one flipped pixel: only the checksum can tell
    hurt.images_path(store.root).write_bytes(bytes(data))
    problems = store.verify()
    assert len(problems) == 2 and "missing" in problems[0] and "sha256" in problems[1]
    with pytest.raises(StoreError, match="missing: run `sslflow validate"):
        store.images()
    dropped = store.repair()
    assert [s.id for s in dropped] == [lost.id, hurt.id]
    again = ImageStore.open(tmp_path / "s")
    assert [s.id for s in again.shards] == [keep.id] and again.verify() == []
    assert not lost.labels_path(store.root).exists()  # swept with the repair


def test_version_1_stores_still_open(tmp_path):
    store = ImageStore.create(tmp_path / "s", 16, 16)
    store.add(random_images(2), [None, None])
    index = json.loads((tmp_path / "s" / "store.json").read_text())
    index["version"] = 1
    for s in index["shards"]:
        del s["sha256"], s["labels_sha256"]
    (tmp_path / "s" / "store.json").write_text(json.dumps(index))
    old = ImageStore.open(tmp_path / "s")
    assert len(old) == 2 and old.verify() == []  # shapes checked, no checksum to compare
