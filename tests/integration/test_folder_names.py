"""A file name that is not valid UTF-8 in the image folder: DVC itself fails on it (exit 255, naming no file), so
`make run` (bench/timed_repro.py) and the retrain flow stop before calling DVC, with one line naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import set_params
from tests.integration.test_retrain_flow import prefect_api, task_runs  # noqa: F401 - the harness fixture

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bad_name_project(project: Path, tmp_path: Path) -> tuple[Path, str]:
    """The pipeline with data.folder holding a file named b'caf\\xe9.png'; (project, the line expected)."""
    folder = tmp_path / "images"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        Image.new("L", (8, 8), 0).save(folder / name / "0.png")
    with open(os.path.join(os.fsencode(folder / "b"), b"caf\xe9.png"), "wb") as f:
        f.write((folder / "b" / "0.png").read_bytes())
    set_params(project, data={"dataset": "mine", "folder": str(folder)})
    return project, (f"data.folder: {folder}/b/caf\\xe9.png: the name is not valid UTF-8, so DVC cannot hash the "
                     "folder; rename it (e.g. convmv -f latin1 -t utf-8 --notest) or move it out of the folder")


def test_dvc_itself_fails_on_the_name_without_naming_it(bad_name_project):
    project, _ = bad_name_project
    done = subprocess.run(["dvc", "status"], cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 255 and "caf" not in done.stdout + done.stderr


def test_make_run_stops_before_dvc_naming_the_file(bad_name_project):
    project, expected = bad_name_project
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "timed_repro.py")], cwd=project,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr == f"make run: {expected}\n" and done.stdout == ""  # dvc never ran: no output, no summary


def test_retrain_flow_fails_before_dvc_naming_the_file(prefect_api, bad_name_project):  # noqa: F811
    from pipelines.retrain import retrain

    project, expected = bad_name_project
    state = retrain(repo=str(project), return_state=True)
    assert state.is_failed() and state.message == expected
    assert task_runs(prefect_api, state.state_details.flow_run_id) == {}  # no stage ran
