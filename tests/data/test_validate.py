"""Great Expectations suites: what passes, what fails (named with rows), and the failure path."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sslflow.core.sections import ValidateConfig
from sslflow.core.settings import load_settings
from sslflow.ssl_models.store import ImageStore
from sslflow.tasks.data import manifest
from sslflow.tasks.data.decode import Accepted, DecodeOptions
from sslflow.tasks.data.ingest import ingest
from sslflow.tasks.data.validate import ValidationFailed, validate

LIMITS = DecodeOptions(size=16, min_side=8, max_pixels=10000, max_file_bytes=1 << 20)
CFG = ValidateConfig(max_quarantined_fraction=0.05, class_balance_tolerance=0.5, allow_new_classes=True)
BASE = ["ingest.size=16", "ingest.min_side=8", "versioning.dvc=off"]


def rows(labels: list[str | None], shas: list[str] | None = None, width: int = 20) -> pd.DataFrame:
    shas = shas or [f"{i:064x}" for i in range(len(labels))]
    records = [Accepted(f"img{i}.png", y, s, 100, "PNG", width, 20, "RGB", 1, np.zeros((0, 0, 3), np.uint8))
               for i, (y, s) in enumerate(zip(labels, shas, strict=True))]
    return manifest.batch_frame(records, [("shard0", i) for i in range(len(records))], source="t",
                                split="train", batch_id="b1", ingested_at=datetime.now(timezone.utc))


def scan(accepted: int, quarantined: int) -> pd.DataFrame:
    data = [(f"ok{i}.png", "accepted", None) for i in range(accepted)]
    data += [(f"bad{i}.png", "quarantined", "truncated") for i in range(quarantined)]
    return pd.DataFrame(data, columns=["path", "status", "reason"]).astype("string")


def test_a_clean_batch_passes_and_writes_json_and_data_docs(tmp_path):
    result = validate(manifest=rows(["a", "b", "a", "b", None]), split="train", limits=LIMITS, cfg=CFG,
                      classes=["a", "b"], reports_dir=tmp_path, scan=scan(5, 0))
    assert result.success and result.failures == []
    report = json.loads((tmp_path / "validation" / "train.json").read_text())
    assert report["success"] and set(report["suites"]) == {"train-scan", "train-manifest", "train-classes"}
    assert (tmp_path / "data_docs" / "index.html").is_file()
    assert list((tmp_path / "data_docs" / "validations").rglob("*.html"))


def test_failures_name_the_expectations_and_rows(tmp_path):
    shas = ["1" * 64, "1" * 64, "2" * 64, "3" * 64, "4" * 64, "5" * 64]
    df = rows(["a", "a", "a", "a", "b", "zebra"], shas)
    df.loc[2, "width"] = 4  # under min_side
    result = validate(manifest=df, split="train", limits=LIMITS, cfg=CFG, classes=["a", "b"],
                      reports_dir=tmp_path, scan=scan(10, 2))
    assert not result.success
    failed = {(f.suite, f.expectation, f.column) for f in result.failures}
    assert failed == {
        ("train-scan", "expect_column_values_to_be_in_set", "status"),
        ("train-manifest", "expect_column_values_to_be_unique", "sha256"),
        ("train-manifest", "expect_column_values_to_be_between", "width"),
        ("train-manifest", "expect_column_values_to_be_in_set", "label"),
    }
    # the train split's class balance is a warning (validate.class_balance_warn_splits), not a gate
    assert [(w.suite, w.column) for w in result.warnings] == [("train-classes", "ratio_to_mean")]
    message = result.message()
    assert "\n" not in message
    for needle in ("bad0.png", "bad1.png", "reason=truncated", "16.7%", "at most 5.0% allowed", "img0.png",
                   "img1.png", "img5.png", "zebra", "img2.png"):
        assert needle in message, needle
    assert json.loads(result.report.read_text())["success"] is False


def test_an_empty_source_fails(tmp_path):
    result = validate(manifest=rows([]), split="train", limits=LIMITS, cfg=CFG, classes=None,
                      reports_dir=tmp_path, scan=scan(0, 0))
    assert [f.expectation for f in result.failures] == ["expect_table_row_count_to_be_between"]


def write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / name)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_threshold_exceeded_stops_the_batch_and_leaves_the_store_unchanged(tmp_path):
    src, store = tmp_path / "incoming", tmp_path / "store"
    write_images(src, [f"{c}/{i}.png" for c in ("a", "b") for i in range(5)])
    p = load_settings([], BASE)
    first = ingest(str(src), store, "train", settings=p, reports_dir=tmp_path / "reports", log=lambda m: None)
    before = tree_digest(store)

    write_images(src, [f"{c}/new{i}.png" for c in ("a", "b") for i in range(3)], seed=1)
    (src / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    (src / "b" / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValidationFailed) as e:
        ingest(str(src), store, "train", settings=p, reports_dir=tmp_path / "reports", log=lambda m: None)
    message = str(e.value)
    assert "was not added" in message and "expect_column_values_to_be_in_set(status)" in message
    assert "a/broken.png" in message and "b/empty.jpg" in message and "\n" not in message
    assert tree_digest(store) == before  # no shard, manifest row or index change
    assert len(ImageStore.open(store / "train")) == 10
    summary = json.loads((tmp_path / "reports" / "ingest" / "train.json").read_text())
    assert summary["status"] == "failed" and summary["data_version"] == first.data_version
    assert summary["validation"]["success"] is False and first.status == "published"

    # raising the threshold lets the same batch in: only the 6 new images
    loose = load_settings([], [*BASE, "validate.max_quarantined_fraction=0.2"])
    ok = ingest(str(src), store, "train", settings=loose, reports_dir=tmp_path / "reports", log=lambda m: None)
    assert (ok.accepted, ok.duplicates, len(ok.quarantined)) == (6, 10, 2)


def test_a_failed_first_batch_leaves_no_store(tmp_path):
    src = tmp_path / "src"
    write_images(src, ["a/0.png"])
    (src / "a" / "bad.png").write_text("no")
    with pytest.raises(ValidationFailed):
        ingest(str(src), tmp_path / "store", "train", settings=load_settings([], BASE),
               reports_dir=tmp_path / "reports", log=lambda m: None)
    assert not (tmp_path / "store").exists()


def test_validate_command_gates_a_published_split(tmp_path, monkeypatch, capsys):
    from sslflow.cli import main

    src = tmp_path / "src"
    write_images(src, [*(f"a/{i}.png" for i in range(4)), "b/0.png"])
    monkeypatch.chdir(tmp_path)
    assert main(["ingest", "--source", "src", "--store", "store", "--split", "test", "--no-dvc", "--set",
                 "ingest.size=16", "--set", "validate.class_balance_tolerance=2"]) == 0
    capsys.readouterr()
    assert main(["validate", "--store", "store", "--split", "test", "--set", "validate.class_balance_tolerance=2"]) == 0
    assert json.loads(capsys.readouterr().out)["success"]
    assert main(["validate", "--store", "store", "--split", "test"]) == 2  # 4 vs 1 images: beyond +-50%
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ratio_to_mean" in err and "b [" in err



def test_class_balance_counts_labeled_images_only_and_gates_the_test_split_alone(tmp_path, capsys):
    """A batch of a new class in a train split whose other classes are large: a warning (one line),
    not a rejection; unlabeled images count for no class; the test split stays gated."""
    labels = ["a"] * 8 + ["b"] * 8 + ["new"] + [None] * 40
    train = validate(manifest=rows(labels), split="train", limits=LIMITS, cfg=CFG, classes=None,
                     reports_dir=tmp_path)
    assert train.success and [w.suite for w in train.warnings] == ["train-classes"]
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "new [" in warned[0] and "count=1]" in warned[0]
    assert "class_balance_warn_splits" in warned[0]
    balanced_but_unlabeled = rows(["a"] * 8 + ["b"] * 8 + [None] * 40)
    assert not validate(manifest=balanced_but_unlabeled, split="train", limits=LIMITS, cfg=CFG, classes=None,
                        reports_dir=tmp_path).warnings
    test = validate(manifest=rows(labels).assign(split="test"), split="test", limits=LIMITS, cfg=CFG,
                    classes=None, reports_dir=tmp_path)
    assert not test.success and [f.suite for f in test.failures] == ["test-classes"]
