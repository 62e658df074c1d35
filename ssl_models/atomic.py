"""Files that appear whole or not at all, and a full disk that is one line, not a crash.

    publish(run_dir, {"encoder.pt": data, "metrics.json": text.encode()})   # all or none
    write_atomic(path, data)                                                 # one file

Each file is written to a fsynced temporary in its directory, and only once every temporary
is written is each one renamed over its name (renames need no space). Out of space or quota:
`DiskFull` naming the file, the temporaries removed, no file changed. A process killed
mid-write leaves `.<name>.<random>.tmp` files, which `remove_stale_temporaries` sweeps on the
next start.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from sslflow.ssl_models.errors import DiskFull

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def publish(directory: Path, files: dict[str, bytes | memoryview]) -> None:
    """Write `files` (name -> bytes) into `directory` together (see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    temps = {name: directory / f".{name}.{uuid.uuid4().hex}.tmp" for name in files}
    try:
        for name, data in files.items():
            try:
                with open(temps[name], "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                if e.errno in NO_SPACE:
                    raise DiskFull(directory / name, e.errno) from None
                raise
        for name, tmp in temps.items():
            os.replace(tmp, directory / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    fsync_dir(directory)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    publish(Path(path).parent, {Path(path).name: data})


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path) -> None:
    """Temporaries of a writer that was killed mid-write: never valid files."""
    if Path(directory).is_dir():
        for pattern in (".*.tmp", ".*.tmp.pt2"):  # .tmp.pt2: exports of sslflow < 0.3
            for f in Path(directory).glob(pattern):
                f.unlink(missing_ok=True)
