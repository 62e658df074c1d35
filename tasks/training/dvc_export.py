"""DVC-friendly views of a pretraining run: deterministic metrics and per-epoch curves.

`sslflow pretrain` writes `RUN_DIR/metrics.json` (quality *and* speed figures) and
`RUN_DIR/history.json` (`{"steps": [...], "epochs": [...]}`). DVC wants flat files:

- `metrics` file: `metrics.json` without the wall-clock keys (`train_seconds`,
  `images_per_s`), so a reproduced run on CPU gives a byte-identical file and
  `dvc metrics diff` shows only real changes;
- `loss.csv`: `epoch,loss,lr` for every trained epoch (epoch 0, the untrained encoder,
  has a kNN score but no loss);
- `knn.csv`: `epoch,knn_top1,knn_top5` for every epoch with an online kNN evaluation.

Used by the `pretrain` stage of `dvc.yaml`: `sslflow pretrain ... --metrics metrics/pretrain.json --plots plots`.
`evaluation_metrics` does the same for `sslflow evaluate --metrics`: only the numbers.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TIMING_KEYS = frozenset({"train_seconds", "images_per_s", "gpu_memory_gb"})
LOSS_COLUMNS = ("epoch", "loss", "lr")
KNN_COLUMNS = ("epoch", "knn_top1", "knn_top5")


def quality_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The run's metrics without wall-clock figures (these differ on every run)."""
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def epoch_rows(history: dict[str, Any], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of `history["epochs"]` that have every one of `columns`, in epoch order."""
    rows = [e for e in history.get("epochs", []) if all(c in e for c in columns)]
    return [{c: e[c] for c in columns} for e in sorted(rows, key=lambda e: e["epoch"])]


def write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:  # repr of floats round-trips exactly
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


def export(run_dir: str | Path, metrics_out: str | Path, plots_dir: str | Path) -> dict[str, Any]:
    """Write the metrics file and `loss.csv` / `knn.csv` for the run in `run_dir`."""
    run_dir, metrics_out, plots_dir = Path(run_dir), Path(metrics_out), Path(plots_dir)
    metrics = quality_metrics(json.loads((run_dir / "metrics.json").read_text()))
    history = json.loads((run_dir / "history.json").read_text())
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    metrics_out.write_text(json.dumps(metrics, indent=1) + "\n")
    write_csv(plots_dir / "loss.csv", LOSS_COLUMNS, epoch_rows(history, LOSS_COLUMNS))
    write_csv(plots_dir / "knn.csv", KNN_COLUMNS, epoch_rows(history, KNN_COLUMNS))
    return metrics


def evaluation_metrics(report: Any, metrics_out: str | Path) -> dict[str, float]:
    """The evaluation's numbers alone (`<protocol>_top1/_top5`, counts), for `dvc metrics` columns."""
    numbers = {k: v for k, v in report.to_json().items() if isinstance(v, int | float) and not isinstance(v, bool)}
    metrics_out = Path(metrics_out)
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    metrics_out.write_text(json.dumps(numbers, indent=1) + "\n")
    return numbers
