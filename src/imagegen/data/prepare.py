"""prepare: the dataset's images -> data/prepared/: {train,test}.npz (uint8 N x C x H x W, int64 labels),
dataset.json (DatasetInfo) and a per-image manifest (parquet).

Built-ins (fashion-mnist, mnist): the IDX files fetch left in data/raw, their published split, N x 1 x 28 x 28.
Folder datasets: the labelled image folder data.folder (imagegen.data.folder), split by each file's sha256,
decoded on every core and streamed to disk; scan.json lists every file that was skipped, with its reason.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagegen.config import Config
from imagegen.data.accepted import numbering, read_order
from imagegen.data.datasets import DATASETS, SPLITS, DatasetSpec
from imagegen.data.fetch import RAW_DIR
from imagegen.data.idx import read_idx
from imagegen.data.arrays import DatasetInfo, write_info
from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_dir
from imagegen.layout import MANIFEST, PREPARED_DIR

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("index", "split", "label", "min", "max", "mean", "std", "hash",
                    "source", "file_sha256", "width", "height", "mode")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same arrays give the same .npz bytes


@dataclass(frozen=True)
class PrepareResult:
    prepared_dir: Path
    counts: dict[str, int]
    skipped: int = 0


def run_prepare(cfg: Config, root: Path = Path("."), processes: int | None = None) -> PrepareResult:
    if not cfg.data.builtin:
        return prepare_folder(cfg, root, processes)
    spec = DATASETS[cfg.data.dataset]
    manifests = []
    out_dir = root / PREPARED_DIR
    with atomic_dir(out_dir) as tmp:
        counts = {}
        for split in SPLITS:
            images, labels = read_raw_split(root / RAW_DIR, spec, split)
            images = images[:, None]  # N x 1 x 28 x 28
            write_npz(tmp / f"{split}.npz", images, labels)
            manifests.append(manifest_rows(images, labels, split, builtin_sources(spec, split, images)))
            counts[split] = len(images)
            log.info("prepare: %s: %d images", split, len(images))
        write_info(tmp, DatasetInfo(spec.name, spec.classes, 1, spec.height))
        import pandas as pd

        pd.concat(manifests, ignore_index=True).to_parquet(tmp / MANIFEST, index=False)
    return PrepareResult(out_dir, counts)


def builtin_sources(spec: DatasetSpec, split: str, images: np.ndarray) -> dict[str, object]:
    """The manifest's source columns for IDX images: '<IDX file>[<index>]', the sha256 of the image's
    bytes (an IDX image has no file of its own), 28 x 28, mode L."""
    name = spec.files[f"{split}-images"].name
    flat = images.reshape(len(images), -1)
    return {"source": [f"{name}[{i}]" for i in range(len(images))],
            "file_sha256": [hashlib.sha256(row.tobytes()).hexdigest() for row in flat],
            "width": spec.width, "height": spec.height, "mode": "L"}


class RawImages:
    """Images appended one by one to a file (never all in memory), later copied into an .npz."""

    def __init__(self, path: Path, shape: tuple[int, int, int]):
        self.path, self.shape, self.count = path, shape, 0
        self.file = path.open("wb")

    def append(self, pixels: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
        self.count += 1

    def write_npy(self, out) -> None:
        self.file.close()
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.count, *self.shape)}
        np.lib.format.write_array_header_1_0(out, header)
        with self.path.open("rb") as f:
            while block := f.read(1 << 24):
                out.write(block)
        self.path.unlink()


def write_npz(path: Path, images: np.ndarray | RawImages, labels: np.ndarray) -> None:
    """What np.savez writes (uncompressed images.npy and labels.npy), with fixed member times."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in (("images", images), ("labels", labels)):
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIME), "w", force_zip64=True) as out:
                if isinstance(array, RawImages):
                    array.write_npy(out)
                else:
                    np.lib.format.write_array(out, np.asanyarray(array), allow_pickle=False)


def prepare_folder(cfg: Config, root: Path, processes: int | None = None) -> PrepareResult:
    """A labelled image folder -> the prepared arrays, streamed (one decoded image in memory at a time). Labels
    follow the accepted class order (data/classes.json), new classes after it; the folder must not change while
    it is read; a full disk fails in one line, leaving no output."""
    try:
        return _prepare_folder(cfg, root, processes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ImagegenError(f"prepare: no space left on the device of {root / PREPARED_DIR} "
                                f"({exc.strerror}); nothing was written: free space and run again") from None
        raise


def _prepare_folder(cfg: Config, root: Path, processes: int | None) -> PrepareResult:
    import pandas as pd

    from imagegen.data.folder import SCAN, decode_all, in_test, scan_folder, shown

    data = cfg.data
    folder = root / data.folder
    scan = scan_folder(folder)
    before = folder_state(scan)
    classes = numbering(scan.classes, read_order(root, data.dataset))
    label_of = [classes.index(name) for name in scan.classes]  # the scan's label -> the accepted numbering
    shape = (data.channels, data.image_size, data.image_size)
    out_dir = root / PREPARED_DIR
    with atomic_dir(out_dir) as tmp:
        images = {split: RawImages(tmp / f".{split}.images", shape) for split in SPLITS}
        rows: dict[str, list[tuple]] = {split: [] for split in SPLITS}
        skipped = list(scan.skipped)
        for label, rel, decoded in decode_all(scan, data.image_size, data.channels, data.background, processes):
            if decoded.reason is not None:
                skipped.append({"path": shown(rel), "reason": decoded.reason, "detail": decoded.detail})
                continue
            split = "test" if in_test(decoded.sha256, data.test_fraction) else "train"
            pixels = decoded.pixels
            images[split].append(pixels)
            flat = pixels.reshape(-1)
            as_float = flat.astype(np.float64)
            rows[split].append((len(rows[split]), split, label_of[label], int(flat.min()), int(flat.max()),
                                as_float.mean(), as_float.std(),
                                hashlib.blake2b(flat.tobytes(), digest_size=16).hexdigest(),
                                rel, decoded.sha256, decoded.width, decoded.height, decoded.mode))
        for entry in skipped:
            log.warning("prepare: %s/%s: skipped (%s: %s)", folder, entry["path"], entry["reason"], entry["detail"])
        check_readable(folder, scan, classes, skipped, data.max_unreadable_fraction, rows)
        for split in SPLITS:
            labels = np.array([row[2] for row in rows[split]], dtype=np.int64)
            write_npz(tmp / f"{split}.npz", images[split], labels)
            log.info("prepare: %s: %d images", split, len(labels))
        write_info(tmp, DatasetInfo(data.dataset, classes, data.channels, data.image_size))
        frames = [pd.DataFrame(rows[split], columns=list(MANIFEST_COLUMNS)) for split in SPLITS]
        manifest = pd.concat(frames, ignore_index=True).astype({"index": "int64", "label": "int64", "min": "int64",
                                                                "max": "int64", "width": "int64", "height": "int64"})
        manifest.to_parquet(tmp / MANIFEST, index=False)
        (tmp / SCAN).write_text(json.dumps({"folder": str(folder), "files": len(scan.files) + len(scan.skipped),
                                            "ignored": scan.ignored, "skipped": skipped}, indent=2) + "\n")
        if folder_state(scan_folder(folder)) != before:  # else DVC would record files that were never read
            raise ImagegenError(f"prepare: {folder}: folder changed during prepare, run again")
    return PrepareResult(out_dir, {split: len(rows[split]) for split in SPLITS}, len(skipped))


def folder_state(scan) -> tuple:
    """The class folders, the skipped files and each image file's path, size and modification time: equal
    before and after the decoding unless a file was added, removed or rewritten meanwhile."""
    def stat(rel: str) -> tuple:
        try:
            info = os.stat(scan.root / rel)
        except OSError:
            return (rel, None)
        return (rel, info.st_size, info.st_mtime_ns)

    return scan.classes, [s["path"] for s in scan.skipped], [stat(rel) for _, rel in scan.files]


def check_readable(folder: Path, scan, classes: tuple[str, ...], skipped: list[dict], max_fraction: float,
                   rows: dict) -> None:
    """One-line errors: too many skipped files, a class without a readable image, an empty split."""
    total = len(scan.files) + len(scan.skipped)
    if len(skipped) > max_fraction * total:
        first = "; ".join(f"{folder}/{s['path']} ({s['reason']}: {s['detail']})" for s in skipped[:3])
        raise ImagegenError(
            f"prepare: {len(skipped)} of {total} files under {folder} were skipped ({len(skipped) / total:.1%}, "
            f"above data.max_unreadable_fraction {max_fraction}; all listed with reasons in the log): {first}"
            + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""))
    readable = {row[2] for split_rows in rows.values() for row in split_rows}
    for label, name in enumerate(classes):
        if label not in readable:
            raise ImagegenError(f"data.folder: {folder / name}: none of its images could be read; "
                                "expected at least one readable image per class")
    for split in SPLITS:
        if not rows[split]:
            raise ImagegenError(f"prepare: no image of {folder} falls in the {split} split; expected both splits "
                                "to hold images (add images or change data.test_fraction)")


def read_raw_split(raw_dir: Path, spec: DatasetSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = raw_dir / spec.files[f"{split}-images"].name
    labels_path = raw_dir / spec.files[f"{split}-labels"].name
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[1:] != (spec.height, spec.width):
        raise ImagegenError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
            f"expected {spec.height}x{spec.width} for {spec.name}"
        )
    if len(images) != len(labels):
        raise ImagegenError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}; "
            "expected one label per image"
        )
    if len(labels) and labels.max() >= len(spec.classes):
        bad = int(np.argmax(labels >= len(spec.classes)))
        raise ImagegenError(
            f"{labels_path}: label {labels[bad]} at index {bad} is out of range; "
            f"expected 0..{len(spec.classes) - 1} for {spec.name}"
        )
    return images, labels.astype(np.int64)


def manifest_rows(images: np.ndarray, labels: np.ndarray, split: str, sources: dict[str, object]):
    """The manifest's rows of one split of a built-in dataset (`sources`: the source columns)."""
    import pandas as pd

    flat = images.reshape(len(images), -1)
    as_float = flat.astype(np.float64)
    return pd.DataFrame({
        "index": np.arange(len(images), dtype=np.int64),
        "split": split,
        "label": labels,
        "min": flat.min(axis=1, initial=255).astype(np.int64),
        "max": flat.max(axis=1, initial=0).astype(np.int64),
        "mean": as_float.mean(axis=1),
        "std": as_float.std(axis=1),
        "hash": image_hashes(images),
        **sources,
    }, columns=list(MANIFEST_COLUMNS))


def image_hashes(images: np.ndarray) -> list[str]:
    """One content hash per image (the manifest's `hash` column; validate recomputes it from the arrays)."""
    flat = images.reshape(len(images), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in flat]
