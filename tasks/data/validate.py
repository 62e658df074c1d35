"""The data contract, as Great Expectations 1.x suites: a failed suite stops the pipeline.

Four suites, each on its own in-memory frame, run before anything is published:

- `scan`: one row per image candidate the source delivered (accepted, duplicate, quarantined).
  Not empty; quarantined fraction <= `validate.max_quarantined_fraction` (GX `mostly`).
- `batch`: one row per new image, with the shape of the array that will be stored
  (channels = 3 after conversion, the store's side), sha256 unique within the batch.
- `manifest`: every row of the split after the batch (published + new): sha256 unique,
  required columns not null, original sizes and byte counts within bounds, labels within
  the known class set, split column = the split.
- `classes`: one row per class among the split's labeled images (unlabeled ones are not
  counted): each class's count within `validate.class_balance_tolerance` of the mean class
  count. A gate for the evaluation splits (`test`); for the splits named in
  `validate.class_balance_warn_splits` (default `train`: mostly unlabeled for SSL, and new
  classes arrive in small batches) a failure is a one-line warning, not a rejection.

The result is written as JSON (`reports/validation/<split>.json`) and as GX Data Docs HTML
(`reports/data_docs/index.html`); `ValidationResult.message()` names the failing expectations
and rows in one line.
"""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from sslflow.core.errors import UserError
from sslflow.tasks.data.decode import DecodeOptions
from sslflow.tasks.data.manifest import REQUIRED

SITE = "sslflow"
SHOW_ROWS = 5



@dataclass(frozen=True)
class Failure:
    suite: str
    expectation: str
    column: str | None
    observed: str  # "3 of 20 rows (15.0%)", "0 rows", ...
    rows: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = f"{self.suite}: {self.expectation}" + (f"({self.column})" if self.column else "")
        shown = ", ".join(self.rows[:SHOW_ROWS]) + (", ..." if len(self.rows) > SHOW_ROWS else "")
        return f"{what} {self.observed}" + (f": {shown}" if shown else "")


@dataclass
class ValidationResult:
    success: bool
    failures: list[Failure]
    report: Path
    data_docs: Path | None
    warnings: list[Failure] = field(default_factory=list)  # failed expectations that do not gate

    def message(self) -> str:
        failed = "; ".join(f.describe() for f in self.failures)
        return f"data validation failed: {failed} (report: {self.report})"

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "report": str(self.report),
                "data_docs": str(self.data_docs) if self.data_docs else None,
                "failures": [asdict(f) for f in self.failures],
                "warnings": [asdict(f) for f in self.warnings]}


class ValidationFailed(UserError):
    """A suite failed: nothing was published."""

    def __init__(self, result: ValidationResult, prefix: str = "") -> None:
        super().__init__(prefix + result.message())
        self.result = result


@dataclass
class Suite:
    name: str
    frame: pd.DataFrame
    expectations: list[Any]
    index_columns: list[str]
    gate: bool = True  # False: a failure is a warning


def validate(*, manifest: pd.DataFrame, split: str, limits: DecodeOptions, cfg: Any,
             classes: Sequence[str] | None, reports_dir: Path, scan: pd.DataFrame | None = None,
             batch: pd.DataFrame | None = None) -> ValidationResult:
    """Run the suites; write JSON + Data Docs. `classes` None = do not check label names."""
    import great_expectations.expectations as gxe

    suites: list[Suite] = []
    if scan is not None:
        suites.append(Suite(f"{split}-scan", scan, [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["accepted", "duplicate"],
                                            mostly=max(0.0, 1.0 - cfg.max_quarantined_fraction)),
        ], ["path", "reason"]))
    if batch is not None and len(batch):
        suites.append(Suite(f"{split}-batch", batch, [
            gxe.ExpectColumnValuesToBeInSet(column="stored_channels", value_set=[3]),
            gxe.ExpectColumnValuesToBeInSet(column="stored_height", value_set=[limits.size]),
            gxe.ExpectColumnValuesToBeInSet(column="stored_width", value_set=[limits.size]),
            gxe.ExpectColumnValuesToBeUnique(column="sha256"),
        ], ["path"]))
    suites.append(_manifest_suite(manifest, split, limits, classes))
    labeled = manifest["label"].dropna()  # the labeled part only: unlabeled images have no class
    if len(labeled):
        counts = labeled.value_counts()
        frame = pd.DataFrame({"label": counts.index.astype(str), "count": counts.to_numpy(),
                              "ratio_to_mean": (counts / counts.mean()).to_numpy()})
        tol = cfg.class_balance_tolerance
        suites.append(Suite(f"{split}-classes", frame, [
            gxe.ExpectColumnValuesToBeBetween(column="ratio_to_mean", min_value=max(0.0, 1 - tol),
                                              max_value=1 + tol),
        ], ["label", "count"], gate=balance_gates(split, cfg)))
    result = _run(suites, split, Path(reports_dir))
    for w in result.warnings:  # stderr: a Prefect task with log_prints logs it too
        print(f"validate {split}: warning: {w.describe()} (only a warning for the {split} split: "
              f"validate.class_balance_warn_splits; report: {result.report})", file=sys.stderr)
    return result


def balance_gates(split: str, cfg: Any) -> bool:
    """Does a class imbalance stop `split`? Not for the splits of `validate.class_balance_warn_splits`."""
    return split not in tuple(getattr(cfg, "class_balance_warn_splits", ("train",)))


def _manifest_suite(manifest: pd.DataFrame, split: str, limits: DecodeOptions,
                    classes: Sequence[str] | None) -> Suite:
    import great_expectations.expectations as gxe

    frame = manifest.assign(pixels=manifest["width"] * manifest["height"])
    expectations: list[Any] = [gxe.ExpectColumnValuesToBeUnique(column="sha256")]
    expectations += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED]
    expectations += [
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=limits.min_side),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=limits.min_side),
        gxe.ExpectColumnValuesToBeBetween(column="pixels", min_value=1, max_value=limits.max_pixels),
        gxe.ExpectColumnValuesToBeBetween(column="bytes", min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=[split]),
    ]
    if classes is not None:  # compared with the escaped frame (see `_html_safe`)
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column="label",
                                                            value_set=[html.escape(c) for c in classes]))
    return Suite(f"{split}-manifest", frame, expectations, ["path"])


def _run(suites: list[Suite], split: str, reports_dir: Path) -> ValidationResult:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    docs_dir = (reports_dir / "data_docs").resolve()
    ctx = gx.get_context(mode="ephemeral")  # fresh per call: no state leaks between runs
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.add_data_docs_site(site_name=SITE, site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    datasource = ctx.data_sources.add_pandas("sslflow")
    results: dict[str, Any] = {}
    failures: list[Failure] = []
    warnings: list[Failure] = []
    for s in suites:
        batch_def = datasource.add_dataframe_asset(s.name).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=s.name, expectations=s.expectations))
        definition = ctx.validation_definitions.add(gx.ValidationDefinition(name=s.name, data=batch_def,
                                                                            suite=suite))
        result = definition.run(batch_parameters={"dataframe": _html_safe(s.frame)}, result_format={
            "result_format": "COMPLETE", "unexpected_index_column_names": s.index_columns})
        results[s.name] = result.to_json_dict()
        (failures if s.gate else warnings).extend(_failure(s.name, r) for r in result.results if not r.success)
    docs = ctx.build_data_docs(site_names=[SITE])
    docs_index = reports_dir / "data_docs" / "index.html" if SITE in docs else None
    report = reports_dir / "validation" / f"{split}.json"
    out = ValidationResult(not failures, failures, report, docs_index, warnings)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({**out.to_dict(), "suites": results}, indent=1, default=str))
    return out


def _html_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with every string HTML-escaped: Data Docs write unexpected values (file names,
    class names, reasons: all chosen by whoever supplied the files) into HTML as they are, so
    a file named `<img src=x onerror=...>.jpg` was stored XSS in reports/ and MLflow."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(lambda v: html.escape(v) if isinstance(v, str) else v)
    return out


def _failure(suite: str, r: Any) -> Failure:
    cfg = r.expectation_config
    column = cfg.kwargs.get("column")
    res = r.result or {}
    if "unexpected_count" in res:
        observed = f"{res['unexpected_count']} of {res.get('element_count')} rows unexpected " \
                   f"({res.get('unexpected_percent') or 0:.1f}%"
        mostly = cfg.kwargs.get("mostly")
        observed += f", at most {100 * (1 - mostly):.1f}% allowed)" if mostly not in (None, 1, 1.0) else ")"
    else:
        observed = f"observed {res.get('observed_value')}"
    rows = []
    for item in res.get("unexpected_index_list") or []:
        if isinstance(item, dict):
            name = "path" if "path" in item else "label"
            rest = [f"{k}={_short(_plain(v))}" for k, v in item.items() if k != name and not _missing(v)]
            row = _plain(item.get(name))
            rows.append(f"{row} [{', '.join(rest)}]" if rest else str(row))
    return Failure(suite, cfg.type, column, observed, rows)


def _plain(value: Any) -> Any:
    """Undo `_html_safe` for the terminal and the JSON summary."""
    return html.unescape(value) if isinstance(value, str) else value


def validate_split(split_dir: Path, *, limits: DecodeOptions, cfg: Any,
                   classes: Sequence[str] | None, reports_dir: Path) -> ValidationResult:
    """Re-check a published split (no new batch): the gate a pipeline runs before training."""
    from sslflow.ssl_models.store import ImageStore
    from sslflow.tasks.data import manifest

    store = ImageStore.open(split_dir)
    rows = manifest.read(split_dir, store)
    if len(rows) != len(store):
        raise UserError(f"{split_dir}: the manifest describes {len(rows)} of {len(store)} images "
                        "(written without `sslflow ingest`?)")
    limits = replace(limits, size=store.height)
    return validate(manifest=rows, split=Path(split_dir).name, limits=limits, cfg=cfg,
                    classes=classes, reports_dir=reports_dir)


def _missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and other non-scalars
        return False


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 16 else text[:12] + "..."
