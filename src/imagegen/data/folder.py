"""A labelled image folder (ROOT/<class>/<images>) as a dataset: scan, split by content hash, decode.

- Classes are ROOT's sub-folders (sorted by name; hidden ones ignored); a class's images are the
  .png .jpg .jpeg .webp .bmp files anywhere under its folder. Hidden files and folders, other files
  and files directly in ROOT are ignored.
- Split: a file goes to test when its sha256, read as a fraction of 2**256, is below
  data.test_fraction. So adding images never moves an existing one, and identical files share a split.
- Decoding (Pillow): EXIF orientation applied; 16-bit grey scaled to 8 bits; palette, CMYK and the
  rest converted; transparency composited on data.background; then the central square (side = the
  shorter side) resized to image_size x image_size with Lanczos (antialiased) and converted to the
  configured channels. A file Pillow cannot decode (zero bytes, truncated, not an image) is listed
  as unreadable and left out.
- Decoding runs on every core (order-preserving), streaming into per-split memory-mapped arrays, so
  the decoded set is held once (on disk) and never twice in memory.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagegen.errors import ImagegenError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
SCAN = "scan.json"  # beside the arrays: what the scan found (unreadable files by path)
CHUNK = 16  # files per task handed to a decoding process


@dataclass(frozen=True)
class Scan:
    root: Path
    classes: tuple[str, ...]
    files: list[tuple[int, str]]  # (label, path relative to root, posix), sorted by label then path
    ignored: int  # hidden, non-image and top-level files


def scan_folder(root: Path) -> Scan:
    """The class folders and image files under root; one-line errors for a folder that cannot be a dataset."""
    if not root.exists():
        raise ImagegenError(f"data.folder: {root}: no such folder; expected ROOT/<class>/<image files>")
    if not root.is_dir():
        raise ImagegenError(f"data.folder: {root} is not a folder; expected ROOT/<class>/<image files>")
    classes, ignored = [], 0
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            classes.append(entry.name)
        else:
            ignored += 1
    if len(classes) < 2:
        found = f" ({classes[0]})" if classes else ""
        raise ImagegenError(f"data.folder: {root} has {len(classes)} class folder(s){found}; "
                            "expected two or more sub-folders, one per class")
    files: list[tuple[int, str]] = []
    for label, name in enumerate(classes):
        found, skipped = class_files(root, name)
        if not found:
            raise ImagegenError(f"data.folder: {root / name} holds no image files ({' '.join(IMAGE_SUFFIXES)}); "
                                "expected at least one per class (add images or remove the folder)")
        files += [(label, rel) for rel in found]
        ignored += skipped
    if ignored:
        log.info("prepare: %d hidden or non-image file(s) under %s ignored", ignored, root)
    return Scan(root, tuple(classes), files, ignored)


def class_files(root: Path, name: str) -> tuple[list[str], int]:
    """(sorted relative paths of the image files under root/name, number of other files skipped)."""
    found, skipped = [], 0
    for folder, dirs, names in os.walk(root / name):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for file in names:
            if not file.startswith(".") and file.lower().endswith(IMAGE_SUFFIXES):
                found.append((Path(folder) / file).relative_to(root).as_posix())
            else:
                skipped += 1
    return sorted(found), skipped


def in_test(sha256: str, test_fraction: float) -> bool:
    """The split of a file, from its content hash alone."""
    return int(sha256, 16) < test_fraction * 2**256


@dataclass(frozen=True)
class Decoded:
    sha256: str | None  # None: the file could not be read at all
    error: str | None  # why it is unreadable; None when decoded
    pixels: np.ndarray | None = None  # C x S x S uint8
    width: int = 0  # as stored in the file
    height: int = 0
    mode: str = ""


def decode_file(task: tuple[str, int, int, str]) -> Decoded:
    """Read one file, hash its bytes and decode it (runs in a worker process; never raises)."""
    path, size, channels, background = task
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Decoded(None, f"cannot read ({exc.strerror or exc})")
    sha = hashlib.sha256(data).hexdigest()
    try:
        pixels, width, height, mode = decode_bytes(data, size, channels, background)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a damaged file
        return Decoded(sha, f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200])
    return Decoded(sha, None, pixels, width, height, mode)


def decode_bytes(data: bytes, size: int, channels: int, background: str) -> tuple[np.ndarray, int, int, str]:
    """(C x size x size uint8 pixels, stored width, stored height, stored mode) of an encoded image."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        width, height, mode = image.width, image.height, image.mode
        if image.format == "JPEG":
            image.draft(None, (size, size))  # let the JPEG decoder downscale by 2, 4 or 8 (never below size)
        image.load()  # a truncated or damaged file fails here
        image = ImageOps.exif_transpose(image)
        image = to_rgb_or_grey(image, channels, background)
        w, h = image.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)  # the central square
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.LANCZOS, box=box)
        pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels), width, height, mode


def to_rgb_or_grey(image, channels: int, background: str):
    """An L (channels 1) or RGB (channels 3) image; transparency composited on the background colour."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey: scale 0..65535 to 0..255
        wide = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.round(np.clip(wide, 0, 65535) / 257).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.round(np.clip(np.asarray(image), 0, 255)).astype(np.uint8))
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if transparent:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if background == "white" else (0, 0, 0, 255))
        base.alpha_composite(rgba)
        image = base
    target = "L" if channels == 1 else "RGB"
    if image.mode != target:
        image = image.convert(target)  # L <-> RGB, P, CMYK, YCbCr, 1, ...
    return image


def workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def decode_all(scan: Scan, size: int, channels: int, background: str, processes: int | None = None):
    """Yield (label, relative path, Decoded) in scan order, decoding on `processes` processes (all cores)."""
    from tqdm import tqdm

    tasks = [(str(scan.root / rel), size, channels, background) for _, rel in scan.files]
    processes = min(processes or workers(), max(len(tasks), 1))
    pool = None
    if processes > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: fresh interpreters, whatever threads this process runs; a worker that dies fails the
        # stage (BrokenProcessPool) instead of hanging it
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        results = pool.map(decode_file, tasks, chunksize=CHUNK) if pool else map(decode_file, tasks)
        with tqdm(total=len(tasks), desc="prepare: decode", unit="img", disable=None, leave=False) as bar:
            for (label, rel), decoded in zip(scan.files, results):
                bar.update()
                yield label, rel, decoded
    except Exception as exc:
        from concurrent.futures.process import BrokenProcessPool

        if isinstance(exc, BrokenProcessPool):
            raise ImagegenError(f"prepare: a decoding process of {scan.root} died ({exc}); expected it to finish "
                                "(out of memory? try again, or fewer processes)") from None
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
