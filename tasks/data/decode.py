"""Defensive decoding: untrusted bytes in, a store-ready RGB array or a quarantine reason out.

Every file the scanner hands over ends as exactly one `Outcome`: `Accepted` (decoded,
converted to RGB, resized to the store's working resolution), `Duplicate` (its sha256 is
already in the store, so it is never decoded) or `Rejected` (a short machine-readable
`reason` plus a human `detail`). Nothing here raises for bad input: a bad file must cost
one quarantine entry, never the run.

Resize policy: scale the shorter side to `size` and center-crop the longer one (bicubic,
antialiased when shrinking), after EXIF orientation. Large JPEGs are first reduced in the
DCT domain (`Image.draft`), which is exact enough and several times faster.

Memory: the pixel limit alone let a 172 KB 16-bit 9400x9400 PNG take 3.2 GB, so the decoded
size (bits per pixel x pixels, after JPEG draft reduction) has its own limit,
`max_decoded_bytes`; a file over it is quarantined as `too_large_decoded` before decoding.

Decoding runs in worker processes (`decode_files`) that die with the ingest (SIGKILL on the
parent's death). A worker that dies itself (the OOM killer, a crash in a native decoder) costs
one file: its chunk is decoded again one file at a time in a fresh worker, and the file that
kills that one is quarantined as `worker_crashed`. This module imports only Pillow, NumPy and
`sslflow.core` so that spawning a worker stays cheap.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
import stat
import warnings
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from PIL import (  # noqa: F401 - the plugins register the FORMATS with Image.open
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

# Pillow plugins we trust for untrusted input (never EPS/PSD/ICO and friends that happen to
# sit behind an image extension). JPEG also opens MPO, the multi-picture JPEG phones write.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
ORIENTATION_TAG = 0x0112
WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class DecodeOptions:
    size: int  # side of the stored square images
    min_side: int  # smaller images are quarantined as too_small
    max_pixels: int  # Pillow's decompression-bomb limit (width * height)
    max_file_bytes: int  # larger files are quarantined without being read
    max_decoded_bytes: int = 128 << 20  # bits per pixel x pixels, after JPEG draft reduction

    @classmethod
    def of(cls, ingest: object, size: int | None = None) -> DecodeOptions:
        """From the `ingest` settings section; `size` = an existing store's side."""
        return cls(size or ingest.size, ingest.min_side, ingest.max_pixels,  # type: ignore[attr-defined]
                   ingest.max_file_bytes, ingest.max_decoded_bytes)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FileTask:
    """One file to decode: `rel` is its path relative to the source root (the manifest key)."""

    rel: str
    path: str  # what to open (the target of an in-root symlink)
    label: str | None


@dataclass(frozen=True)
class Accepted:
    rel: str
    label: str | None
    sha256: str
    nbytes: int
    format: str
    width: int  # as displayed, i.e. after EXIF orientation
    height: int
    mode: str  # Pillow mode of the original (L, P, RGBA, CMYK, I;16, ...)
    orientation: int  # EXIF orientation tag, 1 = none
    image: np.ndarray  # (size, size, 3) uint8


@dataclass(frozen=True)
class Duplicate:
    rel: str
    label: str | None
    sha256: str


@dataclass(frozen=True)
class Rejected:
    rel: str
    reason: str
    detail: str


Outcome = Accepted | Duplicate | Rejected


# ------------------------------------------------------------------------------------ files
def read_file(task: FileTask, opts: DecodeOptions) -> bytes | Rejected:
    """The file's bytes, opened without following symlinks and without blocking on FIFOs."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(task.path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            return Rejected(task.rel, "symlink_not_followed", "became a symlink after the scan")
        return Rejected(task.rel, "unreadable", e.strerror or str(e))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return Rejected(task.rel, "is_directory", "a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            return Rejected(task.rel, "not_regular_file", "not a regular file (FIFO, socket or device)")
        if st.st_size > opts.max_file_bytes:
            return Rejected(task.rel, "file_too_large", f"{st.st_size} bytes > {opts.max_file_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(opts.max_file_bytes + 1)
    except OSError as e:
        return Rejected(task.rel, "unreadable", e.strerror or str(e))
    finally:
        os.close(fd)
    if not data:
        return Rejected(task.rel, "empty_file", "0 bytes")
    if len(data) > opts.max_file_bytes:
        return Rejected(task.rel, "file_too_large", f"more than {opts.max_file_bytes} bytes")
    return data


def decode_file(task: FileTask, opts: DecodeOptions, known: Collection[str]) -> Outcome:
    """Read, hash, and (unless the hash is `known`) decode one file."""
    data = read_file(task, opts)
    if isinstance(data, Rejected):
        return data
    sha = hashlib.sha256(data).hexdigest()
    if sha in known:
        return Duplicate(task.rel, task.label, sha)
    return decode_bytes(data, task.rel, task.label, sha, opts)


@contextmanager
def _bomb_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb check with our limit, its warning promoted to an error."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode_bytes(data: bytes, rel: str, label: str | None, sha: str, opts: DecodeOptions) -> Outcome:
    try:
        with _bomb_limit(opts.max_pixels), Image.open(io.BytesIO(data), formats=FORMATS) as im:
            return _accept(im, rel, label, sha, len(data), im.format or "unknown", opts)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Rejected(rel, "decompression_bomb", str(e).split(" could be")[0].rstrip(","))
    except UnidentifiedImageError:
        return Rejected(rel, "not_an_image", f"not a {'/'.join(FORMATS)} image")
    except (OSError, EOFError, SyntaxError) as e:
        text = str(e)
        if isinstance(e, EOFError) or "truncated" in text.lower():
            return Rejected(rel, "truncated", text or "unexpected end of file")
        return Rejected(rel, "decode_error", f"{type(e).__name__}: {text}")
    except Exception as e:  # a decoder bug must quarantine the file, not end the run
        return Rejected(rel, "decode_error", f"{type(e).__name__}: {e}")


def decode_image(im: Image.Image, rel: str, label: str | None, opts: DecodeOptions,
                 known: Collection[str], fmt: str = "raw") -> Outcome:
    """An already decoded image (demo, torchvision): hashed over mode, size and pixels."""
    raw = im.tobytes()
    palette = bytes(im.getpalette() or []) if im.mode in ("P", "PA") else b""
    sha = hashlib.sha256(f"{im.mode}:{im.width}x{im.height}:".encode() + raw + palette).hexdigest()
    if sha in known:
        return Duplicate(rel, label, sha)
    try:
        with _bomb_limit(opts.max_pixels):
            return _accept(im, rel, label, sha, len(raw), fmt, opts)
    except Exception as e:
        return Rejected(rel, "decode_error", f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------ pixels
#: Bits per pixel of Pillow's modes (an unknown mode counts as 32).
MODE_BITS = {"1": 1, "L": 8, "P": 8, "LA": 16, "PA": 16, "La": 16, "I;16": 16, "I;16L": 16, "I;16B": 16,
             "I;16N": 16, "RGB": 24, "YCbCr": 24, "LAB": 24, "HSV": 24, "RGBA": 32, "RGBa": 32, "RGBX": 32,
             "CMYK": 32, "I": 32, "F": 32}


def decoded_bytes(mode: str, width: int, height: int) -> int:
    return (MODE_BITS.get(mode, 32) * width * height + 7) // 8


def _accept(im: Image.Image, rel: str, label: str | None, sha: str, nbytes: int, fmt: str,
            opts: DecodeOptions) -> Outcome:
    w, h = im.size
    if w * h > opts.max_pixels:
        return Rejected(rel, "decompression_bomb", f"{w}x{h} = {w * h} pixels > {opts.max_pixels}")
    if min(w, h) < opts.min_side:
        return Rejected(rel, "too_small", f"{w}x{h}, shorter side < {opts.min_side}")
    mode = im.mode
    if im.format in ("JPEG", "MPO") and min(w, h) >= 2 * opts.size:
        scale = opts.size / min(w, h)
        im.draft(None, (max(1, round(w * scale)), max(1, round(h * scale))))
    need = decoded_bytes(im.mode, *im.size)  # before anything reads pixels (PNG's getexif does)
    if need > opts.max_decoded_bytes:
        return Rejected(rel, "too_large_decoded", f"{w}x{h} {mode} decodes to {need >> 20} MiB "
                                                  f"> {opts.max_decoded_bytes >> 20} MiB")
    orientation = _orientation(im)
    width, height = (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # as displayed
    im.load()
    if orientation != 1:
        im = _transpose(im)
    rgb = _resize(to_rgb(im), opts.size)
    return Accepted(rel, label, sha, nbytes, fmt, width, height, mode, orientation, rgb)


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # corrupt EXIF: keep the pixels, ignore the tag
        return 1
    return value if 1 <= value <= 8 else 1


def _transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # corrupt EXIF: keep the pixels as stored
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB with alpha composited onto white; 16-bit and float greys scaled, not clipped."""
    if im.mode.startswith("I;16"):  # 65535 -> 255, rounded; integer arithmetic (no float64 copy)
        a = np.asarray(im).astype(np.uint32)
        im = Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")
    elif im.mode == "I":
        a = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
        im = Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


def _resize(im: Image.Image, size: int) -> np.ndarray:
    """Shorter side to `size`, then the central square: no distortion, no padding."""
    w, h = im.size
    if (w, h) != (size, size):
        s = min(w, h)
        left, top = (w - s) / 2, (h - s) / 2
        im = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + s, top + s))
    return np.asarray(im, dtype=np.uint8)


# ------------------------------------------------------------------------------------ parallel
_WORKER: tuple[DecodeOptions, frozenset[str]] | None = None


def _init_worker(parent_pid: int, opts: DecodeOptions, known: frozenset[str]) -> None:
    global _WORKER
    from sslflow.core.processes import die_with_parent

    die_with_parent(parent_pid, signal.SIGKILL)  # a killed ingest takes its workers with it
    _WORKER = (opts, known)


def _decode_chunk_in_worker(chunk: Sequence[FileTask]) -> list[Outcome]:
    assert _WORKER is not None, "worker not initialised"
    opts, known = _WORKER
    return [decode_file(t, opts, known) for t in chunk]


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _pool(workers: int, opts: DecodeOptions, known: frozenset[str]) -> ProcessPoolExecutor:
    # spawn, not fork: the parent may hold torch/GX threads, which fork does not copy safely.
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(), opts, known))


def decode_files(tasks: Sequence[FileTask], opts: DecodeOptions, known: Collection[str],
                 workers: int = 0, chunk_size: int = 256) -> Iterator[Outcome]:
    """Outcomes in task order. Small jobs (or `workers=1`) stay in this process: spawning
    workers costs about half a second, more than decoding a few hundred images."""
    workers = workers or default_workers()
    if workers <= 1 or len(tasks) <= 2 * chunk_size:
        for t in tasks:
            yield decode_file(t, opts, known)
        return
    known = frozenset(known)
    pending = [tasks[i:i + chunk_size] for i in range(0, len(tasks), chunk_size)]
    while pending:
        try:
            with _pool(min(workers, len(pending)), opts, known) as pool:
                for outcomes in pool.map(_decode_chunk_in_worker, pending):
                    yield from outcomes
                    pending.pop(0)
        except BrokenProcessPool:
            # a worker died: the first unfinished chunk may hold the culprit (or be a bystander);
            # decode it one file at a time, then go on in parallel with a fresh pool
            yield from _decode_isolated(pending.pop(0), opts, known)


def _decode_isolated(chunk: Sequence[FileTask], opts: DecodeOptions, known: frozenset[str]) -> Iterator[Outcome]:
    """One file at a time in one worker; a file that kills it is quarantined (`worker_crashed`)
    and a fresh worker takes the next one."""
    pool = _pool(1, opts, known)
    try:
        for task in chunk:
            try:
                yield pool.submit(_decode_chunk_in_worker, [task]).result()[0]
            except BrokenProcessPool:
                yield Rejected(task.rel, "worker_crashed", "the decode worker died on this file (out of memory "
                                                           "or a crash in a native decoder)")
                pool.shutdown(wait=True, cancel_futures=True)
                pool = _pool(1, opts, known)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
