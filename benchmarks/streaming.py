"""Streamed vs resident store: throughput ratio and peak memory, in the same run.

Builds a store of random images (or takes `--store`), then measures it twice, each time in a
fresh child process so the two modes do not share a peak-memory figure:

* resident: the whole store copied to the device once (`max_resident_bytes` = its size);
* streamed: `pretrain.max_device_bytes` = store size / `--budget-ratio` (default 16, so the
  store is >= 10x the allowed device bytes): batches read from the shard files by the reader
  thread into the ring of `--prefetch` (pinned, on CUDA) host buffers.

Each child reports (1) data throughput: images/s of one full epoch of batches (after
`--warmup` batches), each batch touched on the device; (2) training throughput: images/s of
`--train-steps` real `Pretrainer.train_step`s (SimCLR, ResNet-18 of `--width`, no
torch.compile) fed by the same batches; (3) peak host RSS (`VmHWM` of the child) of the data
epoch and, reset in between, of the training steps, and its RSS before any image was read;
(4) on CUDA, peak device memory allocated by the data epoch and by the training. The parent
prints a table and the streamed / resident ratios (goal on a GPU: training >= 0.95).

The store was just written, so its pages are in the page cache: this measures the path from
the page cache (local SSD when warm), not a cold network disk.

    nice -n 10 python benchmarks/streaming.py --device cpu                  # CPU: small, < 3 min
    python benchmarks/streaming.py --device cuda --json out/streaming.json  # GPU defaults: 96 px
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GPU_DEFAULTS = {"images": 20000, "size": 96, "width": 64, "train_steps": 40, "warmup": 8}
CPU_DEFAULTS = {"images": 20000, "size": 32, "width": 8, "train_steps": 2, "warmup": 1}


def build_store(root: Path, images: int, size: int, shard_images: int, seed: int = 0) -> Path:
    """Random uint8 images in shards of `shard_images`, one shard in memory at a time."""
    from sslflow.ssl_models.store import ImageStore

    store = ImageStore.create(root, size, size)
    rng = np.random.default_rng(seed)
    for lo in range(0, images, shard_images):
        n = min(shard_images, images - lo)
        store.add(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), [None] * n)
    return root


def _status_kb(key: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    """Start a new VmHWM from the current RSS (Linux >= 4.0: "5" to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> dict:
    """One mode in this (fresh) process: data epoch, then training steps; prints a JSON line."""
    import torch

    from sslflow.core.settings import load_settings
    from sslflow.ssl_models.store import DeviceBatches, ImageStore
    from sslflow.ssl_models.train import Pretrainer

    store = ImageStore.open(args.store)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    budget = store.nbytes if args.child == "resident" else max(1, store.nbytes // args.budget_ratio)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    rss_before_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    batches = DeviceBatches(store, args.batch_size, device, seed=0, max_resident_bytes=budget,
                            prefetch=args.prefetch)
    sync()
    setup_s = time.perf_counter() - t0
    assert batches.resident is (args.child == "resident"), "the budget did not select the mode"

    # (1) data: one full epoch, every batch used on the device (a reduction), timed after warm-up
    total = torch.zeros((), device=device, dtype=torch.int64)
    n_images, t_start = 0, None
    for i, images in enumerate(batches.epoch(0)):
        if i == args.warmup:
            sync()
            t_start = time.perf_counter()
        total += images[:, 0, 0, 0].sum()
        if t_start is not None:
            n_images += len(images)
    sync()
    data_ips = n_images / (time.perf_counter() - t_start) if t_start else float("nan")
    data_peak_kb = _status_kb("VmHWM")  # the data path alone: before any network or activation
    device_peak = {}
    if cuda:
        device_peak["peak_device_data_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        torch.cuda.reset_peak_memory_stats(device)

    # (2) training: the real step fed by the same DeviceBatches (Pretrainer built with the budget)
    overrides = [f"device={args.device}", f"backbone.resnet.width={args.width}", "pretrain.method=simclr",
                 f"pretrain.batch_size={args.batch_size}", "pretrain.epochs=1", "pretrain.compile=false",
                 "pretrain.export=false", "pretrain.eval_every=0", "pretrain.checkpoint_every=0",
                 "pretrain.log_every=1000000", "pretrain.optimizer=sgd", f"pretrain.max_device_bytes={budget}"]
    train_ips, peak_reset = float("nan"), False
    if args.train_steps:
        del batches, images  # the resident copy: the trainer makes its own
        peak_reset = _reset_peak_rss()
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Pretrainer(store, load_settings([], overrides), Path(run_dir) / "run", progress_bar=False)
            assert trainer.batches.resident is (args.child == "resident")
            t_start, done = None, 0
            for i, images in enumerate(trainer.batches.epoch(0)):
                if i == args.warmup:
                    sync()
                    t_start = time.perf_counter()
                trainer.train_step(images)
                if t_start is not None:
                    done += len(images)
                if i + 1 >= args.warmup + args.train_steps:
                    break
            sync()
            train_ips = done / (time.perf_counter() - t_start) if t_start else float("nan")
    result = {
        "mode": args.child, "device": str(device), "store_bytes": store.nbytes, "device_budget_bytes": budget,
        "images": len(store), "batches_per_epoch": len(store) // args.batch_size, "setup_s": round(setup_s, 3),
        "data_images_per_s": round(data_ips, 1), "train_images_per_s": round(train_ips, 2),
        "rss_before_mb": round(rss_before_kb / 1024, 1), "peak_rss_data_mb": round(data_peak_kb / 1024, 1),
        "peak_rss_mb" if not peak_reset else "peak_rss_train_mb": round(_status_kb("VmHWM") / 1024, 1),
        "checksum": int(total),
    }
    if cuda:
        result.update(device_peak)
        result["peak_device_train_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["peak_device_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(device)
    print("RESULT " + json.dumps(result), flush=True)
    return result


def run_child(mode: str, args: argparse.Namespace, store: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--store", str(store), "--device", args.device,
           "--batch-size", str(args.batch_size), "--prefetch", str(args.prefetch), "--warmup", str(args.warmup),
           "--train-steps", str(args.train_steps), "--width", str(args.width),
           "--budget-ratio", str(args.budget_ratio)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"streaming benchmark: the {mode} child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--store", type=Path, help="measure this store instead of building a random one")
    ap.add_argument("--images", type=int, help="images of the random store (default 20000)")
    ap.add_argument("--size", type=int, help="their side in px (default: 96 on CUDA, 32 on the CPU)")
    ap.add_argument("--shard-images", type=int, default=2048, help="images per shard of the random store")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--prefetch", type=int, default=4, help="batches in the streaming ring")
    ap.add_argument("--warmup", type=int, help="batches / steps not timed (default 8 CUDA, 1 CPU)")
    ap.add_argument("--train-steps", type=int, help="timed training steps (0 = data only; default 40 CUDA, 2 CPU)")
    ap.add_argument("--width", type=int, help="ResNet-18 width (default 64 CUDA, 8 CPU)")
    ap.add_argument("--budget-ratio", type=int, default=16, help="store size / device bytes allowed when streamed")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--child", choices=("resident", "streamed"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.child:
        child(args)
        return

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sslflow-streaming-") as tmp:
        store = args.store or build_store(Path(tmp) / "store", args.images, args.size, args.shard_images)
        build_s = time.perf_counter() - t0
        resident = run_child("resident", args, store)
        streamed = run_child("streamed", args, store)
    if resident["checksum"] != streamed["checksum"]:
        sys.exit("streaming benchmark: the two modes read different images (checksums differ)")
    ratio = {k: round(streamed[k] / resident[k], 3) if resident[k] else None
             for k in ("data_images_per_s", "train_images_per_s")}
    report = {"resident": resident, "streamed": streamed, "ratio_streamed_over_resident": ratio,
              "store_over_budget": round(streamed["store_bytes"] / streamed["device_budget_bytes"], 1),
              "build_store_s": round(build_s, 1), "wall_s": round(time.perf_counter() - t0, 1),
              "prefetch": args.prefetch, "batch_size": args.batch_size, "train_steps": args.train_steps,
              "width": args.width, "cpu_count": os.cpu_count()}
    keys = ["data_images_per_s", "train_images_per_s", "setup_s", "rss_before_mb", "peak_rss_data_mb",
            "peak_rss_train_mb" if "peak_rss_train_mb" in resident else "peak_rss_mb"]
    if "peak_device_data_mb" in resident:
        keys += ["peak_device_data_mb", "peak_device_train_mb", "peak_device_reserved_mb"]
    print(f"store: {resident['images']} images, {resident['store_bytes'] / 2**20:.1f} MiB; streamed with "
          f"{streamed['device_budget_bytes'] / 2**20:.2f} MiB allowed on {resident['device']} "
          f"({report['store_over_budget']}x smaller than the store), prefetch {args.prefetch}, batch {args.batch_size}")
    print(f"| {'':28} | {'resident':>12} | {'streamed':>12} | {'ratio':>6} |")
    for k in keys:
        r = ratio.get(k)
        print(f"| {k:28} | {resident[k]:>12} | {streamed[k]:>12} | {r if r is not None else '':>6} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
