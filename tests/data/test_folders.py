"""An image folder given where a store is expected goes through ingest (quarantine, dedupe, validation)."""

from __future__ import annotations

import pytest
from PIL import Image

from helpers import fast_params
from sslflow.ssl_models.store import StoreError
from sslflow.tasks.data.folders import open_images


def test_a_folder_becomes_a_store_through_ingest(tmp_path):
    root = tmp_path / "imgs"
    (root / "red").mkdir(parents=True)
    (root / "blue").mkdir()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(root / "red" / "a.png")
    Image.new("RGB", (32, 24), (0, 0, 255)).save(root / "blue" / "b.JPG")
    Image.new("L", (16, 16), 128).save(root / "loose.png")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(root / "red" / "copy.png")  # the same bytes as a.png
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    settings = fast_params("ingest.size=16", "validate.max_quarantined_fraction=0.5",
                           "validate.class_balance_tolerance=10")
    store = open_images(root, tmp_path / "cache", settings)
    assert sorted(store.classes) == ["blue", "red"]
    labels = [store.classes[i] if i >= 0 else None for i in store.labels()]
    assert sorted(map(str, labels)) == ["None", "blue", "red"]
    images = store.images()
    assert images.shape == (3, 16, 16, 3)  # ingest.size; the duplicate and the broken file are not in
    red = images[labels.index("red")]
    assert red[8, 8, 0] == 255 and red[8, 8, 2] == 0
    report = (tmp_path / "cache" / "imgs-store" / "reports" / "ingest" / "images.json").read_text()
    assert "broken.jpg" in report  # quarantined, with its reason
    # a second call only hashes the files: the same store, nothing added
    again = open_images(root, tmp_path / "cache", settings)
    assert again.root == store.root and len(again) == 3
    # an image added to the folder is picked up by the next call
    Image.new("RGB", (16, 16), (0, 255, 0)).save(root / "red" / "b.png")
    assert len(open_images(root, tmp_path / "cache", settings)) == 4


def test_missing_or_empty_folders_are_one_line_errors(tmp_path):
    settings = fast_params()
    with pytest.raises(StoreError, match="does not exist"):
        open_images(tmp_path / "nope", tmp_path / "cache", settings)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match=r"row_count.*observed 0|holds no images"):
        open_images(tmp_path / "empty", tmp_path / "cache", settings)
