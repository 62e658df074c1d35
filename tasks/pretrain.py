"""The pretrain step: a plain function (Prefect wraps it later), used by the CLI and DVC."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ssl_models.config import Params
from ssl_models.store import open_images
from ssl_models.train import Callback, Pretrainer, PretrainResult
from sslflow.errors import UserError


def pretrain(data: str | Path, out: str | Path, params: Params, *, resume: bool = False,
             eval_train: str | Path | None = None, eval_test: str | Path | None = None,
             callbacks: Sequence[Callback] = (), progress_bar: bool = True) -> PretrainResult:
    """Pretrain an encoder on `data` (a store or an image folder) into run directory `out`.

    With `eval_train` and `eval_test` (labeled stores or folders) the run reports online kNN
    accuracy every `pretrain.eval_every` epochs. Writes `out/checkpoints/last.pt`,
    `out/encoder.pt` (+ `encoder.pt2`), `out/metrics.json` and `out/history.json`.
    """
    out = Path(out)
    if (eval_train is None) != (eval_test is None):
        raise UserError("online kNN needs both --eval-train and --eval-test")
    cache = out / "data-cache"
    store = open_images(data, cache)
    eval_stores = None
    if eval_train is not None and eval_test is not None:
        eval_stores = (open_images(eval_train, cache), open_images(eval_test, cache))
    try:
        trainer = Pretrainer(store, params, out, resume=resume, callbacks=callbacks,
                             eval_stores=eval_stores, progress_bar=progress_bar)
    except ValueError as e:  # bad combination of data and params: the user can fix it
        raise UserError(str(e)) from None
    return trainer.fit()
