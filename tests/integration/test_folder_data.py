"""A labelled image folder through prepare and validate (real Great Expectations, real DVC), and the
Fashion-MNIST PNG export read back byte for byte."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imagegen.config import Config, DataConfig
from imagegen.data.folder import SCAN
from imagegen.data.prepare import MANIFEST_COLUMNS, run_prepare
from imagegen.data.arrays import DatasetInfo, load_split, read_info
from imagegen.data.validate import METRICS_FILE, REPORT_DIR, run_validate
from imagegen.errors import ImagegenError
from imagegen.layout import MANIFEST, PREPARED_DIR
from tests.conftest import set_params
from tests.helpers import make_image_folder, needs_fashion_mnist

SHAPES = {"dataset": "shapes", "image_size": 32, "channels": 3, "test_fraction": 0.3, "max_unreadable_fraction": 0.05}
SMALL_FOLDER_CHECKS = {"min_images_per_class": 10}


def shapes_config(folder: Path, data: dict | None = None, validate: dict | None = None) -> Config:
    return Config.model_validate({"data": {**SHAPES, "folder": str(folder), **(data or {})},
                                  "validate": {**SMALL_FOLDER_CHECKS, **(validate or {})}})


def test_generated_folder_prepared_and_validated(tmp_path):
    extras = make_image_folder(tmp_path / "shapes")
    cfg = shapes_config(tmp_path / "shapes")
    result = run_prepare(cfg, tmp_path, processes=2)  # decoded on two processes
    assert result.skipped == 2 and sum(result.counts.values()) == 48
    prepared = tmp_path / PREPARED_DIR
    assert read_info(prepared, "shapes") == DatasetInfo("shapes", ("circle", "square", "triangle"), 3, 32)
    for split in ("train", "test"):
        images, labels = load_split(prepared / f"{split}.npz")
        assert images.shape == (result.counts[split], 3, 32, 32) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and set(labels) == {0, 1, 2}
    manifest = pd.read_parquet(prepared / MANIFEST)
    assert tuple(manifest.columns) == MANIFEST_COLUMNS and len(manifest) == 48
    assert set(manifest["mode"]) >= {"RGB", "RGBA", "P", "CMYK"} and manifest["mode"].str.startswith("I").any()
    assert manifest["width"].between(20, 100).all() and manifest["height"].between(20, 100).all()
    assert manifest["file_sha256"].str.fullmatch("[0-9a-f]{64}").all()
    sources = set(manifest["source"])
    assert "circle/circle-000.png" in sources and "square/square-006.JPG" in sources
    assert not {"square/broken.png", "circle/.hidden.png", "triangle/notes.txt"} & sources  # left out, ignored
    scan = json.loads((prepared / SCAN).read_text())
    assert scan["files"] == 50 and scan["ignored"] == 1
    # one process or two, the same bytes: an unchanged folder gives an unchanged DVC output
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    run_prepare(cfg, tmp_path, processes=1)
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    assert [(s["path"], s["reason"]) for s in scan["skipped"]] == [("triangle/notes.txt", "format"),
                                                                   ("square/broken.png", "damaged")]
    assert extras["corrupt"].is_file()

    summary = run_validate(cfg, tmp_path).summary
    assert summary["success"] and summary["files"]["skipped"] == ["triangle/notes.txt", "square/broken.png"]
    assert summary["files"]["skipped_per_reason"] == {"damaged": 1, "format": 1}
    assert summary["files"]["images_per_class"] == {"circle": 16, "square": 16, "triangle": 16}
    assert summary["files"]["width"]["min"] >= 20 and summary["files"]["width"]["max"] <= 100
    assert summary["files"]["modes"]["CMYK"] == 6
    assert any("short_side" in w for w in summary["warnings"])  # images under 32 px are upscaled: a warning only
    docs = "".join(p.read_text() for p in (tmp_path / REPORT_DIR / "data_docs").rglob("*.html"))
    assert "CMYK" in docs and re.search(r"damaged\W+1\W+format\W+1", docs)  # skipped files counted per reason
    assert json.loads((tmp_path / METRICS_FILE).read_text())["files"]["skipped_fraction"] == round(2 / 50, 4)


def test_folder_failures_name_the_expectation(tmp_path):
    make_image_folder(tmp_path / "shapes")
    extra = tmp_path / "shapes" / "circle"
    for i in range(40):  # circles now outnumber the others
        (extra / f"copy-{i}.png").write_bytes((extra / "circle-000.png").read_bytes())
    cfg = shapes_config(tmp_path / "shapes", validate={"min_images_per_class": 17, "class_share_fail": 0.6,
                                                       "class_share_warn": 0.9})
    run_prepare(cfg, tmp_path, processes=1)
    with pytest.raises(ImagegenError) as info:
        run_validate(cfg, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert ("files: expect_column_values_to_be_between(class_images): 32 of 90 rows unexpected, e.g. [16.0, 16.0, "
            "16.0]; expected values >= 17") in message
    assert "files: expect_column_values_to_be_between(class_share): 32 of 90 rows unexpected" in message
    # identical files share a split, so the copies are exact duplicates within one split, never across
    assert "expect_column_values_to_be_in_set(repeats_earlier)" in message
    metrics = json.loads((tmp_path / METRICS_FILE).read_text())
    assert metrics["success"] is False
    assert metrics["train"]["also_in_other_split"] == 0 and metrics["test"]["also_in_other_split"] == 0


@needs_fashion_mnist
def test_exported_fashion_mnist_reads_back_byte_identical(tmp_path):
    from imagegen.data.export import builtin_arrays

    out = tmp_path / "fashion-png"
    run = subprocess.run(["imagegen", "export", "--dataset", "fashion-mnist", "--out", str(out), "--limit", "40"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "80 PNG images written" in run.stdout
    assert sorted(p.name for p in out.iterdir())[:3] == ["Ankle boot", "Bag", "Coat"]
    assert (out / "T-shirt_top").is_dir()  # "T-shirt/top", filesystem-safe

    cfg = Config.model_validate({"data": {"dataset": "fashion-png", "folder": str(out)}})  # 28 x 28 grey
    run_prepare(cfg, tmp_path, processes=2)
    idx = builtin_arrays("fashion-mnist", DataConfig())
    manifest = pd.read_parquet(tmp_path / PREPARED_DIR / MANIFEST)
    arrays = {split: load_split(tmp_path / PREPARED_DIR / f"{split}.npz")[0] for split in ("train", "test")}
    assert sum(len(a) for a in arrays.values()) == 80
    for row in manifest.itertuples():
        split, index = re.fullmatch(r".*/fashion-mnist-(train|test)-(\d{5})\.png", row.source).groups()
        np.testing.assert_array_equal(arrays[row.split][row.index][0], idx[split][0][int(index)])

    # drop: the next images of the train-then-test sequence that are not there yet
    run = subprocess.run(["imagegen", "drop", "--from", "fashion-mnist", "--batch", "3", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    added = sorted(p.name for p in out.glob("*/*.png") if p.name.startswith("fashion-mnist-train-0004"))
    assert added == ["fashion-mnist-train-00040.png", "fashion-mnist-train-00041.png", "fashion-mnist-train-00042.png"]
    assert len(list(out.glob("*/*.png"))) == 83


def dvc(root: Path, *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_growing_folder_reruns_prepare_and_keeps_splits(project, tmp_path):
    folder = tmp_path / "shapes"
    make_image_folder(folder)
    set_params(project, data={**SHAPES, "folder": str(folder)}, validate=SMALL_FOLDER_CHECKS)
    first = dvc(project, "repro", "prepare")
    assert "Running stage 'prepare'" in first
    assert "Running stage 'fetch'" not in first  # prepare reads the folder, not fetch's output
    before = pd.read_parquet(project / PREPARED_DIR / MANIFEST).set_index("source")["split"]
    assert "up to date" in dvc(project, "status", "prepare")

    make_image_folder(folder, per_class=6, seed=1, start=16)  # 18 new images
    status = dvc(project, "status", "prepare")
    assert "prepare:" in status and f"modified:           {folder}" in status
    again = dvc(project, "repro", "prepare")
    assert "Running stage 'prepare'" in again
    after = pd.read_parquet(project / PREPARED_DIR / MANIFEST).set_index("source")["split"]
    assert len(after) == len(before) + 18
    pd.testing.assert_series_equal(after[before.index], before)  # no existing image changed split
