"""The three-week retraining demo for real: a folder dataset that `imagegen drop` grows from Fashion-MNIST,
the `retrain` deployment on a real `prefect server`, each week's flow run executed by a
`prefect worker start --run-once`, real DVC, the real MLflow registry (the project's embedded store).

Week 1 (600 images) registers v1 as champion; week 2 (+1200) trains on the grown data and the register
stage re-scores the champion on the new test split before deciding; a run with nothing new does nothing;
week 3 (+1200 inverted images) is stopped by the drift gate: nothing trained, nothing registered.
Tiny params (tests/tiny.py), 28 x 28 grey.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imagegen import tracking
from imagegen.data.integrity import HASH_KEY, RECORD
from imagegen.layout import data_version
from tests.conftest import REPO_ROOT, set_params
from tests.helpers import cli_env, needs_fashion_mnist
from tests.integration.test_retrain_flow import (  # the same REST helpers (prefect_server: tests/integration/conftest.py)
    api, run_cli, run_worker_once, states, summary, task_runs)
from tests.tiny import TINY_TRAINING

pytestmark = [pytest.mark.slow,
              needs_fashion_mnist]

DATASET, POOL, DEPLOYMENT = "wardrobe", "demo-pool", "demo"
TRAINING = ["train-features", "train-gan", "train-vae", "evaluate", "register", "report"]
STAGES = ["fetch", "prepare", "validate", *TRAINING]
KINDS = ("gan", "vae")


def drop(project: Path, folder: Path, batch: int) -> list[Path]:
    """`imagegen drop --from fashion-mnist --batch N FOLDER`; the PNG files it added."""
    before = set(folder.glob("*/*.png"))
    done = subprocess.run(["imagegen", "drop", "--from", "fashion-mnist", "--batch", str(batch), str(folder)],
                          cwd=project, capture_output=True, text=True, timeout=300, env=cli_env(None))
    assert done.returncode == 0, done.stderr[-3000:]
    added = sorted(set(folder.glob("*/*.png")) - before)
    assert len(added) == batch, done.stdout
    return added


def run_week(url: str, env: dict, project: Path, deployment_id: str) -> dict:
    """"Run now" on the deployment, a worker runs it; the finished flow run."""
    flow_run = api(url, f"deployments/{deployment_id}/create_flow_run", {})
    code, output = run_worker_once(POOL, env, project, timeout=900)
    finished = api(url, f"flow_runs/{flow_run['id']}")
    assert finished["state"]["type"] in ("COMPLETED", "FAILED"), (code, finished["state"], output[-3000:])
    finished["worker_output"] = output
    return finished


def registry(project: Path) -> tuple[dict, dict]:
    """({model: sorted versions}, {model: champion version}) of the project's MLflow registry."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.embedded_uri(project), registry_uri=tracking.embedded_uri(project))
    versions, champions = {}, {}
    for kind in KINDS:
        name = f"{DATASET}-{kind}"
        found = client.search_model_versions(f"name = '{name}'")
        versions[name] = sorted(int(v.version) for v in found)
        champions[name] = int(client.get_model_version_by_alias(name, "champion").version) if found else None
    return versions, champions


def version_tags(project: Path, name: str, version: int) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.embedded_uri(project), registry_uri=tracking.embedded_uri(project))
    return client.get_model_version(name, str(version)).tags


def read(project: Path, path: str) -> dict:
    return json.loads((project / path).read_text())


def test_three_weeks_of_new_images_a_fair_contest_then_a_bad_batch_stopped(prefect_server, project, tmp_path):
    url, env = prefect_server
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the project's embedded store
    folder = tmp_path / "images"
    shutil.copytree(REPO_ROOT / "pipelines", project / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    set_params(project, **{**TINY_TRAINING,
                           "train": {**TINY_TRAINING["train"], "limit": None},  # train on all of it: more each week
                           "data": {"dataset": DATASET, "folder": str(folder), "image_size": 28, "channels": 1},
                           "validate": {"min_images_per_class": 20}})  # ~60 a class in week 1
    applied = run_cli([sys.executable, "-m", "pipelines.deploy", "apply", "--name", DEPLOYMENT, "--pool", POOL,
                       "--repo", str(project), "--only-if-changed"], env, project)
    assert applied.returncode == 0, applied.stderr
    deployment = api(url, f"deployments/name/retrain/{DEPLOYMENT}")
    assert deployment["parameters"]["only_if_changed"] is True

    # --- week 1: 600 images; v1 of each model becomes champion
    drop(project, folder, 600)
    week1 = run_week(url, env, project, deployment["id"])
    assert week1["state"]["type"] == "COMPLETED", (week1["state"], week1["worker_output"][-3000:])
    assert states(task_runs(url, week1["id"])) == {stage: "COMPLETED" for stage in STAGES}
    v1_data = data_version(project)
    lineage = read(project, "metrics/drift.json")["lineage"]
    assert (lineage["data_version"], lineage["images"], lineage["images_added"]) == (v1_data, 600, 600)
    first = read(project, "metrics/register.json")
    for kind in KINDS:
        assert first[kind]["version"] == 1 and first[kind]["promoted"] and first[kind]["champion_after"] == 1
    assert registry(project) == ({f"{DATASET}-{k}": [1] for k in KINDS}, {f"{DATASET}-{k}": 1 for k in KINDS})
    markdown = summary(url, week1["id"])
    assert markdown.startswith("# retrain: completed") and "(600 images, +600 since `None`)" in markdown
    assert "| train-gan | ran |" in markdown and "no accepted version before this one" in markdown
    with_test = (project / "data/prepared/test.npz").stat().st_size

    # --- week 2: 1200 more; trained on 1800, the champion re-scored on the new test split, then the decision
    drop(project, folder, 1200)
    week2 = run_week(url, env, project, deployment["id"])
    assert week2["state"]["type"] == "COMPLETED", (week2["state"], week2["worker_output"][-3000:])
    assert states(task_runs(url, week2["id"])) == {stage: "COMPLETED" for stage in STAGES}
    v2_data = data_version(project)
    assert v2_data != v1_data and (project / "data/prepared/test.npz").stat().st_size > with_test
    drift = read(project, "metrics/drift.json")
    assert drift["passed"] and drift["lineage"]["images"] == 1800 and drift["lineage"]["images_added"] == 1200
    assert drift["lineage"]["previous_data_version"] == v1_data
    test_sha = json.loads((project / RECORD).read_text())[HASH_KEY]["test"]
    second = read(project, "metrics/register.json")
    for kind in KINDS:
        d = second[kind]
        assert d["version"] == 2 and d["new_version"] and d["champion_before"] == 1, d
        assert d["champion_rescored"] is True, d
        assert math.isfinite(d["value"]) and math.isfinite(d["champion_value"]), d  # both scores recorded
        assert d["champion_value"] != d["champion_value_recorded"], d  # re-scored, not last week's number
        assert d["champion_data_version"] == v1_data and d["challenger_data_version"] == v2_data, d
        assert d["scored_on"]["data_version"] == v2_data, d  # both on this week's data version ...
        assert "both scored on test split " + d["scored_on"]["test_sha256"][:12] in d["reason"], d  # ... and split
        assert d["scored_on"]["test_sha256"] == test_sha
        assert d["champion_after"] == (2 if d["promoted"] else 1), d
        tags = version_tags(project, f"{DATASET}-{kind}", 2)
        assert float(tags["contest.champion_value"]) == pytest.approx(d["champion_value"])
        assert tags["contest.champion_data_version"] == v1_data and tags["dvc_data_md5"] == v2_data
    versions, champions = registry(project)
    assert versions == {f"{DATASET}-{k}": [1, 2] for k in KINDS}
    assert champions == {f"{DATASET}-{k}": second[k]["champion_after"] for k in KINDS}
    markdown = summary(url, week2["id"])
    assert "(1800 images, +1200 since `" in markdown and "Drift gate: passed" in markdown
    assert all(f"| {stage} | ran |" in markdown for stage in TRAINING), markdown
    assert "- gan.champion_rescored: `True`" in markdown and "- gan.champion_value: `" in markdown

    # --- nothing new: Completed in seconds, "no new data", no stage run
    idle = run_week(url, env, project, deployment["id"])
    assert idle["state"]["type"] == "COMPLETED", idle["state"]
    assert idle["state"]["message"].startswith("no new data: nothing changed"), idle["state"]
    assert task_runs(url, idle["id"]) == {}
    assert summary(url, idle["id"]).startswith("# retrain: no new data")

    # --- week 3: a bad batch (1200 new images, inverted) is stopped by the drift gate before training
    from PIL import Image, ImageOps

    for path in drop(project, folder, 1200):
        ImageOps.invert(Image.open(path).convert("L")).save(path)
    lock_before = (project / "dvc.lock").read_text()
    register_before = (project / "metrics/register.json").read_bytes()
    week3 = run_week(url, env, project, deployment["id"])
    assert week3["state"]["type"] == "FAILED", week3["state"]
    message = week3["state"]["message"]
    assert message.startswith("stage 'validate' failed: imagegen validate: error: validate: drift gate failed"), message
    assert "intensity_psi" in message and "\n" not in message
    runs = states(task_runs(url, week3["id"]))
    assert runs == {"fetch": "COMPLETED", "prepare": "COMPLETED", "validate": "FAILED"}, runs  # nothing trained
    assert registry(project) == (versions, champions)  # nothing registered, champions unchanged
    assert (project / "metrics/register.json").read_bytes() == register_before
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    old = yaml.safe_load(lock_before)["stages"]
    assert all(lock[stage] == old[stage] for stage in ["validate", *TRAINING])  # validate recorded no accepted run
    assert read(project, "metrics/drift.json")["checks"]["intensity_psi"]["status"] == "fail"
    markdown = summary(url, week3["id"])
    assert markdown.startswith("# retrain: FAILED") and "Drift gate: **FAILED**" in markdown
    assert "| validate | failed |" in markdown and "| train-gan | not run |" in markdown
