"""One trial of a study: sample, pretrain `tune.budget_epochs` (resuming a retried trial from
its dead predecessor's checkpoint), report each epoch's kNN top-1 to the pruner, return the last."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError
from sslflow.core.settings import Settings
from sslflow.tasks.tuning.interrupt import StopRequest
from sslflow.tasks.tuning.space import SearchDim, as_overrides, sample


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
    settings: Settings  # the base configuration
    space: tuple[SearchDim, ...]
    stores: tuple[Any, Any, Any]  # train, eval train, eval test
    runs_dir: Path
    tracker: Any
    parent_run_id: str
    log: Callable[[str], None]
    progress_bar: bool = False
    trials_here: list[int] = field(default_factory=list)
    stop: StopRequest = field(default_factory=StopRequest)  # Ctrl-C: stop at the next step

    def trial_dir(self, number: int) -> Path:
        return self.runs_dir / f"trial-{number}"

    def __call__(self, trial: Any) -> float:
        import optuna

        from sslflow.ssl_models.errors import ConfigError
        from sslflow.ssl_models.train import CHECKPOINT, Pretrainer, TrainingDiverged

        cfg = self.settings.tune
        self.trials_here.append(trial.number)
        values = sample(trial, self.space, self.settings.pretrain.method)
        fixed = [f"pretrain.epochs={cfg.budget_epochs}", "pretrain.eval_every=1", "pretrain.export=false"]
        try:
            params = self.settings.updated([*as_overrides(values, self.settings), *fixed])
        except (UserError, ConfigError) as e:
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
                                 callbacks=[mlflow_cb, PruneOnKnn(trial), self.stop],
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

        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.settings.tune.max_retries)
        retry(trial.study, frozen_trial(trial))

    @staticmethod
    def _drop_checkpoints(run_dir: Path) -> None:
        """Finished trials keep encoder + metrics; optimizer checkpoints are only for resuming."""
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "data-cache", ignore_errors=True)
