"""A built-in dataset written out as a labelled PNG folder: `imagegen export` and `imagegen drop`.

OUT/<class>/<dataset>-<split>-<index:05d>.png, one grey 28 x 28 PNG per image, each written atomically
(a killed run leaves whole files only; a re-run skips the files already there). Class names become
folder names with anything but letters, digits, space, '.', '_' and '-' replaced by '_'
("T-shirt/top" -> "T-shirt_top"). `drop` adds the next N images of the train-then-test sequence that
are not in the folder yet: a folder that grows batch by batch (a demo of retraining on new data).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagegen.config import DataConfig
from imagegen.data.datasets import DATASETS, SPLITS
from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_file

UNSAFE = re.compile(r"[^A-Za-z0-9 ._-]")


def safe_name(name: str) -> str:
    """A class name as a folder name."""
    return UNSAFE.sub("_", name).strip(" .") or "_"


@dataclass(frozen=True)
class ExportResult:
    written: int
    skipped: int  # already there


def builtin_arrays(dataset: str, data: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(images N x 28 x 28, labels) per split of a built-in dataset, fetched from data.sources (verified)."""
    from imagegen.data.fetch import expand_sources, fetch_file
    from imagegen.data.prepare import read_raw_split

    if dataset not in DATASETS:
        raise ImagegenError(f"--dataset: {dataset!r} is not a built-in dataset; expected one of {', '.join(DATASETS)}")
    spec = DATASETS[dataset]
    data = data.model_copy(update={"dataset": dataset})
    with tempfile.TemporaryDirectory(prefix="imagegen-export-") as tmp:
        for key, file_spec in spec.files.items():
            fetch_file(file_spec, expand_sources(data), Path(tmp), data, dataset, spec.file_size(key))
        return {split: read_raw_split(Path(tmp), spec, split) for split in SPLITS}


def image_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:05d}.png"


def write_png(path: Path, image: np.ndarray) -> bool:
    """Write one grey image as a PNG, atomically; False when the file is already there."""
    from PIL import Image

    if path.exists():
        return False
    try:
        with atomic_file(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
    except OSError as exc:
        raise ImagegenError(f"{path}: cannot write ({exc.strerror or exc}); expected a writable folder") from None
    return True


def export(dataset: str, out: Path, data: DataConfig, splits: tuple[str, ...] = SPLITS,
           limit: int | None = None) -> ExportResult:
    """The first `limit` images (all when None) of each split as OUT/<class>/<dataset>-<split>-<index>.png."""
    from tqdm import tqdm

    arrays = builtin_arrays(dataset, data)
    folders = [safe_name(c) for c in DATASETS[dataset].classes]
    written = skipped = 0
    for split in splits:
        images, labels = arrays[split]
        count = len(images) if limit is None else min(limit, len(images))
        for i in tqdm(range(count), desc=f"export {split}", unit="img", disable=None, leave=False):
            if write_png(out / folders[labels[i]] / image_name(dataset, split, i), images[i]):
                written += 1
            else:
                skipped += 1
    return ExportResult(written, skipped)


def drop(dataset: str, folder: Path, batch: int, data: DataConfig) -> ExportResult:
    """Add the next `batch` images of the train-then-test sequence that are not in `folder` yet."""
    arrays = builtin_arrays(dataset, data)
    folders = [safe_name(c) for c in DATASETS[dataset].classes]
    present = {p.name for p in folder.glob("*/*.png")} if folder.is_dir() else set()
    written = 0
    for split in SPLITS:
        images, labels = arrays[split]
        for i in range(len(images)):
            if written == batch:
                return ExportResult(written, len(present))
            name = image_name(dataset, split, i)
            if name not in present and write_png(folder / folders[labels[i]] / name, images[i]):
                written += 1
    return ExportResult(written, len(present))
