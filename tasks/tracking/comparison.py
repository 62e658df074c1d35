"""A method comparison's side-by-side view: one row per trained method, as markdown, CSV, a chart.

The `compare` flow (`flows/compare.py`) trains several methods on one data version and
hands the finished rows here; these plain functions only format, so tests call them without
MLflow or Prefect. Method names and error texts come from users' settings and are escaped
for markdown.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sslflow.tasks.tracking.plots import pyplot, save_figure

#: (row key, column title, decimals) of the table, in order.
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("method", "method", 0),
    ("family", "family", 0),
    ("backbone", "backbone", 0),
    ("epochs", "epochs", 0),
    ("knn_top1", "kNN top-1", 1),
    ("linear_top1", "linear top-1", 1),
    ("knn_top1_at_init", "random-init kNN", 1),
    ("knn_gain", "kNN gain", 1),
    ("minutes", "minutes", 1),
    ("images_per_s", "images/s", 0),
)


def comparison_row(method: str, family: str, backbone: str, epochs: int, eval_metrics: Mapping[str, float],
                   pretrain_metrics: Mapping[str, float], minutes: float) -> dict[str, Any]:
    """One finished method: final kNN / linear top-1 (evaluation protocols), the kNN of the
    same encoder at random initialisation (online kNN at epoch 0, same protocol), the gain,
    the pretraining's wall-clock minutes and the engine's training images/s."""
    knn = float(eval_metrics.get("knn_top1", math.nan))
    init = float(pretrain_metrics.get("knn_top1_at_init", math.nan))
    return {"method": method, "family": family, "backbone": backbone, "epochs": int(epochs), "knn_top1": knn,
            "linear_top1": float(eval_metrics.get("linear_top1", math.nan)), "knn_top1_at_init": init,
            "knn_gain": knn - init, "minutes": float(minutes),
            "images_per_s": float(pretrain_metrics.get("images_per_s", math.nan)), "error": ""}


def failed_row(method: str, family: str, backbone: str, epochs: int, error: str, minutes: float) -> dict[str, Any]:
    """A method whose training or evaluation failed: its row says so instead of numbers."""
    row: dict[str, Any] = {key: math.nan for key, _, _ in COLUMNS}
    row.update(method=method, family=family, backbone=backbone, epochs=int(epochs), minutes=float(minutes),
               error=error.replace("\n", " ")[:300])
    return row


def _cell(value: Any, decimals: int) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{decimals}f}"
    return str(value)


def _escape(text: str) -> str:
    """Markdown table cell: HTML escaped, no pipe, link, code or emphasis syntax, one line."""
    text = html.escape(" ".join(text.split()))
    return "".join(f"\\{c}" if c in "\\`*[]|" else c for c in text)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a GitHub markdown table; a failed method's row names its error."""
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = [_escape(_cell(row.get(key, ""), decimals)) for key, _, decimals in COLUMNS]
        if row.get("error"):
            cells[4] = "failed: " + _escape(str(row["error"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def text_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as aligned plain text for a terminal."""
    grid = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        cells = [_cell(row.get(key, ""), decimals) for key, _, decimals in COLUMNS]
        if row.get("error"):
            cells[4] = f"failed: {row['error']}"[:60]
        grid.append(cells)
    widths = [max(len(r[i]) for r in grid) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in grid]
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV (machine-readable: full precision, empty for a missing figure, plus `error`)."""
    buf = io.StringIO()
    keys = [key for key, _, _ in COLUMNS] + ["error"]
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if isinstance(row.get(k), float) and math.isnan(row[k]) else row.get(k, "")
                         for k in keys})
    return buf.getvalue()


def plot_comparison(rows: Sequence[Mapping[str, Any]], histories: Mapping[str, Mapping[str, Any]],
                    out_path: str | Path) -> Path:
    """One PNG, three panels: online kNN top-1 over epochs per method (epoch 0 = random init),
    the final linear top-1 per method, and the training images/s per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for method, history in histories.items():
        pts = [e for e in history.get("epochs", []) if "knn_top1" in e]
        if pts:
            ax.plot([e["epoch"] for e in pts], [e["knn_top1"] for e in pts], "o-", ms=3, label=method)
    ax.set(xlabel="epoch (0 = random init)", ylabel="kNN top-1 (%)", title="online kNN per method")
    ax.grid(alpha=0.3)
    if histories:
        ax.legend(fontsize=7, ncol=2)
    names = [str(r["method"]) for r in rows]
    for ax, key, title in ((axes[1], "linear_top1", "final linear top-1 (%)"),
                           (axes[2], "images_per_s", "training images/s")):
        values = [0.0 if math.isnan(float(r.get(key, math.nan))) else float(r[key]) for r in rows]
        ax.bar(range(len(names)), values, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set(title=title)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, out_path)


def write_report(rows: Sequence[Mapping[str, Any]], histories: Mapping[str, Mapping[str, Any]], out_dir: str | Path,
                 header: str = "") -> dict[str, Path]:
    """`compare.md` (header + table), `compare.csv` and `compare.png` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "compare.md"
    md.write_text((header + "\n\n" if header else "") + markdown_table(rows))
    table = out_dir / "compare.csv"
    table.write_text(csv_table(rows))
    chart = plot_comparison(rows, histories, out_dir / "compare.png")
    return {"markdown": md, "csv": table, "chart": chart}


def parent_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-method figures as metrics of the parent run (`<method>/knn_top1`, ...), for sorting in the UI."""
    out = {}
    for row in rows:
        for key in ("knn_top1", "linear_top1", "knn_top1_at_init", "images_per_s", "minutes"):
            value = row.get(key)
            if isinstance(value, int | float) and not math.isnan(float(value)):
                out[f"{row['method']}/{key}"] = float(value)
    return out


__all__ = ["COLUMNS", "comparison_row", "csv_table", "failed_row", "markdown_table", "parent_metrics",
           "plot_comparison", "text_table", "write_report"]
