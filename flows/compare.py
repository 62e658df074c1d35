"""The `compare` flow: several methods on one data version with one budget, side by side in MLflow.

    from sslflow.flows.compare import compare_flow
    summary = compare_flow(["simclr", "byol", "mae"])                     # each with its demo profile
    summary = compare_flow(["simclr", "byol"], params_files=["params/profiles/cifar10-simclr.yaml"], epochs=100)

One parent MLflow run (`sslflow.kind=compare`) holds one child run per method (nested:
`mlflow.parentRunId`), each a full training run (params, per-epoch curves, plots, evaluation)
on the same store and data version. Each method's settings: `tasks/pipeline/comparison.py`.
The parent gets the side-by-side table (`comparison/compare.md`, `compare.csv`), the chart
(`comparison/compare.png`: online kNN over epochs, final linear top-1, images/s per method)
and per-method metrics (`<method>/knn_top1`, ...); the flow ends with the table as a markdown
artifact. The baseline of every row is the kNN of the same encoder at random initialisation
(the online kNN at epoch 0). A method that fails (a diverged loss, ...) is a failed child run
and a row that says so; the others still train. Nothing is registered: a comparison informs
the choice of a method, the `train` flow and its promotion gate make models.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact


@flow(name="compare", log_prints=True)
def compare_flow(methods: list[str] | str, data: str | None = None, eval_train: str | None = None,
                 eval_test: str | None = None, params_files: list[str] | None = None,
                 overrides: list[str] | None = None, epochs: int | None = None, run_name: str | None = None,
                 runs_dir: str | None = None, report_dir: str | None = None, data_version: str | None = None,
                 progress_bar: bool = False, project: str | None = None) -> dict[str, Any]:
    """Train and evaluate (kNN + linear probe) each of `methods` as a child run of one parent.

    `data` None = `pipeline.store`/train (eval-train = `data`, eval-test = `pipeline.store`/test);
    `params_files` None = each method's demo profile; `overrides` (`--set` strings) and
    `epochs` apply to every method. `report_dir`: also write the table and chart there.
    """
    from sslflow.core.errors import ServiceUnavailable
    from sslflow.core.project import run_name as checked_run_name
    from sslflow.core.secrets import redact_uri
    from sslflow.core.settings import load_settings
    from sslflow.tasks.data.versioning import store_data_version
    from sslflow.tasks.pipeline.comparison import eval_inputs, parse_methods, plan
    from sslflow.tasks.pipeline.decisions import md
    from sslflow.tasks.tracking.backend import check_tracking_server, resolve_tracking_uri
    from sslflow.tasks.tracking.comparison import markdown_table, parent_metrics, text_table, write_report
    from sslflow.tasks.tracking.run import tracking_run

    logger = get_run_logger()
    overrides = list(overrides or [])
    base = load_settings(params_files, overrides, project=project)
    names = parse_methods(methods)
    children = plan(names, base, params_files, overrides, epochs)  # every bad setting: one line, before any work
    train, ev_train, ev_test = eval_inputs(base, data, eval_train, eval_test)
    data_version = data_version or store_data_version(train.parent)
    name = checked_run_name(run_name)
    run_root = base.path(runs_dir or base.pipeline.runs) / name
    uri = resolve_tracking_uri(base)
    check_tracking_server(uri, base.tracking.preflight_timeout_s)

    rows: list[dict[str, Any]] = []
    histories: dict[str, dict[str, Any]] = {}
    budget = f"{epochs} epochs each" if epochs else "each method's own epochs"
    header = (f"Methods compared on {md(train)} (data version {md(data_version or 'unknown')}), "
              f"{md(budget)}; kNN/linear on {md(ev_train)} -> {md(ev_test)}.")
    with tracking_run(base, run_name=name, data_version=data_version, check=False, log_params=False,
                      tags={"sslflow.kind": "compare", "method": "compare", "compare.methods": ",".join(names),
                            "compare.budget": budget}) as parent:
        parent.client.log_param(parent.run_id, "compare.methods", ",".join(names))
        parent.client.log_param(parent.run_id, "compare.settings",
                                ", ".join(map(str, params_files)) if params_files else "demo profiles")
        parent.client.log_param(parent.run_id, "compare.epochs", str(epochs or "profile"))
        logger.info("compare %s on %s (data version %s), MLflow run %s on %s", ",".join(names), train,
                    data_version or "unknown", parent.run_id, redact_uri(uri))
        for i, child in enumerate(children, start=1):
            print(f"[{i}/{len(children)}] {child.method} ({child.family}): {child.settings.pretrain.epochs} "
                  f"epochs, settings {child.source}", flush=True)
            try:
                row, history = _train_child(child, name, run_root / child.method, train, ev_train, ev_test,
                                            data_version, progress_bar)
            except ServiceUnavailable:
                raise  # the tracking server is gone: no use training the others
            except Exception as e:  # one failed method is a failed child run and a row; the others still train
                from sslflow.tasks.tracking.comparison import failed_row
                from sslflow.tasks.tracking.run import backbone_label

                logger.error("compare: %s failed: %s", child.method, e)
                row, history = failed_row(child.method, child.family, backbone_label(child.settings),
                                          child.settings.pretrain.epochs, f"{type(e).__name__}: {e}", 0.0), {}
            rows.append(row)
            if history:
                histories[child.method] = history
            print(text_table([row]).splitlines()[-1], flush=True)
            if report_dir:  # as each method finishes: a long comparison stopped midway keeps its table
                write_report(rows, histories, report_dir, header=header)
        with tempfile.TemporaryDirectory(prefix="sslflow-compare-") as tmp:
            files = write_report(rows, histories, tmp, header=header)
            parent.log_artifact(Path(tmp), "comparison")
        parent.log_metrics(parent_metrics(rows))

    table = markdown_table(rows)
    create_markdown_artifact(f"# compare: {md(name)}\n\n{header}\n\n{table}", key="compare-report",
                             description="side-by-side table of the latest method comparison")
    return {"rows": rows, "table": table, "text_table": text_table(rows), "mlflow_run_id": parent.run_id,
            "tracking_uri": uri, "run_dir": str(run_root), "data_version": data_version,
            "failed": [r["method"] for r in rows if r.get("error")],
            "artifacts": sorted(p.name for p in files.values())}


def _train_child(child: Any, parent_name: str, run_dir: Path, train: Path, ev_train: Path, ev_test: Path,
                 data_version: str | None, progress_bar: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """One method as a nested MLflow run: pretrain (online kNN from epoch 0) -> kNN + linear -> log."""
    from sslflow.tasks.pipeline.steps import evaluate_step, log_step, pretrain_step
    from sslflow.tasks.tracking.comparison import comparison_row
    from sslflow.tasks.tracking.run import backbone_label, tracking_run

    settings = child.settings
    with tracking_run(settings, run_name=f"{parent_name}/{child.method}", data_version=data_version, check=False,
                      nested=True, tags={"sslflow.kind": "compare-child", "compare.settings": child.source}) as run:
        t0 = time.perf_counter()
        result = pretrain_step(train, run_dir, settings, eval_train=ev_train, eval_test=ev_test,
                               callbacks=[run.callback()], progress_bar=progress_bar)
        minutes = (time.perf_counter() - t0) / 60
        report = evaluate_step(run_dir, ev_train, ev_test, settings, ["knn", "linear"])
        log_step(run, run_dir, settings, report, train_store=ev_train, test_store=ev_test)
        row = comparison_row(child.method, child.family, backbone_label(settings), settings.pretrain.epochs,
                             report.metrics, result.metrics, minutes)
        run.log_metrics({k: row[k] for k in ("knn_top1", "linear_top1", "knn_top1_at_init", "images_per_s")})
    return row, {"epochs": list(result.history.epochs)}
