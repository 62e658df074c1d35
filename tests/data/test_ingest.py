"""Ingestion: a hostile folder, conversions, incremental batches, dedupe, demo and torchvision."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import CIFAR10_ARCHIVE
from sslflow.core.errors import UserError
from sslflow.core.settings import load_settings
from sslflow.ssl_models.store import ImageStore, StoreError
from sslflow.tasks.data import manifest
from sslflow.tasks.data.decode import Accepted, DecodeOptions, FileTask, decode_files
from sslflow.tasks.data.ingest import ingest

BASE = ["ingest.size=16", "ingest.min_side=8", "ingest.max_pixels=10000", "versioning.dvc=off"]


def params(*overrides: str):
    return load_settings([], [*BASE, *overrides])


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def write_images(folder: Path, names: list[str], seed: int = 0, size: int = 20) -> None:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        noise(size, size, seed * 1000 + i).save(folder / name)


def run(src: Path | str, store: Path, tmp: Path, split: str = "train", **kw):
    p = kw.pop("p", None) or params()
    return ingest(str(src), store, split, settings=p, reports_dir=tmp / "reports", log=lambda m: None, **kw)


# ------------------------------------------------------------------------------------ hostile folder
def build_hostile(root: Path, outside: Path) -> None:
    root.mkdir()
    (root / "cats").mkdir()
    ok = io.BytesIO()
    noise(40, 30, 1).save(ok, "JPEG")
    (root / "cats" / "ok1.jpg").write_bytes(ok.getvalue())
    (root / "cats" / "ok dup.jpg").write_bytes(ok.getvalue())  # same bytes, another name
    nested = root / "cats" / "nested" / "deep"
    nested.mkdir(parents=True)
    noise(24, 24, 2).save(nested / "ökä 1.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(root / "cats" / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(root / "cats" / "gray16.png")
    (root / "cats" / "readme.txt").write_text("not an image")
    (root / "dogs").mkdir()
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, 16:] = (0, 0, 255, 255)  # left half fully transparent, right half opaque blue
    Image.fromarray(rgba, "RGBA").save(root / "dogs" / "rgba.png")
    frames = [Image.new("P", (32, 32), 1), Image.new("P", (32, 32), 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    frames[0].save(root / "dogs" / "palette.gif", save_all=True, append_images=frames[1:])
    raw = np.zeros((30, 60, 3), np.uint8)
    raw[:15] = (255, 0, 0)  # top half red, bottom half blue as stored
    raw[15:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: red ends up on the right
    Image.fromarray(raw).save(root / "dogs" / "rotated.JPG", exif=exif, quality=95)
    Image.fromarray(np.full((32, 32), 200, np.uint8), "L").save(root / "dogs" / "gray.bmp")
    noise(32, 32, 3).save(root / "loose.tiff")
    trunc = io.BytesIO()
    noise(64, 64, 4).save(trunc, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(trunc.getvalue()[: len(trunc.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("this is text, not a PNG\n")
    Image.new("RGB", (1, 1)).save(root / "tiny.png")
    Image.new("RGB", (128, 128)).save(root / "bomb.png")  # 16,384 pixels > max_pixels 10,000
    (root / "x.jpg").mkdir()
    noise(20, 20, 5).save(root / "x.jpg" / "inner.png")  # never entered
    noise(20, 20, 6).save(outside)
    os.symlink(outside, root / "escape.jpg")
    os.mkfifo(root / "pipe.jpg")  # would block a naive open() forever
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")


def test_hostile_folder_exact_counts_reasons_and_conversions(tmp_path):
    root = tmp_path / "hostile"
    build_hostile(root, tmp_path / "outside.jpg")
    store = tmp_path / "store"
    s = run(root, store, tmp_path, p=params("validate.max_quarantined_fraction=1.0"))

    reasons = {q["path"]: q["reason"] for q in s.quarantined}
    assert reasons == {
        "truncated.jpg": "truncated", "empty.png": "empty_file", "notes.png": "not_an_image",
        "tiny.png": "too_small", "bomb.png": "decompression_bomb", "x.jpg": "is_directory",
        "escape.jpg": "symlink_outside_root", "pipe.jpg": "not_regular_file",
    }
    assert (s.scanned, s.accepted, s.duplicates, s.duplicates_in_batch) == (20, 9, 1, 1)
    assert s.ignored == [".DS_Store", "cats/readme.txt"]
    assert s.converted == {"CMYK": 1, "I;16": 1, "L": 1, "P": 1, "RGBA": 1}
    assert s.exif_rotated == 1 and s.status == "published" and s.total_in_store == 9
    assert s.validation["success"]

    split = ImageStore.open(store / "train")
    rows = manifest.read(store / "train")
    assert len(rows) == len(split) == 9
    assert sorted(split.classes) == ["cats", "dogs"]
    by_path = {r.path: i for i, r in enumerate(rows.itertuples())}
    assert set(by_path) == {"cats/ok dup.jpg", "cats/nested/deep/ökä 1.png", "cats/cmyk.jpg", "cats/gray16.png",
                            "dogs/rgba.png", "dogs/palette.gif", "dogs/rotated.JPG", "dogs/gray.bmp", "loose.tiff"}
    images, labels = split.images(), split.labels()
    assert images.shape == (9, 16, 16, 3)
    row = rows.iloc[by_path["cats/nested/deep/ökä 1.png"]]
    assert row["label"] == "cats" and split.classes[labels[by_path["cats/nested/deep/ökä 1.png"]]] == "cats"
    assert labels[by_path["loose.tiff"]] == -1 and pd.isna(rows.iloc[by_path["loose.tiff"]]["label"])

    rot = by_path["dogs/rotated.JPG"]
    assert (rows.iloc[rot]["width"], rows.iloc[rot]["height"], rows.iloc[rot]["orientation"]) == (30, 60, 6)
    assert images[rot][8, 2, 2] > 200 and images[rot][8, 2, 0] < 60   # left: blue
    assert images[rot][8, 13, 0] > 200 and images[rot][8, 13, 2] < 60  # right: red
    assert abs(int(images[by_path["cats/gray16.png"]][8, 8, 0]) - 128) <= 1  # scaled, not clipped to 255
    assert images[by_path["dogs/rgba.png"]][8, 2].tolist() == [255, 255, 255]  # transparent -> white
    assert images[by_path["dogs/palette.gif"]][8, 8].tolist() == [255, 0, 0]  # first frame
    cmyk = images[by_path["cats/cmyk.jpg"]][8, 8]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60
    ok = rows.iloc[by_path["cats/ok dup.jpg"]]
    assert (ok["format"], ok["mode"], ok["width"], ok["height"]) == ("JPEG", "RGB", 40, 30)
    assert ok["bytes"] == (root / "cats" / "ok1.jpg").stat().st_size
    assert set(rows["batch_id"]) == {s.batch_id} and set(rows["split"]) == {"train"}

    saved = json.loads((tmp_path / "reports" / "ingest" / "train.json").read_text())
    assert saved["accepted"] == 9 and saved["batch_id"] == s.batch_id
    assert (tmp_path / "reports" / "ingest" / "batches" / f"{s.batch_id}.json").is_file()


def test_parallel_decode_matches_in_process(tmp_path):
    names = [f"c{i % 3}/img{i:03d}.png" for i in range(40)]
    write_images(tmp_path, names, size=24)
    (tmp_path / "c0" / "bad.png").write_text("nope")
    tasks = sorted([FileTask(str(p.relative_to(tmp_path)), str(p), None) for p in tmp_path.rglob("*.png")],
                   key=lambda t: t.rel)
    opts = DecodeOptions(size=16, min_side=8, max_pixels=10000, max_file_bytes=1 << 20)
    serial = list(decode_files(tasks, opts, set(), workers=1))
    parallel = list(decode_files(tasks, opts, set(), workers=2, chunk_size=4))
    assert [type(o) for o in serial] == [type(o) for o in parallel]
    assert sum(isinstance(o, Accepted) for o in parallel) == 40
    for a, b in zip(serial, parallel, strict=True):
        if isinstance(a, Accepted):
            assert a.sha256 == b.sha256 and np.array_equal(a.image, b.image)


# ------------------------------------------------------------------------------------ batches
def test_incremental_batches_add_only_new_files(tmp_path):
    incoming, store = tmp_path / "incoming", tmp_path / "store"
    write_images(incoming, [f"{c}/{i}.png" for c in ("a", "b") for i in range(3)])
    first = run(incoming, store, tmp_path)
    assert (first.accepted, first.duplicates, first.total_in_store) == (6, 0, 6)

    write_images(incoming, [f"{c}/new{i}.png" for c in ("a", "b") for i in range(2)], seed=1)
    shutil.copy(incoming / "a" / "0.png", incoming / "b" / "copy of a0.png")  # same bytes, new name
    t0 = time.perf_counter()
    second = run(incoming, store, tmp_path)
    assert (second.accepted, second.new_images, second.duplicates_in_store, second.duplicates_in_batch) == (4, 4, 7, 0)
    assert second.total_in_store == 10 and second.batch_id != first.batch_id
    assert second.data_version != first.data_version and second.previous_data_version == first.data_version
    rows = manifest.read(store / "train")
    assert rows["batch_id"].value_counts().to_dict() == {first.batch_id: 6, second.batch_id: 4}
    assert rows["sha256"].is_unique and len(ImageStore.open(store / "train")) == 10

    third = run(incoming, store, tmp_path)
    assert (third.status, third.accepted, third.duplicates) == ("unchanged", 0, 11)
    assert third.data_version == second.data_version
    assert time.perf_counter() - t0 < 60


def test_duplicates_across_splits_never_leak_into_test(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    write_images(src, [f"{c}/{i}.png" for c in ("a", "b") for i in range(3)])
    run(src, store, tmp_path, "train")
    test = run(src, store, tmp_path, "test")
    assert (test.accepted, test.duplicates_in_other_splits, test.status) == (0, 6, "unchanged")
    assert not (store / "test").exists()
    assert test.store_counts == {"train": 6}


def test_existing_store_keeps_its_size(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    write_images(src, ["a/0.png", "b/0.png"])
    run(src, store, tmp_path)
    with pytest.raises(StoreError, match="16x16"):
        ingest(str(src), store, "train", size=32, settings=params(), reports_dir=tmp_path / "r", log=lambda m: None)


# ------------------------------------------------------------------------------------ sources
def test_demo_source_labeled_splits_with_different_seeds(tmp_path):
    from sslflow.tasks.data.demo import CLASSES

    store = tmp_path / "store"
    p = params("ingest.demo_train_per_class=3", "ingest.demo_test_per_class=2")
    train = run("demo", store, tmp_path, "train", p=p)
    test = run("demo", store, tmp_path, "test", p=p)
    assert (train.accepted, test.accepted, test.duplicates) == (30, 20, 0)
    for split, n in (("train", 3), ("test", 2)):
        s = ImageStore.open(store / split)
        assert s.classes == list(CLASSES) and (s.height, s.width) == (16, 16)
        assert np.bincount(s.labels()).tolist() == [n] * 10
    again = run("demo", store, tmp_path, "train", p=p)
    assert (again.accepted, again.duplicates) == (0, 30)
    with pytest.raises(UserError, match="demo source has splits"):
        run("demo", store, tmp_path, "val", p=p)


def test_torchvision_source_fails_at_once_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLFLOW_OFFLINE", "1")
    p = params(f"ingest.torchvision_root={tmp_path / 'tv'}")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="offline") as e:
        run("torchvision:CIFAR10", tmp_path / "store", tmp_path, p=p)
    assert time.perf_counter() - t0 < 20 and "\n" not in str(e.value)
    assert not (tmp_path / "store").exists()
    with pytest.raises(UserError, match="no dataset 'NoSuchSet'"):
        run("torchvision:NoSuchSet", tmp_path / "store", tmp_path, p=p)


def test_torchvision_source_reads_a_dataset_without_network(tmp_path):
    s = run("torchvision:FakeData?size=12&image_size=[3,20,24]&num_classes=3", tmp_path / "store", tmp_path,
            p=params("validate.class_balance_tolerance=10"))
    assert (s.accepted, s.resized) == (12, 12)
    rows = manifest.read(tmp_path / "store" / "train")
    assert set(rows["format"]) == {"raw"} and set(rows["label"]) <= {"0", "1", "2"}
    assert (rows["width"].iloc[0], rows["height"].iloc[0]) == (24, 20)


def test_probe_of_a_closed_port_is_quick_and_false():
    from sslflow.tasks.data.sources import reachable

    t0 = time.perf_counter()
    assert not reachable("http://127.0.0.1:9/", timeout=2.0)
    assert time.perf_counter() - t0 < 3


def test_missing_source_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run(tmp_path / "nope", tmp_path / "store", tmp_path)
    with pytest.raises(UserError, match="split"):
        run("demo", tmp_path / "store", tmp_path, split="../evil")


# ------------------------------------------------------------------------------------ CLI
def test_cli_ingest_prints_summary_and_exit_codes(tmp_path, monkeypatch, capsys):
    from sslflow.cli import main

    src = tmp_path / "src"
    write_images(src, ["a/0.png", "b/0.png"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSLFLOW_PROJECT", str(tmp_path))  # reports/ go to the project
    code = main(["ingest", "--source", str(src), "--store", "data/store", "--no-dvc", "--set", "ingest.size=16"])
    out = capsys.readouterr()
    assert code == 0
    summary = json.loads(out.out)
    assert summary["accepted"] == 2 and summary["new_images"] == 2 and summary["data_version"].endswith(".dir")
    assert (tmp_path / "reports" / "ingest" / "train.json").is_file()
    code = main(["ingest", "--source", "missing", "--store", "data/store", "--no-dvc"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


CIFAR_CLASSES = ("airplane", "cat", "ship")


@pytest.fixture(scope="module")
def cifar10_test_subset(tmp_path_factory) -> Path:
    """Three classes of the real CIFAR-10 test JPEGs (3,000 files: seconds, not a minute)."""
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR10_ARCHIVE}")
    import tarfile

    root = tmp_path_factory.mktemp("cifar10")
    prefixes = tuple(f"cifar10/test/{c}/" for c in CIFAR_CLASSES)
    with tarfile.open(CIFAR10_ARCHIVE) as tar:
        tar.extractall(root, members=[m for m in tar if m.name.startswith(prefixes)], filter="data")
    return root / "cifar10" / "test"


@pytest.mark.cifar
def test_real_cifar10_jpegs_ingest_in_parallel_and_balanced(cifar10_test_subset, tmp_path):
    p = params("ingest.size=32", "ingest.min_side=16", "ingest.max_pixels=89478485")
    s = run(cifar10_test_subset, tmp_path / "store", tmp_path, p=p)  # 3,000 files: the process pool
    assert (s.accepted, s.quarantined, s.converted, s.resized) == (3000, [], {}, 0)
    store = ImageStore.open(tmp_path / "store" / "train")
    assert store.classes == list(CIFAR_CLASSES) and np.bincount(store.labels()).tolist() == [1000] * 3
    first = Image.open(cifar10_test_subset / "airplane" / "0000.jpg").convert("RGB")
    assert np.array_equal(store.images()[0], np.asarray(first))  # 32x32 stays pixel-exact
