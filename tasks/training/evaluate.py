"""The evaluate step: kNN, linear probe and fine-tune of a pretrained encoder."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError
from sslflow.core.settings import Settings
from sslflow.ssl_models.checkpoint import load_encoder
from sslflow.ssl_models.evaluate import EvalReport
from sslflow.ssl_models.evaluate import evaluate as run_protocols
from sslflow.ssl_models.train import resolve_device
from sslflow.tasks.data.folders import open_images

log = logging.getLogger("sslflow")


def evaluate(encoder_dir: str | Path, train: str | Path, test: str | Path, settings: Settings,
             protocols: Sequence[str] | None = None, output: str | Path | None = None) -> EvalReport:
    """Evaluate the encoder saved in `encoder_dir` on a labeled train/test pair.

    Images are normalised with the statistics the encoder was trained with (saved beside
    its weights), whatever `augment.mean/std` say now. Writes the report as JSON to `output`
    (default `encoder_dir/evaluation.json`, flat `<protocol>_top1/_top5` keys first) and the
    linear-probe confusion matrix beside it (`evaluation-confusion.json`).
    """
    encoder_dir = Path(encoder_dir)
    if not (encoder_dir / "encoder.pt").is_file() and not encoder_dir.is_file():
        raise UserError(f"{encoder_dir} holds no encoder.pt (has its pretraining finished? "
                        "continue it with `sslflow pretrain --resume`)")
    encoder, meta = load_encoder(encoder_dir)
    protocols = list(protocols or settings.eval.protocols)
    cache = (encoder_dir if encoder_dir.is_dir() else encoder_dir.parent) / "data-cache"
    train_store, test_store = open_images(train, cache, settings), open_images(test, cache, settings)
    check_sizes(meta, train_store, test_store)
    aug = dataclasses.replace(settings.augment, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    device = resolve_device(settings.device)
    report = run_protocols(encoder, train_store, test_store, protocols, settings.eval, aug, device, settings.seed)
    out = Path(output) if output else (encoder_dir if encoder_dir.is_dir() else encoder_dir.parent) / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_json(), indent=1))
    confusion = report.confusion_json()
    if confusion is not None:
        out.with_name(f"{out.stem}-confusion.json").write_text(json.dumps(confusion))
    return report


def check_sizes(meta: dict, train: Any, test: Any) -> None:
    """Train and test images of one size (refused otherwise); a warning line when it is not the
    size the encoder was trained at (its features are then out of distribution)."""
    if (train.height, train.width) != (test.height, test.width):
        raise UserError(f"the train images are {train.height}x{train.width} px and the test images "
                        f"{test.height}x{test.width}: ingest both splits at one size")
    trained = meta.get("image_size")
    if trained and int(trained) != train.height:
        log.warning("the encoder was trained on %s px images and is evaluated on %d px ones: expect lower "
                    "accuracy (re-ingest at %s px, or pretrain at this size)", trained, train.height, trained)
