"""Where a study lives and how it is opened: storage URL, RDB storage with heartbeats, sampler,
pruner, and the create-or-join of a study by name (workers starting at once agree on one)."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sslflow.core.errors import ServiceUnavailable, UserError
from sslflow.core.project import default_optuna_storage

STORAGE_ENV = "SSLFLOW_TUNE_STORAGE"


def resolve_storage(settings: Any) -> str:
    """`tune.storage` > env `SSLFLOW_TUNE_STORAGE` > `<project>/optuna.db` (SQLite)."""
    if settings.tune.storage.strip():
        return settings.tune.storage.strip()
    env = os.environ.get(STORAGE_ENV, "").strip()
    return env or default_optuna_storage(settings.project)


def storage_label(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def open_storage(url: str, cfg: Any, attempts: int = 4) -> Any:
    """RDBStorage with heartbeats and retry of trials whose worker died.

    Workers started together on an empty database race to create Optuna's tables (one of
    them gets a duplicate-key error from PostgreSQL's catalogue): creation is idempotent, so
    a failed attempt is retried after a short pause before it counts as an error.
    """
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # concurrent readers wait instead of "database is locked"
    with quiet_optuna():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retries)
    for attempt in range(1, attempts + 1):
        try:
            with quiet_optuna():
                return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=cfg.heartbeat_interval_s,
                                  grace_period=cfg.grace_period_s, heartbeat_stale_trial_callback=retry)
        except ImportError as e:
            raise UserError(f"Optuna storage {storage_label(url)}: driver missing: {first_line(e)}") from None
        except ValueError as e:
            raise UserError(f"Optuna storage {storage_label(url)} is not a valid URL: {first_line(e)}") from None
        except Exception as e:  # sqlalchemy errors: server down, wrong password, no database, creation race
            if attempt == attempts:
                kind = "unusable" if isinstance(e, optuna.exceptions.StorageInternalError) else "unreachable"
                raise ServiceUnavailable(f"Optuna storage {storage_label(url)} is {kind}: {first_line(e)}") from None
            time.sleep(0.5 * attempt + random.random())
    raise AssertionError("unreachable")


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna warns that heartbeats, retries and constant_liar are experimental, every time."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        yield


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def make_sampler(cfg: Any, joining: bool) -> Any:
    """TPE (or random) seeded with `tune.sampler_seed`; a worker joining a study someone else
    started mixes in its host and pid, or all workers would propose the same configurations."""
    import optuna

    seed = cfg.sampler_seed
    if joining:
        seed = hash((cfg.sampler_seed, socket.gethostname(), os.getpid())) % 2**31
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with quiet_optuna():  # constant_liar is experimental
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials, constant_liar=True)


def make_pruner(cfg: Any) -> Any:
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.pruner_warmup_epochs)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.budget_epochs)
    return optuna.pruners.NopPruner()


def open_study(name: str, storage: Any, cfg: Any) -> tuple[Any, bool]:
    """(study, created): exactly one of several workers starting at once creates it (the
    storage's unique study name decides), the others load it."""
    import optuna

    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                    sampler=make_sampler(cfg, joining=False), pruner=make_pruner(cfg))
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(cfg, joining=True),
                                  pruner=make_pruner(cfg))
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise UserError(f"Optuna study {name!r} exists and minimizes; sslflow maximizes kNN top-1 "
                            "(choose another --study)") from None
        return study, False


def count_states(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts
