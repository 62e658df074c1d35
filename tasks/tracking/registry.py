"""The encoder as an MLflow model, its registration, and the promotion gate.

Aliases, not stages: `champion` is what `mlflow.pytorch.load_model("models:/NAME@champion")`
serves, `previous` the champion it displaced (roll back with `sslflow promote --version`),
`challenger` the last version that lost. Each version records why, as version tags:

    promotion.decision        promoted | challenger | rejected | manual
    promotion.reason          one sentence
    promotion.metric          e.g. linear_top1 (on the fixed evaluation split)
    promotion.score           this version's score ("" when evaluation failed)
    promotion.champion_version / promotion.champion_score   what it was compared with
    promotion.min_delta, promotion.validation_ok, promotion.evaluation_ok
    eval.<metric>             every evaluation metric, so a later version can compare

Gate (`promote`): a version becomes champion only if validation and evaluation succeeded and
(there is no champion yet, or its score beats the champion's by at least `min_delta` and is
strictly higher). A failed validation/evaluation is `rejected` and gets no alias.

The train flow calls, inside `sslflow.tasks.tracking.run.tracking_run(...)`::

    decision = register_and_promote(run, run_dir, report, settings, test_store=test,
                                    data={TAG_TRAIN_IMAGES: n, TAG_DATA_VERSION: version})
"""

from __future__ import annotations

import getpass
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError
from sslflow.tasks.tracking.backend import artifact_store_errors
from sslflow.tasks.tracking.run import TrackedRun

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
ARTIFACT = "encoder"


# ------------------------------------------------------------------------------------ logging
def _pip_requirements() -> list[str]:
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]


def input_example(meta: dict[str, Any], store: Any = None, n: int = 2):
    """`n` (>= 2) images normalised as the encoder expects, float32 (N, 3, H, W) numpy: from
    `store` when given (its first images), else uniform noise in [0, 1]. A batch of 1 would
    freeze the exported batch dimension to 1."""
    import numpy as np
    import torch

    from sslflow.ssl_models.augment import eval_view

    n = max(2, n)
    size = int(meta["image_size"])
    if store is not None and len(store) > 0:
        imgs = store.images()[:n]
        imgs = np.concatenate([imgs] * math.ceil(n / len(imgs)))[:n]
        x = torch.from_numpy(imgs)
    else:
        x = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return eval_view(x, meta["mean"], meta["std"]).contiguous().numpy().astype("float32")


def log_encoder(run_dir: str | Path, *, test_store: Any = None, run_id: str | None = None, name: str = ARTIFACT):
    """Log the backbone of `run_dir/encoder.pt` as one MLflow model with two flavors: `pytorch`
    (a torch.export program with a dynamic batch dimension, normalised float images in: what
    `mlflow.pytorch.load_model` returns) and a `python_function` flavor that takes image bytes
    (base64) or paths and returns embeddings, with the run's resize / normalise inside
    (`sslflow.tasks.serving.pyfunc`: what `mlflow models serve` answers with). The signature and
    input example are the served ones (2 images as base64 PNG); the metadata holds the encoder's
    (arch, width, image_size, mean, std) and describes the tensor input. Logged into the active
    run, or `run_id`. Returns mlflow's `ModelInfo`."""
    import mlflow
    import torch
    from mlflow.models import Model, infer_signature

    from sslflow.ssl_models.checkpoint import load_encoder
    from sslflow.tasks.serving import pyfunc

    run_dir = Path(run_dir)
    if not (run_dir / "encoder.pt").is_file() and not run_dir.is_file():
        raise UserError(f"{run_dir} holds no encoder.pt: nothing to log")
    encoder, meta = load_encoder(run_dir)
    encoder.eval()
    example = input_example(meta, test_store)
    with torch.no_grad():
        output = encoder(torch.from_numpy(example)).numpy()
    metadata = {**meta, "input": "pyfunc: columns image (base64 image bytes) or path; pytorch flavor: float32 "
                "(N, 3, H, W), RGB in [0, 1], then (x - mean) / std",
                "output": "float32 (N, feature_dim) backbone features (before any projection head)"}
    encoder_file = run_dir / "encoder.pt" if run_dir.is_dir() else run_dir
    raw = _example_images(meta, test_store)
    kwargs = dict(artifact_path=None, name=name, flavor=pyfunc, metadata=metadata, pytorch_model=encoder,
                  encoder_file=encoder_file, feature_dim=int(output.shape[1]), tensor_example=example,
                  tensor_signature=infer_signature(example, output), example_images=raw,
                  pip_requirements=_pip_requirements())
    active = mlflow.active_run()
    if run_id is None or (active is not None and active.info.run_id == run_id):
        if active is None:
            raise RuntimeError("log_encoder needs an active MLflow run or run_id")
        run_id = active.info.run_id
        with artifact_store_errors(mlflow.get_tracking_uri(), f"logging the encoder to MLflow run {run_id}"):
            return Model.log(**kwargs)
    with mlflow.start_run(run_id=run_id), \
            artifact_store_errors(mlflow.get_tracking_uri(), f"logging the encoder to MLflow run {run_id}"):
        return Model.log(**kwargs)


def _example_images(meta: dict[str, Any], store: Any = None, n: int = 2):
    """`n` uint8 (H, W, 3) images for the served input example: the store's first, else noise."""
    import numpy as np

    if store is not None and len(store) > 0:
        imgs = store.images()[:n]
        return np.concatenate([imgs] * math.ceil(n / len(imgs)))[:n]
    size = int(meta["image_size"])
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def register_encoder(model_uri: str, name: str, *, eval_metrics: dict[str, float] | None = None,
                     tags: dict[str, Any] | None = None):
    """Register `model_uri` as a new version of `name` (created on first use), with every
    evaluation metric as a version tag `eval.<key>`. Returns the `ModelVersion`."""
    import mlflow

    all_tags = {f"eval.{k}": str(float(v)) for k, v in (eval_metrics or {}).items()}
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    return mlflow.register_model(model_uri, name, tags=all_tags or None)


# ------------------------------------------------------------------------------------ gate
@dataclass
class PromotionDecision:
    model_name: str
    version: str
    decision: str  # promoted | challenger | rejected | manual
    reason: str
    metric: str
    score: float | None
    champion_version: str | None  # the champion compared with (before this decision)
    champion_score: float | None

    @property
    def promoted(self) -> bool:
        return self.decision in ("promoted", "manual")

    def tags(self) -> dict[str, str]:
        def s(v: Any) -> str:
            return "" if v is None else str(v)

        return {"promotion.decision": self.decision, "promotion.reason": self.reason,
                "promotion.metric": self.metric, "promotion.score": s(self.score),
                "promotion.champion_version": s(self.champion_version),
                "promotion.champion_score": s(self.champion_score),
                "promotion.time": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _client(client: Any = None):
    from mlflow import MlflowClient

    return client or MlflowClient()


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(e).lower()


def current_alias(name: str, alias: str, client: Any = None):
    """The ModelVersion holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(client).get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _not_found(e) or "alias" in str(e).lower():
            return None
        raise


def version_score(mv: Any, metric: str, client: Any = None) -> float | None:
    """A version's `metric`: its `eval.<metric>` tag, else the `eval/<metric>` metric of the
    run that produced it; None if neither exists."""
    raw = (mv.tags or {}).get(f"eval.{metric}")
    if raw not in (None, ""):
        try:
            return float(raw)
        except ValueError:
            pass
    if getattr(mv, "run_id", None):
        from mlflow.exceptions import MlflowException

        try:
            value = _client(client).get_run(mv.run_id).data.metrics.get(f"eval/{metric}")
        except MlflowException:
            value = None
        if value is not None:
            return float(value)
    return None


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def decide(score: float | None, champion_score: float | None, has_champion: bool, min_delta: float,
           validation_ok: bool = True, evaluation_ok: bool = True) -> tuple[str, str]:
    """The gate as a pure function: (decision, reason)."""
    if not validation_ok:
        return "rejected", "data validation failed"
    if not evaluation_ok or not _finite(score):
        return "rejected", "evaluation failed or produced no score"
    if not has_champion:
        return "promoted", "first model: no champion yet"
    if not _finite(champion_score):
        return "challenger", "the champion has no recorded score to compare with; promote by hand"
    assert score is not None and champion_score is not None
    delta = score - champion_score
    if delta > 0 and delta >= min_delta:
        return "promoted", f"beats the champion by {delta:.4g} >= min_delta {min_delta:g}"
    return "challenger", f"does not beat the champion by min_delta {min_delta:g} (delta {delta:.4g})"


def promote(name: str, version: str | int, score: float | None, cfg: Any, *,
            validation_ok: bool = True, evaluation_ok: bool = True, client: Any = None) -> PromotionDecision:
    """Apply the gate to version `version` of `name` and move the aliases accordingly:
    promoted -> it gets `champion`, the displaced champion gets `previous`; challenger -> it
    gets `challenger`; rejected -> no alias. The decision and both scores become version tags."""
    client = _client(client)
    version = str(version)
    champ = current_alias(name, CHAMPION, client)
    if champ is not None and str(champ.version) == version:
        raise UserError(f"{name} version {version} is already the champion")
    champ_score = version_score(champ, cfg.metric, client) if champ is not None else None
    decision, reason = decide(score, champ_score, champ is not None, cfg.min_delta, validation_ok, evaluation_ok)
    result = PromotionDecision(name, version, decision, reason, cfg.metric,
                               float(score) if _finite(score) else None,
                               str(champ.version) if champ is not None else None, champ_score)
    tags = {**result.tags(), "promotion.min_delta": str(cfg.min_delta),
            "promotion.validation_ok": str(validation_ok).lower(),
            "promotion.evaluation_ok": str(evaluation_ok).lower()}
    if _finite(score):
        tags[f"eval.{cfg.metric}"] = str(float(score))
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if decision == "promoted":
        _make_champion(name, version, champ, client)
    elif decision == "challenger":
        client.set_registered_model_alias(name, CHALLENGER, version)
    return result


def _make_champion(name: str, version: str, old: Any, client: Any) -> None:
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, str(old.version))
        client.set_model_version_tag(name, str(old.version), "promotion.displaced_by", version)
    client.set_registered_model_alias(name, CHAMPION, version)
    for alias in (CHALLENGER, PREVIOUS):  # one version holds one role
        holder = current_alias(name, alias, client)
        if holder is not None and str(holder.version) == version:
            client.delete_registered_model_alias(name, alias)


def promote_by_hand(name: str, version: str | int, client: Any = None) -> PromotionDecision:
    """`sslflow promote --version N`: make version N the champion whatever the gate says
    (a rollback is promoting the `previous` version). The old champion gets `previous`."""
    from mlflow.exceptions import MlflowException

    client = _client(client)
    version = str(version)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as e:
        if _not_found(e):
            raise UserError(f"registered model {name!r} has no version {version}") from None
        raise
    champ = current_alias(name, CHAMPION, client)
    if champ is not None and str(champ.version) == version:
        raise UserError(f"{name} version {version} is already the champion")
    metric = (mv.tags or {}).get("promotion.metric", "")
    score = version_score(mv, metric, client) if metric else None
    champ_score = version_score(champ, metric, client) if champ is not None and metric else None
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    result = PromotionDecision(name, version, "manual", f"promoted by hand by {user}", metric, score,
                               str(champ.version) if champ is not None else None, champ_score)
    for k, v in {**result.tags(), "promotion.by": user}.items():
        client.set_model_version_tag(name, version, k, v)
    _make_champion(name, version, champ, client)
    return result


# ------------------------------------------------------------------------------------ one call
#: Version tags of every registered encoder: what it was trained on (`retrain` compares them).
TAG_TRAIN_IMAGES = "data.train_images"
TAG_DATA_VERSION = "data.version"


def register_and_promote(run: TrackedRun, run_dir: str | Path, eval_report: Any, settings: Any, *,
                         validation_ok: bool = True, evaluation_ok: bool | None = None,
                         test_store: Any = None, data: dict[str, Any] | None = None) -> PromotionDecision:
    """Log `run_dir`'s encoder into `run`, register it as a new version of
    `tracking.model_name` tagged with its evaluation metrics, its run and what it was trained
    on (`data`: `data.train_images`, `data.version`), then apply the promotion gate on
    `promotion.metric` of `eval_report` (None = evaluation failed: the version is registered
    but never promoted). The decision also goes to the run as tags and a `promotion/promoted`
    metric. A `promotion.metric` the report does not hold is a one-line `UserError`."""
    from sslflow.ssl_models.store import ImageStore

    if isinstance(test_store, str | Path):
        test_store = ImageStore.open(test_store)
    name = settings.tracking.model_name
    metrics = dict(eval_report.metrics) if eval_report is not None else {}
    metric = settings.promotion.metric
    if evaluation_ok is None:
        evaluation_ok = eval_report is not None
    if eval_report is not None and metric not in metrics:
        raise UserError(f"promotion.metric {metric!r} is not in the evaluation report "
                        f"({', '.join(metrics) or 'no metrics'}); add its protocol to eval.protocols")
    info = log_encoder(run_dir, test_store=test_store, run_id=run.run_id)
    tags = {"run_id": run.run_id, **{k: ("unknown" if v is None else v) for k, v in (data or {}).items()}}
    mv = register_encoder(info.model_uri, name, eval_metrics=metrics, tags=tags)
    decision = promote(name, mv.version, metrics.get(metric), settings.promotion,
                       validation_ok=validation_ok, evaluation_ok=evaluation_ok, client=run.client)
    run.set_tags({"model_name": decision.model_name, "model_version": decision.version,
                  "promotion.decision": decision.decision, "promotion.reason": decision.reason})
    run.log_metrics({"promoted": 1.0 if decision.promoted else 0.0}, prefix="promotion/")
    return decision
