"""The accepted data profile travels with the champion (issue 27): the register stage logs data/profile with
the versions it registers and tags them with its data version number; `imagegen validate` gates against the
champion's profile from the tracking store (real embedded MLflow store), not the local one, and refuses a
profile that comes back tampered with."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from imagegen import tracking
from imagegen.baseline import champion_profile
from imagegen.config import Config, load_config
from imagegen.data import drift
from imagegen.data.datasets import DATASETS
from imagegen.data.fetch import RAW_DIR
from imagegen.data.prepare import run_prepare
from imagegen.registry import run_register
from tests.helpers import cli_env, make_project
from tests.tiny import tiny_arrays, write_mirror

pytestmark = pytest.mark.slow


def accepted_profile(number: int) -> drift.Profile:
    """A profile of Fashion-MNIST as validate accepts it, numbered `number` (its statistics made up)."""
    classes = list(DATASETS["fashion-mnist"].classes)
    counts = {split: {c: 12 for c in classes} for split in ("train", "test")}
    info = {"dataset": "fashion-mnist", "shape": [1, 28, 28], "classes": classes, "data_version": "champion-md5",
            "content_sha256": "c" * 64, "images": {"train": 120, "test": 120}, "images_per_class": counts,
            "histograms": [[100] * drift.BINS], "mix": {}, "sample": 240, "data_version_number": number}
    return drift.Profile(info, np.zeros(drift.FEATURES), np.eye(drift.FEATURES), drift.embedding_net(1).state_dict(),
                         np.array([1, 2, 3], dtype=np.uint64))


def test_the_champion_carries_its_profile_and_validate_gates_against_it(tmp_path):
    root = make_project(tmp_path / "a", seed=0, fid={"gan": 30.0, "vae": 40.0})
    drift.save_profile(root / drift.PROFILE_DIR, accepted_profile(3))
    (root / "metrics" / "drift.json").write_text(json.dumps({"lineage": {"data_version_number": 3}}))  # as validate
    mlflow_uri = tracking.embedded_uri(root)
    run_register(load_config(root / "params.yaml"), root)

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    champion = client.get_model_version_by_alias("fashion-mnist-gan", "champion")
    assert champion.tags["data_version_number"] == "3"
    logged = client.list_artifacts(champion.tags["data_profile_run_id"], "data_profile")
    assert {Path(f.path).name for f in logged} == {"profile.json", "feature_mean.npy", "feature_cov.npy",
                                                    "embedding.pt", "image_hashes.npy"}

    # another clone (no local profile): its baseline is the champion's
    clone = tmp_path / "a"  # same store; the local profile removed, prepared data of its own
    shutil.rmtree(clone / drift.PROFILE_DIR)
    found = champion_profile(clone, "fashion-mnist", tmp_path / "download")
    assert found is not None and found[1] == "fashion-mnist-gan v1"
    assert json.loads((found[0] / "profile.json").read_text())["data_version_number"] == 3
    write_mirror(clone / RAW_DIR, tiny_arrays(), compress=False)
    run_prepare(Config(), clone)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    (clone / "params.yaml").write_text(yaml.safe_dump({**params, "validate": {"expected_counts": {"train": 120,
                                                                                                   "test": 40}}}))
    done = subprocess.run(["imagegen", "validate"], cwd=clone, env=cli_env(None), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "drift gate failed against data version 3 (champion-md5)" in done.stderr  # the champion's, not a baseline
    assert json.loads((clone / drift.RESULTS).read_text())["lineage"]["previous_data_version_number"] == 3

    # the profile in the store tampered with (a pickle where the embedding weights belong): refused in one line
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"0.weight": np.dtype}, evil / drift.EMBEDDING)
    client.log_artifact(champion.run_id, str(evil / drift.EMBEDDING), "data_profile")
    done = subprocess.run(["imagegen", "validate"], cwd=clone, env=cli_env(None), capture_output=True, text=True,
                          timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("imagegen validate: error: ")]
    assert done.returncode == 1 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "damaged drift profile (UnpicklingError" in errors[0]
