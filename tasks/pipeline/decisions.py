"""The plain decisions the flows make, and the markdown they report them with.

No Prefect here: `flows/` wraps these, the CLI and tests call them directly.

    n = train_image_count(settings.path(settings.pipeline.store))   # images in the train split
    champ = champion_version(settings)                               # the version holding `champion`
    decision = retrain_decision(n, trained_on(champ), settings.pipeline.min_new_images)
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The version tags `retrain` reads (written by `sslflow.tasks.tracking.registry.register_and_promote`).
from sslflow.tasks.tracking.registry import TAG_DATA_VERSION, TAG_TRAIN_IMAGES


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


def latest_version(settings: Any, client: Any = None) -> int:
    """The highest version number of the registered model (0 when there is none)."""
    versions = _versions(settings, client)
    return max((int(v.version) for v in versions), default=0)


def trained_meanwhile(settings: Any, after: int, images: int, data_version: str | None,
                      client: Any = None) -> Any:
    """A version newer than `after` trained on this very data (the same data version, or the
    same number of train images when a version is unknown: a store only grows), or None.
    What a retrain that waited for the slot checks, so that two forced runs train once."""
    for mv in sorted(_versions(settings, client), key=lambda v: -int(v.version)):
        if int(mv.version) <= after:
            break
        tags = mv.tags or {}
        if data_version and tags.get(TAG_DATA_VERSION) not in (None, "", "None"):
            if tags[TAG_DATA_VERSION] == data_version:
                return mv
        elif trained_on(mv) == images:
            return mv
    return None


def last_training(settings: Any, client: Any = None) -> Any:
    """The newest registered version, whatever its promotion (champion or challenger), or None.
    Every completed training registers one, so this is what the last training was trained on:
    `retrain` counts new images against it, not against the champion, so that a challenger's
    data is not trained on again the next night."""
    return max(_versions(settings, client), key=lambda v: int(v.version), default=None)


def _versions(settings: Any, client: Any = None) -> list[Any]:
    if client is None:
        from mlflow import MlflowClient

        from sslflow.tasks.tracking.backend import resolve_tracking_uri

        client = MlflowClient(tracking_uri=resolve_tracking_uri(settings))
    return list(client.search_model_versions(f"name='{settings.tracking.model_name}'"))


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
    champion_images: int | None  # the last training was trained on (None: none / unknown)
    new_images: int  # since the last training
    policy: str = "count"
    drift: dict[str, Any] | None = None  # score, p_value, level, drifted, ... when the drift test ran

    def to_dict(self) -> dict[str, Any]:
        out = {"train": self.train, "reason": self.reason, "images": self.images,
               "champion_images": self.champion_images, "new_images": self.new_images, "policy": self.policy}
        if self.drift is not None:
            out["drift"] = {k: v for k, v in self.drift.items() if k in DRIFT_EVIDENCE}
        return out


DRIFT_EVIDENCE = ("score", "p_value", "level", "drifted", "reference", "new", "permutations")


def retrain_decision(images: int, champion_images: int | None, min_new_images: int, *,
                     force: bool = False, has_champion: bool = True, policy: str = "count",
                     drift: Any = None) -> RetrainDecision:
    """Train when forced, or by `policy` (`pipeline.retrain_policy`): `count` when at least
    `min_new_images` train images arrived since the last training (`champion_images`: what it
    was trained on); `drift` when the drift test (`drift`, a `DriftResult`) rejected; `any`
    either. No previous training (or one without the tag): every image counts as new."""
    decision = _count_decision(images, champion_images, min_new_images, force=force, has_champion=has_champion)
    if policy == "count" or force or decision.images == 0 or decision.new_images <= 0:
        return RetrainDecision(**{**decision.__dict__, "policy": policy})
    if drift is None:
        if policy == "any" or not has_champion:  # nothing to test against: the count decides
            return RetrainDecision(**{**decision.__dict__, "policy": policy})
        return RetrainDecision(False, f"nothing to do: drift test not run ({decision.new_images} new images)",
                               images, champion_images, decision.new_images, policy)
    evidence = {**drift.to_dict()}
    says = drift.summary()
    train = drift.drifted or (policy == "any" and decision.train)
    if train:
        why = says if drift.drifted else f"{decision.reason}; {says}"
        return RetrainDecision(True, f"{why} (policy {policy})", images, champion_images, decision.new_images,
                               policy, evidence)
    count = f"; {decision.reason.removeprefix('nothing to do: ')}" if policy == "any" else ""
    return RetrainDecision(False, f"nothing to do: {says}{count} (policy {policy})", images, champion_images,
                           decision.new_images, policy, evidence)


def _count_decision(images: int, champion_images: int | None, min_new_images: int, *,
                    force: bool = False, has_champion: bool = True) -> RetrainDecision:
    new = images - champion_images if champion_images is not None else images
    if images == 0:
        return RetrainDecision(False, "nothing to do: the train split is empty", images, champion_images, 0)
    if force:
        return RetrainDecision(True, f"forced ({new} new images since the last training)", images, champion_images, new)
    if new >= min_new_images and new > 0:
        since = "since the last training" if has_champion else "and there is no champion yet"
        return RetrainDecision(True, f"{new} new images {since} (min_new_images {min_new_images})",
                               images, champion_images, new)
    return RetrainDecision(False, f"nothing to do: {new} new images since the last training "
                                  f"(< min_new_images {min_new_images})", images, champion_images, new)


# ------------------------------------------------------------------------------------ report
def markdown_report(title: str, metrics: Mapping[str, float], decision: Any = None,
                    extra: Mapping[str, Any] | None = None) -> str:
    """The Prefect artifact: a metrics table and the promotion decision, as markdown. Every
    value is escaped (`md`): paths, run and class names come from users, and the UI renders
    the markdown as HTML."""
    lines = [f"# {md(title)}", "", "| metric | value |", "| --- | ---: |"]
    for k, v in metrics.items():
        try:
            f = float(v)
            lines.append(f"| {md(k)} | {'n/a' if math.isnan(f) else f'{f:.2f}'} |")
        except (TypeError, ValueError):
            lines.append(f"| {md(k)} | {md(v)} |")
    if decision is not None:
        lines += ["", "## Promotion", "", "| | |", "| --- | --- |",
                  f"| model | {md(decision.model_name)} version {md(decision.version)} |",
                  f"| decision | **{md(decision.decision)}** |",
                  f"| reason | {md(decision.reason)} |",
                  f"| {md(decision.metric)} | {_fmt(decision.score)} (champion "
                  f"{md(decision.champion_version or '-')}: {_fmt(decision.champion_score)}) |"]
    for k, v in (extra or {}).items():
        lines.append(f"\n**{md(k)}**: {md(v)}")
    return "\n".join(lines) + "\n"


def md(value: Any) -> str:
    """`value` as inert markdown text: HTML escaped (no tags, no `<javascript:...>` autolinks),
    the characters that make links, code, emphasis or table cells backslash-escaped, one line
    (a table cell cannot hold a newline)."""
    text = html.escape(" ".join(str(value).split()))
    return "".join(f"\\{c}" if c in MD_SPECIAL else c for c in text)


MD_SPECIAL = set("\\`*[]|")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
