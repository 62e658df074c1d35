"""Benchmark: `ingest` of the 50,000 CIFAR-10 train JPEGs, then the no-op re-ingest.

    .venv/bin/python benchmarks/ingest_cifar10.py [--workers N] [--dvc]

Extracts `../shared/datasets/cifar10-jpeg.tar.gz` to a temp dir (timed apart), ingests
`cifar10/train` into a fresh store (decode in worker processes, dedupe, GX validation,
publish, data version), ingests it again (every file a duplicate: hashed, never decoded),
and prints the figures as JSON. `--dvc` runs both inside a fresh git + DVC repo so `dvc add`
and `dvc push` to a local remote are included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"




def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    ap.add_argument("--workers", type=int, default=0, help="decode processes (0 = all cores)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--dvc", action="store_true", help="inside a git + DVC repo: include dvc add/push")
    args = ap.parse_args()
    if not args.archive.is_file():
        print(f"CIFAR-10 archive not found at {args.archive}", file=sys.stderr)
        return 2
    from sslflow.core.settings import load_settings
    from sslflow.tasks.data.ingest import ingest

    with tempfile.TemporaryDirectory(prefix="sslflow-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        with tarfile.open(args.archive) as tar:
            tar.extractall(work, filter="data")
        extract_s = time.perf_counter() - t0
        source = work / "cifar10" / "train"
        project = work / "project"
        project.mkdir()
        if args.dvc:
            subprocess.run(["git", "init", "-q"], cwd=project, check=True)
            subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
        params = load_settings([], [f"ingest.size={args.size}", f"ingest.workers={args.workers}",
                                    f"versioning.dvc={'on' if args.dvc else 'off'}",
                                    f"versioning.remote_dir={work / 'remote'}"], project=project)
        runs = {}
        for name in ("first", "again"):
            t0 = time.perf_counter()
            s = ingest(str(source), project / "data" / "store", "train", settings=params,
                       reports_dir=project / "reports", log=lambda m: None)
            runs[name] = {"seconds": round(time.perf_counter() - t0, 2), "phases": s.seconds,
                          "accepted": s.accepted, "duplicates": s.duplicates,
                          "quarantined": len(s.quarantined), "data_version": s.data_version}
        first = runs["first"]
        print(json.dumps({
            "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()},
            "files": first["accepted"] + first["duplicates"] + first["quarantined"],
            "extract_seconds": round(extract_s, 2),
            "ingest": first, "reingest": runs["again"],
            "images_per_second": round(first["accepted"] / first["seconds"]),
            "dvc": args.dvc,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
