"""Near-duplicates by embedding: the same picture resized, re-encoded or lightly edited.

    hits = near_duplicates(new, store, threshold=0.95, device="cuda")
    # [{"index": 7, "match": "store", "match_index": 1203, "cosine": 0.991}, ...]

Exact sha256 dedupe (ingest) misses a photo saved again as JPEG or at another size; their
embeddings stay almost parallel. The search is exact on the device: cosine similarities of
`chunk` new rows against the whole store at a time (one (chunk, N) matrix), which is fast for
stores up to ~1e5 images. FAISS is not installed in this stack (no approximate index); a larger
store would want one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _unit(x: np.ndarray | Tensor | None, device: torch.device) -> Tensor | None:
    if x is None or len(x) == 0:
        return None
    t = x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x, np.float32))
    return F.normalize(t.to(device=device, dtype=torch.float32), dim=1)


@torch.no_grad()
def near_duplicates(new: np.ndarray | Tensor, store: np.ndarray | Tensor | None = None, *, threshold: float = 0.95,
                    chunk: int = 1024, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Rows of `new` whose cosine with a row of `store`, or with an earlier row of `new`, is at least
    `threshold`: one dict per duplicate row (`index`, `match` "store" | "batch", `match_index`,
    `cosine`), the store match preferred (the batch's first copy of a picture is kept)."""
    device = torch.device(device)
    x, s = _unit(new, device), _unit(store, device)
    if x is None:
        return []
    hits: list[dict[str, Any]] = []
    for start in range(0, len(x), chunk):
        q = x[start:start + chunk]
        best_s = best_si = None
        if s is not None:
            best_s, best_si = torch.full((len(q),), -2.0, device=device), torch.zeros(len(q), dtype=torch.long,
                                                                                          device=device)
            for s0 in range(0, len(s), chunk * 8):
                sim = q @ s[s0:s0 + chunk * 8].T
                v, i = sim.max(1)
                better = v > best_s
                best_s, best_si = torch.where(better, v, best_s), torch.where(better, i + s0, best_si)
        # within the batch: only earlier rows (the first copy is the original)
        prev = x[:start + len(q)]
        sim = q @ prev.T
        rows = torch.arange(len(q), device=device).unsqueeze(1) + start
        sim = sim.masked_fill(torch.arange(len(prev), device=device).unsqueeze(0) >= rows, -2.0)
        best_b, best_bi = sim.max(1)
        for r in range(len(q)):
            if best_s is not None and float(best_s[r]) >= threshold:
                hits.append({"index": start + r, "match": "store", "match_index": int(best_si[r]),
                             "cosine": round(float(best_s[r]), 4)})
            elif float(best_b[r]) >= threshold:
                hits.append({"index": start + r, "match": "batch", "match_index": int(best_bi[r]),
                             "cosine": round(float(best_b[r]), 4)})
    return hits
