"""MLflow side of a study: one parent run per study, one nested run per trial.

The parent run's id is a user attribute of the Optuna study, so every worker (and every
resumption) of the study logs under the same parent. Trials are nested runs (tag
`mlflow.parentRunId`) with the full flattened params, the per-epoch kNN curve (`epoch/*`,
the same keys as a training run), and their final Optuna state as the `optuna.state` tag and
the run status (COMPLETE -> FINISHED, PRUNED -> KILLED, FAIL -> FAILED). The parent gets the
best value and params (`best.*` tags, `best_params.yaml`) and PNG plots, refreshed whenever a
worker finishes.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sslflow.tasks.tracking.backend import artifact_store_errors, get_or_create_experiment
from sslflow.tasks.tracking.plots import pyplot, save_figure
from sslflow.tasks.tracking.run import MLflowCallback, flat_params, run_tags

PARENT_RUN_ATTR = "mlflow_parent_run_id"
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


class StudyTracker:
    """Creates and updates the MLflow runs of one study on one tracking backend."""

    def __init__(self, settings: Any, uri: str) -> None:
        from mlflow import MlflowClient

        self.settings, self.cfg, self.uri = settings, settings.tracking, uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = get_or_create_experiment(self.client, self.cfg.experiment, uri)

    # ------------------------------------------------------------------------------ parent
    def parent_run(self, study: Any, storage: Any, *, config: Mapping[str, Any], storage_label: str) -> str:
        """The study's one parent run, whichever worker gets here first: the check for it and
        its creation happen under a lock held in the study's storage, so workers that start
        together (or a resumption) all log under the same parent."""
        from sslflow.tasks.tuning.locking import storage_lock

        with storage_lock(storage, f"sslflow-tune-parent:{study.study_name}"):
            run_id = study.user_attrs.get(PARENT_RUN_ATTR)  # read from the storage, inside the lock
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")
                return str(run_id)
            tags = run_tags(None, project_dir=self.settings.project,
                            extra={"sslflow.kind": "tune-study", "optuna.study": study.study_name,
                                   "optuna.storage": storage_label})
            run = self.client.create_run(self.experiment_id, run_name=f"tune-{study.study_name}", tags=tags)
            self._log_params(run.info.run_id, {f"tune.{k}": v for k, v in config.items()})
            study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
            return run.info.run_id

    def end_parent(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    # ------------------------------------------------------------------------------ trials
    def start_trial(self, parent_id: str, trial_number: int, study_name: str, params: Any,
                    sampled: Mapping[str, Any], tags: Mapping[str, Any]) -> str:
        all_tags = run_tags(params, extra={"mlflow.parentRunId": parent_id, "sslflow.kind": "tune-trial",
                                           "optuna.study": study_name, "optuna.trial": trial_number,
                                           "optuna.state": "RUNNING", **tags})
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial_number}", tags=all_tags)
        flat = flat_params(params)
        flat.update({f"sampled.{mlflow_key(k)}": str(v) for k, v in sampled.items()})
        self._log_params(run.info.run_id, flat)
        return run.info.run_id

    def trial_callback(self, run_id: str) -> MLflowCallback:
        return MLflowCallback(run_id, self.client, flush_every=self.cfg.flush_every)

    def end_trial(self, run_id: str, state: str, *, value: float | None = None, reason: str = "") -> None:
        if value is not None:
            self.client.log_metric(run_id, "objective/knn_top1", value)
        self.client.set_tag(run_id, "optuna.state", state)
        if reason:
            self.client.set_tag(run_id, "optuna.reason", reason[:5000])
        self.client.set_terminated(run_id, STATUS.get(state, "FAILED"))

    # ------------------------------------------------------------------------------ summary
    def summarize(self, study: Any, parent_id: str, best_file: Path | None,
                  log: Callable[[str], None] = print) -> None:
        """Counts, best value/params and plots on the parent run (idempotent: tags and
        artifacts are overwritten, metrics get one point per finished-trial count)."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = {s.name.lower(): sum(t.state == s for t in trials)
                  for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        finished = counts["complete"] + counts["pruned"]
        metrics = {f"trials_{k}": float(v) for k, v in counts.items()}
        tags: dict[str, str] = {}
        best = best_trial(study)
        if best is not None:
            metrics["best_knn_top1"] = float(best.value)
            tags = {"best.trial": str(best.number), **{f"best.{mlflow_key(k)}": str(v) for k, v in best.params.items()}}
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(parent_id, metrics=[Metric(k, v, now, finished) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        with tempfile.TemporaryDirectory() as tmp, artifact_store_errors(self.uri, "the study's plots"):
            out = Path(tmp)
            (out / "trials.json").write_text(json.dumps(_trials_table(trials), indent=1, default=str))
            for path in plot_study(study, out, log):
                self.client.log_artifact(parent_id, str(path), "tune")
            self.client.log_artifact(parent_id, str(out / "trials.json"), "tune")
            if best_file is not None and best_file.is_file():
                self.client.log_artifact(parent_id, str(best_file), "tune")

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])


def mlflow_key(param: str) -> str:
    """MLflow names allow no brackets: `augment.crop_scale[0]` -> `augment.crop_scale.0`."""
    return re.sub(r"\[(\d+)\]", r".\1", param)


def best_trial(study: Any) -> Any:
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(done, key=lambda t: t.value) if done else None


def _trials_table(trials: list[Any]) -> list[dict[str, Any]]:
    return [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "knn_by_epoch": {str(k): v for k, v in sorted(t.intermediate_values.items())},
             "worker": t.user_attrs.get("worker"), "seed": t.user_attrs.get("seed"),
             "retry_of": t.system_attrs.get("failed_trial")} for t in trials]


def plot_study(study: Any, out_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Optimization history, kNN-per-epoch curves of every trial, parameter importances (PNG).

    A plot that cannot be drawn yet (e.g. importances need two finished trials with
    different values) is skipped with a log line, never an error."""
    from optuna.visualization import matplotlib as ovm

    pyplot()  # the Agg backend, before Optuna's matplotlib helpers touch pyplot
    plots = {"optimization_history.png": ovm.plot_optimization_history,
             "knn_by_epoch.png": ovm.plot_intermediate_values,
             "param_importances.png": ovm.plot_param_importances}
    written = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            log(f"tune: no {name} yet ({e})")
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        written.append(save_figure(fig, out_dir / name))
    return written
