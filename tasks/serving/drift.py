"""Has a batch of new images drifted from the training data? A two-sample test on embeddings.

    result = mmd_test(reference, new, permutations=500, level=0.01, seed=0, device="cuda")
    result.drifted, result.score, result.p_value      # MMD^2 (unbiased), permutation p-value
    shares = cluster_shares(reference, new, k=8)       # where the new batch moved to

Why MMD with a permutation p-value: it is the standard kernel two-sample test for embeddings
(what alibi-detect's `MMDDrift` computes), it needs no training (a domain classifier does), and
the permutation null makes the p-value exact whatever the embedding geometry. alibi-detect and
evidently are not in the pinned stack (their own torch / pandas / scikit-learn pins), so the
test is implemented here in plain torch, on the device: one kernel matrix of the pooled sample,
then every permutation's statistic from it with matrix products (no recomputed distances).

Embeddings are L2-normalised first (SSL encoders are trained for cosine geometry). The RBF
bandwidth is the median heuristic (median pairwise distance of the pooled sample). The
per-cluster shares come from k-means on the reference (a few Lloyd iterations in torch, k-means++
seeding): a cluster whose share grows is where the new data went.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sslflow.core.errors import UserError


@dataclass(frozen=True)
class DriftResult:
    score: float  # unbiased MMD^2 of the L2-normalised embeddings (0 = no difference)
    p_value: float  # permutation p-value: (1 + #{null >= score}) / (1 + permutations)
    level: float
    drifted: bool  # p_value < level
    reference: int  # sizes of the two samples
    new: int
    permutations: int
    bandwidth: float
    clusters: list[dict[str, Any]] = field(default_factory=list)  # cluster_shares(), when computed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "drift" if self.drifted else "no drift"
        return (f"{verdict}: MMD^2 {self.score:.4g}, p {self.p_value:.3g} (level {self.level:g}, "
                f"{self.new} new vs {self.reference} reference embeddings, {self.permutations} permutations)")


def _as_tensor(x: np.ndarray | Tensor, device: torch.device) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x, np.float32))
    return t.to(device=device, dtype=torch.float32)


def _normalized(x: np.ndarray | Tensor, device: torch.device) -> Tensor:
    return F.normalize(_as_tensor(x, device), dim=1)


def mmd_test(reference: np.ndarray | Tensor, new: np.ndarray | Tensor, *, permutations: int = 500,
             level: float = 0.01, seed: int = 0, device: str | torch.device = "cpu",
             chunk: int = 64) -> DriftResult:
    """MMD two-sample test (RBF kernel, median-heuristic bandwidth) of `new` against `reference`,
    (n, d) and (m, d) embeddings. `permutations` label shuffles of the pooled sample give the
    null distribution, `chunk` of them per matrix product (memory chunk x (n+m)^2 floats)."""
    n, m = len(reference), len(new)
    if n < 2 or m < 2:
        raise UserError(f"drift test needs at least 2 reference and 2 new embeddings (got {n} and {m})")
    if permutations < 1:
        raise UserError("drift test: permutations must be >= 1")
    device = torch.device(device)
    z = torch.cat([_normalized(reference, device), _normalized(new, device)])
    d2 = torch.cdist(z, z).pow(2)
    total = n + m
    off = ~torch.eye(total, dtype=torch.bool, device=device)
    median = d2[off].median().clamp_min(1e-12)  # median heuristic: sigma^2 = median squared distance / 2
    k = torch.exp(-d2 / (2 * (median / 2)))  # exp(-d^2 / median d^2)
    k.fill_diagonal_(0.0)  # unbiased estimate: no i == j terms

    def stat(a: Tensor) -> Tensor:
        """MMD^2 for each row of `a` (P, n+m) of 0/1 reference memberships."""
        b = 1.0 - a
        ka = a @ k
        xx = (ka * a).sum(1) / (n * (n - 1))
        xy = (ka * b).sum(1) / (n * m)
        yy = ((b @ k) * b).sum(1) / (m * (m - 1))
        return xx + yy - 2 * xy

    ref_mask = torch.zeros(1, total, device=device)
    ref_mask[0, :n] = 1.0
    observed = stat(ref_mask)[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    exceed = 0
    for start in range(0, permutations, chunk):
        p = min(chunk, permutations - start)
        order = torch.argsort(torch.rand(p, total, generator=gen), dim=1).to(device)
        a = (order < n).float()  # a random n of the pooled sample play the reference
        exceed += int((stat(a) >= observed).sum())
    p_value = (1 + exceed) / (1 + permutations)
    return DriftResult(score=float(observed), p_value=float(p_value), level=float(level),
                       drifted=bool(p_value < level), reference=n, new=m, permutations=int(permutations),
                       bandwidth=float(median.sqrt()))


# ------------------------------------------------------------------------------------ clusters
def kmeans(x: np.ndarray | Tensor, k: int, *, iterations: int = 20, seed: int = 0,
           device: str | torch.device = "cpu") -> Tensor:
    """(k, d) centroids of the L2-normalised rows of `x`: k-means++ seeding, then Lloyd steps."""
    device = torch.device(device)
    z = _normalized(x, device)
    k = max(1, min(int(k), len(z)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(len(z), (1,), generator=gen))
    centers = [z[first]]
    d2 = (z - z[first]).pow(2).sum(1)
    for _ in range(1, k):
        probs = (d2 / d2.sum()).cpu() if float(d2.sum()) > 0 else torch.full((len(z),), 1.0 / len(z))
        i = int(torch.multinomial(probs, 1, generator=gen))
        centers.append(z[i])
        d2 = torch.minimum(d2, (z - z[i]).pow(2).sum(1))
    c = torch.stack(centers)
    for _ in range(iterations):
        assign = torch.cdist(z, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, z)
        counts = torch.bincount(assign, minlength=len(c)).unsqueeze(1).float()
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    return c


def assign(x: np.ndarray | Tensor, centers: Tensor) -> Tensor:
    """Index of the nearest centroid of each L2-normalised row of `x`."""
    return torch.cdist(_normalized(x, centers.device), centers).argmin(1)


def cluster_shares(reference: np.ndarray | Tensor, new: np.ndarray | Tensor, k: int = 8, *, seed: int = 0,
                   device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Per cluster of the reference (k-means): its share of the reference and of the new batch,
    sorted by the change (the clusters the new batch moved to first)."""
    centers = kmeans(reference, k, seed=seed, device=device)
    kk = len(centers)
    ref = torch.bincount(assign(reference, centers), minlength=kk).float() / len(reference)
    nw = torch.bincount(assign(new, centers), minlength=kk).float() / max(len(new), 1)
    rows = [{"cluster": i, "reference_share": round(float(ref[i]), 4), "new_share": round(float(nw[i]), 4),
             "change": round(float(nw[i] - ref[i]), 4)} for i in range(kk)]
    return sorted(rows, key=lambda r: -r["change"])


def class_shares(reference_labels: list[str | None], new_labels: list[str | None]) -> list[dict[str, Any]]:
    """Per class name (None = unlabeled): share of the reference and of the new batch."""
    names = sorted({str(x) for x in [*reference_labels, *new_labels]})

    def shares(labels: list[str | None]) -> dict[str, float]:
        total = max(len(labels), 1)
        return {c: sum(str(x) == c for x in labels) / total for c in names}

    r, n = shares(reference_labels), shares(new_labels)
    rows = [{"class": c, "reference_share": round(r[c], 4), "new_share": round(n[c], 4),
             "change": round(n[c] - r[c], 4)} for c in names]
    return sorted(rows, key=lambda row: -row["change"])


def cluster_weights(reference: np.ndarray | Tensor, new: np.ndarray | Tensor, candidates: np.ndarray | Tensor,
                    k: int = 8, *, seed: int = 0, device: str | torch.device = "cpu") -> np.ndarray:
    """A weight per candidate embedding: (new share + eps) / (reference share + eps) of its cluster,
    so a selection can favour the regions the new data drifted to (1 = no change)."""
    centers = kmeans(reference, k, seed=seed, device=device)
    kk, eps = len(centers), 1.0 / max(len(reference), 1)
    ref = torch.bincount(assign(reference, centers), minlength=kk).float() / len(reference)
    nw = torch.bincount(assign(new, centers), minlength=kk).float() / max(len(new), 1)
    ratio = (nw + eps) / (ref + eps)
    return ratio[assign(candidates, centers)].cpu().numpy().astype(np.float32)


def pca_2d(*samples: np.ndarray) -> list[np.ndarray]:
    """The samples projected on the top 2 principal components of their pooled L2-normalised rows."""
    z = [F.normalize(torch.from_numpy(np.asarray(s, np.float32)), dim=1) for s in samples]
    pooled = torch.cat(z)
    mean = pooled.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(pooled - mean, q=min(2, pooled.shape[1]), center=False)
    return [((s - mean) @ v[:, :2]).numpy() for s in z]
