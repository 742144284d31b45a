"""The validate stage with the real Great Expectations suite, on the tiny dataset and damaged copies."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from imagegen.config import Config, ValidateConfig
from imagegen.data.fetch import RAW_DIR
from imagegen.data.prepare import run_prepare
from imagegen.layout import MANIFEST, PREPARED_DIR
from imagegen.fsutil import sha256_file
from imagegen.data.validate import METRICS_FILE, REPORT_DIR, run_validate
from imagegen.data.integrity import split_hash
from imagegen.errors import ImagegenError
from tests.tiny import tiny_arrays, write_mirror

TINY_COUNTS = {"train": 120, "test": 40}


def prepared(root, arrays=None):
    write_mirror(root / RAW_DIR, arrays or tiny_arrays(), compress=False)
    run_prepare(Config(), root)
    return root


def config(**validate) -> Config:
    return Config(validate=ValidateConfig(**{"expected_counts": TINY_COUNTS, **validate}))


def failure(root, cfg=None) -> str:
    with pytest.raises(ImagegenError) as info:
        run_validate(cfg or config(), root)
    message = str(info.value)
    assert "\n" not in message
    assert (root / REPORT_DIR / "data_docs" / "index.html").is_file()  # the report is there to read
    assert json.loads((root / METRICS_FILE).read_text())["success"] is False
    return message


def edit_manifest(root, edit):
    path = root / PREPARED_DIR / MANIFEST
    manifest = pd.read_parquet(path)
    edit(manifest).to_parquet(path, index=False)


def test_clean_data_passes_and_writes_reports(tmp_path):
    root = prepared(tmp_path)
    result = run_validate(config(), root)
    metrics = json.loads((root / METRICS_FILE).read_text())
    assert result.summary == metrics
    assert metrics["success"] is True and metrics["failed_expectations"] == 0
    assert metrics["evaluated_expectations"] > 30
    assert metrics["train"]["rows"] == 120 and metrics["test"]["rows"] == 40
    assert metrics["train"]["duplicates_within_split"] == 0 and metrics["train"]["differ_from_manifest"] == 0
    assert metrics["data_sha256"] == {"train": split_hash(root / PREPARED_DIR / "train.npz"),
                                      "test": split_hash(root / PREPARED_DIR / "test.npz"),
                                      "dataset.json": sha256_file(root / PREPARED_DIR / "dataset.json")}
    assert metrics["test"]["near_duplicates_in_other_split"] == 0
    results = json.loads((root / REPORT_DIR / "results.json").read_text())
    assert results["train"]["success"] and results["test"]["success"]
    html = (root / REPORT_DIR / "data_docs" / "index.html").read_text()
    assert "manifest" in html
    assert [p.name for p in root.joinpath("reports").iterdir()] == ["validation"]  # no temp folders left


def test_row_count_uses_dataset_sizes_by_default(tmp_path):
    message = failure(prepared(tmp_path), Config())
    assert "train: expect_table_row_count_to_equal: observed 120, expected 60000;" in message
    assert message.endswith("test: expect_table_row_count_to_equal: observed 40, expected 10000")


def test_nan_in_manifest(tmp_path):
    root = prepared(tmp_path)
    edit_manifest(root, lambda m: m.assign(mean=m["mean"].where(m.index != 3, np.nan)))
    message = failure(root)
    assert message.endswith("train: expect_column_values_to_not_be_null(mean): 1 of 120 rows unexpected, "
                            "e.g. [None]; expected no null values")
    assert "test:" not in message


def test_label_out_of_range_in_manifest(tmp_path):
    root = prepared(tmp_path)
    edit_manifest(root, lambda m: m.assign(label=m["label"].where(m.index != 130, 11)))
    message = failure(root)
    assert ("test: expect_column_values_to_be_in_set(label): 1 of 40 rows unexpected, e.g. [11]; "
            "expected values in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];") in message
    assert "test: expect_column_pair_values_to_be_equal(label,array_label): 1 of 40 rows unexpected" in message
    assert "expected label == array_label" in message


def test_class_imbalance(tmp_path):
    arrays = tiny_arrays()
    arrays["train-labels"] = np.where(np.arange(120) < 20, 0, arrays["train-labels"]).astype(np.uint8)
    message = failure(prepared(tmp_path, arrays))
    assert message.startswith("validate: 1 expectation(s) failed (see reports/validation/data_docs/index.html): "
                              "train: expect_column_values_to_be_between(class_share_ratio): ")
    assert message.endswith("; expected values between 0.9 and 1.1")
    assert "test:" not in message
    # a looser tolerance accepts it
    run_validate(config(class_balance_tolerance=1.0), tmp_path)


def test_duplicates_within_split_above_threshold(tmp_path):
    arrays = tiny_arrays()
    arrays["train-images"][[10, 20, 30, 40, 50]] = arrays["train-images"][0]
    root = prepared(tmp_path, arrays)
    message = failure(root)
    assert message.endswith("train: expect_column_values_to_be_in_set(repeats_earlier): 5 of 120 rows unexpected, "
                            "e.g. [True, True, True]; expected values in [False] in at least 99.0% of rows")
    assert json.loads((root / METRICS_FILE).read_text())["train"]["duplicates_within_split"] == 5
    run_validate(config(max_duplicate_fraction=0.05), root)


def test_arrays_changed_after_prepare_fail_validation(tmp_path):
    """Validate checks the arrays training reads, not only the manifest prepare wrote: one image
    copied over a quarter of train.npz (the manifest still describes the old images) fails."""
    root = prepared(tmp_path)
    path = root / PREPARED_DIR / "train.npz"
    with np.load(path) as arrays:
        images, labels = arrays["images"].copy(), arrays["labels"]
    images[1:31] = images[0]
    np.savez(path, images=images, labels=labels)
    message = failure(root)
    assert "train: expect_column_pair_values_to_be_equal(hash,array_hash): 30 of 120 rows unexpected" in message
    assert "train: expect_column_values_to_be_in_set(repeats_earlier): 30 of 120 rows unexpected" in message
    assert "test:" not in message
    metrics = json.loads((root / METRICS_FILE).read_text())
    assert metrics["train"]["differ_from_manifest"] == 30 and metrics["test"]["differ_from_manifest"] == 0
    assert metrics["train"]["duplicates_within_split"] == 30
    assert metrics["data_sha256"]["train"] == split_hash(path)  # what failed is recorded: training refuses it


def test_near_duplicates_across_splits(tmp_path):
    arrays = tiny_arrays()
    noise = np.random.default_rng(1).integers(-2, 3, size=(2, 28, 28))
    near = (arrays["train-images"][[5, 6]].astype(int) + noise).clip(0, 255)
    assert (near != arrays["train-images"][[5, 6]]).any(axis=(1, 2)).all()  # close, not equal
    arrays["test-images"][[0, 1]] = near
    arrays["test-images"][2] = arrays["train-images"][7]  # exact copy
    root = prepared(tmp_path, arrays)
    message = failure(root)
    assert ("test: expect_column_values_to_be_between(nearest_other_split_rms): 3 of 40 rows unexpected"
            in message)
    assert "expected values >= 5.0 in at least 99.0% of rows" in message
    metrics = json.loads((root / METRICS_FILE).read_text())
    assert metrics["test"]["near_duplicates_in_other_split"] == 3
    assert metrics["test"]["also_in_other_split"] == 1
    assert metrics["train"]["near_duplicates_in_other_split"] == 3


def test_manifest_out_of_step_with_arrays(tmp_path):
    root = prepared(tmp_path)
    edit_manifest(root, lambda m: m.drop(index=[0]))
    with pytest.raises(ImagegenError, match="119 train rows, but train.npz holds 120 labels"):
        run_validate(config(), root)


def test_missing_column_and_missing_file(tmp_path):
    root = prepared(tmp_path)
    edit_manifest(root, lambda m: m.drop(columns=["std"]))
    with pytest.raises(ImagegenError, match="missing column\\(s\\) std"):
        run_validate(config(), root)
    (root / PREPARED_DIR / MANIFEST).write_bytes(b"not parquet")
    with pytest.raises(ImagegenError, match="not a readable parquet file"):
        run_validate(config(), root)
    (root / PREPARED_DIR / MANIFEST).unlink()
    with pytest.raises(ImagegenError, match="run the prepare stage first"):
        run_validate(config(), root)


def test_dataset_json_changed_after_validation_is_refused_by_the_stages_that_read_it(tmp_path):
    """dataset.json (class names, shape) is covered by the validated hash like the arrays."""
    from imagegen.data.integrity import require_validated

    root = prepared(tmp_path)
    run_validate(config(), root)
    require_validated(root, "train-gan")  # as validated: accepted
    info = root / PREPARED_DIR / "dataset.json"
    raw = json.loads(info.read_text())
    info.write_text(json.dumps({**raw, "classes": raw["classes"][::-1]}))  # classes swapped: labels mean other things
    with pytest.raises(ImagegenError) as refused:
        require_validated(root, "train-gan")
    assert str(refused.value).startswith("train-gan: data/prepared/dataset.json is not the one that passed validation")


def test_more_classes_than_the_vae_prior_components_are_refused_at_validate(tmp_path):
    root = prepared(tmp_path)
    cfg = Config.model_validate({"validate": {"expected_counts": TINY_COUNTS}, "vae": {"prior_components": 8}})
    with pytest.raises(ImagegenError, match=r"^validate: data/prepared/dataset.json lists 10 classes; expected at "
                                            r"most vae.prior_components \(8\) with vae.prior class_mixture"):
        run_validate(cfg, root)
    run_validate(Config.model_validate({"validate": {"expected_counts": TINY_COUNTS},
                                        "vae": {"prior_components": 8, "prior": "mixture"}}), root)
