"""Where images come from: a folder tree, a torchvision dataset, or the built-in demo set.

Every source turns into the same stream of `tasks.decode` outcomes, so quarantine, dedupe,
the manifest and validation never care where an image came from.

- folder (`PATH` or `folder:PATH`): walked recursively; `<root>/<class>/...` is labeled with
  `<class>`, loose files in `<root>` are unlabeled. Symlinks are never followed out of the
  root; symlinked directories are not entered (no loops, no double counting).
- `torchvision:NAME[?key=value&...]`: a dataset class of `torchvision.datasets`, read from
  `ingest.torchvision_root/NAME`, downloaded when missing and the network is reachable;
  offline it fails at once. Extra constructor arguments go in the query (values are YAML).
- `demo`: `tasks.demo.generate_demo`, a different seed per split.
"""

from __future__ import annotations

import inspect
import os
import socket
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import yaml
from PIL import Image

from sslflow.core.errors import UserError
from sslflow.tasks.data import demo
from sslflow.tasks.data.decode import DecodeOptions, FileTask, Outcome, Rejected, decode_files, decode_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
OFFLINE_ENV = "SSLFLOW_OFFLINE"
PROBE_TIMEOUT_S = 3.0


class Source(Protocol):
    spec: str
    classes: tuple[str, ...]  # declared class order; () = the names found in the data
    ignored: list[str]  # non-image files (relative paths)

    def outcomes(self, opts: DecodeOptions, known: Collection[str], workers: int,
                 chunk_size: int) -> Iterator[Outcome]: ...


def open_source(spec: str, split: str, *, demo_per_class: dict[str, int], demo_seed: int,
                torchvision_root: Path) -> Source:
    if spec == "demo":
        if split not in demo_per_class:
            raise UserError(f"the demo source has splits {', '.join(demo_per_class)}, not {split!r}")
        seed = demo_seed + list(demo_per_class).index(split)
        return DemoSource(spec, split, demo_per_class[split], seed)
    if spec.startswith("torchvision:"):
        return TorchvisionSource.open(spec, split, torchvision_root)
    path = Path(spec.removeprefix("folder:"))
    if not path.exists():
        raise UserError(f"source {spec} does not exist (a folder, demo, or torchvision:NAME)")
    if not path.is_dir():
        raise UserError(f"source {spec} is not a directory")
    return FolderSource(spec, path)


# ------------------------------------------------------------------------------------ folder
def display_path(rel: str) -> str:
    """A relative path as valid UTF-8 (undecodable bytes as \\x escapes) for JSON and Parquet."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class FolderScan:
    tasks: list[FileTask] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def scan_folder(root: Path) -> FolderScan:
    """Walk `root` without following symlinks; sorted by path, so a batch is reproducible."""
    scan = FolderScan()
    real_root = os.path.realpath(root)
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as e:
            scan.rejected.append(Rejected(display_path(prefix.rstrip("/")) or ".", "unreadable",
                                          f"directory: {e.strerror or e}"))
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                stack.append((entry.path, f"{prefix}{entry.name}/"))
            else:
                _classify(entry, prefix, real_root, scan)
    scan.tasks.sort(key=lambda t: t.rel)
    scan.rejected.sort(key=lambda r: r.rel)
    scan.ignored.sort()
    return scan


def _classify(entry: os.DirEntry[str], prefix: str, real_root: str, scan: FolderScan) -> None:
    rel = display_path(prefix + entry.name)
    label = display_path(prefix.split("/", 1)[0]) if prefix else None
    is_image = Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
    path = entry.path
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        if os.path.commonpath([real_root, target]) != real_root:
            scan.rejected.append(Rejected(rel, "symlink_outside_root",
                                          "points outside the source root (not followed)"))
            return
        if not os.path.exists(target):
            scan.rejected.append(Rejected(rel, "broken_symlink", "its target does not exist"))
            return
        if os.path.isdir(target):
            scan.ignored.append(rel)  # symlinked directories are not entered
            return
        path = target
    elif entry.is_dir(follow_symlinks=False):
        scan.rejected.append(Rejected(rel, "is_directory", "a directory named like an image"))
        return
    if is_image:
        scan.tasks.append(FileTask(rel, path, label))
    else:
        scan.ignored.append(rel)


@dataclass
class FolderSource:
    spec: str
    root: Path
    classes: tuple[str, ...] = ()
    ignored: list[str] = field(default_factory=list)

    def outcomes(self, opts: DecodeOptions, known: Collection[str], workers: int,
                 chunk_size: int) -> Iterator[Outcome]:
        scan = scan_folder(self.root)
        self.ignored = scan.ignored
        yield from scan.rejected
        yield from decode_files(scan.tasks, opts, known, workers, chunk_size)


# ------------------------------------------------------------------------------------ demo
@dataclass
class DemoSource:
    spec: str
    split: str
    n_per_class: int
    seed: int
    classes: tuple[str, ...] = demo.CLASSES
    ignored: list[str] = field(default_factory=list)

    def outcomes(self, opts: DecodeOptions, known: Collection[str], workers: int,
                 chunk_size: int) -> Iterator[Outcome]:
        images, labels = demo.generate_demo(self.n_per_class, opts.size, self.seed)
        for i, (img, y) in enumerate(zip(images, labels, strict=True)):
            rel = f"demo/{self.split}/{i:05d}"
            yield decode_image(Image.fromarray(img), rel, demo.CLASSES[y], opts, known)


# ------------------------------------------------------------------------------------ torchvision
@dataclass
class TorchvisionSource:
    spec: str
    name: str
    split: str
    dataset: Any
    classes: tuple[str, ...]
    ignored: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, spec: str, split: str, root: Path) -> TorchvisionSource:
        name, _, query = spec.removeprefix("torchvision:").partition("?")
        import torch.utils.data
        import torchvision.datasets

        ds_cls = getattr(torchvision.datasets, name, None)
        if not (inspect.isclass(ds_cls) and issubclass(ds_cls, torch.utils.data.Dataset)):
            raise UserError(f"{spec}: torchvision.datasets has no dataset {name!r} (e.g. CIFAR10, STL10)")
        kwargs: dict[str, Any] = {k: yaml.safe_load(v) for k, v in parse_qsl(query)}
        params = inspect.signature(ds_cls).parameters
        if "root" in params:
            kwargs.setdefault("root", str(Path(root) / name))
        if "train" in params:
            if split not in ("train", "test"):
                raise UserError(f"{spec} has splits train and test, not {split!r}")
            kwargs.setdefault("train", split == "train")
        elif "split" in params:
            kwargs.setdefault("split", split)
        dataset = _construct(spec, ds_cls, kwargs, "download" in params)
        classes = tuple(str(c) for c in getattr(dataset, "classes", None) or ())
        return cls(spec, name, split, dataset, classes)

    def outcomes(self, opts: DecodeOptions, known: Collection[str], workers: int,
                 chunk_size: int) -> Iterator[Outcome]:
        for i in range(len(self.dataset)):
            rel = f"{self.name}/{self.split}/{i:06d}"
            try:
                im, target = self.dataset[i]
                if isinstance(im, np.ndarray):
                    im = Image.fromarray(im)
                if not isinstance(im, Image.Image):
                    raise TypeError(f"expected a PIL image, got {type(im).__name__}")
            except Exception as e:
                yield Rejected(rel, "decode_error", f"{type(e).__name__}: {e}")
                continue
            yield decode_image(im, rel, self._label(target), opts, known)

    def _label(self, target: Any) -> str | None:
        try:
            y = int(target)
        except (TypeError, ValueError):
            return None
        if y < 0:
            return None  # e.g. STL10's unlabeled split
        return self.classes[y] if y < len(self.classes) else str(y)


def _construct(spec: str, ds_cls: type, kwargs: dict[str, Any], can_download: bool) -> Any:
    """The dataset from disk; else downloaded, but only after a quick network probe."""
    extra = {"download": False} if can_download else {}
    try:
        return ds_cls(**kwargs, **extra)
    except TypeError as e:
        raise UserError(f"{spec}: {e}") from None
    except Exception as e:
        if not can_download:
            raise UserError(f"{spec}: {e}".replace("\n", " ")) from None
    where = kwargs.get("root", "its root")
    if offline(_download_urls(ds_cls)):
        raise UserError(f"{spec} is not downloaded in {where} and this machine is offline: "
                        f"download it on a connected machine, or copy it into {where}")
    try:
        return ds_cls(**kwargs, download=True)
    except Exception as e:
        raise UserError(f"{spec}: download failed: {e}".replace("\n", " ")) from None


def _download_urls(ds_cls: type) -> list[str]:
    urls: list[str] = []
    for attr in ("url", "mirrors", "resources"):
        value = getattr(ds_cls, attr, None)
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            first = item[0] if isinstance(item, list | tuple) and item else item
            if isinstance(first, str) and first.startswith(("http://", "https://")):
                urls.append(first)
    return urls or ["https://download.pytorch.org"]


def offline(urls: list[str]) -> bool:
    """True when `SSLFLOW_OFFLINE` is set, or the first download host does not answer."""
    if os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes"):
        return True
    return not reachable(urls[0])


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connect to the URL's host, bounded in time even when DNS hangs."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)
