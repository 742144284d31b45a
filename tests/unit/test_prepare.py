from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from imagegen.config import Config
from imagegen.data.fetch import RAW_DIR
from imagegen.data.idx import write_idx
from imagegen.data.datasets import DATASETS
from imagegen.data.prepare import MANIFEST, MANIFEST_COLUMNS, PREPARED_DIR, run_prepare
from imagegen.data.prepared import DatasetInfo, read_info
from imagegen.errors import ImagegenError
from tests.tiny import tiny_arrays, write_mirror


@pytest.fixture
def raw(tmp_path):
    """tmp_path laid out as a project whose data/raw holds the tiny dataset."""
    arrays = tiny_arrays()
    write_mirror(tmp_path / RAW_DIR, arrays, compress=False)
    return arrays


def test_arrays_and_manifest(tmp_path, raw):
    result = run_prepare(Config(), tmp_path)
    assert result.counts == {"train": 120, "test": 40}
    out = tmp_path / PREPARED_DIR
    for split in ("train", "test"):
        with np.load(out / f"{split}.npz", allow_pickle=False) as arrays:
            assert arrays["images"].dtype == np.uint8 and arrays["images"].shape == (len(raw[f"{split}-labels"]), 1, 28, 28)
            assert arrays["labels"].dtype == np.int64
            np.testing.assert_array_equal(arrays["images"][:, 0], raw[f"{split}-images"])
            np.testing.assert_array_equal(arrays["labels"], raw[f"{split}-labels"])

    manifest = pd.read_parquet(out / MANIFEST)
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 160
    row = manifest[(manifest["split"] == "test") & (manifest["index"] == 7)].iloc[0]
    image = raw["test-images"][7]
    assert row["label"] == raw["test-labels"][7]
    assert (row["min"], row["max"]) == (image.min(), image.max())
    assert row["mean"] == pytest.approx(image.mean()) and row["std"] == pytest.approx(image.std())
    assert row["hash"] == hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()
    assert manifest["hash"].is_unique
    assert (row["source"], row["width"], row["height"], row["mode"]) == ("t10k-images-idx3-ubyte[7]", 28, 28, "L")
    assert row["file_sha256"] == hashlib.sha256(image.tobytes()).hexdigest()
    assert read_info(out, "mnist") == DatasetInfo("fashion-mnist", DATASETS["fashion-mnist"].classes, 1, 28)

    # the same input gives the same bytes (fixed .npz member times), so DVC sees an unchanged output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run_prepare(Config(), tmp_path)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def bad_input(tmp_path, key, array):
    write_idx(tmp_path / RAW_DIR / {"train-labels": "train-labels-idx1-ubyte",
                                    "test-images": "t10k-images-idx3-ubyte"}[key], array)


@pytest.mark.parametrize(
    "key, make, expected",
    [
        ("train-labels", lambda a: a["train-labels"][:-1], "119 labels for 120 images"),
        ("train-labels", lambda a: np.where(a["train-labels"] == 3, 10, a["train-labels"]),
         "label 10 at index 36 is out of range; expected 0..9"),
        ("test-images", lambda a: a["test-images"][:, :27, :], "images are 27x28, expected 28x28"),
    ],
)
def test_bad_input_leaves_no_output(tmp_path, raw, key, make, expected):
    bad_input(tmp_path, key, make(raw))
    with pytest.raises(ImagegenError, match=expected) as info:
        run_prepare(Config(), tmp_path)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]


def test_malformed_header_and_missing_file(tmp_path, raw):
    path = tmp_path / RAW_DIR / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + path.read_bytes()[4:])
    with pytest.raises(ImagegenError, match="t10k-labels-idx1-ubyte: malformed IDX header"):
        run_prepare(Config(), tmp_path)
    path.unlink()
    with pytest.raises(ImagegenError, match="file not found \\(run the fetch stage first\\)"):
        run_prepare(Config(), tmp_path)
    assert not (tmp_path / PREPARED_DIR).exists()
