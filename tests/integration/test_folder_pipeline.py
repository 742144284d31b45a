"""The whole pipeline under `dvc repro` on a generated labelled folder at 32 x 32 RGB, with tiny params:
every stage's outputs have the folder's shape, the corrupt and the non-image file are reported, the registered model
samples RGB images. (Needs models, training, evaluation and sampling that follow the prepared shape.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen.data.arrays import load_split, read_info
from tests.conftest import set_params
from tests.helpers import cli_env, make_image_folder
from tests.tiny import TINY_TRAINING

pytestmark = pytest.mark.slow
STAGES = ("fetch", "prepare", "validate", "train-features", "train-gan", "train-vae", "evaluate", "register")


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), cwd=root, capture_output=True, text=True, timeout=900, env=cli_env(None))
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_folder_dataset_through_every_stage(project, tmp_path):
    folder = tmp_path / "shapes"
    make_image_folder(folder, per_class=20)
    batch = {"batch_size": 8}
    set_params(project, **{**TINY_TRAINING,
                           "data": {"dataset": "shapes", "folder": str(folder), "image_size": 32, "channels": 3,
                                    "test_fraction": 0.3, "max_unreadable_fraction": 0.05},
                           "validate": {"min_images_per_class": 10},
                           "features": {**TINY_TRAINING["features"], **batch},
                           "gan": {**TINY_TRAINING["gan"], **batch},
                           "vae": {**TINY_TRAINING["vae"], **batch},
                           "eval": {**TINY_TRAINING["eval"], "kid_subset_size": 8}})
    out = run(project, "dvc", "repro").stdout
    assert [s for s in STAGES if f"Running stage '{s}'" in out] == list(STAGES)

    prepared = project / "data/prepared"
    info = read_info(prepared, "shapes")
    assert (info.classes, info.shape) == (("circle", "square", "triangle"), (3, 32, 32))
    train, _ = load_split(prepared / "train.npz")
    assert train.shape[1:] == (3, 32, 32)
    validation = json.loads((project / "metrics/validate.json").read_text())
    assert validation["success"] and validation["files"]["skipped"] == ["triangle/notes.txt", "square/broken.png"]

    for kind in ("gan", "vae"):
        grid = Image.open(project / f"reports/{kind}/samples-epoch-001.png")
        assert grid.mode == "RGB"
        run(project, "imagegen", "sample", "--from", f"models/{kind}", "-n", "4", "--out", f"{kind}.npy")
        samples = np.load(project / f"{kind}.npy")
        assert samples.shape == (4, 32, 32, 3) and samples.dtype == np.uint8
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    assert evaluation["gan"]["n_samples"] == 1000 and np.isfinite(evaluation["gan"]["fid"])
    registered = json.loads((project / "metrics/register.json").read_text())
    assert registered["gan"]["model"] == "shapes-gan" and registered["vae"]["model"] == "shapes-vae"

    run(project, "imagegen", "sample", "--model", "models:/shapes-gan@champion", "-n", "4", "--out", "champion.png")
    assert Image.open(project / "champion.png").mode == "RGB"
    run(project, "imagegen", "sample", "--model", "models:/shapes-vae@champion", "-n", "3", "--out", "champion.npy")
    assert np.load(project / "champion.npy").shape == (3, 32, 32, 3)

    # adding images re-runs the pipeline from prepare; fetch stays as it is
    make_image_folder(folder, per_class=3, seed=1, start=20)
    status = run(project, "dvc", "status").stdout
    assert f"modified:           {folder}" in status and "fetch:" not in status
