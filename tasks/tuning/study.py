"""`sslflow tune`: an Optuna study over pretraining parameters, objective = online kNN top-1.

    from sslflow.tasks.tuning.study import tune
    result = tune("data/store", load_settings(), trials=20)

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

from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError
from sslflow.core.settings import Settings
from sslflow.ssl_models.schema import as_dict
from sslflow.tasks.tuning.holdout import objective_stores
from sslflow.tasks.tuning.interrupt import StopRequest
from sslflow.tasks.tuning.objective import Objective
from sslflow.tasks.tuning.space import base_point, search_space, write_best_params
from sslflow.tasks.tuning.storage import (
    count_states,
    open_storage,
    open_study,
    quiet_optuna,
    resolve_storage,
    storage_label,
)

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


# ------------------------------------------------------------------------------------ tune
def tune(store: str | Path, settings: Settings, *, trials: int | None = None, study: str | None = None,
         storage: str | None = None, timeout_s: float | None = None, output: str | Path | None = None,
         runs_dir: str | Path | None = None, base_file: str | Path | None = None,
         log: Callable[[str], None] = print, progress_bar: bool = False) -> TuneResult:
    """Run (or join, or resume) a study until it holds `trials` finished trials or `timeout_s`
    passes; write the best configuration to `output`; return the study's summary.

    `settings` is the base configuration (its `tune` and `tracking` sections apply; arguments
    given here win over `tune.*`); `base_file` is the settings file it came from, which the
    best configuration is written on top of (comments kept).
    """
    import optuna

    from sslflow.ssl_models.store import ImageStore
    from sslflow.tasks.tracking.backend import check_tracking_server, resolve_tracking_uri
    from sslflow.tasks.tuning.tracking import StudyTracker

    cfg = settings.tune
    trials = cfg.trials if trials is None else trials
    if trials <= 0:
        raise UserError(f"--trials must be > 0; got {trials}")
    timeout = cfg.timeout_s if timeout_s is None else timeout_s
    name = study or cfg.study
    space = search_space(settings)
    uri = resolve_tracking_uri(settings)
    check_tracking_server(uri, settings.tracking.preflight_timeout_s)

    store = Path(store)
    for split in ("train", "test"):
        if not ImageStore.is_store(store / split):
            raise UserError(f"{store / split} is not an image store; run `sslflow ingest` (or `sslflow run`) first")
    url = storage or resolve_storage(settings)
    label = storage_label(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = open_storage(url, cfg)  # an unreachable server fails here, before any data is read
    train = ImageStore.open(store / "train")
    study_dir = settings.path(runs_dir or cfg.runs) / name
    bank, queries = objective_stores(train, ImageStore.open(store / "test"), cfg.holdout_fraction,
                                     settings.seed, study_dir)
    with quiet_optuna():
        study_obj, created = open_study(name, opened, cfg)
        if created and cfg.baseline_trial:  # the current configuration, under the same budget
            study_obj.enqueue_trial(base_point(space, settings), user_attrs={"baseline": True})
    tracker = StudyTracker(settings, uri)
    config = {**{k: v for k, v in as_dict(cfg).items() if k != "space"}, "trials": trials, "timeout_s": timeout,
              "study": name, "storage": label, "space": {d.name: d.param for d in space}}
    parent = tracker.parent_run(study_obj, opened, config=config, storage_label=label)
    log(f"tune: study {name!r} on {label} ({'new' if created else 'joined'}), "
        f"{_finished(study_obj)}/{trials} trials finished; MLflow parent run {parent} on {uri}")

    objective = Objective(name, settings, space, (train, bank, queries), study_dir, tracker, parent, log,
                          progress_bar)
    interrupted = False
    try:
        if _finished(study_obj) < trials:
            with quiet_optuna(), objective.stop.on_sigint():
                study_obj.optimize(objective, n_trials=None, timeout=timeout or None,
                                   callbacks=[optuna.study.MaxTrialsCallback(
                                       trials, states=(optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)),
                                              _stop_when_asked(objective.stop)],
                                   gc_after_trial=True)
        interrupted = objective.stop.requested  # Ctrl-C after the last training step of a trial
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        _safe(tracker.summarize, study_obj, parent, None, log)
        _safe(tracker.end_parent, parent, "FAILED")
        raise

    if interrupted:
        log(f"tune: interrupted; a trial cut short is re-enqueued: rerun the same command to resume study {name!r}")
    result = summarize(study_obj, trials, label, objective.trials_here, parent, uri, interrupted)
    if result.best_trial is not None:
        header = [f"study {name!r} on {label}: trial {result.best_trial} of {result.complete + result.pruned}, "
                  f"kNN top-1 {result.best_value:.2f} after {cfg.budget_epochs} epochs",
                  "searched: " + ", ".join(result.best_params)]
        out = write_best_params(settings.path(output or cfg.output), result.best_params, settings,
                                base_file=base_file, header=header)
        result.output = str(out)
    tracker.summarize(study_obj, parent, Path(result.output) if result.output else None, log)
    tracker.end_parent(parent, "KILLED" if interrupted else "FINISHED")
    if interrupted:
        raise KeyboardInterrupt
    return result


def _stop_when_asked(stop: StopRequest) -> Callable[[Any, Any], None]:
    """An Optuna callback: no new trial after a Ctrl-C that came between training steps."""

    def callback(study: Any, trial: Any) -> None:
        if stop.requested:
            study.stop()

    return callback


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

