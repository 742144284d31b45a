"""Data integrity: the gate of the stages that read the prepared arrays (train-*, evaluate).

`validate` records in metrics/validate.json whether the suite passed and the content hash of
each split it validated; a stage that reads the prepared data recomputes the hashes and refuses
data that failed validation, was never validated, or was validated as other data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from imagegen.data.arrays import INFO

from imagegen.errors import ImagegenError
from imagegen.fsutil import sha256_file
from imagegen.layout import PREPARED_DIR

RECORD = Path("metrics/validate.json")
HASH_KEY = "data_sha256"


def array_hash(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of a split's content (dtype, shape and bytes of images and labels), not of the .npz file."""
    digest = hashlib.sha256()
    for array in (images, labels):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def split_hash(path: Path) -> str:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return array_hash(arrays["images"], arrays["labels"])
    except FileNotFoundError:
        raise ImagegenError(f"{path}: file not found (run the prepare stage first)") from None
    except (KeyError, ValueError, OSError) as exc:
        raise ImagegenError(f"{path}: expected an .npz holding 'images' and 'labels' ({exc})") from None


def info_hash(root: Path) -> str | None:
    """sha256 of data/prepared/dataset.json (class names and shape), None when there is none (old built-ins)."""
    path = root / PREPARED_DIR / INFO
    return sha256_file(path) if path.is_file() else None


def content_hashes(root: Path, arrays: dict) -> dict:
    """What validate records under HASH_KEY: each split's content hash (arrays: split -> (images, labels)) and
    the sha256 of dataset.json, so a stage refuses class names or a shape that were not validated."""
    return {**{split: array_hash(*pair) for split, pair in arrays.items()}, INFO: info_hash(root)}


def require_validated(root: Path, stage: str, splits: tuple[str, ...] = ("train", "test")) -> None:
    """Refuse (one line) unless metrics/validate.json says the suite passed on exactly these splits' arrays."""
    path = root / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImagegenError(f"{stage}: {RECORD} not found; run the validate stage first "
                            "(expected data that passed validation)") from None
    except ValueError as exc:
        raise ImagegenError(f"{stage}: {RECORD} is not valid JSON ({exc}); re-run the validate stage") from None
    if not isinstance(record, dict) or record.get("success") is not True:
        failed = record.get("failed_expectations", "?") if isinstance(record, dict) else "?"
        raise ImagegenError(f"{stage}: {RECORD} says validation failed ({failed} failed expectation(s)); "
                            "expected data that passed validation: fix the data and re-run validate")
    recorded = record.get(HASH_KEY) if isinstance(record.get(HASH_KEY), dict) else {}
    for split in splits:
        file = root / PREPARED_DIR / f"{split}.npz"
        actual = split_hash(file)
        if recorded.get(split) != actual:
            raise ImagegenError(
                f"{stage}: {PREPARED_DIR / file.name} is not the data that passed validation (content sha256 "
                f"{actual[:12]}, {RECORD} {HASH_KEY}.{split} is {str(recorded.get(split))[:12]}); "
                "re-run the validate stage")
    if recorded.get(INFO) != info_hash(root):
        raise ImagegenError(f"{stage}: {PREPARED_DIR / INFO} is not the one that passed validation (sha256 "
                            f"{str(info_hash(root))[:12]}, {RECORD} {HASH_KEY}.{INFO} is "
                            f"{str(recorded.get(INFO))[:12]}); re-run the validate stage")
