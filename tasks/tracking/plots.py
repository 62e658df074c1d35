"""The figures people look at after a run: loss and kNN curves, augmented views, an embedding
map, the confusion matrix. Each is a plain function writing one PNG (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt



def save_figure(fig: Any, out_path: str | Path) -> Path:
    """Write a finished figure as PNG (parents created) and free it."""
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    pyplot().close(fig)
    return out_path

def plot_curves(history: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """`loss.png` (per-step and per-epoch loss) and `knn.png` (online kNN top-1/top-5 per
    epoch, epoch 0 = random init) from a `history.json` dict. Returns the files written."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps, epochs = history.get("steps", []), history.get("epochs", [])
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    if steps:
        ax.plot([s["epoch"] if "epoch" in s else s["step"] for s in steps], [s["loss"] for s in steps],
                lw=0.8, alpha=0.6, label="per log interval")
    ep = [e for e in epochs if "loss" in e]
    if ep:
        ax.plot([e["epoch"] for e in ep], [e["loss"] for e in ep], "o-", label="epoch mean")
    ax.set(xlabel="epoch", ylabel="loss", title="pretraining loss")
    ax.grid(alpha=0.3)
    if steps or ep:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    knn = [e for e in epochs if "knn_top1" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("knn_top1", "knn_top5"):
        pts = [e for e in knn if key in e]
        if pts:
            ax.plot([e["epoch"] for e in pts], [e[key] for e in pts], "o-", label=key)
    ax.set(xlabel="epoch (0 = random init)", ylabel="accuracy (%)", title="online kNN")
    ax.grid(alpha=0.3)
    if knn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no online kNN (no eval stores)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out_dir / "knn.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "knn.png")
    return written


def plot_augmented_views(store: Any, params: Any, out_path: str | Path, n: int = 8) -> Path:
    """A grid: one row per source image, the original then each of the method's views, drawn
    with the run's `BatchAugment` (same recipe and strength as training) on the CPU."""
    import torch

    from sslflow.ssl_models.augment import BatchAugment
    from sslflow.ssl_models.train import method_views

    plt = pyplot()
    images = store.images()
    n = min(n, len(images))
    if n == 0:
        raise UserError(f"{store.root} holds no images for the augmented-views grid")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(params.seed))[:n]
    batch = torch.from_numpy(images[idx.numpy()])
    views = method_views(params, store.height)
    aug = BatchAugment(views, params.augment.mean, params.augment.std)
    out = aug(batch, torch.Generator().manual_seed(params.seed))
    mean = torch.tensor(params.augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(params.augment.std).view(1, 3, 1, 1)
    cols = 1 + len(out)
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.3 * n), squeeze=False)
    for r in range(n):
        axes[r][0].imshow(batch[r].numpy())
        for c, v in enumerate(out, start=1):
            img = (v[r:r + 1] * std + mean).clamp(0, 1)[0].permute(1, 2, 0).numpy()
            axes[r][c].imshow(img)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("original", fontsize=7)
    for c, v in enumerate(views, start=1):
        axes[0][c].set_title(f"view {c} ({v.size}px)", fontsize=7)
    return save_figure(fig, out_path)


def plot_embedding_map(encoder_dir: str | Path, store: Any, out_path: str | Path,
                       batch_size: int = 256, max_points: int = 5000, seed: int = 0) -> Path:
    """2-D PCA map of the encoder's test-set embeddings (L2-normalised), coloured by label."""
    import numpy as np
    import torch

    from sslflow.ssl_models.checkpoint import load_encoder
    from sslflow.ssl_models.evaluate import extract_features

    plt = pyplot()
    encoder, meta = load_encoder(Path(encoder_dir))
    images, labels = store.images(), store.labels()
    if len(images) > max_points:
        keep = np.random.default_rng(seed).choice(len(images), max_points, replace=False)
        images, labels = images[keep], labels[keep]
    feats = extract_features(encoder, images, meta["mean"], meta["std"], batch_size, "cpu")
    feats = torch.nn.functional.normalize(feats, dim=1)
    centred = feats - feats.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    classes = list(getattr(store, "classes", []))
    cmap = plt.get_cmap("tab10" if max(len(classes), 1) <= 10 else "tab20")
    for lab in sorted(set(labels.tolist())):
        m = labels == lab
        name = "unlabeled" if lab < 0 else (classes[lab] if lab < len(classes) else str(lab))
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color="lightgrey" if lab < 0 else cmap(lab % cmap.N), label=name)
    ax.set(title="test-set embeddings (PCA)", xlabel="PC 1", ylabel="PC 2")
    if len(set(labels.tolist())) <= 20:
        ax.legend(fontsize=6, markerscale=2, loc="best")
    return save_figure(fig, out_path)


def plot_confusion(confusion: Mapping[str, Any], out_path: str | Path, title: str = "linear probe") -> Path:
    """The confusion matrix of `EvalReport.confusion_json()` (rows = true class) as a PNG."""
    import numpy as np

    plt = pyplot()
    m = np.asarray(confusion["matrix"], dtype=float)
    classes = list(confusion.get("classes") or range(len(m)))
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(m), 1.2 + 0.45 * len(m)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(m)), [str(c) for c in classes], rotation=90, fontsize=7)
    ax.set_yticks(range(len(m)), [str(c) for c in classes], fontsize=7)
    if len(m) <= 20:
        top = m.max() if m.size else 0
        for i in range(len(m)):
            for j in range(len(m)):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] > top / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} confusion")
    return save_figure(fig, out_path)
