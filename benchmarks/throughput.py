"""End-to-end pretraining throughput: sslflow's device pipeline vs a per-image DataLoader.

Both sides train the same network (ResNet-18 CIFAR stem + SimCLR projector, NT-Xent) on the
CIFAR-10 train JPEGs and count *source* images per second (each makes two views):

* sslflow: the real `Pretrainer` loop (store resident on the device, batched per-image
  augmentation on the device, bf16 autocast, channels_last, torch.compile on CUDA); the figure
  is the median of the per-`log_every` readings after the first epoch (compilation warm-up).
* baseline: torchvision transforms on PIL images, one image at a time in DataLoader worker
  processes (the usual SimCLR recipe), fp32, the same model.

Then one short run per method (MoCo v2, BYOL, DINO) through the same loop.

    python benchmarks/throughput.py                       # GPU: full figures
    python benchmarks/throughput.py --device cpu --quick  # CPU smoke run (minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cifar import cifar10_stores, extract  # benchmarks/ is on sys.path when run as a script

from sslflow.core.settings import load_settings
from sslflow.ssl_models.methods import Batch
from sslflow.ssl_models.store import ImageStore
from sslflow.ssl_models.train import Pretrainer, build_method, train_context


def cifar10(cache: Path) -> tuple[Path, ImageStore]:
    """The train JPEGs (for the DataLoader baseline) and their store (for sslflow), built once."""
    return extract(cache) / "train", ImageStore.open(cifar10_stores(cache)["train"])


def sslflow_throughput(store: ImageStore, overrides: list[str], run_dir: Path) -> dict[str, float]:
    params = load_settings([], overrides)

    class Readings:
        def __init__(self) -> None:
            self.values: list[tuple[float, float]] = []

        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            self.values.append((metrics["epoch"], metrics["images_per_s"]))

        def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            pass

    readings = Readings()
    Pretrainer(store, params, run_dir, callbacks=[readings], progress_bar=False).fit()
    steady = [v for epoch, v in readings.values if epoch > 1.0] or [v for _, v in readings.values]
    return {"images_per_s": statistics.median(steady), "readings": len(steady)}


def dataloader_throughput(folder: Path, overrides: list[str], steps: int, workers: int) -> dict[str, float]:
    """The per-image baseline: PIL + torchvision transforms in DataLoader workers, fp32."""
    from torchvision import datasets
    from torchvision.transforms import v2

    params = load_settings([], overrides)
    aug, cfg = params.augment, params.pretrain
    s = aug.strength
    one_view = v2.Compose([
        v2.RandomResizedCrop(32, scale=aug.crop_scale, ratio=aug.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=aug.jitter_prob),
        v2.RandomGrayscale(aug.grayscale_prob),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(aug.mean, aug.std),
    ])

    class TwoViews:
        def __call__(self, img):
            return one_view(img), one_view(img)

    device = torch.device(params.device if params.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    data = datasets.ImageFolder(str(folder), transform=TwoViews())
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    method = build_method(params, train_context(params, 32), device).train()
    raw = torch.zeros(cfg.batch_size, 32, 32, 3, dtype=torch.uint8, device=device)  # SimCLR reads only the views
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    warmup, timed, t0 = 5, 0, 0.0
    it = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        try:
            (v1, v2_), _ = next(it)
        except StopIteration:
            it = iter(loader)
            (v1, v2_), _ = next(it)
        v1, v2_ = v1.to(device, non_blocking=True), v2_.to(device, non_blocking=True)
        loss = method(Batch([v1, v2_], raw, aug.mean, aug.std), 0.0).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        timed += i >= warmup
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"images_per_s": timed * cfg.batch_size / seconds, "steps": timed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3, help="sslflow epochs for SimCLR (first is warm-up)")
    ap.add_argument("--method-epochs", type=int, default=2)
    ap.add_argument("--baseline-steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=15, help="DataLoader workers of the baseline")
    ap.add_argument("--quick", action="store_true", help="narrow network, few steps: a CPU smoke run")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sslflow-bench")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    folder, store = cifar10(args.cache)
    common = [f"device={args.device}", f"pretrain.batch_size={args.batch_size}", "pretrain.log_every=10",
              "pretrain.checkpoint_every=0", "pretrain.eval_every=0", "pretrain.warmup_epochs=1"]
    if args.quick:
        common += ["backbone.resnet.width=16", "pretrain.simclr.proj_hidden_dim=256",
                   "pretrain.moco.proj_hidden_dim=256", "pretrain.byol.proj_hidden_dim=256",
                   "pretrain.byol.pred_hidden_dim=256",
                   "pretrain.dino.hidden_dim=256", "pretrain.dino.out_dim=1024", "augment.local_crops=2",
                   "pretrain.log_every=2"]
        store = _subset(store, args.cache / "store-quick", 8 * args.batch_size)
        args.baseline_steps = min(args.baseline_steps, 5)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"device: {device_name}; torch {torch.__version__}; store: {len(store)} images "
          f"{store.height}x{store.width}; batch {args.batch_size}", flush=True)

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sim = sslflow_throughput(store, [*common, "pretrain.method=simclr", f"pretrain.epochs={args.epochs}"],
                                 Path(tmp) / "simclr")
        results["sslflow_simclr"] = sim["images_per_s"]
        print(f"sslflow SimCLR (device pipeline): {sim['images_per_s']:,.0f} images/s", flush=True)
        base = dataloader_throughput(folder, [*common, "pretrain.method=simclr"], args.baseline_steps,
                                     args.workers)
        results["dataloader_simclr"] = base["images_per_s"]
        print(f"per-image DataLoader baseline ({args.workers} workers, fp32): "
              f"{base['images_per_s']:,.0f} images/s", flush=True)
        for method in ("moco", "byol", "dino"):
            r = sslflow_throughput(store, [*common, f"pretrain.method={method}",
                                           f"pretrain.epochs={args.method_epochs}"], Path(tmp) / method)
            results[f"sslflow_{method}"] = r["images_per_s"]
            print(f"sslflow {method}: {r['images_per_s']:,.0f} images/s", flush=True)

    ratio = results["sslflow_simclr"] / results["dataloader_simclr"]
    print("\n| pipeline | source images/s |\n| --- | --- |")
    for key, value in results.items():
        print(f"| {key} | {value:,.0f} |")
    print(f"\nspeed-up of sslflow over the per-image DataLoader (SimCLR): {ratio:.2f}x  [{device_name}]")
    if args.json:
        args.json.write_text(json.dumps({**results, "ratio": ratio, "device": device_name}, indent=1))


def _subset(store: ImageStore, out: Path, n: int) -> ImageStore:
    if ImageStore.is_store(out):
        return ImageStore.open(out)
    images, labels = store.images()[:n], store.labels()[:n]
    sub = ImageStore.create(out, store.height, store.width)
    sub.add(images, [store.classes[i] if i >= 0 else None for i in labels])
    return sub


if __name__ == "__main__":
    main()
