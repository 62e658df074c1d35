"""Set a rejected batch aside, so a nightly job does not fail on the same files every night.

When validation rejects what `retrain` found in the incoming folder, nothing was added to the
store, but the files are still there: the next night would reject them again, and every later
batch with them. `set_aside` moves the files of the incoming folder that are not in the store
(the batch: new images, the quarantined files that made it fail) to `<set_aside>/<batch>/`,
keeping their relative paths (so `<class>/` labels survive), with `REJECTED.json` (what failed,
the override that would admit it) and the validation report beside them. To admit the batch
after all: fix it (or choose the override), and move its files back into the incoming folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslflow.core.errors import UserError
from sslflow.ssl_models.store import file_sha256

RECORD = "REJECTED.json"

#: The setting that admits what each suite rejected (`<split>-<suite>`), named in the message.
OVERRIDES = {
    "scan": "validate.max_quarantined_fraction",
    "classes": "validate.class_balance_tolerance (or list the split in validate.class_balance_warn_splits)",
    "manifest": "validate.allow_new_classes=true or ingest.classes (for labels the store does not know)",
}


class BatchSetAside(UserError):
    """The batch was rejected and moved aside: one line naming the folder and the override."""


@dataclass(frozen=True)
class SetAside:
    folder: Path
    files: int
    failure: str
    override: str

    def message(self, incoming: Path) -> str:
        return (f"the batch in {incoming} was rejected ({self.failure}) and set aside: {self.files} files moved to "
                f"{self.folder}/ with its report ({RECORD}), so the next run goes on without it; to admit it, "
                f"fix it or set {self.override}, and move the files back to {incoming}/")


def override_for(failures: list[Any]) -> str:
    """The setting that admits the first failure (`Failure.suite` is `<split>-<suite>`)."""
    for f in failures:
        suite = str(getattr(f, "suite", "")).rsplit("-", 1)[-1]
        if suite in OVERRIDES:
            return OVERRIDES[suite]
    return "the validate.* setting of the failed expectation (docs/data.md)"


def batch_files(incoming: Path, known: set[str] | dict[str, Any]) -> list[Path]:
    """Regular files under `incoming` (links not followed) whose bytes are not in the store."""
    out = []
    for dirpath, dirnames, files in os.walk(incoming):
        dirnames.sort()
        for name in sorted(files):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink() and file_sha256(p) not in known:
                out.append(p)
    return out


def set_aside(incoming: str | Path, store_root: str | Path, dest_root: str | Path, rejected: Any,
              reports: list[str | Path] = ()) -> SetAside:
    """Move the rejected batch out of `incoming` into a new folder under `dest_root`.

    `rejected`: the `ValidationFailed` (its `result.failures` name the suites); `reports`: files
    copied beside the batch (the validation JSON). Files already in the store stay where they are
    (they were duplicates, not the problem)."""
    from sslflow.tasks.data.manifest import known_hashes

    incoming, dest_root = Path(incoming), Path(dest_root)
    if dest_root.resolve().is_relative_to(incoming.resolve()):
        raise UserError(f"pipeline.set_aside ({dest_root}) is inside the incoming folder {incoming}: the next "
                        "run would ingest the rejected batch again; choose a folder outside it")
    failures = list(getattr(getattr(rejected, "result", None), "failures", []) or [])
    first = failures[0].describe() if failures else str(rejected)
    failure = first if len(first) <= 300 else first[:297] + "..."
    files = batch_files(incoming, known_hashes(Path(store_root)))
    folder = dest_root / time.strftime("%Y%m%dT%H%M%S")
    n = 1
    while folder.exists():  # two rejections in one second
        folder = dest_root / f"{time.strftime('%Y%m%dT%H%M%S')}-{n}"
        n += 1
    folder.mkdir(parents=True)
    moved = 0
    try:
        for p in files:
            target = folder / p.relative_to(incoming)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), str(target))
            moved += 1
    except OSError as e:  # a read-only source folder, a full disk: say so, do not hide the rejection
        raise UserError(f"the batch in {incoming} was rejected ({failure}) and could not be set aside "
                        f"({moved} of {len(files)} files moved to {folder}: {e.strerror or e}); move or fix the "
                        "files by hand") from None
    for dirpath, _, _ in sorted(os.walk(incoming), reverse=True):  # the emptied class folders
        if Path(dirpath) != incoming:
            with suppress(OSError):  # not empty: something stays
                Path(dirpath).rmdir()
    copied = []
    for r in reports:
        if Path(r).is_file():
            shutil.copy2(r, folder / Path(r).name)
            copied.append(Path(r).name)
    aside = SetAside(folder, len(files), failure, override_for(failures))
    (folder / RECORD).write_text(json.dumps({
        "incoming": str(incoming), "files": [str(p.relative_to(incoming)) for p in files],
        "error": str(rejected), "override": aside.override, "reports": copied,
        "set_aside_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
    return aside
