"""The `sslflow` command line: happy paths and one-line errors with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import FAST
from sslflow.cli import main
from sslflow.ssl_models.store import ImageStore

FAST_SET = [arg for item in FAST for arg in ("--set", item)]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(capsys, *argv: str, match: str) -> None:
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]


def test_pretrain_then_evaluate(tmp_path, capsys, demo_stores):
    run = tmp_path / "run"
    code, out, _ = _run(capsys, "pretrain", "--data", str(demo_stores["train"]), "--out", str(run),
                        "--eval-train", str(demo_stores["train"]), "--eval-test", str(demo_stores["test"]),
                        "--no-progress", *FAST_SET, "--set", "pretrain.epochs=1")
    assert code == 0 and (run / "encoder.pt2").is_file() and '"knn_top1"' in out
    code, out, _ = _run(capsys, "evaluate", "--encoder", str(run), "--train", str(demo_stores["train"]),
                        "--test", str(demo_stores["test"]), "--protocol", "knn,linear", *FAST_SET)
    assert code == 0 and "knn_top1" in out and "linear_top1" in out and "finetune" not in out
    report = json.loads((run / "evaluation.json").read_text())
    assert {"knn_top1", "knn_top5", "linear_top1", "linear_top5"} <= set(report)
    assert not any(k.startswith("finetune") for k in report)
    # --resume of a finished run is a no-op that rewrites the same encoder
    code, _, _ = _run(capsys, "pretrain", "--data", str(demo_stores["train"]), "--out", str(run), "--resume",
                      "--no-progress", *FAST_SET, "--set", "pretrain.epochs=1")
    assert code == 0


def test_pretrain_accepts_an_image_folder(tmp_path, capsys):
    from sslflow.tasks.data.demo import write_demo_folder

    folder = write_demo_folder(tmp_path / "imgs", n_per_class=4, size=16)
    code, _, err = _run(capsys, "pretrain", "--data", str(folder), "--out", str(tmp_path / "run"), "--no-progress",
                        *FAST_SET, "--set", "pretrain.epochs=1", "--set", "pretrain.eval_every=0")
    assert code == 0, err
    assert len(ImageStore.open(tmp_path / "run" / "data-cache" / "imgs-store" / "images")) == 40


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, demo_stores):
    train, test = str(demo_stores["train"]), str(demo_stores["test"])
    _one_line_error(capsys, "pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
                    match="does not exist")
    _one_line_error(capsys, "pretrain", "--data", train, "--out", str(tmp_path / "r"), "--set", "pretrain.lrr=1",
                    match="unknown setting pretrain.lrr (did you mean pretrain.lr?)")
    _one_line_error(capsys, "pretrain", "--data", train, "--out", str(tmp_path / "r"), "--set",
                    "pretrain.method=swav9", match="pretrain.method must be one of")
    _one_line_error(capsys, "pretrain", "--data", train, "--out", str(tmp_path / "r"), *FAST_SET,
                    "--set", "pretrain.batch_size=1024", match="fewer than one batch of 1024")
    _one_line_error(capsys, "pretrain", "--data", train, "--out", str(tmp_path / "r"), "--params",
                    str(tmp_path / "missing.yaml"), match="missing.yaml does not exist")
    _one_line_error(capsys, "pretrain", "--data", train, "--out", str(tmp_path / "r"), "--eval-train", train,
                    match="needs both --eval-train and --eval-test")
    _one_line_error(capsys, "evaluate", "--encoder", str(tmp_path), "--train", train, "--test", test,
                    match="holds no encoder.pt")


def test_evaluate_rejects_unlabeled_or_empty_sets_and_bad_protocols(tmp_path, capsys, demo_stores):
    run = tmp_path / "run"
    assert _run(capsys, "pretrain", "--data", str(demo_stores["train"]), "--out", str(run), "--no-progress",
                *FAST_SET, "--set", "pretrain.epochs=1", "--set", "pretrain.eval_every=0")[0] == 0
    unlabeled = ImageStore.create(tmp_path / "unlabeled", 16, 16)
    unlabeled.add(np.zeros((4, 16, 16, 3), np.uint8), [None] * 4)
    empty = ImageStore.create(tmp_path / "empty", 16, 16)
    train = str(demo_stores["train"])
    _one_line_error(capsys, "evaluate", "--encoder", str(run), "--train", train, "--test", str(unlabeled.root),
                    *FAST_SET, match="label")
    _one_line_error(capsys, "evaluate", "--encoder", str(run), "--train", train, "--test", str(empty.root),
                    *FAST_SET, match="empty")
    _one_line_error(capsys, "evaluate", "--encoder", str(run), "--train", train, "--test", train,
                    "--protocol", "knn,svm", match="unknown protocol 'svm'")


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "sslflow" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_options_are_never_abbreviated(capsys):
    """`--sourc demo` must not silently become `--source demo` and start the whole job."""
    with pytest.raises(SystemExit) as e:
        main(["run", "--sourc", "demo"])
    assert e.value.code == 2 and "unrecognized arguments: --sourc" in capsys.readouterr().err


def test_settings_command_shows_the_resolved_tree(capsys, tmp_path):
    import yaml

    code, out, _ = _run(capsys, "settings", "--project", str(tmp_path), "--set", "pretrain.lr=0.3")
    assert code == 0 and yaml.safe_load(out)["pretrain"]["lr"] == 0.3
    code, out, _ = _run(capsys, "settings", "--flat", "--set", "pretrain.method=moco")
    assert code == 0 and "pretrain.moco.queue_size=4096" in out.splitlines()
    code, out, _ = _run(capsys, "settings", "--reference")
    assert code == 0 and "| `pretrain.moco.queue_size` |" in out
