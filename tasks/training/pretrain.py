"""The pretrain step: a plain function (Prefect wraps it later), used by the CLI, flows and DVC.

Under `torchrun --nproc-per-node N` every rank calls it: the process group is joined from
torchrun's environment for the duration of the call (and left afterwards), rank 0 ingests an
image folder into the store cache before the others open it, and only rank 0 reports and
writes (see `sslflow.ssl_models.train`). Without torchrun it is a plain single-process run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sslflow.core.errors import UserError
from sslflow.core.settings import Settings
from sslflow.ssl_models import distributed
from sslflow.ssl_models.store import ImageStore
from sslflow.ssl_models.train import Callback, Pretrainer, PretrainResult, resolve_device
from sslflow.tasks.data.folders import open_images


def pretrain(data: str | Path, out: str | Path, settings: Settings, *, resume: bool = False,
             eval_train: str | Path | None = None, eval_test: str | Path | None = None,
             callbacks: Sequence[Callback] = (), progress_bar: bool = True) -> PretrainResult:
    """Pretrain an encoder on `data` (a store or an image folder) into run directory `out`.

    With `eval_train` and `eval_test` (labeled stores or folders) the run reports online kNN
    accuracy every `pretrain.eval_every` epochs. Writes `out/checkpoints/last.pt`,
    `out/encoder.pt` (+ `encoder.pt2`), `out/metrics.json` and `out/history.json`. Bad
    settings or data raise the engine's errors (`ConfigError`, `RunStateError`, `StoreError`).
    """
    out = Path(out)
    if (eval_train is None) != (eval_test is None):
        raise UserError("online kNN needs both --eval-train and --eval-test")
    device = resolve_device(settings.device)
    with distributed.process_group(device):
        with distributed.main_first():  # two ranks must not write the same folder cache at once
            store, eval_stores = _open_stores(data, out / "data-cache", eval_train, eval_test, settings)
        trainer = Pretrainer(store, settings, out, resume=resume, callbacks=callbacks,
                             eval_stores=eval_stores, progress_bar=progress_bar)
        return trainer.fit()


def _open_stores(data: str | Path, cache: Path, eval_train: str | Path | None, eval_test: str | Path | None,
                 settings: Settings) -> tuple[ImageStore, tuple[ImageStore, ImageStore] | None]:
    update = distributed.is_main()
    store = open_images(data, cache, settings, update=update)
    if eval_train is None or eval_test is None:
        return store, None
    return store, (open_images(eval_train, cache, settings, update=update),
                   open_images(eval_test, cache, settings, update=update))
