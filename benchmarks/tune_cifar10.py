"""A CIFAR-10 study: N trials with short budgets, then the best configuration against the
profile's default configuration, same budget, same seed.

    python benchmarks/tune_cifar10.py                                  # 20 trials x 10 epochs, MoCo (GPU)
    python benchmarks/tune_cifar10.py --method simclr --trials 20 --budget 10
    python benchmarks/tune_cifar10.py --device cpu --subset 2000 --trials 3 --budget 1 \\
        --set backbone.resnet.width=8 --set pretrain.batch_size=128     # CPU smoke run

The default configuration is trial 0 (`tune.baseline_trial`), so it is trained under exactly
the same conditions as the sampled ones (it is never pruned: it is the pruner's first baseline). Both
are then scored by kNN on the **test** split (the objective itself only sees a held-out part
of the train split). Prints a markdown table and writes JSON into --work.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import optuna
import torch
from cifar import REPO, cifar10_stores  # benchmarks/ is on sys.path when run as a script

from sslflow.core.settings import load_settings
from sslflow.tasks.training.evaluate import evaluate
from sslflow.tasks.tuning.study import tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="moco", choices=["simclr", "moco", "byol", "dino"])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--budget", type=int, default=10, help="epochs per trial")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--subset", type=int, help="use this many train and test images (smoke runs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sslflow-tune-bench")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    data = cifar10_stores(args.work, args.subset)
    root = args.work / f"store-{args.subset or 'full'}"
    for split in ("train", "test"):
        (root / split).parent.mkdir(parents=True, exist_ok=True)
        if not (root / split).exists():
            (root / split).symlink_to(data[split].resolve())
    profile = REPO / "params" / "profiles" / f"cifar10-{args.method}.yaml"
    engine = [f"device={args.device}", *args.overrides]
    tune_ov = [f"tune.budget_epochs={args.budget}", f"tracking.uri=sqlite:///{args.work / 'mlflow.db'}"]
    study = f"cifar10-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = f"sqlite:///{args.work / 'optuna.db'}"

    # trial 0 is the profile's own configuration (tune.baseline_trial), trained like the others
    t0 = time.perf_counter()
    settings = load_settings([profile], [*engine, *tune_ov], project=args.work)
    result = tune(root, settings, trials=args.trials, study=study, storage=storage, base_file=profile,
                  output=args.work / f"{study}.yaml", runs_dir=args.work / "runs")
    minutes = (time.perf_counter() - t0) / 60
    trials = optuna.load_study(study_name=study, storage=storage).trials
    params = settings
    rows = []
    for label, trial in (("default (trial 0)", trials[0]), (f"best (trial {result.best_trial})",
                                                            trials[result.best_trial or 0])):
        run_dir = Path(trial.user_attrs["run_dir"])
        test = evaluate(run_dir, root / "train", root / "test", params, ["knn"], output=run_dir / "test-knn.json")
        rows.append({"configuration": label, "values": {k: _short(v) for k, v in trial.params.items()},
                     "objective_knn_top1": round(trial.value, 2) if trial.value is not None else trial.state.name,
                     "test_knn_top1": round(test.metrics["knn_top1"], 2)})
    device = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else "CPU"
    summary = {"study": study, "method": args.method, "trials": args.trials, "budget_epochs": args.budget,
               "complete": result.complete, "pruned": result.pruned, "minutes": round(minutes, 1),
               "device": device, "rows": rows}
    (args.work / f"{study}.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{args.method}, {args.trials} trials x {args.budget} epochs ({result.complete} complete, "
          f"{result.pruned} pruned) in {minutes:.1f} min on {device}\n")
    print("| configuration | values | objective kNN (held-out train) | test kNN |\n| --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['configuration']} | {r['values']} | {r['objective_knn_top1']} | {r['test_knn_top1']} |")


def _short(v):
    return round(v, 4) if isinstance(v, float) else v


if __name__ == "__main__":
    main()
