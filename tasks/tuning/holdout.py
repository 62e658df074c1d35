"""The objective's kNN data: a class-stratified held-out part of the train split (the test split
stays out of the search)."""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError


def objective_stores(train: Any, test: Any, holdout_fraction: float, seed: int, study_dir: Path) -> tuple[Any, Any]:
    """(kNN memory bank, kNN queries) of the objective.

    With `holdout_fraction` > 0 the queries are a class-stratified random part of the train
    split's labeled images and the bank is the rest, so the test split stays unseen by the
    search and the champion's test score is not selected on itself. The two stores are
    written once per (data, fraction, seed) under the study directory (atomically: workers
    may start together). 0 = the test split is the query set.
    """
    import numpy as np

    from sslflow.ssl_models.store import ImageStore

    if holdout_fraction <= 0:
        return train, test
    key = f"{'-'.join(sh.id for sh in train.shards)}-{holdout_fraction}-{seed}"
    root = study_dir / f"holdout-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if not (ImageStore.is_store(root / "bank") and ImageStore.is_store(root / "queries")):
        labels = train.labels()
        rng = np.random.default_rng(seed)
        query = np.zeros(len(labels), dtype=bool)
        for c in np.unique(labels[labels >= 0]):
            idx = np.flatnonzero(labels == c)
            take = max(1, round(holdout_fraction * len(idx)))
            if take >= len(idx):
                raise UserError(f"tune.holdout_fraction {holdout_fraction}: class {train.classes[c]!r} has only "
                                f"{len(idx)} labeled images; lower it or set 0 to use the test split")
            query[rng.choice(idx, size=take, replace=False)] = True
        if not query.any():
            raise UserError(f"{train.root} has no labeled images: the kNN objective needs labels "
                            "(or set tune.holdout_fraction=0 to use the test split)")
        images = train.images()
        tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for name, keep in (("bank", ~query & (labels >= 0)), ("queries", query)):
            out = ImageStore.create(tmp / name, train.height, train.width)
            with out.writing():
                out.publish([], list(train.classes))  # the train split's label numbering, in both
                out.add(images[keep], [train.classes[i] for i in labels[keep]])
        with suppress(OSError):  # another worker won the race: its copy is identical
            tmp.rename(root)
        shutil.rmtree(tmp, ignore_errors=True)
    return ImageStore.open(root / "bank"), ImageStore.open(root / "queries")
