"""Is the data a remote step needs on this host? The store (pulled with DVC when missing) and
the settings files, at the paths the caller sent.

The contract of a step running on another host (a GPU worker; docs/scaling-gpu-pool.md):
paths are absolute, as the caller sees them; the store is used where it is, or `dvc pull`ed
through `<store>.dvc` when that file records the data version asked for; anything else is a
one-line `UserError` naming the path and the host, so nothing trains on the wrong data.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from sslflow.core.errors import UserError
from sslflow.tasks.data.versioning import find_repo_root, store_data_version

logger = logging.getLogger("sslflow")


def missing_splits(store_root: Path, splits: list[str]) -> list[str]:
    return [s for s in splits if not (store_root / s / "store.json").is_file()]


def ensure_store(store_root: str | Path, splits: list[str], data_version: str | None = None) -> Path:
    """Make `store_root/<split>` usable on this host, pulling the store with DVC if needed.

    A store that is present is used as it is, unless its `<store>.dvc` records another data
    version than the one asked for (the checkout here lags behind). A missing one is pulled
    from the DVC remote through `<store>.dvc` when that file records the version asked for.
    Every other case is a `UserError` naming the path: nothing is trained on the wrong data.
    """
    root = Path(store_root)
    recorded = store_data_version(root)
    if data_version and recorded and recorded != data_version:
        raise UserError(f"{root}.dvc on {socket.gethostname()} records data version {recorded}, the train flow "
                        f"asked for {data_version}: update this checkout (git pull, dvc pull) or share the store")
    missing = missing_splits(root, splits)
    if not missing:
        return root
    if recorded is None:
        raise UserError(f"image store {root / missing[0]} is not on {socket.gethostname()} and there is no "
                        f"{root}.dvc to pull it with: mount the store at the same path as on the host of the "
                        "train flow, or track it with DVC (docs/scaling-gpu-pool.md)")
    dvc_pull(Path(f"{root}.dvc"))
    missing = missing_splits(root, splits)
    if missing:
        raise UserError(f"dvc pull {root}.dvc did not produce {root / missing[0]}/store.json")
    return root


def dvc_pull(dvc_file: Path) -> None:
    """`dvc pull <dvc_file>` in the DVC repo that holds it (from its default remote)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    repo_root = find_repo_root(dvc_file.parent)
    if repo_root is None:
        raise UserError(f"{dvc_file} is not inside a DVC repo: cannot pull the store it names")
    logger.info("store not on this host: dvc pull %s", dvc_file)
    try:
        with Repo(str(repo_root)) as repo:
            repo.pull(targets=[str(dvc_file)])
    except DvcException as e:
        raise UserError(f"dvc pull {dvc_file} failed: {e}".replace("\n", " ")) from None


def require_files(paths: list[str], what: str) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"{what} {missing[0]} is not on {socket.gethostname()}: share it at the same path "
                        "or keep the checkout at the same path on every host")
