"""Label efficiency on CIFAR-10: a linear probe on N k-center-selected labels vs N random labels.

    python benchmarks/label_efficiency.py --model runs/cifar10-simclr            # any encoder (GPU or CPU)
    nice -n 10 python benchmarks/label_efficiency.py --model random --pool 10000 --test 2000 --device cpu

The labels of the train pool are hidden: `sslflow.tasks.serving.select.k_center_greedy` picks N
images from the pool's embeddings alone (what `sslflow select` does), then their labels are
revealed and a linear probe (multinomial logistic regression on the L2-normalised embeddings,
full-batch L-BFGS) is trained on them and scored on the test split; the baseline draws N at
random. Averaged over `--seeds` (random draws; k-center's first pick). `--model random` is an
untrained narrow ResNet-18 (a fixed image -> vector map: the weakest encoder, for a CPU run);
`--model quick` pretrains SimCLR for `--quick-epochs` on the pool first. Prints a markdown table
for the README and writes JSON to `--work`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cifar import REPO, cifar10_stores

from sslflow.core.settings import load_settings
from sslflow.ssl_models.backbones import SSLResNet
from sslflow.ssl_models.store import ImageStore
from sslflow.tasks.serving.encoder import ImageEncoder, embed_images, load_encoder_for_embedding
from sslflow.tasks.serving.select import k_center_greedy

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def linear_probe(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, classes: int = 10,
                 wd: float = 1e-3, steps: int = 100) -> float:
    """Test top-1 (%) of a logistic regression fitted on (x, y) with L-BFGS (L2-normalised inputs)."""
    x, xt = F.normalize(x, dim=1), F.normalize(xt, dim=1)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w * 10 + b, y) + wd * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w * 10 + b).argmax(1) == yt).float().mean() * 100)


def encoder_for(args: argparse.Namespace, pool_store: Path) -> tuple[ImageEncoder, str]:
    if args.model == "random":
        torch.manual_seed(0)
        return ImageEncoder(SSLResNet("resnet18", 16, True, 32), 32, CIFAR_MEAN, CIFAR_STD).eval(), \
            "untrained ResNet-18 (width 16)"
    if args.model == "quick":
        from sslflow.tasks.training.pretrain import pretrain

        params = load_settings(REPO / "params" / "profiles" / "cifar10-simclr.yaml",
                               [f"device={args.device}", f"pretrain.epochs={args.quick_epochs}",
                                "backbone.resnet.width=16", "pretrain.batch_size=256", *args.overrides])
        run = args.work / "label-efficiency-encoder"
        pretrain(pool_store, run, params, resume=True, progress_bar=False)
        encoder, _ = load_encoder_for_embedding(run)
        return encoder, f"SimCLR, {args.quick_epochs} epochs on the pool, ResNet-18 width 16"
    encoder, meta = load_encoder_for_embedding(args.model)
    return encoder, f"{args.model} ({meta.get('name', '?')})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random", help="run dir / encoder.pt / models:/..., 'random' or 'quick'")
    ap.add_argument("--pool", type=int, default=10000, help="unlabeled train images to select from")
    ap.add_argument("--test", type=int, default=10000, help="test images to score on")
    ap.add_argument("--budgets", type=int, nargs="+", default=[100, 500, 1000])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick-epochs", type=int, default=5)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sslflow-bench")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    t0 = time.perf_counter()
    data = cifar10_stores(args.work)
    train, test = ImageStore.open(data["train"]), ImageStore.open(data["test"])
    rng = np.random.default_rng(0)
    pool_idx = np.sort(rng.permutation(len(train))[:args.pool])
    test_idx = np.sort(rng.permutation(len(test))[:args.test])
    pool_x, pool_y = train.images()[pool_idx], train.labels()[pool_idx]
    test_x, test_y = test.images()[test_idx], test.labels()[test_idx]
    pool_store = args.work / f"label-efficiency-pool-{args.pool}"
    if args.model == "quick" and not ImageStore.is_store(pool_store):
        ImageStore.create(pool_store, train.height, train.width).add(pool_x, [train.classes[i] for i in pool_y])
    encoder, described = encoder_for(args, pool_store)
    emb = torch.from_numpy(embed_images(encoder, pool_x, 256, args.device))
    emb_t = torch.from_numpy(embed_images(encoder, test_x, 256, args.device))
    y, yt = torch.from_numpy(pool_y), torch.from_numpy(test_y)
    t_embed = time.perf_counter() - t0
    full = linear_probe(emb, y, emb_t, yt)

    rows = []
    for n in args.budgets:
        acc = {"random": [], "k-center": []}
        t_sel = 0.0
        for seed in range(args.seeds):
            r = np.random.default_rng(1000 + seed).choice(len(emb), n, replace=False)
            t1 = time.perf_counter()
            k = k_center_greedy(emb.numpy(), n, seed=seed, device=args.device)
            t_sel += time.perf_counter() - t1
            for name, idx in (("random", r), ("k-center", k)):
                idx_t = torch.from_numpy(np.asarray(idx))
                acc[name].append(linear_probe(emb[idx_t], y[idx_t], emb_t, yt))
        row = {"N": n, **{f"{k}_mean": round(float(np.mean(v)), 2) for k, v in acc.items()},
               **{f"{k}_std": round(float(np.std(v)), 2) for k, v in acc.items()},
               "delta": round(float(np.mean(acc["k-center"]) - np.mean(acc["random"])), 2),
               "select_s": round(t_sel / args.seeds, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"encoder": described, "pool": args.pool, "test": args.test, "seeds": args.seeds,
           "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
           "probe_on_whole_pool": round(full, 2), "embed_s": round(t_embed, 1), "rows": rows}
    (args.work / "label_efficiency.json").write_text(json.dumps(out, indent=1))
    print(f"\nencoder: {described}; pool {args.pool} train images (labels hidden), {args.test} test images, "
          f"{args.seeds} seeds; probe on all {args.pool} labels: {full:.1f}%\n")
    print("| N labels | random | k-center greedy | difference |\n| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['N']} | {r['random_mean']:.1f} ± {r['random_std']:.1f} | {r['k-center_mean']:.1f} ± "
              f"{r['k-center_std']:.1f} | {r['delta']:+.1f} |")


if __name__ == "__main__":
    main()
