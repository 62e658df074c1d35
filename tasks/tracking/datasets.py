"""The image stores a run used, as MLflow dataset inputs: the UI's Dataset column, lineage, filters.

Without them the runs table of an experiment says "Dataset: -" and nobody sees which data a
model saw. Each split is one dataset input of the run:

- name: the split's path relative to the project (`data/store/train`), the same for every run
  on that store, so the UI groups its versions;
- digest: the DVC data version of the store root (`<md5>.dir`, what `data/store.dvc` records;
  computed the same way without DVC), so two runs on the same data show the same digest;
- source: the split's path (`file://...`), the `.dvc` file and the DVC remote when there is one;
- schema: uint8 images (N, H, W, 3) and int64 labels (-1 = unlabeled);
- profile: rows, labeled rows, classes, image size;
- context tag: `training` (the train split) or `evaluation` (the test split).
"""

from __future__ import annotations

import configparser
import json
from contextlib import suppress
from pathlib import Path
from typing import Any

CONTEXT_TAG = "mlflow.data.context"  # the tag the MLflow UI reads (mlflow.data.context)
MAX_DIGEST = 36  # MLflow's datasets.digest column


def dvc_remote_url(path: Path) -> str | None:
    """The URL of the default DVC remote of the repo holding `path` (`.dvc/config.local` wins,
    as in DVC), or None. Read as the INI file it is: no DVC import for a label."""
    for root in (path, *path.parents):
        if (root / ".dvc").is_dir():
            parser = configparser.ConfigParser()
            try:
                parser.read([root / ".dvc" / "config", root / ".dvc" / "config.local"])
            except configparser.Error:
                return None
            name = parser.get("core", "remote", fallback=None)
            return parser.get(f"'remote \"{name}\"'", "url", fallback=None) if name else None
    return None


def store_dataset(split_dir: str | Path, data_version: str | None, project: Path | None = None) -> Any:
    """The `mlflow.entities.Dataset` of one split of an image store."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset
    from mlflow.types import Schema, TensorSpec

    from sslflow.ssl_models.store import ImageStore
    from sslflow.tasks.data.versioning import current_data_version

    split_dir = Path(split_dir).resolve()
    store = ImageStore.open(split_dir)
    labels = store.labels()
    name = split_dir.as_posix()
    if project is not None:
        with suppress(ValueError):  # outside the project: the absolute path
            name = split_dir.relative_to(Path(project).resolve()).as_posix()
    version = data_version or current_data_version(split_dir.parent) or "unknown"
    source: dict[str, Any] = {"uri": split_dir.as_uri()}
    dvc_file = split_dir.parent.with_name(split_dir.parent.name + ".dvc")
    if dvc_file.is_file():
        source["dvc_file"] = str(dvc_file)
        remote = dvc_remote_url(split_dir.parent)
        if remote:
            source["dvc_remote"] = remote
    schema = TensorDatasetSchema(
        features=Schema([TensorSpec(np.dtype(np.uint8), (-1, store.height, store.width, 3), "image")]),
        targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")]))
    profile = {"num_rows": len(store), "labeled_rows": int((labels >= 0).sum()), "classes": len(store.classes),
               "image_size": f"{store.height}x{store.width}"}
    return Dataset(name=name, digest=str(version)[:MAX_DIGEST], source_type="local", source=json.dumps(source),
                   schema=json.dumps(schema.to_dict()), profile=json.dumps(profile))


def log_store_inputs(run: Any, data_version: str | None, project: Path | None = None, *,
                     train_store: str | Path | None = None, test_store: str | Path | None = None) -> list[Any]:
    """Log the train split (`training`) and the test split (`evaluation`) as dataset inputs of `run`."""
    from mlflow.entities import DatasetInput, InputTag

    from sslflow.tasks.tracking.run import outages_as_one_line

    inputs = [DatasetInput(store_dataset(split, data_version, project), [InputTag(CONTEXT_TAG, context)])
              for split, context in ((train_store, "training"), (test_store, "evaluation"))
              if split is not None and (Path(split) / "store.json").is_file()]
    if inputs:
        with outages_as_one_line(run.tracking_uri, f"logging the dataset inputs of MLflow run {run.run_id}"):
            run.client.log_inputs(run.run_id, datasets=inputs)
    return inputs
