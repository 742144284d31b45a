"""Shared fixtures: an isolated environment and a throwaway copy of the DVC project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# What a copy of the project needs for `dvc repro`: the pipeline definition and the code its stages hash.
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", "data/classes.json", "src",
                 "plots/template.html")


@pytest.fixture(autouse=True, scope="session")
def quiet_offline_env():
    """No telemetry, no update checks; console scripts of this venv (imagegen, dvc) on PATH."""
    os.environ.update(
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )


def copy_project(root: Path, extra: tuple[str, ...] = ()) -> Path:
    """`root` (created) holding copies of this project's pipeline files and code (PROJECT_FILES + `extra`)."""
    root.mkdir(parents=True)
    for name in (*PROJECT_FILES, *extra):
        src, dst = REPO_ROOT / name, root / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh git + DVC repository holding a copy of this project's pipeline and code."""
    root = copy_project(tmp_path / "project")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["dvc", "config", "--local", "core.site_cache_dir", str(tmp_path / "dvc-site")],
                   cwd=root, check=True)
    return root


def set_params(root: Path, **sections: dict) -> None:
    """Merge the given sections into root/params.yaml, e.g. set_params(root, validate={...})."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text()) or {}
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(autouse=True)
def restore_mlflow_tracking_uri():
    """mlflow.set_tracking_uri() also sets MLFLOW_TRACKING_URI: keep it from leaking between tests."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
