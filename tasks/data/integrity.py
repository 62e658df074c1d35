"""Are a split's files what its index says, and the repair when they are not.

    problems = check_split(Path("data/store/train"))     # [] = every shard there, right shape and sha256
    lost = repair_split(Path("data/store/train"))        # drop what is gone; re-ingest brings it back

A shard lost after publication (deleted by hand, a disk error, an old sslflow's concurrent
ingests) used to pass `sslflow validate` and crash `pretrain`; and because the manifest kept
the lost images' hashes, re-ingesting them reported duplicates forever. The repair drops the
damaged shards from the index and their rows from the manifest, under the same locks as an
ingest, so their images are forgotten and the next ingest of the source restores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sslflow.core.errors import UserError
from sslflow.ssl_models.store import ImageStore
from sslflow.tasks.data import manifest


class StoreDamaged(UserError):
    """The split's index names shard files that are missing or damaged (exit 2)."""


@dataclass(frozen=True)
class Repair:
    shards: int  # dropped from the index
    images: int  # their images, now forgotten (re-ingest restores them)
    paths: list[str]  # source paths of those images, from the manifest

    def __str__(self) -> str:
        if not self.shards:
            return "nothing to repair"
        return (f"dropped {self.shards} damaged shard(s) holding {self.images} images; ingest their source again "
                f"to restore them (e.g. {', '.join(self.paths[:3]) or 'unknown paths'})")


def check_split(split_dir: Path, checksums: bool = True) -> list[str]:
    """One line per problem of the split's shard files (empty when sound)."""
    return ImageStore.open(split_dir).verify(checksums=checksums)


def require_sound(split_dir: Path, checksums: bool = True) -> None:
    """Raise `StoreDamaged` naming the files (one line) unless every shard checks out."""
    problems = check_split(split_dir, checksums)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise StoreDamaged(f"{split_dir} is damaged: {'; '.join(problems[:3])}{more}. Run `sslflow validate "
                           f"--store {Path(split_dir).parent} --split {Path(split_dir).name} --repair`, then "
                           "ingest the source again")


def repair_split(split_dir: Path, wait_s: float = 60.0) -> Repair:
    """Drop damaged shards from the index and their rows from the manifest (under the ingest lock)."""
    from sslflow.tasks.data.ingest import ingest_lock

    split_dir = Path(split_dir)
    with ingest_lock(split_dir.parent, wait_s):
        store = ImageStore.open(split_dir)
        before = manifest.read(split_dir, store)
        bad = store.repair()
        if not bad:
            return Repair(0, 0, [])
        dropped = {s.id for s in bad}
        lost = before[before["shard"].isin(dropped)]
        manifest.write(split_dir, manifest.read(split_dir, ImageStore.open(split_dir)))
        return Repair(len(bad), sum(s.count for s in bad), [str(p) for p in lost["path"]])
