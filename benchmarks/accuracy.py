"""CIFAR-10 accuracy runs: pretrain each method with its profile, then kNN + linear probe.

    python benchmarks/accuracy.py --methods simclr moco byol dino          # 100 epochs each (GPU)
    python benchmarks/accuracy.py --methods simclr --set pretrain.epochs=1 \\
        --set backbone.resnet.width=8 --subset 2048 --device cpu          # CPU smoke run

Uses `params/profiles/cifar10-<method>.yaml` (plus any `--set`), the train JPEGs as the
unlabeled pool and the labeled probe set, the test JPEGs as the held-out split. Prints a
markdown table (epochs, batch, minutes, device) for the README and writes JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from cifar import REPO, cifar10_stores

from sslflow.core.settings import load_settings
from sslflow.tasks.training.evaluate import evaluate
from sslflow.tasks.training.pretrain import pretrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["simclr", "moco", "byol", "dino"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--subset", type=int, help="use this many train and test images (smoke runs)")
    ap.add_argument("--protocols", default="knn,linear")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sslflow-accuracy")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    data = cifar10_stores(args.work, args.subset)
    device = "CPU"
    if args.device != "cpu" and torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    rows = []
    for method in args.methods:
        params = load_settings(REPO / "params" / "profiles" / f"cifar10-{method}.yaml",
                               [f"device={args.device}", *args.overrides])
        run_dir = args.work / "runs" / method
        t0 = time.perf_counter()
        result = pretrain(data["train"], run_dir, params, resume=True, eval_train=data["train"],
                          eval_test=data["test"], progress_bar=False)
        minutes = (time.perf_counter() - t0) / 60
        report = evaluate(run_dir, data["train"], data["test"], params, args.protocols.split(","))
        row = {"method": method, "epochs": params.pretrain.epochs, "batch": params.pretrain.batch_size,
               "minutes": round(minutes, 1), "images_per_s": round(result.metrics["images_per_s"]),
               "device": device, **{k: round(v, 2) for k, v in report.metrics.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.work / "accuracy.json").write_text(json.dumps(rows, indent=1))
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
