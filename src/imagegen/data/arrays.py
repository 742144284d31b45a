"""What the prepare stage leaves in data/prepared/, and how every later stage reads it.

- `{train,test}.npz`: `images` uint8 N x C x H x W (C = 1 grey or 3 RGB; H = W = 28, 32 or 64),
  `labels` int64 class indices.
- `dataset.json`: the dataset's name, class names, channels and image size (DatasetInfo).
- `manifest.parquet`: one row per image (split, label, statistics, content hash, source).

Data prepared before dataset.json existed holds N x H x W grey arrays of a built-in dataset:
both readers below accept it, so an old data/prepared keeps working until prepare runs again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imagegen.errors import ImagegenError


INFO = "dataset.json"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    channels: int = 1
    image_size: int = 28

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def write_info(folder: Path, info: DatasetInfo) -> None:
    """Write dataset.json into `folder` (the caller's atomic_dir makes it atomic)."""
    (folder / INFO).write_text(json.dumps(asdict(info), indent=2) + "\n")


def read_info(prepared_dir: Path, dataset: str) -> DatasetInfo:
    """The prepared dataset's description; for data prepared before dataset.json, the built-in `dataset`'s."""
    path = prepared_dir / INFO
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        from imagegen.data.datasets import DATASETS

        if dataset not in DATASETS:
            raise ImagegenError(f"{path}: not found (run the prepare stage first)") from None
        spec = DATASETS[dataset]
        return DatasetInfo(spec.name, spec.classes, 1, spec.height)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ImagegenError(f"{path}: not valid JSON; expected the dataset description prepare wrote") from None
    try:
        return DatasetInfo(raw["name"], tuple(raw["classes"]), int(raw["channels"]), int(raw["image_size"]))
    except (KeyError, TypeError, ValueError):
        raise ImagegenError(f"{path}: expected name, classes, channels and image_size") from None


def as_nchw(images: np.ndarray) -> np.ndarray:
    """N x H x W grey images (the old layout) as N x 1 x H x W; N x C x H x W unchanged (no copy)."""
    return images[:, None] if images.ndim == 3 else images


def load_split(path: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x C x H x W, labels) of one prepared split, the first `limit` only when given."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            images, labels = arrays["images"], arrays["labels"]
    except FileNotFoundError:
        raise ImagegenError(f"{path}: file not found (run the prepare stage first)") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ImagegenError(f"{path}: images are {images.dtype} {images.shape}, expected uint8 N x C x H x W")
    images = as_nchw(images)
    return (images[:limit], labels[:limit]) if limit else (images, labels)
