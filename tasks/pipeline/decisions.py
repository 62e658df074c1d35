"""Pipeline parameters (`params/pipeline.yaml`) and the plain decisions the flows make.

No Prefect here: `flows/` wraps these, the CLI and tests call them directly.

    pp = load_pipeline_params()                 # params/pipeline.yaml (+ file, --set pipeline.*)
    n = train_image_count("data/store")         # images in the train split (0 if none yet)
    trained_on = champion_train_images(tp)      # the champion's `data.train_images` version tag
    decision = retrain_decision(n, trained_on, pp.pipeline.min_new_images, force=False)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError
from sslflow.core.settings import DATA_SECTIONS, PARAMS_DIR, build, merged_sections

PARAMS_FILE = "pipeline.yaml"
SECTION = "pipeline"
TRACKING_SECTIONS = frozenset({"tracking", "promotion"})
# Version tags the train flow writes on every registered encoder: what it was trained on.
TAG_TRAIN_IMAGES = "data.train_images"
TAG_DATA_VERSION = "data.version"


@dataclass(frozen=True)
class PipelineConfig:
    store: str
    incoming: str
    runs: str
    reports: str
    min_new_images: int
    force: bool
    retries: int
    retry_delay_s: float
    lock: str
    lock_timeout_s: float
    cron: str
    timezone: str
    work_pool: str
    gpu_work_pool: str
    gpu_limit: str
    pretrain_deployment: str  # "" = pretrain in the train flow's process; "flow/deployment" = run_deployment


@dataclass(frozen=True)
class PipelineParams:
    pipeline: PipelineConfig


def load_pipeline_params(params_file: str | Path | None = None, overrides: Iterable[str] = (),
                         params_dir: Path = PARAMS_DIR) -> PipelineParams:
    """`params/pipeline.yaml`, then the `pipeline` section of `params_file`, then the
    `pipeline.*` entries of `overrides` (others belong to other loaders)."""
    raw = merged_sections(PipelineParams, Path(params_dir) / PARAMS_FILE, params_file, overrides)
    pp: PipelineParams = build(PipelineParams, raw, prefix="")
    p = pp.pipeline
    if p.min_new_images < 0:
        raise UserError(f"pipeline.min_new_images must be >= 0; got {p.min_new_images}")
    if p.retries < 0:
        raise UserError(f"pipeline.retries must be >= 0; got {p.retries}")
    if p.retry_delay_s < 0 or p.lock_timeout_s < 0:
        raise UserError("pipeline.retry_delay_s and pipeline.lock_timeout_s must be >= 0")
    if not p.lock.strip():
        raise UserError("pipeline.lock must name a concurrency limit")
    if len(p.cron.split()) != 5:
        raise UserError(f"pipeline.cron must be a 5-field cron expression; got {p.cron!r}")
    if p.pretrain_deployment.strip() and p.pretrain_deployment.count("/") != 1:
        raise UserError("pipeline.pretrain_deployment must name a deployment as flow/deployment "
                        f"(e.g. pretrain/gpu) or be empty; got {p.pretrain_deployment!r}")
    return pp


def _section(override: str) -> str:
    return override.split(".", 1)[0].split("=", 1)[0].strip()


def partition_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    """Split a mixed `--set` list by loader: engine, data (ingest/validate/versioning),
    tracking (tracking/promotion) and pipeline."""
    out: dict[str, list[str]] = {"engine": [], "data": [], "tracking": [], "pipeline": []}
    for item in overrides:
        s = _section(item)
        key = ("data" if s in DATA_SECTIONS else "tracking" if s in TRACKING_SECTIONS
               else "pipeline" if s == SECTION else "engine")
        out[key].append(item)
    return out


def retry_delays(retries: int, first_s: float) -> list[float]:
    """Exponential backoff: first_s, 2 first_s, 4 first_s, ..."""
    return [first_s * 2 ** i for i in range(retries)]


# ------------------------------------------------------------------------------------ data
def train_image_count(store_root: str | Path) -> int:
    """Images published in `store_root/train` (0 when the split does not exist yet)."""
    from sslflow.ssl_models.store import ImageStore

    split = Path(store_root) / "train"
    if not (split / "store.json").is_file():
        return 0
    return len(ImageStore.open(split))


def require_images(split_dir: str | Path) -> int:
    """The number of images in a published split; a one-line `UserError` when there are none."""
    from sslflow.ssl_models.store import ImageStore

    split_dir = Path(split_dir)
    if not (split_dir / "store.json").is_file():
        raise UserError(f"image store {split_dir} does not exist: ingest images first "
                        "(sslflow ingest --source ... --store ... or sslflow run)")
    n = len(ImageStore.open(split_dir))
    if n == 0:
        raise UserError(f"image store {split_dir} is empty: ingest images first")
    return n


def store_data_version(store_root: str | Path) -> str | None:
    """The DVC hash recorded for the store (`<store>.dvc`), else None (not computed here: it
    reads every byte of the store)."""
    import yaml

    dvc_file = Path(str(store_root).rstrip("/") + ".dvc")
    if not dvc_file.is_file():
        return None
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
        return str(outs[0].get("md5")) if outs else None
    except (yaml.YAMLError, AttributeError, IndexError):
        return None


# ------------------------------------------------------------------------------------ champion
def champion_version(tp: Any, client: Any = None) -> Any:
    """The registered model version holding alias `champion`, or None."""
    from sslflow.tasks.tracking.registry import CHAMPION, current_alias
    from sslflow.tasks.tracking.track import resolve_tracking_uri

    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=resolve_tracking_uri(tp.tracking))
    return current_alias(tp.tracking.model_name, CHAMPION, client)


def trained_on(mv: Any) -> int | None:
    """Train images a registered version was trained on (its `data.train_images` tag)."""
    if mv is None:
        return None
    raw = (mv.tags or {}).get(TAG_TRAIN_IMAGES)
    try:
        return int(raw) if raw not in (None, "") else None
    except ValueError:
        return None


@dataclass(frozen=True)
class RetrainDecision:
    train: bool
    reason: str
    images: int  # in the train split now
    champion_images: int | None  # the champion was trained on (None: no champion / unknown)
    new_images: int  # since the champion was trained

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train, "reason": self.reason, "images": self.images,
                "champion_images": self.champion_images, "new_images": self.new_images}


def retrain_decision(images: int, champion_images: int | None, min_new_images: int, *,
                     force: bool = False, has_champion: bool = True) -> RetrainDecision:
    """Train when forced, or when at least `min_new_images` train images arrived since the
    champion was trained. No champion (or one without the tag): every image counts as new."""
    new = images - champion_images if champion_images is not None else images
    if images == 0:
        return RetrainDecision(False, "nothing to do: the train split is empty", images, champion_images, 0)
    if force:
        return RetrainDecision(True, f"forced ({new} new images since the champion)", images, champion_images, new)
    if new >= min_new_images and new > 0:
        since = "since the champion was trained" if has_champion else "and there is no champion yet"
        return RetrainDecision(True, f"{new} new images {since} (min_new_images {min_new_images})",
                               images, champion_images, new)
    return RetrainDecision(False, f"nothing to do: {new} new images since the champion was trained "
                                  f"(< min_new_images {min_new_images})", images, champion_images, new)


# ------------------------------------------------------------------------------------ report
def markdown_report(title: str, metrics: Mapping[str, float], decision: Any = None,
                    extra: Mapping[str, Any] | None = None) -> str:
    """The Prefect artifact: a metrics table and the promotion decision, as markdown."""
    lines = [f"# {title}", "", "| metric | value |", "| --- | ---: |"]
    for k, v in metrics.items():
        try:
            f = float(v)
            lines.append(f"| {k} | {'n/a' if math.isnan(f) else f'{f:.2f}'} |")
        except (TypeError, ValueError):
            lines.append(f"| {k} | {v} |")
    if decision is not None:
        lines += ["", "## Promotion", "", "| | |", "| --- | --- |",
                  f"| model | {decision.model_name} version {decision.version} |",
                  f"| decision | **{decision.decision}** |",
                  f"| reason | {decision.reason} |",
                  f"| {decision.metric} | {_fmt(decision.score)} (champion "
                  f"{decision.champion_version or '-'}: {_fmt(decision.champion_score)}) |"]
    for k, v in (extra or {}).items():
        lines.append(f"\n**{k}**: {v}")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
