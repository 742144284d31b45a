"""Weeks 4 and 5 of the retraining demo (tests/integration/test_retrain_demo.py, whose helpers this reuses),
run with plain `dvc repro` to keep the time down: a folder that `imagegen drop` grows from Fashion-MNIST,
real DVC, real GX, the real MLflow registry (the project's embedded store).

Week 1: FOLDER_IMAGES images; the whole pipeline registers v1 of each model as champion, with the accepted data
profile (data version 1). Week 4: 300 inverted images: the folder view dilutes them (its PSI passes), the batch
view fails the gate; nothing trained or registered. Week 5: a new class folder as well: the gate fails on the
class list; `imagegen accept-classes` accepts it, and the shared classes' batch check still fails.
The issue asks for a folder of 40,000; on this 2-core machine 10,000 keeps each prepare under a minute, and
bench/drift_batch.py shows the folder view diluting the batch the same way from 5,000 images on.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from imagegen import tracking
from tests.conftest import set_params
from tests.helpers import cli_env, needs_fashion_mnist
from tests.integration.test_retrain_demo import DATASET, KINDS, TRAINING, drop, read, registry
from tests.tiny import TINY_TRAINING

pytestmark = [pytest.mark.slow, needs_fashion_mnist]

FOLDER_IMAGES = 10_000
BAD_BATCH = 300


def repro(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True, timeout=1800,
                          env=cli_env(None))


def invert(paths: list[Path]) -> None:
    from PIL import Image, ImageOps

    for path in paths:
        ImageOps.invert(Image.open(path).convert("L")).save(path)


def validate_error(done: subprocess.CompletedProcess) -> str:
    """The validate stage's one-line error in `dvc repro`'s output."""
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.startswith("imagegen validate: error: ")]
    assert done.returncode != 0 and len(lines) == 1, output[-3000:]
    return lines[0]


def test_weeks_4_and_5_a_bad_batch_and_a_new_class_are_stopped(project, tmp_path):
    folder = tmp_path / "images"
    set_params(project, **{**TINY_TRAINING,
                           "data": {"dataset": DATASET, "folder": str(folder), "image_size": 28, "channels": 1},
                           "validate": {"min_images_per_class": 20}})

    # --- week 1: the baseline, trained and registered with its data profile
    drop(project, folder, FOLDER_IMAGES)
    done = repro(project)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    versions, champions = registry(project)
    assert champions == {f"{DATASET}-{k}": 1 for k in KINDS}
    from mlflow import MlflowClient

    uri = tracking.embedded_uri(project)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_model_version(f"{DATASET}-gan", "1").tags["data_version_number"] == "1"
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]

    def nothing_trained_or_registered() -> None:
        assert registry(project) == (versions, champions)
        now = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
        assert all(now[stage] == lock[stage] for stage in ["validate", *TRAINING])

    # --- week 4: 300 inverted images in a large folder: the batch view fails, the folder view does not
    invert(drop(project, folder, BAD_BATCH))
    error = validate_error(repro(project))
    assert error.startswith("imagegen validate: error: validate: drift gate failed against data version 1 (")
    assert "batch_intensity_psi" in error and "batch_feature_frechet" in error
    checks = read(project, "metrics/drift.json")["checks"]
    assert checks["intensity_psi"]["status"] in ("ok", "warn") and checks["intensity_psi"]["value"] < 0.25, checks
    assert checks["batch_intensity_psi"]["status"] == "fail" and checks["batch_feature_frechet"]["status"] == "fail"
    assert read(project, "metrics/drift.json")["lineage"]["batch_images"] == BAD_BATCH
    nothing_trained_or_registered()

    # --- week 5: a new class folder as well: fails on the class list until accepted, then on the batch
    new_class = folder / "new-arrivals"  # sorts among the others: by name it would renumber later classes
    new_class.mkdir()
    for path in drop(project, folder, 150):
        path.rename(new_class / path.name)
    error = validate_error(repro(project))
    assert ("class list changed since data version 1: added [new-arrivals], removed []; not accepted: run "
            "`imagegen accept-classes` to append them") in error
    nothing_trained_or_registered()

    accepted = subprocess.run(["imagegen", "accept-classes", "--by", "week5-test"], cwd=project, capture_output=True,
                              text=True, timeout=600, env=cli_env(None))
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "class(es) new-arrivals accepted by week5-test" in accepted.stdout
    error = validate_error(repro(project))
    assert "class list" not in error and "batch_intensity_psi" in error  # the shared classes are still checked
    drift = read(project, "metrics/drift.json")
    assert drift["class_list"]["accepted"] is True and drift["class_list"]["added"] == ["new-arrivals"]
    classes = json.loads((project / "data/prepared/dataset.json").read_text())["classes"]
    assert classes[-1] == "new-arrivals" and classes[:-1] == json.loads(
        (project / "data/profile/profile.json").read_text())["classes"]  # every accepted class keeps its index
    nothing_trained_or_registered()
