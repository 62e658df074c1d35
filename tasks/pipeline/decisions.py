"""The plain decisions the flows make, and the markdown they report them with.

No Prefect here: `flows/` wraps these, the CLI and tests call them directly.

    n = train_image_count(settings.path(settings.pipeline.store))   # images in the train split
    champ = champion_version(settings)                               # the version holding `champion`
    decision = retrain_decision(n, trained_on(champ), settings.pipeline.min_new_images)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The version tags `retrain` reads (written by `sslflow.tasks.tracking.registry.register_and_promote`).
from sslflow.tasks.tracking.registry import TAG_TRAIN_IMAGES


def retry_delays(retries: int, first_s: float) -> list[float]:
    """Exponential backoff: first_s, 2 first_s, 4 first_s, ..."""
    return [first_s * 2 ** i for i in range(retries)]


# ------------------------------------------------------------------------------------ champion
def champion_version(settings: Any, client: Any = None) -> Any:
    """The registered model version holding alias `champion`, or None."""
    from sslflow.tasks.tracking.backend import resolve_tracking_uri
    from sslflow.tasks.tracking.registry import CHAMPION, current_alias

    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=resolve_tracking_uri(settings))
    return current_alias(settings.tracking.model_name, CHAMPION, client)


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
