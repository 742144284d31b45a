"""prepare: IDX files -> data/prepared/{train,test}.npz and a per-image manifest (parquet)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagegen.config import Config
from imagegen.data.datasets import DATASETS, SPLITS, DatasetSpec
from imagegen.data.fetch import RAW_DIR
from imagegen.data.idx import read_idx
from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_dir

log = logging.getLogger(__name__)

PREPARED_DIR = Path("data/prepared")
MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = ("index", "split", "label", "min", "max", "mean", "std", "hash")


@dataclass(frozen=True)
class PrepareResult:
    prepared_dir: Path
    counts: dict[str, int]


def run_prepare(cfg: Config, root: Path = Path(".")) -> PrepareResult:
    spec = DATASETS[cfg.data.dataset]
    manifests = []
    out_dir = root / PREPARED_DIR
    with atomic_dir(out_dir) as tmp:
        counts = {}
        for split in SPLITS:
            images, labels = load_split(root / RAW_DIR, spec, split)
            with (tmp / f"{split}.npz").open("wb") as f:
                np.savez(f, images=images, labels=labels)
            manifests.append(manifest_rows(images, labels, split))
            counts[split] = len(images)
            log.info("prepare: %s: %d images", split, len(images))
        import pandas as pd

        pd.concat(manifests, ignore_index=True).to_parquet(tmp / MANIFEST, index=False)
    return PrepareResult(out_dir, counts)


def load_split(raw_dir: Path, spec: DatasetSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
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


def manifest_rows(images: np.ndarray, labels: np.ndarray, split: str):
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
    }, columns=list(MANIFEST_COLUMNS))


def image_hashes(images: np.ndarray) -> list[str]:
    """One content hash per image (the manifest's `hash` column; validate recomputes it from the arrays)."""
    flat = images.reshape(len(images), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in flat]
