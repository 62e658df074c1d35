"""Data versions with DVC: the store root is a `dvc add`-tracked directory.

`data_version` is DVC's content hash of the store root (the `md5` of its `.dvc` file, e.g.
`3a5f...e.dir`): the md5 of the sorted JSON list of (relpath, md5) of every file. Outside a
DVC repo (or with `versioning.dvc: off`) the same hash is computed here (`dir_hash`), so a
version means the same thing with and without DVC, and a tracked store later gets the same id.

Every ingest that changes the store produces a new version: `dvc add` writes
`<store>.dvc`, and `dvc push` copies the new objects to the default remote. A repo without a
default remote gets a local directory remote (`versioning.remote_dir`) written to
`.dvc/config.local`, so a team-wide remote in `.dvc/config` (S3-compatible or other) always
wins. Restore any earlier version (commit the `.dvc` file after each ingest)::

    git checkout <rev> -- data/store.dvc
    dvc checkout data/store.dvc      # from the local cache
    dvc pull data/store.dvc          # when the cache lacks it: from the remote
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sslflow.core.errors import UserError

LOCAL_REMOTE = "sslflow-local"



@dataclass
class VersionInfo:
    data_version: str | None
    hashed_by: str  # "dvc" (from the .dvc file) | "sslflow" (same algorithm, no DVC)
    dvc_file: str | None = None
    remote: str | None = None
    pushed: bool = False
    error: str | None = None  # why pushing failed (the data is in, the remote lags)
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Files inside a store that are not data: the writer locks. `.dvcignore` holds the same pattern
#: (`Tracker` adds it to a repository that lacks it), so DVC's hash and `dir_hash` agree.
IGNORED = ".sslflow-*.lock"


def dir_hash(root: Path) -> str:
    """DVC 3's `md5` of a directory, as `dvc add` records it (checked against DVC in tests)."""
    entries = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if fnmatch.fnmatch(name, IGNORED):
                continue
            p = Path(dirpath) / name
            entries.append({"md5": file_md5(p), "relpath": p.relative_to(root).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


@contextlib.contextmanager
def _quiet_dvc() -> Iterator[None]:
    """DVC logs hints ('To track the changes with git...') to stdout at import-time handlers;
    our stdout is the JSON summary. Keep DVC's warnings (they go to stderr), drop its info."""
    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        dvc_logger.setLevel(level)


def find_repo_root(path: Path) -> Path | None:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Path(Repo.find_root(str(path)))
    except NotDvcRepoError:
        return None


class Tracker:
    """`dvc add` / `dvc push` of one store root inside a DVC repo."""

    def __init__(self, repo_root: Path, store_root: Path, cfg: Any) -> None:
        self.repo_root, self.store_root, self.cfg = repo_root, store_root.resolve(), cfg
        self.dvc_file = self.store_root.with_name(self.store_root.name + ".dvc")
        self.pipeline_stage: str | None = None  # set when a dvc.yaml stage outputs the store

    @classmethod
    def for_store(cls, store_root: Path, cfg: Any) -> Tracker | None:
        """The tracker, or None when DVC is off / not a DVC repo (error when `dvc: on`)."""
        if cfg.dvc not in ("auto", "on", "off"):
            raise UserError(f"versioning.dvc must be auto, on or off; got {cfg.dvc!r}")
        if cfg.dvc == "off":
            return None
        existing = next(p for p in (store_root.absolute(), *store_root.absolute().parents) if p.exists())
        root = find_repo_root(existing)
        if root is None:
            if cfg.dvc == "on":
                raise UserError(f"{store_root} is not inside a DVC repo (run `dvc init`, or --no-dvc)")
            return None
        tracker = cls(root, store_root, cfg)
        tracker.ignore_locks()
        tracker.preflight()
        return tracker

    def ignore_locks(self) -> None:
        """Make the repository's `.dvcignore` hold the stores' lock-file pattern (DVC must not
        version a lock, and must hash a store as `dir_hash` does)."""
        path = self.repo_root / ".dvcignore"
        lines = path.read_text().splitlines() if path.is_file() else []
        if IGNORED not in (line.strip() for line in lines):
            path.write_text("\n".join([*lines, "# the writer locks of sslflow's image stores", IGNORED]) + "\n")

    def preflight(self) -> None:
        """Fail before anything is written when `dvc add` could not record the version."""
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        try:
            with Repo(str(self.repo_root)) as repo:
                self._check(repo)
        except DvcException as e:
            raise UserError(f"DVC repo {self.repo_root}: {e}".replace("\n", " ")) from None

    def _check(self, repo: Any) -> None:
        for out in repo.index.outs:
            if Path(out.fs_path) == self.store_root and not out.stage.is_data_source:
                self.pipeline_stage = out.stage.addressing
                return
        if repo.scm.is_ignored(str(self.dvc_file)):
            rel = self.dvc_file.relative_to(self.repo_root)
            raise UserError(f"{rel} is git-ignored, so DVC cannot track the store: un-ignore it "
                            f"(e.g. replace '/{rel.parts[0]}/' by '/{rel.parts[0]}/*' and "
                            f"'!/{rel.parts[0]}/*.dvc' in .gitignore), or use --no-dvc")

    def track(self) -> str:
        """`dvc add` the store root; the new data_version."""
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        try:
            with _quiet_dvc(), Repo(str(self.repo_root)) as repo:
                repo.add(str(self.store_root))
        except DvcException as e:
            raise UserError(f"dvc add {self.store_root} failed: {e}".replace("\n", " ")) from None
        return self.recorded_version() or dir_hash(self.store_root)

    def recorded_version(self) -> str | None:
        if self.pipeline_stage or not self.dvc_file.is_file():
            return None
        meta = yaml.safe_load(self.dvc_file.read_text())
        return str(meta["outs"][0]["md5"])

    def push(self) -> str:
        """`dvc push` of the store; the remote's name. Configures the local remote if none."""
        from dvc.repo import Repo

        with _quiet_dvc(), Repo(str(self.repo_root)) as repo:
            remote = repo.config["core"].get("remote")
            if not remote:
                remote = self._add_local_remote(repo)
            repo.push(targets=[str(self.dvc_file)], remote=remote)
        return remote

    def _add_local_remote(self, repo: Any) -> str:
        url = Path(os.path.expanduser(self.cfg.remote_dir))
        url = url if url.is_absolute() else self.repo_root / url
        url.mkdir(parents=True, exist_ok=True)
        with repo.config.edit("local") as conf:
            conf["remote"][LOCAL_REMOTE] = {"url": str(url)}
            conf["core"]["remote"] = LOCAL_REMOTE
        return LOCAL_REMOTE


def version_store(store_root: Path, tracker: Tracker | None, push: bool) -> VersionInfo:
    """Record the store's version; a failed push is reported, never fatal to the data."""
    if tracker is None:
        return VersionInfo(dir_hash(store_root), "sslflow")
    if tracker.pipeline_stage:  # `dvc repro` records (and `dvc push` uploads) the stage's outputs
        return VersionInfo(dir_hash(store_root), "sslflow",
                           note=f"output of dvc.yaml stage {tracker.pipeline_stage!r}: `dvc repro` records it")
    info = VersionInfo(tracker.track(), "dvc", dvc_file=str(tracker.dvc_file))
    if push:
        from dvc.exceptions import DvcException

        try:
            info.remote = tracker.push()
            info.pushed = True
        except DvcException as e:
            info.error = f"dvc push failed: {e}".replace("\n", " ")
    return info


def store_data_version(store_root: str | Path) -> str | None:
    """The DVC hash recorded for the store (`<store>.dvc`), else None (not computed here: it
    reads every byte of the store)."""
    import yaml

    dvc_file = Path(str(store_root).rstrip("/") + ".dvc")
    if not dvc_file.is_file():
        return None
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
        return str(outs[0].get("md5")) if outs else None
    except (yaml.YAMLError, AttributeError, IndexError):
        return None


def current_data_version(store_root: str | Path) -> str | None:
    """The store's data version as a run reports it: the one `<store>.dvc` records, else the
    same hash computed here (`dir_hash`: reads every byte, about a second per 500 MB), None
    when there is no store. A store outside DVC (`--no-dvc`, no DVC repo, a worker's copy)
    still gets a version, so reports and MLflow never say "unknown" for data that exists."""
    recorded = store_data_version(store_root)
    if recorded is not None:
        return recorded
    root = Path(store_root)
    return dir_hash(root) if root.is_dir() and any(root.iterdir()) else None
