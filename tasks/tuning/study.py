"""`sslflow tune`: an Optuna study over pretraining parameters, objective = online kNN top-1.

    from sslflow.tasks.tuning.study import tune
    result = tune("data/store", ["params/profiles/demo.yaml"], trials=20)

Each trial pretrains for `tune.budget_epochs` epochs with the sampled values on top of the
base params (same seed for every trial, recorded), reports kNN top-1 on the test split after
every epoch to the pruner, and returns the last one. Everything about scale comes from
Optuna itself:

- storage: any SQLAlchemy URL (`RDBStorage`). The embedded default is SQLite in the project
  (`optuna.db`, one process); workers on many hosts share a PostgreSQL URL and a study name.
- a worker that dies (kill -9, lost host) stops heart-beating; after `tune.grace_period_s`
  its trial is failed and re-enqueued (`RetryHeartbeatStaleTrialCallback`) and the retry resumes
  from the dead trial's last epoch checkpoint. Ctrl-C re-enqueues the running trial at once.
- the target `tune.trials` counts finished (complete + pruned) trials in the study, so
  rerunning the same command continues an interrupted study up to it.

Diverged trials (NaN loss) are pruned, not failed: a configuration that blows up is a bad
configuration, and the study goes on. Any other error stops the worker.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError
from sslflow.tasks.tuning.space import (
    TuneConfig,
    TuneParams,
    as_overrides,
    base_point,
    base_values,
    load_tune_params,
    sample,
    write_best_params,
)

PROJECT_DIR = Path(__file__).resolve().parents[2]
STORAGE_ENV = "SSLFLOW_TUNE_STORAGE"
FINISHED = ("COMPLETE", "PRUNED")


@dataclass
class TuneResult:
    study: str
    storage: str  # password hidden
    target_trials: int
    complete: int
    pruned: int
    failed: int
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    output: str | None  # the params file with the best configuration
    trials_here: list[int] = field(default_factory=list)  # trial numbers this worker ran
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ storage
def resolve_storage(cfg: TuneConfig, project_dir: Path = PROJECT_DIR) -> str:
    """`tune.storage` > env `SSLFLOW_TUNE_STORAGE` > SQLite in the project directory."""
    if cfg.storage.strip():
        return cfg.storage.strip()
    env = os.environ.get(STORAGE_ENV, "").strip()
    return env or f"sqlite:///{(Path(project_dir) / 'optuna.db').resolve()}"


def storage_label(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def open_storage(url: str, cfg: TuneConfig, attempts: int = 4) -> Any:
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
    with _quiet_optuna():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retries)
    for attempt in range(1, attempts + 1):
        try:
            with _quiet_optuna():
                return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=cfg.heartbeat_interval_s,
                                  grace_period=cfg.grace_period_s, heartbeat_stale_trial_callback=retry)
        except ImportError as e:
            raise UserError(f"Optuna storage {storage_label(url)}: driver missing: {_first_line(e)}") from None
        except ValueError as e:
            raise UserError(f"Optuna storage {storage_label(url)} is not a valid URL: {_first_line(e)}") from None
        except Exception as e:  # sqlalchemy errors: server down, wrong password, no database, creation race
            if attempt == attempts:
                kind = "unusable" if isinstance(e, optuna.exceptions.StorageInternalError) else "unreachable"
                raise UserError(f"Optuna storage {storage_label(url)} is {kind}: {_first_line(e)}") from None
            time.sleep(0.5 * attempt + random.random())
    raise AssertionError("unreachable")


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna warns that heartbeats, retries and constant_liar are experimental, every time."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        yield


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def make_sampler(cfg: TuneConfig, joining: bool) -> Any:
    """TPE (or random) seeded with `tune.sampler_seed`; a worker joining a study someone else
    started mixes in its host and pid, or all workers would propose the same configurations."""
    import optuna

    seed = cfg.sampler_seed
    if joining:
        seed = hash((cfg.sampler_seed, socket.gethostname(), os.getpid())) % 2**31
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with _quiet_optuna():  # constant_liar is experimental
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials, constant_liar=True)


def make_pruner(cfg: TuneConfig) -> Any:
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.pruner_warmup_epochs)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.budget_epochs)
    return optuna.pruners.NopPruner()


def open_study(name: str, storage: Any, cfg: TuneConfig) -> tuple[Any, bool]:
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


# ------------------------------------------------------------------------------------ data
def objective_stores(train: Any, test: Any, holdout_fraction: float, seed: int, study_dir: Path) -> tuple[Any, Any]:
    """(kNN memory bank, kNN queries) of the objective.

    With `holdout_fraction` > 0 the queries are a class-stratified random part of the train
    split's labeled images and the bank is the rest, so the test split stays unseen by the
    search and the champion's test score is not selected on itself. The two stores are
    written once per (data, fraction, seed) under the study directory (atomically: workers
    may start together). 0 = the test split is the query set.
    """
    import numpy as np

    from sslflow.ssl_models.store import ImageStore

    if holdout_fraction <= 0:
        return train, test
    key = f"{'-'.join(sh.id for sh in train.shards)}-{holdout_fraction}-{seed}"
    root = study_dir / f"holdout-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if not (ImageStore.is_store(root / "bank") and ImageStore.is_store(root / "queries")):
        labels = train.labels()
        rng = np.random.default_rng(seed)
        query = np.zeros(len(labels), dtype=bool)
        for c in np.unique(labels[labels >= 0]):
            idx = np.flatnonzero(labels == c)
            take = max(1, round(holdout_fraction * len(idx)))
            if take >= len(idx):
                raise UserError(f"tune.holdout_fraction {holdout_fraction}: class {train.classes[c]!r} has only "
                                f"{len(idx)} labeled images; lower it or set 0 to use the test split")
            query[rng.choice(idx, size=take, replace=False)] = True
        if not query.any():
            raise UserError(f"{train.root} has no labeled images: the kNN objective needs labels "
                            "(or set tune.holdout_fraction=0 to use the test split)")
        images = train.images()
        tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for name, keep in (("bank", ~query & (labels >= 0)), ("queries", query)):
            out = ImageStore.create(tmp / name, train.height, train.width)
            out.publish([], list(train.classes))  # the train split's label numbering, in both
            out.add(images[keep], [train.classes[i] for i in labels[keep]])
        with suppress(OSError):  # another worker won the race: its copy is identical
            tmp.rename(root)
        shutil.rmtree(tmp, ignore_errors=True)
    return ImageStore.open(root / "bank"), ImageStore.open(root / "queries")


# ------------------------------------------------------------------------------------ objective
def frozen_trial(trial: Any) -> Any:
    """The stored record of a live trial (system attributes included)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def retried_from(trial: Any) -> int | None:
    """The failed trial this one directly re-runs (the last of its retry history), if any."""
    history = frozen_trial(trial).system_attrs.get("retry_history") or []
    return int(history[-1]) if history else None


class PruneOnKnn:
    """Pretrainer callback: report each epoch's kNN top-1 to the trial; raise TrialPruned
    when the pruner says so (after the epoch's checkpoint is written)."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        import optuna

        if epoch < 1 or "knn_top1" not in metrics:  # epoch 0 is the random-init encoder
            return
        self.trial.report(float(metrics["knn_top1"]), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"kNN top-1 {metrics['knn_top1']:.2f} after epoch {epoch}")


@dataclass
class Objective:
    """One trial: sample, pretrain `budget_epochs` (resuming a retried trial), return kNN top-1."""

    study_name: str
    files: list[str]
    overrides: list[str]  # engine overrides of the base configuration
    base: dict[str, Any]  # flat base params
    tp: TuneParams
    stores: tuple[Any, Any, Any]  # train, eval train, eval test
    runs_dir: Path
    tracker: Any
    parent_run_id: str
    log: Callable[[str], None]
    progress_bar: bool = False
    trials_here: list[int] = field(default_factory=list)

    def trial_dir(self, number: int) -> Path:
        return self.runs_dir / f"trial-{number}"

    def __call__(self, trial: Any) -> float:
        import optuna

        from sslflow.core.settings import load_params
        from sslflow.ssl_models.train import CHECKPOINT, Pretrainer, TrainingDiverged

        cfg = self.tp.tune
        self.trials_here.append(trial.number)
        values = sample(trial, self.tp.space, str(self.base["pretrain.method"]))
        fixed = [f"pretrain.epochs={cfg.budget_epochs}", "pretrain.eval_every=1"]
        try:
            params = load_params(self.files, [*self.overrides, *as_overrides(values, self.base), *fixed])
        except UserError as e:
            raise UserError(f"trial {trial.number}: the sampled values {values} are invalid: {e}") from None
        trial.set_user_attr("seed", params.seed)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        run_dir, resume = self._run_dir(trial, CHECKPOINT)
        trial.set_user_attr("run_dir", str(run_dir))
        retry_of = retried_from(trial)
        run_id = self.tracker.start_trial(self.parent_run_id, trial.number, self.study_name, params, values,
                                          {"seed": params.seed, "optuna.retry_of": retry_of if retry_of is not None
                                           else "", "run_dir": run_dir})
        trial.set_user_attr("mlflow_run_id", run_id)
        if retry_of is not None:
            self._close_dead_run(trial, retry_of)
        self.log(f"trial {trial.number}: {values}" + (f" (resuming trial {retry_of})" if resume else ""))
        mlflow_cb = self.tracker.trial_callback(run_id)
        try:
            trainer = Pretrainer(self.stores[0], params, run_dir, resume=resume,
                                 callbacks=[mlflow_cb, PruneOnKnn(trial)],
                                 eval_stores=(self.stores[1], self.stores[2]), progress_bar=self.progress_bar)
            self._replay(trainer.history.epochs, trial, mlflow_cb)
            result = trainer.fit()
        except optuna.TrialPruned as e:
            mlflow_cb.flush()
            self.log(f"trial {trial.number}: pruned ({e})")
            self.tracker.end_trial(run_id, "PRUNED", reason=str(e))
            self._drop_checkpoints(run_dir)
            raise
        except TrainingDiverged as e:
            mlflow_cb.flush()
            self.tracker.end_trial(run_id, "PRUNED", reason=f"diverged: {e}")
            trial.set_user_attr("diverged", True)
            self.log(f"trial {trial.number}: pruned (diverged)")
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except KeyboardInterrupt:
            self._requeue(trial)  # resumed from its checkpoint by the next run of the study
            self.tracker.end_trial(run_id, "FAIL", reason="interrupted (Ctrl-C); re-enqueued")
            raise
        except BaseException as e:
            self.tracker.end_trial(run_id, "FAIL", reason=f"{type(e).__name__}: {e}")
            raise
        value = float(result.metrics["knn_top1"])
        self.log(f"trial {trial.number}: kNN top-1 {value:.2f} after {cfg.budget_epochs} epochs")
        mlflow_cb.flush()
        self.tracker.end_trial(run_id, "COMPLETE", value=value)
        self._drop_checkpoints(run_dir)
        return value

    def _run_dir(self, trial: Any, checkpoint: str) -> tuple[Path, bool]:
        """A retried trial takes over the dead trial's directory (and its checkpoint)."""
        run_dir = self.trial_dir(trial.number)
        orig = retried_from(trial)
        if orig is not None and not run_dir.exists():
            src = self.trial_dir(orig)
            if (src / checkpoint).is_file():
                src.rename(run_dir)
        if run_dir.exists() and not (run_dir / checkpoint).is_file():
            shutil.rmtree(run_dir)  # a trial that died before its first checkpoint: start over
        return run_dir, (run_dir / checkpoint).is_file()

    @staticmethod
    def _replay(epochs: list[dict[str, float]], trial: Any, mlflow_cb: Any) -> None:
        """A resumed trial reports the epochs the dead one already trained (pruner + MLflow)."""
        for m in epochs:
            mlflow_cb.on_epoch_end(int(m["epoch"]), {k: v for k, v in m.items() if k != "epoch"})
            if m["epoch"] >= 1 and "knn_top1" in m:
                trial.report(float(m["knn_top1"]), int(m["epoch"]))

    def _close_dead_run(self, trial: Any, number: int) -> None:
        """The MLflow run of a trial whose worker died is still RUNNING: close it as FAILED."""
        dead = next((t for t in trial.study.get_trials(deepcopy=False) if t.number == number), None)
        run_id = dead.user_attrs.get("mlflow_run_id") if dead is not None else None
        if run_id and self.tracker.client.get_run(run_id).info.status == "RUNNING":
            self.tracker.end_trial(run_id, "FAIL", reason=f"its worker stopped heart-beating; "
                                                          f"resumed as trial {trial.number}")

    def _requeue(self, trial: Any) -> None:
        import optuna

        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.tp.tune.max_retries)
        retry(trial.study, frozen_trial(trial))

    @staticmethod
    def _drop_checkpoints(run_dir: Path) -> None:
        """Finished trials keep encoder + metrics; optimizer checkpoints are only for resuming."""
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "data-cache", ignore_errors=True)


# ------------------------------------------------------------------------------------ tune
def tune(store: str | Path, params_files: Sequence[str | Path] = (), overrides: Sequence[str] = (), *,
         trials: int | None = None, study: str | None = None, storage: str | None = None,
         timeout_s: float | None = None, output: str | Path | None = None, runs_dir: str | Path | None = None,
         log: Callable[[str], None] = print, progress_bar: bool = False) -> TuneResult:
    """Run (or join, or resume) a study until it holds `trials` finished trials or `timeout_s`
    passes; write the best configuration to `output`; return the study's summary.

    `params_files` + engine `overrides` are the base configuration (the last file also feeds
    the `tune`/`tracking` sections); arguments given here win over `tune.*`.
    """
    import optuna

    from sslflow.ssl_models.store import ImageStore
    from sslflow.tasks.pipeline.decisions import partition_overrides
    from sslflow.tasks.tracking.track import check_tracking_server, load_tracking_params, resolve_tracking_uri
    from sslflow.tasks.tuning.tracking import StudyTracker

    files = [str(f) for f in params_files]
    last = files[-1] if files else None
    tune_ov = [o for o in overrides if o.split(".", 1)[0].strip() == "tune"]
    ov = partition_overrides([o for o in overrides if o not in tune_ov])
    tp = load_tune_params(last, tune_ov)
    cfg = tp.tune
    trials = cfg.trials if trials is None else trials
    if trials <= 0:
        raise UserError(f"--trials must be > 0; got {trials}")
    timeout = cfg.timeout_s if timeout_s is None else timeout_s
    name = study or cfg.study
    engine_ov = list(ov["engine"])
    base = base_values(files, engine_ov)  # a bad base configuration fails here, in one line
    tracking = load_tracking_params(last, ov["tracking"]).tracking
    uri = resolve_tracking_uri(tracking)
    check_tracking_server(uri, tracking.preflight_timeout_s)

    store = Path(store)
    for split in ("train", "test"):
        if not ImageStore.is_store(store / split):
            raise UserError(f"{store / split} is not an image store; run `sslflow ingest` (or `sslflow run`) first")
    url = storage or resolve_storage(cfg)
    label = storage_label(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = open_storage(url, cfg)  # an unreachable server fails here, before any data is read
    train = ImageStore.open(store / "train")
    study_dir = Path(runs_dir or cfg.runs) / name
    bank, queries = objective_stores(train, ImageStore.open(store / "test"), cfg.holdout_fraction,
                                     int(base["seed"]), study_dir)
    with _quiet_optuna():
        study_obj, created = open_study(name, opened, cfg)
        if created and cfg.baseline_trial:  # the current configuration, under the same budget
            study_obj.enqueue_trial(base_point(tp.space, base), user_attrs={"baseline": True})
    tracker = StudyTracker(tracking, uri)
    config = {**asdict(cfg), "trials": trials, "timeout_s": timeout, "study": name, "storage": label,
              "space": {d.name: d.param for d in tp.space}}
    parent = tracker.parent_run(study_obj, created=created, config=config, storage_label=label)
    log(f"tune: study {name!r} on {label} ({'new' if created else 'joined'}), "
        f"{_finished(study_obj)}/{trials} trials finished; MLflow parent run {parent} on {uri}")

    objective = Objective(name, files, engine_ov, base, tp, (train, bank, queries), study_dir, tracker, parent, log,
                          progress_bar)
    interrupted = False
    try:
        if _finished(study_obj) < trials:
            with _quiet_optuna():
                study_obj.optimize(objective, n_trials=None, timeout=timeout or None,
                                   callbacks=[optuna.study.MaxTrialsCallback(
                                       trials, states=(optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED))],
                                   gc_after_trial=True)
    except KeyboardInterrupt:
        interrupted = True
        log(f"tune: interrupted; the running trial is re-enqueued: rerun the same command to resume study {name!r}")
    except BaseException:
        _safe(tracker.summarize, study_obj, parent, None, log)
        _safe(tracker.end_parent, parent, "FAILED")
        raise

    result = summarize(study_obj, trials, label, objective.trials_here, parent, uri, interrupted)
    if result.best_trial is not None:
        header = [f"study {name!r} on {label}: trial {result.best_trial} of {result.complete + result.pruned}, "
                  f"kNN top-1 {result.best_value:.2f} after {cfg.budget_epochs} epochs",
                  "searched: " + ", ".join(result.best_params)]
        out = write_best_params(output or cfg.output, result.best_params, base, base_file=last, header=header)
        result.output = str(out)
    tracker.summarize(study_obj, parent, Path(result.output) if result.output else None, log)
    tracker.end_parent(parent, "KILLED" if interrupted else "FINISHED")
    if interrupted:
        raise KeyboardInterrupt
    return result


def _finished(study: Any) -> int:
    counts = count_states(study)
    return sum(counts.get(s, 0) for s in FINISHED)


def summarize(study: Any, target: int, label: str, trials_here: list[int], parent: str | None,
              uri: str | None, interrupted: bool = False) -> TuneResult:
    from sslflow.tasks.tuning.tracking import best_trial

    counts = count_states(study)
    best = best_trial(study)
    return TuneResult(study=study.study_name, storage=label, target_trials=target,
                      complete=counts.get("COMPLETE", 0), pruned=counts.get("PRUNED", 0),
                      failed=counts.get("FAIL", 0), best_value=None if best is None else float(best.value),
                      best_params=dict(best.params) if best is not None else {},
                      best_trial=None if best is None else best.number, output=None,
                      trials_here=list(trials_here), mlflow_run_id=parent, tracking_uri=uri,
                      interrupted=interrupted)


def _safe(fn: Callable[..., Any], *args: Any) -> None:
    with suppress(Exception):  # keep the original error
        fn(*args)

