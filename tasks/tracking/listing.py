"""Recent runs as a table for a terminal: what the MLflow UI's runs table shows, for people in shells.

    rows = recent_runs(settings, limit=20)      # from the configured tracking URI, newest first
    print(format_runs(rows))

One row per run of the experiment `tracking.experiment`: its name, start, method, data version,
kNN and linear-probe top-1 (the evaluation's; the online kNN when there was no evaluation),
the promotion decision, and the registered version with its aliases (`v3 champion`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

KNN_KEYS = ("knn_top1", "eval/knn_top1", "pretrain/knn_top1")
LINEAR_KEYS = ("linear_top1", "eval/linear_top1")


@dataclass(frozen=True)
class RunRow:
    name: str
    started: str
    status: str
    method: str
    data_version: str
    knn: float | None
    linear: float | None
    decision: str
    model: str  # "v3 champion", "v2", "" when not registered

    def cells(self) -> list[str]:
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        status = "" if self.status == "FINISHED" else f" ({self.status.lower()})"
        return [self.name + status, self.started, self.method, self.data_version, pct(self.knn), pct(self.linear),
                self.decision, self.model]


HEADER = ["run", "started", "method", "data", "kNN", "linear", "decision", "model"]


def _first(metrics: dict[str, float], keys: Sequence[str]) -> float | None:
    return next((float(metrics[k]) for k in keys if k in metrics), None)


def version_aliases(client: Any, model_name: str) -> dict[str, list[str]]:
    """{version: [aliases]} of the registered model (empty when it does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(model_name)
    except MlflowException:
        return {}
    out: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return out


def recent_runs(settings: Any, limit: int = 20, client: Any = None) -> list[RunRow] | None:
    """The newest `limit` runs of the experiment, newest first; None when the experiment does
    not exist yet. The caller checks the server first (`check_tracking_server`)."""
    from mlflow import MlflowClient

    from sslflow.tasks.tracking.backend import resolve_tracking_uri
    from sslflow.tasks.tracking.run import outages_as_one_line

    uri = resolve_tracking_uri(settings)
    client = client or MlflowClient(tracking_uri=uri)
    cfg = settings.tracking
    with outages_as_one_line(uri, "listing the MLflow runs"):
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                  max_results=limit)
        aliases = version_aliases(client, cfg.model_name)
    rows = []
    for r in runs:
        tags, metrics = r.data.tags, r.data.metrics
        version = tags.get("model_version", "")
        model = f"v{version} {' '.join(sorted(aliases.get(version, [])))}".strip() if version else ""
        data = tags.get("data_version", "")
        rows.append(RunRow(
            name=r.info.run_name or r.info.run_id[:8],
            started=time.strftime("%Y-%m-%d %H:%M", time.localtime((r.info.start_time or 0) / 1000)),
            status=r.info.status, method=tags.get("method", "-"),
            data_version=data[:8] if data and data != "unknown" else "-",
            knn=_first(metrics, KNN_KEYS), linear=_first(metrics, LINEAR_KEYS),
            decision=tags.get("promotion.decision", "-"), model=model or "-"))
    return rows


def format_runs(rows: Sequence[RunRow]) -> str:
    """A plain text table, columns as wide as their widest cell; numbers right-aligned."""
    table = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    numeric = {HEADER.index("kNN"), HEADER.index("linear")}
    lines = []
    for row in table:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
