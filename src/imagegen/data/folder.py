"""A labelled image folder (ROOT/<class>/<images>) as a dataset: scan, split by content hash, decode.

The folder is untrusted input (filled by other people and tools), so nothing in it is read on trust:
- Classes are ROOT's sub-folders, their names NFC-normalised (a folder written in NFC and one in NFD
  are one class), sorted. A class's images are the .png .jpg .jpeg .webp .bmp files anywhere under
  its folder, each decoded only when Pillow finds that format in it (Image.open(formats=[...])).
- Skipped, each listed with a reason (Scan.skipped, then scan.json): other files (.gif, .svg, .tif,
  ...), files directly in ROOT, symbolic links (never followed: a link could lead anywhere on the
  host, or loop), pipes and devices, names that are not valid UTF-8 (shown escaped), and when
  decoding: empty files, content of another format than the extension says, images over the pixel
  limit (checked from the header, before decoding), damaged or truncated files. Hidden files and
  folders are ignored (counted only).
- Split: a file goes to test when its sha256, read as a fraction of 2**256, is below
  data.test_fraction. So adding images never moves an existing one, and identical files share a split.
- Decoding (Pillow): EXIF orientation applied; a large image first box-reduced by an integer factor
  (to 3 x image_size or more); 16-bit grey resized while 16-bit, then scaled to 8 bits; palette, CMYK
  and the rest converted; transparency composited on data.background; then the central
  square (side = the shorter side) resized to image_size x image_size with Lanczos (antialiased) and
  converted to the configured channels.
- Decoding runs on every core (order-preserving), streaming into per-split memory-mapped arrays, so
  the decoded set is held once (on disk) and never twice in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagegen.errors import ImagegenError

log = logging.getLogger(__name__)

FORMATS = {".bmp": "BMP", ".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP"}  # extension -> Pillow's
IMAGE_SUFFIXES = tuple(FORMATS)
MAX_SCALE = 128  # an image decodes to at most (MAX_SCALE * image_size)**2 pixels: 64 Mpx at 64 x 64
REDUCE_GAP = 3  # a large image is first box-reduced to no less than REDUCE_GAP x image_size (then Lanczos)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per pixel
SCAN = "scan.json"  # beside the arrays: what the scan found (every skipped file, with its reason)
CHUNK = 16  # files per task handed to a decoding process


@dataclass(frozen=True)
class Scan:
    root: Path
    classes: tuple[str, ...]  # NFC
    files: list[tuple[int, str]]  # (label, path relative to root, posix), sorted by label then path
    ignored: int  # hidden files and folders
    skipped: list[dict[str, str]]  # found, not read: {"path" (escaped), "reason" (a word), "detail"}


def skip(rel: str, reason: str, detail: str) -> dict[str, str]:
    return {"path": shown(rel), "reason": reason, "detail": detail}


def shown(path: str) -> str:
    """A path as messages and scan.json show it: bytes that are not UTF-8 escaped (caf\\xe9.png)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def valid_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by the OS as surrogates
        return False
    return True


def scan_folder(root: Path) -> Scan:
    """The class folders, image files and skipped files under root; one-line errors for a folder that cannot
    be a dataset."""
    if not root.exists():
        raise ImagegenError(f"data.folder: {root}: no such folder; expected ROOT/<class>/<image files>")
    if not root.is_dir():
        raise ImagegenError(f"data.folder: {root} is not a folder; expected ROOT/<class>/<image files>")
    folders: dict[str, list[str]] = {}  # class (NFC) -> its folders (NFC and NFD spellings)
    skipped: list[dict[str, str]] = []
    ignored = 0
    for entry in entries(root, "", skipped):
        if entry.name.startswith("."):
            ignored += 1
        elif problem := entry_problem(entry, entry.name):
            skipped.append(problem)
        elif entry.is_dir(follow_symlinks=False):
            folders.setdefault(unicodedata.normalize("NFC", entry.name), []).append(entry.name)
        else:
            skipped.append(skip(entry.name, "not-in-a-class", "a file directly in the folder; expected it "
                                                               "inside a class folder"))
    classes = sorted(folders)
    if len(classes) < 2:
        found = f" ({classes[0]})" if classes else ""
        raise ImagegenError(f"data.folder: {root} has {len(classes)} class folder(s){found}; "
                            "expected two or more sub-folders, one per class")
    files: list[tuple[int, str]] = []
    for label, name in enumerate(classes):
        found = []
        for folder in folders[name]:
            found_here, hidden = class_files(root, folder, skipped)
            found += found_here
            ignored += hidden
        if not found:
            raise ImagegenError(f"data.folder: {root / name} holds no image files ({' '.join(IMAGE_SUFFIXES)}); "
                                "expected at least one per class (add images or remove the folder)")
        files += [(label, rel) for rel in sorted(found)]
    if ignored:
        log.info("prepare: %d hidden file(s) or folder(s) under %s ignored", ignored, root)
    return Scan(root, tuple(classes), files, ignored, skipped)


def entries(root: Path, rel: str, skipped: list[dict[str, str]]) -> list[os.DirEntry]:
    """The entries of root/rel sorted by name; [] and a skipped entry when it cannot be listed."""
    try:
        with os.scandir(root / rel) as found:
            return sorted(found, key=lambda e: e.name)
    except OSError as exc:
        skipped.append(skip(rel, "unreadable", f"cannot list the folder ({exc.strerror or exc})"))
        return []


def entry_problem(entry: os.DirEntry, rel: str) -> dict[str, str] | None:
    """Why a folder entry is not read at all (name, link, not a file or folder), or None."""
    if not valid_name(entry.name):
        return skip(rel, "name", "the name is not valid UTF-8; rename it")
    if entry.is_symlink():
        return skip(rel, "symlink", "a symbolic link, not followed (it may lead out of the folder or loop); "
                                    "copy the file in instead")
    if not (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False)):
        return skip(rel, "not-a-file", "not a regular file (a pipe, socket or device)")
    return None


def class_files(root: Path, top: str, skipped: list[dict[str, str]]) -> tuple[list[str], int]:
    """(relative paths of the image files under root/top, hidden entries ignored); other entries go to skipped."""
    found, hidden, pending = [], 0, [top]
    while pending:
        folder = pending.pop()
        for entry in entries(root, folder, skipped):
            rel = f"{folder}/{entry.name}"
            if entry.name.startswith("."):
                hidden += 1
            elif problem := entry_problem(entry, rel):
                skipped.append(problem)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(rel)
            elif os.path.splitext(entry.name)[1].lower() in FORMATS:
                found.append(rel)
            else:
                suffix = os.path.splitext(entry.name)[1].lower() or "no extension"
                skipped.append(skip(rel, "format", f"{suffix} is not a format prepare reads; expected "
                                                   + " ".join(IMAGE_SUFFIXES)))
    return found, hidden


def folder_name_problem(project: Path) -> str | None:
    """What `dvc status` / `dvc repro` would fail on without naming it: a name that is not valid UTF-8 in the
    project's image folder (DVC hashes every file of it, hidden ones too). One line naming the file, or None
    (also for a built-in dataset, or a params.yaml that does not load: the stages report that)."""
    from imagegen.config import load_config

    try:
        data = load_config(project / "params.yaml").data
    except ImagegenError:
        return None
    if data.builtin:
        return None
    for folder, dirs, names in os.walk(project / data.folder):
        dirs.sort()
        for name in sorted(dirs + names):
            if not valid_name(name):
                return (f"data.folder: {shown(os.path.join(folder, name))}: the name is not valid UTF-8, so DVC "
                        "cannot hash the folder; rename it (e.g. convmv -f latin1 -t utf-8 --notest) or move it "
                        "out of the folder")
    return None


def in_test(sha256: str, test_fraction: float) -> bool:
    """The split of a file, from its content hash alone."""
    return int(sha256, 16) < test_fraction * 2**256


@dataclass(frozen=True)
class Decoded:
    sha256: str | None  # None when skipped
    reason: str | None  # why it was skipped (a word, as in Scan.skipped); None when decoded
    detail: str = ""
    pixels: np.ndarray | None = None  # C x S x S uint8
    width: int = 0  # as stored in the file
    height: int = 0
    mode: str = ""


class Skipped(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def decode_file(task: tuple[str, int, int, str]) -> Decoded:
    """Read one file, hash its bytes and decode it (runs in a worker process; never raises)."""
    path, size, channels, background = task
    try:
        # no link followed (one put there after the scan), no pipe waited on
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return Decoded(None, "unreadable", f"cannot open ({exc.strerror or exc})")
    with os.fdopen(fd, "rb") as f:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return Decoded(None, "not-a-file", "not a regular file (a pipe, socket or device)")
            if info.st_size == 0:
                return Decoded(None, "empty", "empty file (0 bytes)")
            sha = hashlib.file_digest(f, "sha256").hexdigest()
            f.seek(0)
        except OSError as exc:
            return Decoded(None, "unreadable", f"cannot read ({exc.strerror or exc})")
        try:
            pixels, width, height, mode = decode_image(f, os.path.splitext(path)[1].lower(), size, channels,
                                                       background)
        except Skipped as exc:
            return Decoded(None, exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a damaged file
            return Decoded(None, "damaged", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200])
    return Decoded(sha, None, "", pixels, width, height, mode)


def decode_image(f, suffix: str, size: int, channels: int, background: str) -> tuple[np.ndarray, int, int, str]:
    """(C x size x size uint8 pixels, stored width, stored height, stored mode) of an image file whose extension
    is `suffix`; raises Skipped for content of another format and for images over the pixel limit."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    expected = FORMATS[suffix]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is lower
        try:
            image = Image.open(f, formats=[expected])  # reads the header only
        except UnidentifiedImageError:
            raise Skipped("content", content_detail(f, expected, suffix)) from None
        except Image.DecompressionBombError as exc:
            raise Skipped("too-large", str(exc)) from None
    with image:
        width, height, mode = image.width, image.height, image.mode
        if expected == "JPEG":  # MPO (a camera's multi-picture JPEG) too
            image.draft(None, (size, size))  # let the JPEG decoder downscale by 2, 4 or 8 (never below size)
        limit = (MAX_SCALE * size) ** 2
        if image.width * image.height > limit:
            raise Skipped("too-large", f"{width} x {height} pixels, over the limit of {limit / 1e6:.1f} Mpx "
                                       f"for image_size {size} ({MAX_SCALE} x image_size per side); downscale it")
        image.load()  # a truncated or damaged file fails here
        ImageOps.exif_transpose(image, in_place=True)  # in place: no full-size copy when there is nothing to turn
        if image.mode in WIDE_MODES:
            image = central_square(image, size)  # resized while 16-bit: no wide copy of the full image
        image = reduced(image, size)
        image = central_square(to_rgb_or_grey(image, channels, background), size)
        pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels), width, height, mode


def content_detail(f, expected: str, suffix: str) -> str:
    """Why a file is not the format its extension says: which of the read formats it is, if any."""
    from PIL import Image, UnidentifiedImageError

    f.seek(0)
    others = sorted(set(FORMATS.values()) - {expected})
    try:
        with Image.open(f, formats=others) as image:
            return f"content is {image.format}, not {expected} as its extension {suffix} says"
    except (UnidentifiedImageError, Image.DecompressionBombError):
        return f"content is not {expected} as its extension {suffix} says (nor {', '.join(others)})"


def reduced(image, size: int):
    """A large image box-reduced by an integer factor, its shorter side still REDUCE_GAP x size or more, so that
    the conversions and the resize after it copy a small image, not the full one (palettes and colour keys:
    as they are, averaging them would be wrong)."""
    factor = min(image.size) // (REDUCE_GAP * size)
    if factor < 2 or image.mode in ("1", "P", "PA") or "transparency" in image.info:
        return image
    return image.reduce(factor)


def central_square(image, size: int):
    """The central square of the image (side = the shorter side) at size x size, Lanczos."""
    from PIL import Image

    if image.size == (size, size):
        return image
    w, h = image.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return image.resize((size, size), Image.Resampling.LANCZOS, box=box)


def to_rgb_or_grey(image, channels: int, background: str):
    """An L (channels 1) or RGB (channels 3) image; transparency composited on the background colour."""
    from PIL import Image

    if image.mode == "F":
        image = Image.fromarray(np.round(np.clip(np.asarray(image), 0, 255)).astype(np.uint8))
    elif image.mode in WIDE_MODES:  # 16-bit grey: scale 0..65535 to 0..255
        wide = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.round(np.clip(wide, 0, 65535) / 257).astype(np.uint8))
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
