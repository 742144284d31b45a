"""A tiny stand-in for (Fashion-)MNIST: same files and formats, a few hundred random images."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from imagegen.data.datasets import DATASETS, DatasetSpec, FileSpec
from imagegen.data.arrays import DatasetInfo, write_info
from tests.helpers import write_idx

PER_CLASS = {"train": 12, "test": 4}

# Training and evaluation params small enough for a whole `dvc repro` on a CPU in minutes (merged into
# params.yaml by tests.conftest.set_params).
TINY_TRAINING = {
    "train": {"limit": 256, "mlflow": False},
    "features": {"epochs": 1, "width": 4, "feature_dim": 16},
    "gan": {"epochs": 1, "width": 4, "latent_dim": 8, "batch_size": 32},
    "vae": {"epochs": 1, "width": 4, "latent_dim": 4, "batch_size": 32},
    "eval": {"n_samples": 1000, "kid_subsets": 5, "iwae_k": 4, "iwae_images": 200},
}


def tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays keyed like DatasetSpec.files: balanced labels, distinct random images."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, per_class in PER_CLASS.items():
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        arrays[f"{split}-images"] = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels"] = labels
    return arrays


def write_mirror(folder: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> DatasetSpec:
    """Write the arrays as IDX files (gzip-compressed by default) into folder; return a spec
    whose checksums match them (content sha256 and md5 of the .gz bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = DATASETS["fashion-mnist"]
    files = {}
    for key, array in arrays.items():
        name = base.files[key].name
        write_idx(folder / name, array)
        content = (folder / name).read_bytes()
        gz_md5 = None
        if compress:
            packed = gzip.compress(content, mtime=0)
            (folder / f"{name}.gz").write_bytes(packed)
            (folder / name).unlink()
            gz_md5 = hashlib.md5(packed).hexdigest()
        files[key] = FileSpec(name, hashlib.sha256(content).hexdigest(), gz_md5)
    sizes = {split: len(arrays[f"{split}-labels"]) for split in PER_CLASS}
    return replace(base, files=files, split_sizes=sizes, urls=())


def write_prepared(root: Path, shape: tuple[int, int, int], classes: tuple[str, ...] = ("circle", "square", "star"),
                   sizes: dict[str, int] | None = None, seed: int = 0) -> DatasetInfo:
    """data/prepared as the prepare stage leaves it for a dataset of `shape` (C, H, W): random uint8
    N x C x H x W arrays with balanced labels, and dataset.json. (No manifest: readers do not need it.)"""
    sizes = sizes or {"train": 96, "test": 48}
    rng = np.random.default_rng(seed)
    folder = root / "data" / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        np.savez(folder / f"{split}.npz", images=rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                 labels=np.arange(n, dtype=np.int64) % len(classes))
    info = DatasetInfo("shapes", tuple(classes), shape[0], shape[1])
    write_info(folder, info)
    return info
