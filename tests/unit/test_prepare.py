from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from imagegen.config import Config
from imagegen.data.fetch import RAW_DIR
from imagegen.data.datasets import DATASETS
from imagegen.data.prepare import MANIFEST_COLUMNS, run_prepare
from imagegen.layout import MANIFEST, PREPARED_DIR
from imagegen.data.arrays import DatasetInfo, read_info
from imagegen.errors import ImagegenError
from tests.helpers import write_idx
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


# --- folder datasets: the accepted class order, a folder changing while prepare reads it, a full disk

def image_folder(folder, classes=("one", "two", "zero"), per_class: int = 6, size: int = 28, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    return folder


def folder_config(folder, **data) -> Config:
    return Config.model_validate({"data": {"dataset": "digits", "folder": str(folder), "test_fraction": 0.5, **data}})


def labels_by_class(root) -> dict[str, set[int]]:
    manifest = pd.read_parquet(root / PREPARED_DIR / MANIFEST)
    return {src.split("/")[0]: {int(label)} for src, label in zip(manifest["source"], manifest["label"])}


def test_labels_follow_the_accepted_class_order_and_new_classes_come_last(tmp_path):
    from imagegen.data.accepted import CLASS_ORDER

    folder = image_folder(tmp_path / "images", classes=("one", "ten", "two", "zero"))
    (tmp_path / CLASS_ORDER).parent.mkdir(parents=True)
    (tmp_path / CLASS_ORDER).write_text('{"digits": {"classes": ["zero", "one", "two"], "accepted": []}}')
    run_prepare(folder_config(folder), tmp_path, processes=1)
    assert read_info(tmp_path / PREPARED_DIR, "digits").classes == ("zero", "one", "two", "ten")
    assert labels_by_class(tmp_path) == {"zero": {0}, "one": {1}, "two": {2}, "ten": {3}}


def test_a_file_added_during_prepare_fails_it_and_a_rerun_succeeds(tmp_path, monkeypatch):
    from imagegen.data import folder as folder_module

    folder = image_folder(tmp_path / "images")
    decode_all = folder_module.decode_all

    def adding_a_file(*args, **kwargs):
        for i, item in enumerate(decode_all(*args, **kwargs)):
            if i == 3:
                image_folder(folder, classes=("two",), per_class=7, seed=1)  # writes two/6.png, a new file
            yield item

    monkeypatch.setattr(folder_module, "decode_all", adding_a_file)
    with pytest.raises(ImagegenError) as failed:
        run_prepare(folder_config(folder), tmp_path, processes=1)
    assert str(failed.value) == f"prepare: {folder}: folder changed during prepare, run again"
    assert not (tmp_path / PREPARED_DIR).exists() and not list((tmp_path / "data").glob(".*.partial"))
    monkeypatch.setattr(folder_module, "decode_all", decode_all)
    result = run_prepare(folder_config(folder), tmp_path, processes=1)
    assert sum(result.counts.values()) == 19  # 6 + 7 + 6: the added file is prepared


def test_a_full_disk_fails_in_one_line_and_leaves_no_output(tmp_path, monkeypatch):
    from imagegen.data import prepare

    folder = image_folder(tmp_path / "images")

    def full(self, pixels):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare.RawImages, "append", full)
    with pytest.raises(ImagegenError, match=r"^prepare: no space left on the device of .*data/prepared "
                                            r"\(No space left on device\); nothing was written"):
        run_prepare(folder_config(folder), tmp_path, processes=1)
    assert not (tmp_path / PREPARED_DIR).exists() and not list((tmp_path / "data").glob(".*.partial"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_really_full_disk_fails_in_one_line_and_leaves_no_output(tmp_path):
    """data/ on a 512 KiB tmpfs; the folder's 64 x 64 RGB images need about 1 MiB prepared."""
    folder = image_folder(tmp_path / "images", per_class=30, size=64)
    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    (tmp_path / "project" / "params.yaml").write_text(yaml.safe_dump(
        {"data": {"dataset": "digits", "folder": str(folder), "image_size": 64, "channels": 3, "test_fraction": 0.5}}))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(data)], check=True)
    try:
        done = subprocess.run([sys.executable, "-m", "imagegen.cli", "prepare"], cwd=tmp_path / "project",
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert done.returncode == 1, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("imagegen prepare: error: prepare: no space left on the device of"), done.stderr
        assert "Traceback" not in done.stderr
        assert list(data.iterdir()) == []  # no prepared folder, no partial one
    finally:
        subprocess.run(["umount", str(data)], check=True)

