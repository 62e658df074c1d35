"""What to label next: a diverse subset of unlabeled images, by k-center greedy on embeddings.

    picked = k_center_greedy(unlabeled, 500, labeled=labeled, weights=w, device="cuda")

k-center greedy (Sener & Savarese, 2018, the "coreset" active-learning baseline) picks, one at a
time, the image farthest from everything already picked or labeled: N labels then cover the
embedding space instead of repeating its dense regions, which random sampling does. `weights`
(e.g. `drift.cluster_weights`: how much more often the new data falls in a region than the
training data did) scale the distances, so drifted regions are covered first. Exact, on the
device: one (N,) distance vector updated per pick (N x d work per pick).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sslflow.core.errors import UserError


@torch.no_grad()
def k_center_greedy(candidates: np.ndarray, n: int, *, labeled: np.ndarray | None = None,
                    weights: np.ndarray | None = None, seed: int = 0, device: str | torch.device = "cpu",
                    chunk: int = 65536) -> np.ndarray:
    """Indices (into `candidates`, in pick order) of `n` diverse rows; cosine geometry (L2-normalised).
    With `labeled` rows the picks start far from them; without, the first pick is seeded-random."""
    if n < 0:
        raise UserError(f"select: n must be >= 0 (got {n})")
    device = torch.device(device)
    x = F.normalize(torch.from_numpy(np.asarray(candidates, np.float32)).to(device), dim=1)
    n = min(int(n), len(x))
    if n == 0:
        return np.zeros(0, np.int64)
    w = None if weights is None else torch.from_numpy(np.asarray(weights, np.float32)).to(device)
    dist = torch.full((len(x),), float("inf"), device=device)
    if labeled is not None and len(labeled):
        lab = F.normalize(torch.from_numpy(np.asarray(labeled, np.float32)).to(device), dim=1)
        for s in range(0, len(lab), 1024):
            for c in range(0, len(x), chunk):
                d = torch.cdist(x[c:c + chunk], lab[s:s + 1024]).min(1).values
                dist[c:c + chunk] = torch.minimum(dist[c:c + chunk], d)
    picked: list[int] = []
    if torch.isinf(dist).all():
        first = int(np.random.default_rng(seed).integers(len(x)))
    else:
        first = int(torch.argmax(dist if w is None else dist * w))
    taken = torch.zeros(len(x), dtype=torch.bool, device=device)
    nxt = first
    for _ in range(n):
        picked.append(nxt)
        taken[nxt] = True
        dist = torch.minimum(dist, (x - x[nxt]).pow(2).sum(1).sqrt())
        score = dist if w is None else dist * w
        nxt = int(torch.argmax(score.masked_fill(taken, -1.0)))
    return np.asarray(picked, np.int64)


def select_from_store(split_dir: str | Path, encoder: Any, n: int, *, device: str = "cpu", seed: int = 0,
                      drift_reference: int | None = None, clusters: int = 8, batch_size: int = 256) -> pd.DataFrame:
    """The `n` unlabeled images of a split store to label next, in pick order: columns `rank`,
    `index` (row in the store), `path` (the manifest's), `sha256`, `weight`. The labeled rows seed
    the coverage (no pick near what is already labeled). `drift_reference` = N weights the picks
    towards the clusters that rows N.. (the new data) fill more than rows ..N did."""
    from sslflow.ssl_models.store import ImageStore
    from sslflow.tasks.data import manifest
    from sslflow.tasks.serving.drift import cluster_weights
    from sslflow.tasks.serving.encoder import embed_images

    split_dir = Path(split_dir)
    store = ImageStore.open(split_dir)
    labels = store.labels()
    emb = embed_images(encoder, (np.load(s.images_path(store.root), mmap_mode="r") for s in store.shards),
                       batch_size, device)
    unl = np.flatnonzero(labels < 0)
    cols = ["rank", "index", "path", "sha256", "weight"]
    if not len(unl) or n == 0:
        return pd.DataFrame(columns=cols)
    weights = None
    if drift_reference is not None and 2 <= drift_reference < len(emb) - 1:
        weights = cluster_weights(emb[:drift_reference], emb[drift_reference:], emb[unl], k=clusters, seed=seed,
                                  device=device)
    picked = k_center_greedy(emb[unl], n, labeled=emb[labels >= 0], weights=weights, seed=seed, device=device)
    rows = manifest.read(split_dir, store)
    idx = unl[picked]
    has = len(rows) == len(store)
    return pd.DataFrame({"rank": np.arange(1, len(idx) + 1), "index": idx,
                         "path": [str(rows["path"].iat[i]) if has else f"{split_dir.name}/{i:07d}" for i in idx],
                         "sha256": [str(rows["sha256"].iat[i]) if has else "" for i in idx],
                         "weight": np.ones(len(idx)) if weights is None else weights[picked]})
