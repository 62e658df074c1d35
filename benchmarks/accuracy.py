"""CIFAR-10 accuracy runs: pretrain each method with its profile, then kNN + linear probe.

    python benchmarks/accuracy.py --methods simclr moco byol dino          # 100 epochs each (GPU)
    python benchmarks/accuracy.py --methods simclr --set pretrain.epochs=1 \\
        --set pretrain.width=8 --subset 2048 --device cpu                 # CPU smoke run

Uses `params/profiles/cifar10-<method>.yaml` (plus any `--set`), the train JPEGs as the
unlabeled pool and the labeled probe set, the test JPEGs as the held-out split. Prints a
markdown table (epochs, batch, minutes, device) for the README and writes JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from sslflow.core.settings import PARAMS_DIR, load_params
from sslflow.ssl_models.store import ImageStore, store_from_folder
from sslflow.tasks.training.evaluate import evaluate
from sslflow.tasks.training.pretrain import pretrain

ARCHIVE = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def stores(cache: Path, subset: int | None) -> dict[str, Path]:
    """Train/test stores built once from the JPEG archive (optionally a class-balanced prefix)."""
    if not (cache / "cifar10").is_dir():
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(cache, filter="data")
    out = {}
    for split in ("train", "test"):
        full = cache / f"store-{split}"
        if not ImageStore.is_store(full):
            store_from_folder(cache / "cifar10" / split, full)
        out[split] = full
        if subset:
            small = cache / f"store-{split}-{subset}"
            if not ImageStore.is_store(small):
                src = ImageStore.open(full)
                rng = torch.Generator().manual_seed(0)
                keep = torch.randperm(len(src), generator=rng)[:subset].sort().values.numpy()
                images, labels = src.images()[keep], src.labels()[keep]
                ImageStore.create(small, src.height, src.width).add(images, [src.classes[i] for i in labels])
            out[split] = small
    return out


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
    data = stores(args.work, args.subset)
    device = "CPU"
    if args.device != "cpu" and torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    rows = []
    for method in args.methods:
        params = load_params(PARAMS_DIR / "profiles" / f"cifar10-{method}.yaml",
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
