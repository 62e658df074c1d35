"""`log_training`: everything people look at after a run, into its MLflow run, in one call."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError
from sslflow.tasks.tracking.datasets import log_store_inputs
from sslflow.tasks.tracking.plots import plot_augmented_views, plot_confusion, plot_curves, plot_embedding_map
from sslflow.tasks.tracking.run import TrackedRun, flat_params

#: The evaluation metrics also logged under their own names: the obvious columns to add and sort
#: by in the MLflow runs table (and what `sslflow runs` shows).
TOP_LEVEL_METRICS = ("knn_top1", "linear_top1", "finetune_top1")


def log_training(run: TrackedRun, run_dir: str | Path, params: Any, eval_report: Any = None, *,
                 train_store: Any = None, test_store: Any = None,
                 gx_report: str | Path | Sequence[str | Path] | None = None,
                 extra_artifacts: Sequence[str | Path] = (), data_version: str | None = None) -> dict[str, Any]:
    """Everything people look at after a run, into `run`:

    - metrics: `pretrain/<key>` from `metrics.json`, `eval/<key>` from `eval_report.metrics`,
      and `knn_top1`, `linear_top1`, `finetune_top1` (the evaluation's) as top-level metrics;
    - dataset inputs: the train split (context `training`) and the test split (`evaluation`),
      digest = the data version (`data_version`, else the run's, else computed; see
      `sslflow.tasks.tracking.datasets`), when they are given as paths;
    - artifacts: `params/params.yaml` (every resolved setting, a file `--params` accepts) +
      `params.json` (the engine's dotted keys), `plots/loss.png`,
      `plots/knn.png`, `plots/augmented_views.png` (needs `train_store`),
      `plots/embedding_map.png` (needs `test_store`), `evaluation/evaluation.json`,
      `evaluation/confusion.json` + `plots/confusion.png` (linear probe), `gx/` (the GX report
      files or directories), run-dir `metrics.json`/`history.json`, and the method's own
      pictures (`visuals/*.png`, e.g. reconstructions) as `plots/method/`.

    `train_store`/`test_store` are `ImageStore`s or paths. Returns the logged metric dict.
    """
    import yaml

    from sslflow.ssl_models.store import ImageStore

    run_dir = Path(run_dir)
    cfg = run.config
    logged: dict[str, Any] = {}
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        pre = json.loads(metrics_file.read_text())
        run.log_metrics(pre, prefix="pretrain/")
        logged.update({f"pretrain/{k}": v for k, v in pre.items()})
    if eval_report is not None:
        ev = {k: float(v) for k, v in eval_report.metrics.items() if not math.isnan(float(v))}
        run.log_metrics(ev, prefix="eval/")
        logged.update({f"eval/{k}": v for k, v in ev.items()})
        top = {k: ev[k] for k in TOP_LEVEL_METRICS if k in ev}
        run.log_metrics(top)
        logged.update(top)
    stores = {k: s for k, s in (("train_store", train_store), ("test_store", test_store)) if isinstance(s, str | Path)}
    if stores:
        log_store_inputs(run, data_version or run.data_version, getattr(params, "project", None), **stores)

    def _store(s: Any) -> Any:
        return ImageStore.open(s) if isinstance(s, str | Path) else s

    with tempfile.TemporaryDirectory(prefix="sslflow-mlflow-") as tmp:
        tmp = Path(tmp)
        (tmp / "params").mkdir()
        nested = params.nested() if params is not None else {}
        (tmp / "params" / "params.yaml").write_text(yaml.safe_dump(nested, sort_keys=False))
        (tmp / "params" / "params.json").write_text(json.dumps(flat_params(params) if params else {}, indent=1))
        plots = tmp / "plots"
        history_file = run_dir / "history.json"
        if history_file.is_file():
            plot_curves(json.loads(history_file.read_text()), plots)
        if train_store is not None and params is not None and cfg.augment_grid_images > 0:
            plot_augmented_views(_store(train_store), params, plots / "augmented_views.png",
                                 cfg.augment_grid_images)
        if test_store is not None and cfg.embedding_map and (run_dir / "encoder.pt").is_file():
            plot_embedding_map(run_dir, _store(test_store), plots / "embedding_map.png",
                               seed=params.seed if params is not None else 0)
        if eval_report is not None:
            (tmp / "evaluation").mkdir()
            (tmp / "evaluation" / "evaluation.json").write_text(json.dumps(eval_report.to_json(), indent=1))
            confusion = eval_report.confusion_json()
            if confusion is not None:
                (tmp / "evaluation" / "confusion.json").write_text(json.dumps(confusion))
                plot_confusion(confusion, plots / "confusion.png")
        run.log_artifact(tmp / "params", "params")
        if plots.is_dir():
            run.log_artifact(plots, "plots")
        if (tmp / "evaluation").is_dir():
            run.log_artifact(tmp / "evaluation", "evaluation")
    for name in ("metrics.json", "history.json"):
        run.log_artifact(run_dir / name, "run")
    if (run_dir / "visuals").is_dir():  # what the method shows of itself: reconstructions, colorizations, ...
        run.log_artifact(run_dir / "visuals", "plots/method")
    if gx_report is not None:
        for p in [gx_report] if isinstance(gx_report, str | Path) else gx_report:
            p = Path(p)
            if not p.exists():
                raise UserError(f"GX report {p} does not exist")
            run.log_artifact(p, f"gx/{p.name}" if p.is_dir() else "gx")
    for p in extra_artifacts:
        run.log_artifact(p)
    return logged
