"""`dvc repro` of the real data stages in a throwaway copy of the project, on the real dataset."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import set_params
from tests.tiny import TINY_TRAINING
from tests.helpers import needs_fashion_mnist

pytestmark = needs_fashion_mnist
STAGES = ("fetch", "prepare", "validate", "train-features", "train-gan", "train-vae", "evaluate", "register")


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_repro_runs_once_then_only_what_changed(project):
    set_params(project, **TINY_TRAINING)
    first = dvc(project, "repro")
    assert ran(first.stdout) == list(STAGES)
    assert sorted(p.name for p in (project / "data/raw").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    assert (project / "data/prepared/manifest.parquet").is_file()
    assert (project / "reports/validation/data_docs/index.html").is_file()
    metrics = json.loads((project / "metrics/validate.json").read_text())
    assert metrics["success"] and metrics["train"]["rows"] == 60000 and metrics["test"]["rows"] == 10000
    for kind in ("gan", "vae"):
        assert (project / f"models/{kind}/weights.pt").is_file()
        assert (project / f"reports/{kind}/samples-epoch-001.png").is_file()
        assert json.loads((project / f"metrics/train-{kind}.json").read_text())["steps"] == 8
    assert "best_epoch" in json.loads((project / "metrics/train-gan.json").read_text())
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    assert evaluation["gan"]["n_samples"] == 1000 and "nll_iwae" in evaluation["vae"]
    assert (project / "reports/evaluate/vae-reconstructions.png").is_file()
    registered = json.loads((project / "metrics/register.json").read_text())
    assert registered["gan"]["model"] == "fashion-mnist-gan" and registered["gan"]["champion_after"] == 1

    second = dvc(project, "repro")
    assert ran(second.stdout) == []
    assert "didn't change, skipping" in second.stdout
    assert "up to date" in dvc(project, "status").stdout

    # A variant through `dvc exp run -S`: only validate depends on validate.* params.
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=project, check=True, env={**os.environ, **env})
    variant = dvc(project, "exp", "run", "-S", "validate.class_balance_tolerance=0.05")
    assert ran(variant.stdout) == ["validate"]  # its metrics did not change, so training is not re-run
    variant = dvc(project, "exp", "run", "-S", "gan.lr_g=0.0001")
    assert ran(variant.stdout) == ["train-gan", "evaluate", "register"]

    shown = dvc(project, "metrics", "show").stdout
    for name in ("metrics/validate.json", "metrics/features.json", "metrics/train-gan.json",
                 "metrics/train-vae.json", "metrics/evaluate.json", "metrics/register.json"):
        assert name in shown
    plots = json.loads(dvc(project, "plots", "show", "--json").stdout)
    assert "plots/train-gan.csv" in json.dumps(plots)


def test_failed_validation_stops_repro(project):
    set_params(project, validate={"expected_counts": {"train": 5, "test": 5}})
    result = dvc(project, "repro", check=False)
    assert result.returncode != 0
    assert "expect_table_row_count_to_equal: observed 60000" in result.stderr
    assert "Traceback" not in result.stderr
    assert "validate" not in (project / "dvc.lock").read_text()  # fetch and prepare are recorded, validate is not
