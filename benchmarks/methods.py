"""Per-method training throughput on CIFAR-10 and one short accuracy point, within a time budget.

    python benchmarks/methods.py --out $OUT                               # GPU: the methods of issues 13/14
    python benchmarks/methods.py --methods simclr,rotation --device cpu --subset 512 \\
        --set backbone.resnet.width=8 --out /tmp/m                        # CPU smoke run

Each method trains with its `params/profiles/cifar10-<method>.yaml` (`mocov3-vit`: the ViT-Small/4
profile of MoCo v3; `mae` is ViT-Small/4 too, the others ResNet-18 with the CIFAR stem) for
`--epochs` epochs on the CIFAR-10 train JPEGs (ingested once, through `sslflow ingest`), through
the real training loop, with online kNN (train -> test) at the random initialisation and after
the last epoch. Reported per method: the median of the loop's per-interval images/s in the last
epoch (source images, each making the method's views), the kNN top-1 before and after, the
minutes. A short run: the accuracy point says whether the recipe learns at full scale, not
what 100 epochs reach (`benchmarks/accuracy.py`). The warm-up is shortened to
`--warmup` epochs so the short run leaves it. Methods are started while the time budget
(`--budget-s`) lasts; `methods.json` and `methods.md` in `--out` are rewritten after each one,
so a run cut short keeps what finished. The demo-set comparison of every method is
`make bench-methods` (`sslflow compare`), not this script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cifar  # benchmarks/ is on sys.path when run as a script
import torch

from sslflow.core.settings import load_settings
from sslflow.ssl_models.store import ImageStore
from sslflow.ssl_models.train import Pretrainer

NEW_METHODS = ("swav", "simsiam", "barlow", "vicreg", "mocov3", "mocov3-vit", "mae", "autoencoder", "vae",
               "rotation", "jigsaw", "colorization", "inpainting", "cpc", "dim", "cmc")


class Readings:
    """The loop's per-interval throughput readings (the `Callback` protocol)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, float]] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.append((float(metrics.get("epoch", 0.0)), float(metrics["images_per_s"])))

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        pass


def run_method(entry: str, train: ImageStore, test: ImageStore, overrides: list[str], work: Path,
               epochs: int, warmup: float) -> dict:
    method = entry.split("-")[0]
    profile = cifar.REPO / "params" / "profiles" / f"cifar10-{entry}.yaml"
    params = load_settings(profile, [f"pretrain.epochs={epochs}", f"pretrain.eval_every={epochs}",
                                     f"pretrain.warmup_epochs={warmup}", "pretrain.checkpoint_every=0",
                                     "pretrain.export=false", "pretrain.log_every=10", *overrides])
    readings = Readings()
    t0 = time.perf_counter()
    result = Pretrainer(train, params, work / entry, callbacks=[readings], eval_stores=(train, test),
                        progress_bar=False).fit()
    minutes = (time.perf_counter() - t0) / 60
    last = [v for e, v in readings.steps if e > epochs - 1] or [v for _, v in readings.steps]
    b = params.backbone
    backbone = f"{b.name}-p{b.vit.patch_size}" if b.family == "vit" else b.name
    m = result.metrics
    return {"method": entry, "family": type(result.method).family, "backbone": backbone,
            "batch": params.pretrain.batch_size, "epochs": epochs,
            "images_per_s": round(statistics.median(last) if last else m["images_per_s"]),  # short runs: the mean
            "knn_top1_at_init": round(m.get("knn_top1_at_init", math.nan), 2),
            "knn_top1": round(m.get("knn_top1", math.nan), 2), "final_loss": round(m["final_loss"], 4),
            "minutes": round(minutes, 2), "profile": profile.name, "method_name": method}


def write(rows: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    keys = ["method", "family", "backbone", "batch", "epochs", "images_per_s", "knn_top1_at_init", "knn_top1",
            "minutes"]
    lines = [f"Device: {meta['device']}; torch {meta['torch']}; {meta['train_images']} train / "
             f"{meta['test_images']} test images; command: `{meta['command']}`", "",
             "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    (out / "methods.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(NEW_METHODS), help="comma-separated; mocov3-vit = MoCo v3 on ViT")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per method (the last one is measured)")
    ap.add_argument("--warmup", type=float, default=0.25, help="warm-up epochs of the short runs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--subset", type=int, help="use this many train and test images (smoke runs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no method after this many seconds")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sslflow-bench")
    ap.add_argument("--out", type=Path, required=True, help="methods.json and methods.md go here")
    args = ap.parse_args()

    if os.environ.get("SSLFLOW_CIFAR10"):  # the archive elsewhere than ../shared/datasets (a device machine)
        cifar.ARCHIVE = Path(os.environ["SSLFLOW_CIFAR10"])
    t_start = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    stores = cifar.cifar10_stores(args.cache, args.subset)
    train, test = ImageStore.open(stores["train"]), ImageStore.open(stores["test"])
    device = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else "CPU"
    meta = {"device": device, "torch": torch.__version__, "train_images": len(train), "test_images": len(test),
            "command": " ".join(sys.argv), "ingest_s": round(time.perf_counter() - t_start, 1)}
    print(f"{device}; {len(train)} train / {len(test)} test images; ingest {meta['ingest_s']} s", flush=True)
    rows: list[dict] = []
    t_methods = time.perf_counter()  # the budget is the methods' (ingest is once per cache)
    for entry in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if time.perf_counter() - t_methods > args.budget_s:
            row = {"method": entry, "error": "not started: time budget spent"}
        else:
            row = _run_safely(entry, train, test, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, args.out, {**meta, "seconds": round(time.perf_counter() - t_start, 1)})
    print((args.out / "methods.md").read_text())


def _run_safely(entry: str, train: ImageStore, test: ImageStore, args: argparse.Namespace) -> dict:
    """One method's row; its failure is its row (the others still run)."""
    with tempfile.TemporaryDirectory(prefix=f"sslflow-{entry}-") as tmp:
        try:
            return run_method(entry, train, test, [f"device={args.device}", *args.overrides], Path(tmp),
                              args.epochs, args.warmup)
        except Exception as e:
            return {"method": entry, "error": f"{type(e).__name__}: {e}"[:300]}


if __name__ == "__main__":
    main()
