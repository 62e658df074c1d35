"""`sslflow tune`: an Optuna search over pretraining parameters (params/tune.yaml), objective =
online kNN top-1 after `tune.budget_epochs` epochs, with pruning.

By default this runs the `tune` flow: validate the store, run the study, write the best
configuration to `tune.output` (params/tuned.yaml), then train it with the full epochs (the
`train` flow: evaluation, registry, promotion gate). `--no-train` runs only the search, in
this process and without Prefect: that is how extra workers join a study on other
processes or hosts (same `--storage` and `--study`). Rerunning the same command resumes an
interrupted study; Ctrl-C re-enqueues the running trial, which resumes from its checkpoint.
"""

from __future__ import annotations

import argparse

from sslflow.cli.commands.common import add_params_arguments, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="Optuna search of temperature, queue size, augmentation strength",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, help="finished trials the study should hold (default: tune.trials)")
    p.add_argument("--storage", help="Optuna storage URL (default: tune.storage, else sqlite:///optuna.db); "
                   "postgresql+psycopg2://... for several workers")
    p.add_argument("--study", help="study name (default: tune.study)")
    p.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    p.add_argument("--store", help="image store with train/ and test/ (default: pipeline.store, data/store)")
    p.add_argument("--output", help="settings file for the best configuration (default: tune.output); "
                   "naming the base file itself (e.g. params.yaml for dvc repro) updates only the tuned keys")
    p.add_argument("--no-train", action="store_true",
                   help="search only (no Prefect flow, no training of the best): extra workers use this")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.core.project import PARAMS_FILE
    from sslflow.tasks.tracking.backend import check_tracking_server, resolve_tracking_uri

    settings = settings_from(args)  # bad settings: one line, before anything runs
    check_tracking_server(resolve_tracking_uri(settings), settings.tracking.preflight_timeout_s)
    options = dict(trials=args.trials, study=args.study, storage=args.storage, timeout_s=args.timeout,
                   output=args.output)
    if args.no_train:
        from sslflow.tasks.tuning.study import tune

        base_file = args.params[-1] if args.params else settings.project / PARAMS_FILE
        result = tune(settings.path(args.store or settings.pipeline.store), settings, base_file=base_file,
                      progress_bar=not args.no_progress, **options)
        _print(result.to_dict())
        return 0

    from sslflow.cli.temporary_server import prefect_api
    from sslflow.flows.tune import tune_flow

    with prefect_api():
        summary = tune_flow(params_files=args.params, overrides=list(args.overrides), store=args.store,
                            project=str(settings.project), **options)
    _print(summary["tune"])
    if summary["trained"]:
        t = summary["train"]
        print(f"trained the best configuration: run directory {t['run_dir']}")
        for key, value in t["metrics"].items():
            print(f"  {key:<14} {value:6.2f}")
        print(f"registry: {t['model_name']} version {t['model_version']}: {t['decision']} ({t['reason']})")
    return 0


def _print(r: dict) -> None:
    print(f"study {r['study']} on {r['storage']}: {r['complete']} complete, {r['pruned']} pruned, "
          f"{r['failed']} failed (target {r['target_trials']}); this worker ran trials {r['trials_here']}")
    if r["best_trial"] is None:
        print("no trial completed yet: no best configuration")
        return
    print(f"best: trial {r['best_trial']}, kNN top-1 {r['best_value']:.2f}")
    for key, value in r["best_params"].items():
        print(f"  {key} = {value}")
    print(f"best params written to {r['output']}  (use: --params {r['output']})")
    print(f"MLflow: {r['tracking_uri']} parent run {r['mlflow_run_id']}")
