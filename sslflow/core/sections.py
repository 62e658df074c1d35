"""The pipeline's settings sections (data, tracking, orchestration, tuning), with their domains.

The engine's sections (augment, backbone, pretrain, eval) live in `sslflow.ssl_models.config`;
`sslflow.core.settings.Settings` puts both in one tree. Every field declares its type,
default, domain and doc here, next to its definition (`ssl_models.schema.setting`); relative
paths are relative to the project directory (`sslflow.core.project`).
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sslflow.ssl_models.schema import (
    NON_NEGATIVE,
    PROBABILITY,
    Choices,
    ConfigError,
    Each,
    Pattern,
    Range,
    setting,
)

NAME = Pattern(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", "a simple name (letters, digits, _ . -)")
CRON = Pattern(r"\S+( \S+){4}", "a 5-field cron expression, e.g. '0 3 * * *'")
DEPLOYMENT = Pattern(r"([A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)?", "empty or flow/deployment, e.g. pretrain/gpu")
PATH = Pattern(r".+", "a non-empty path")


# ------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class IngestConfig:
    """`sslflow ingest`: how images enter a store."""

    size: int = setting(32, domain=Range(8, 4096), doc="side of the stored square images of a new store "
                        "(an existing store keeps its own)")
    min_side: int = setting(16, domain=Range(1, 1 << 16), doc="smaller images are quarantined (too_small)")
    max_pixels: int = setting(89_478_485, domain=Range(1, 1 << 40),
                              doc="decompression-bomb limit, width * height (Pillow's default)")
    max_file_bytes: int = setting(64 << 20, domain=Range(1, 1 << 40), doc="larger files are quarantined unread")
    max_decoded_bytes: int = setting(128 << 20, domain=Range(1 << 10, 1 << 40),
                                     doc="bits per pixel x pixels once decoded; larger images are quarantined "
                                         "(too_large_decoded) before decoding")
    workers: int = setting(0, domain=Range(0, 1024), doc="decode processes; 0 = all CPU cores")
    lock_wait_s: float = setting(60.0, domain=Range(0, 86400), resumable=True,
                                 doc="wait this long for another ingest of the same store, then stop with one line")
    chunk_size: int = setting(256, domain=Range(1, 1 << 20), doc="files per worker task")
    shard_images: int = setting(16384, domain=Range(1, 1 << 24), doc="images per shard file of the store")
    classes: tuple[str, ...] = setting((), doc="known class names in label order; [] = from the source / store")
    demo_train_per_class: int = setting(200, domain=Range(0, 1 << 20), doc="`--source demo --split train`")
    demo_test_per_class: int = setting(100, domain=Range(0, 1 << 20), doc="`--source demo --split test`")
    demo_seed: int = setting(0, domain=Range(0, 2**31 - 1), doc="train uses demo_seed, test demo_seed + 1")
    torchvision_root: str = setting("data/raw/torchvision", domain=PATH,
                                    doc="`--source torchvision:NAME` reads/downloads NAME here")
    near_duplicate_threshold: float = setting(0.97, domain=PROBABILITY,
                                              doc="`retrain`: a new image whose champion-embedding cosine with a "
                                                  "store image or an earlier new image is at least this is a "
                                                  "near-duplicate (0 = do not look; docs/drift.md)")
    quarantine_near_duplicates: bool = setting(False, doc="`retrain`: move near-duplicates out of the incoming "
                                                          "folder before ingest (reason near_duplicate, with the "
                                                          "matched file) instead of only reporting them")

    def check(self) -> None:
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError("ingest.classes has duplicate names")
        if self.min_side > self.size * 64:
            raise ConfigError(f"ingest.min_side ({self.min_side}) is far above ingest.size ({self.size})")


@dataclass(frozen=True)
class ValidateConfig:
    """Great Expectations gates of `sslflow ingest` / `sslflow validate`."""

    max_quarantined_fraction: float = setting(0.05, domain=PROBABILITY,
                                              doc="of the image files in one run; more stops the pipeline")
    class_balance_tolerance: float = setting(0.5, domain=NON_NEGATIVE,
                                             doc="each class count within +-tolerance of the mean class count "
                                                 "(labeled images only)")
    class_balance_warn_splits: tuple[str, ...] = setting(
        ("train",), domain=Each(NAME),
        doc="splits where an imbalance is a warning, not a rejection (the SSL train split: mostly "
            "unlabeled, new classes arrive in small batches); every other split (test) is gated")
    allow_new_classes: bool = setting(True, doc="may a later batch bring class names the split lacks?")
    checksums: bool = setting(True, doc="before training, read every shard and compare its sha256 with the "
                                        "index (off: shapes and presence only, for stores of many GB)")


@dataclass(frozen=True)
class VersioningConfig:
    """DVC versioning of the store after each ingest."""

    dvc: str = setting("auto", domain=Choices(("auto", "on", "off")),
                       doc="auto: dvc add/push inside a DVC repo | on: require one | off")
    push: bool = setting(True, doc="dvc push to the default remote after each ingest")
    remote_dir: str = setting("~/.cache/sslflow/dvc-remote", domain=PATH,
                              doc="local remote used when the repo configures none")


# ------------------------------------------------------------------------------------ tracking
@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking and the model registry."""

    uri: str = setting("", doc="'' = sqlite:///<project>/mlflow.db (+ <project>/mlartifacts); "
                       "env MLFLOW_TRACKING_URI wins")
    experiment: str = setting("sslflow", domain=Pattern(r"\S.{0,499}", "a non-empty name"), doc="created on first use")
    model_name: str = setting("ssl-encoder", domain=Pattern(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}",
                                                            "letters, digits, '.', '_' and '-' (it goes into "
                                                            "models:/ URIs and registry searches)"),
                              doc="registered model: load with models:/ssl-encoder@champion")
    flush_every: int = setting(50, domain=Range(1, 1 << 20), doc="metric calls buffered per MlflowClient.log_batch")
    preflight_timeout_s: float = setting(5.0, domain=Range(0, 600, lo_open=True),
                                         doc="an unreachable tracking server fails before training, after this long")
    retry_budget_s: float = setting(120.0, domain=Range(0, 3600), resumable=True,
                                    doc="an MLflow outage during a run: requests are retried for about this long in "
                                    "total, then the run stops with one line (exit 3); MLFLOW_HTTP_REQUEST_* "
                                    "variables set in the environment win")
    embedding_map: bool = setting(True, doc="log a 2-D PCA map of the test-set embeddings coloured by label")
    augment_grid_images: int = setting(8, domain=Range(0, 256), doc="source images in the augmented-views grid")
    heartbeat_s: float = setting(60.0, domain=Range(1, 3600), resumable=True,
                                 doc="an open run's `sslflow.heartbeat` tag is refreshed this often")
    orphan_after_s: float = setting(900.0, domain=Range(10, 30 * 86400), resumable=True,
                                    doc="a RUNNING run silent this long was left by a dead process: the next run "
                                        "of its experiment marks it KILLED")

    def check(self) -> None:
        from sslflow.core.secrets import http_credentials_in_uri, redact_uri

        if http_credentials_in_uri(self.uri):
            raise ConfigError(f"tracking.uri {redact_uri(self.uri)} carries credentials: put them in "
                              "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        if self.orphan_after_s < 3 * self.heartbeat_s:
            raise ConfigError(f"tracking.orphan_after_s {self.orphan_after_s:g} must be at least 3 x "
                              f"tracking.heartbeat_s ({self.heartbeat_s:g}): a live run would look dead")


@dataclass(frozen=True)
class PromotionConfig:
    """The gate that moves the `champion` alias."""

    metric: str = setting("linear_top1", domain=Pattern(r"(knn|linear|finetune)_top[15]",
                                                        "<protocol>_top1 or _top5 of knn, linear or finetune"),
                          doc="evaluation metric compared with the current champion's")
    min_delta: float = setting(0.5, domain=NON_NEGATIVE, doc="points the new version must beat the champion by")


# ------------------------------------------------------------------------------------ pipeline
@dataclass(frozen=True)
class PipelineConfig:
    """Orchestration: flows, deployments, the nightly retrain (docs/orchestration.md)."""

    store: str = setting("data/store", domain=PATH, doc="the image store (train/ and test/ splits)")
    incoming: str = setting("data/incoming", domain=PATH, doc="`retrain` ingests this folder into the train split")
    set_aside: str = setting("data/rejected", domain=PATH,
                             doc="`retrain` moves a batch of the incoming folder that validation rejected to "
                                 "<set_aside>/<batch>/ with its report, so the next run does not fail on it again")
    runs: str = setting("runs", domain=PATH, doc="run directories: runs/<run name>/")
    reports: str = setting("reports", domain=PATH, doc="ingest / validation reports")
    min_new_images: int = setting(100, domain=NON_NEGATIVE,
                                  doc="`retrain` trains when at least this many train images arrived")
    force: bool = setting(False, doc="`retrain` trains whatever arrived")
    retries: int = setting(3, domain=Range(0, 100), doc="I/O tasks: retries with exponential backoff")
    retry_delay_s: float = setting(2.0, domain=Range(0, 3600), doc="first retry after this long, then x2 each time")
    lock: str = setting("sslflow-retrain", domain=NAME, doc="Prefect global concurrency limit (1 slot)")
    lock_timeout_s: float = setting(30.0, domain=Range(0, 86400), doc="a retrain waits this long for the slot")
    lock_lease_s: float = setting(120.0, domain=Range(60, 86400),
                                  doc="the slot's lease, renewed while its holder lives: a killed retrain frees it "
                                      "after this long (Prefect's minimum is 60)")
    cron: str = setting("0 3 * * *", domain=CRON, doc="the `retrain` deployment's schedule")
    timezone: str = setting("UTC", domain=Pattern(r"[A-Za-z_+\-/0-9]+", "an IANA time zone, e.g. UTC"))
    work_pool: str = setting("sslflow-process", domain=NAME, doc="process work pool of the deployments")
    gpu_work_pool: str = setting("sslflow-gpu", domain=NAME, doc="`sslflow deploy --gpu`: pool on GPU hosts")
    gpu_limit: str = setting("", domain=Pattern(r"([A-Za-z0-9][A-Za-z0-9_.-]*)?", "empty or a name"),
                             doc="global concurrency limit held by each pretraining ('' = none), e.g. gpu")
    pretrain_deployment: str = setting("", domain=DEPLOYMENT,
                                       doc="'' = `train` pretrains in its own process; pretrain/gpu = on that pool")
    retrain_policy: str = setting("count", domain=Choices(("count", "drift", "any")),
                                  doc="`retrain` trains on: count = min_new_images new images; drift = the "
                                      "champion-embedding drift test rejects at drift_level; any = either")
    drift_level: float = setting(0.01, domain=Range(0, 1, lo_open=True, hi_open=True),
                                 doc="significance level of the drift test (MMD, permutation p-value)")
    drift_reference_images: int = setting(1000, domain=Range(2, 1 << 20),
                                          doc="seeded sample of the trained-on images embedded as the drift "
                                              "reference (the new images are capped at the same number)")
    drift_permutations: int = setting(500, domain=Range(1, 1 << 20), doc="permutations of the drift test")
    drift_clusters: int = setting(8, domain=Range(1, 1024), doc="k-means clusters of the reference for the "
                                                                "per-cluster shares of the drift report")
    select_n: int = setting(0, domain=NON_NEGATIVE, doc="`retrain`: after training, pick this many unlabeled "
                                                        "images to label next (k-center greedy; 0 = off)")


# ------------------------------------------------------------------------------------ tuning
@dataclass(frozen=True)
class SearchDimConfig:
    """One entry of `tune.space`: a dotted settings key with a range or a list of choices.

    `param` may hold `{method}` (the trial's method) and an index for one list element:
    `pretrain.{method}.temperature`, `augment.crop_scale[0]`.
    """

    param: str = setting("", doc="dotted settings key")
    low: float | None = setting(None, doc="range: lower bound")
    high: float | None = setting(None, doc="range: upper bound")
    log: bool = setting(False, doc="range: sample log-uniformly")
    type: str = setting("float", domain=Choices(("float", "int")))
    choices: tuple[Any, ...] = setting((), doc="a list of values instead of a range")
    methods: tuple[str, ...] = setting((), doc="only for these methods; [] = every method")
    enabled: bool = setting(True)

    def check(self) -> None:
        if not self.param.strip():
            raise ConfigError("param must name a settings key, e.g. pretrain.{method}.temperature")
        if self.choices:
            if any(isinstance(c, list | tuple | dict | Mapping) for c in self.choices):
                raise ConfigError("choices must be a list of plain values")
            if self.low is not None or self.high is not None or self.log:
                raise ConfigError("give either choices or low/high, not both")
            return
        if self.low is None or self.high is None:
            raise ConfigError("needs low and high (or choices)")
        if not self.low < self.high:
            raise ConfigError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ConfigError(f"a log range needs low > 0; got {self.low:g}")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ConfigError("low and high must be finite")


def _default_space() -> types.MappingProxyType:
    from sslflow.ssl_models.methods import METHODS

    dims = {
        "temperature": SearchDimConfig("pretrain.{method}.temperature", 0.05, 1.0, log=True,
                                       methods=("simclr", "moco", "dino")),
        "queue_size": SearchDimConfig("pretrain.moco.queue_size",
                                      choices=(1024, 2048, 4096, 8192, 16384, 32768, 65536), methods=("moco",)),
        "strength": SearchDimConfig("augment.strength", 0.25, 1.5),
        "crop_min_scale": SearchDimConfig("augment.crop_scale[0]", 0.08, 0.5),
        "lr": SearchDimConfig("pretrain.lr", 0.05, 2.0, log=True, enabled=False),
        "method": SearchDimConfig("pretrain.method", choices=tuple(sorted(METHODS)), enabled=False),
    }
    return types.MappingProxyType(dims)


@dataclass(frozen=True)
class TuneConfig:
    """Optuna search (`sslflow tune`, the `tune` flow): docs/tuning.md."""

    study: str = setting("sslflow", domain=NAME, doc="workers naming the same storage and study share its trials")
    storage: str = setting("", doc="'' = sqlite:///<project>/optuna.db; env SSLFLOW_TUNE_STORAGE wins over ''")
    trials: int = setting(20, domain=Range(1, 1_000_000), doc="target of finished trials (complete + pruned)")
    timeout_s: float = setting(0.0, domain=NON_NEGATIVE, doc="no new trial after this many seconds (0 = no limit)")
    budget_epochs: int = setting(5, domain=Range(1, 100_000), doc="pretraining epochs per trial")
    baseline_trial: bool = setting(True, doc="trial 0 of a new study = the base configuration")
    holdout_fraction: float = setting(0.1, domain=Range(0, 1, hi_open=True),
                                      doc="kNN queries: this part of the labeled train images (0 = the test split)")
    sampler: str = setting("tpe", domain=Choices(("tpe", "random")))
    sampler_seed: int = setting(0, domain=Range(0, 2**32 - 1))
    startup_trials: int = setting(5, domain=NON_NEGATIVE, doc="tpe: random trials before the model-based search")
    pruner: str = setting("median", domain=Choices(("median", "hyperband", "none")))
    pruner_startup_trials: int = setting(3, domain=NON_NEGATIVE)
    pruner_warmup_epochs: int = setting(1, domain=NON_NEGATIVE)
    heartbeat_interval_s: int = setting(60, domain=Range(1, 86400))
    grace_period_s: int = setting(180, domain=Range(1, 86400))
    max_retries: int = setting(2, domain=NON_NEGATIVE, doc="a dead trial is resumed this many times")
    runs: str = setting("runs/tune", domain=PATH, doc="trial run directories: <runs>/<study>/trial-<number>/")
    output: str = setting("params/tuned.yaml", domain=PATH, doc="the best configuration as a settings file")
    train_best: bool = setting(True, doc="the `tune` flow then trains the best configuration with the full epochs")
    space: Mapping[str, SearchDimConfig] = field(default_factory=_default_space,
                                                 metadata={"doc": "what is searched (docs/tuning.md)"})

    def check(self) -> None:
        if self.grace_period_s <= self.heartbeat_interval_s:
            raise ConfigError(f"tune.grace_period_s ({self.grace_period_s}) must exceed tune.heartbeat_interval_s "
                              f"({self.heartbeat_interval_s}): a live trial would be failed between two heartbeats")
        enabled = [d for d in self.space.values() if d.enabled]
        if not enabled:
            raise ConfigError("tune.space: every entry is disabled; nothing to search")
        params = [d.param for d in enabled]
        if len(set(params)) != len(params):
            raise ConfigError(f"tune.space: a setting appears twice ({', '.join(params)})")


__all__ = [
    "IngestConfig",
    "PipelineConfig",
    "PromotionConfig",
    "SearchDimConfig",
    "TrackingConfig",
    "TuneConfig",
    "ValidateConfig",
    "VersioningConfig",
]
