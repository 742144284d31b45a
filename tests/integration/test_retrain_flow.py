"""The `retrain` Prefect flow and its schedule, for real: Prefect API, `dvc repro`, Great Expectations.

No mocks. Flows run in-process against `prefect_test_harness` (one temporary server for the
module), except the schedule test, which starts its own `prefect server start` on loopback and a
`prefect worker start --run-once`. Each flow run works on a fresh copy of the project (`project`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, set_params
from tests.helpers import FASHION_MNIST

STAGES = ["fetch", "prepare", "validate"]
BIN = Path(sys.executable).parent


# --- a small client for the Prefect REST API (the same calls for the harness and the real server)

def api(url: str, path: str, body: dict | None = None):
    import httpx

    response = (httpx.get(f"{url}/{path}", timeout=30) if body is None
                else httpx.post(f"{url}/{path}", json=body, timeout=30))
    response.raise_for_status()
    return response.json()


def task_runs(url: str, flow_run_id) -> dict[str, dict]:
    runs = api(url, "task_runs/filter", {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}})
    return {run["name"]: run for run in runs}


def summary(url: str, flow_run_id) -> str:
    found = api(url, "artifacts/filter", {"artifacts": {"key": {"any_": ["retrain-summary"]},
                                                        "flow_run_id": {"any_": [str(flow_run_id)]}}})
    assert len(found) == 1, f"expected one retrain-summary artifact, found {len(found)}"
    assert found[0]["type"] == "markdown"
    return found[0]["data"]


def log_text(url: str, task_run_id, expected: str, timeout: float = 20) -> str:
    """The task run's log messages, once `expected` is among them (logs are shipped in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = api(url, "logs/filter", {"logs": {"task_run_id": {"any_": [task_run_id]}}, "limit": 200})
        text = "\n".join(entry["message"] for entry in logs)
        if expected in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def states(runs: dict[str, dict]) -> dict[str, str]:
    return {name: run["state"]["type"] for name, run in runs.items()}


# --- fixtures

@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> str:
    """A temporary Prefect server (test harness) with its own PREFECT_HOME; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_HOME", str(home))
        env.setenv("DO_NOT_TRACK", "1")
        env.delenv("PREFECT_API_URL", raising=False)
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
        from prefect.testing.utilities import prefect_test_harness

        with temporary_settings(updates={PREFECT_HOME: home}), \
                prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value().rstrip("/")


@pytest.fixture
def data_project(project: Path) -> Path:
    """The project copy with only the data stages: fast, and independent of the training stages."""
    import yaml

    path = project / "dvc.yaml"
    pipeline = yaml.safe_load(path.read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in STAGES}
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return project


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process and its process group; SIGKILL what is left after 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for kill in (process.send_signal, lambda s: os.killpg(process.pid, s)):
            try:
                kill(sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


# --- (a) the whole data pipeline, then again with nothing to do

def test_flow_runs_each_stage_then_skips_up_to_date_stages(prefect_api, data_project, tmp_path):
    from pipelines.retrain import retrain

    first = retrain(repo=str(data_project), return_state=True)
    assert first.is_completed(), first.message
    runs = task_runs(prefect_api, first.state_details.flow_run_id)
    assert states(runs) == {stage: "COMPLETED" for stage in STAGES}
    markdown = summary(prefect_api, first.state_details.flow_run_id)
    assert "| file | metric | value | previous run |" in markdown
    assert "| metrics/validate.json | train.rows | 60000 | — |" in markdown
    assert "| metrics/validate.json | failed_expectations | 0 | — |" in markdown
    assert all(f"| {stage} | ran |" in markdown for stage in STAGES), markdown
    assert "no register stage yet" in markdown
    assert "## Data" in markdown and "| T-shirt/top | 7000 | +7000 |" in markdown  # lineage: images per class
    assert "no accepted version before this one: it becomes the baseline" in markdown  # the drift gate's first profile
    assert runs["validate"]["total_run_time"] > 5  # it really ran GX over 70k images

    remote = tmp_path / "dvc-remote"
    subprocess.run(["dvc", "remote", "add", "-d", "store", str(remote)], cwd=data_project, check=True)
    second = retrain(repo=str(data_project), push=True, return_state=True)
    assert second.is_completed(), second.message
    assert second.message == "3 stages: fetch skipped, prepare skipped, validate skipped"
    runs = task_runs(prefect_api, second.state_details.flow_run_id)
    assert states(runs) == {**{stage: "COMPLETED" for stage in STAGES}, "dvc-push": "COMPLETED"}
    assert all(runs[stage]["total_run_time"] < 5 for stage in STAGES), runs  # skipped: fast
    markdown = summary(prefect_api, second.state_details.flow_run_id)
    assert all(f"| {stage} | skipped |" in markdown for stage in STAGES), markdown
    assert "| metrics/validate.json | train.rows | 60000 | 60000 |" in markdown
    assert "no metric changed" in markdown
    assert "no new data: data version `" in markdown and "(70000 images)" in markdown
    logged = log_text(prefect_api, runs["validate"]["id"], "Stage 'validate' didn't change, skipping")
    assert "Stage 'validate' didn't change, skipping" in logged
    assert any(path.is_file() for path in remote.rglob("*")), "dvc push sent nothing to the remote"

    third = retrain(repo=str(data_project), only_if_changed=True, return_state=True)
    assert third.is_completed()
    assert third.message.startswith("no new data: nothing changed, all 3 stages up to date")
    assert task_runs(prefect_api, third.state_details.flow_run_id) == {}
    assert summary(prefect_api, third.state_details.flow_run_id).startswith("# retrain: no new data")

    upstream = retrain(repo=str(data_project), target="prepare", return_state=True)
    assert upstream.message == "2 stages: fetch skipped, prepare skipped"


# --- (b) fetch fails, is retried with backoff, and succeeds once its source appears

def test_stages_get_the_flow_run_id_for_mlflow_grouping(prefect_api):
    """Stage subprocesses see IMAGEGEN_PIPELINE_RUN, the tag that groups one run's MLflow runs."""
    from prefect import flow

    from pipelines.retrain import _env

    @flow
    def probe():
        from prefect.runtime import flow_run

        return _env().get("IMAGEGEN_PIPELINE_RUN"), str(flow_run.id)

    value, run_id = probe()
    assert value == f"prefect-{run_id}"
    assert "IMAGEGEN_PIPELINE_RUN" not in _env()  # outside a flow run nothing is set


def test_fetch_is_retried_until_its_source_appears(prefect_api, data_project, tmp_path):
    from pipelines.retrain import retrain

    mirror = tmp_path / "mirror"  # does not exist when the flow starts
    set_params(data_project, data={"sources": [str(mirror)]})
    done = threading.Event()

    def restore_mirror_once_fetch_awaits_retry():
        query = {"task_runs": {"name": {"any_": ["fetch"]}, "state": {"type": {"any_": ["SCHEDULED"]}}}}
        while not done.is_set():
            if api(prefect_api, "task_runs/filter", query):  # AwaitingRetry is a SCHEDULED state
                mirror.symlink_to(FASHION_MNIST, target_is_directory=True)
                return
            time.sleep(0.2)

    healer = threading.Thread(target=restore_mirror_once_fetch_awaits_retry, daemon=True)
    healer.start()
    try:
        state = retrain(repo=str(data_project), fetch_retries=3, fetch_retry_delay_s=1, return_state=True)
    finally:
        done.set()
        healer.join(timeout=10)
    assert state.is_completed(), state.message
    runs = task_runs(prefect_api, state.state_details.flow_run_id)
    assert states(runs) == {stage: "COMPLETED" for stage in STAGES}
    assert runs["fetch"]["run_count"] >= 2, runs["fetch"]
    assert runs["prepare"]["run_count"] == 1  # only fetch has retries
    assert "no such folder" in log_text(prefect_api, runs["fetch"]["id"], "no such folder")


# --- (c) a failed expectation fails the flow, naming the expectation

def test_validation_failure_fails_the_flow_with_the_failed_expectation(prefect_api, data_project):
    from pipelines.retrain import retrain

    set_params(data_project, validate={"expected_counts": {"train": 5, "test": 5}})
    state = retrain(repo=str(data_project), fetch_retries=0, return_state=True)
    assert state.is_failed()
    flow_run = api(prefect_api, f"flow_runs/{state.state_details.flow_run_id}")
    message = flow_run["state"]["message"]
    assert flow_run["state"]["type"] == "FAILED"
    assert message.startswith("stage 'validate' failed: imagegen validate: error: ")
    assert "expect_table_row_count_to_equal" in message and "\n" not in message
    runs = task_runs(prefect_api, state.state_details.flow_run_id)
    assert states(runs) == {"fetch": "COMPLETED", "prepare": "COMPLETED", "validate": "FAILED"}
    markdown = summary(prefect_api, state.state_details.flow_run_id)
    assert "| validate | failed |" in markdown and "expect_table_row_count_to_equal" in markdown


# --- (d) the cron deployment on a real server, its scheduled runs, and a worker that runs one

def run_cli(args: list[str], env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_worker_once(pool: str, env: dict, cwd: Path, timeout: float = 240) -> tuple[int, str]:
    """`prefect worker start --run-once`: picks up the runs due now, runs them, exits."""
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"],
                              env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        output, _ = worker.communicate(timeout=timeout)
        return worker.returncode, output
    finally:
        stop(worker)  # on a timeout: the worker and the flow run it started


def test_schedule_registers_cron_runs_and_a_worker_runs_the_flow(prefect_server, data_project):
    url, env = prefect_server
    project = data_project  # the deployment's checkout: the worker runs the flow in it
    shutil.copytree(REPO_ROOT / "pipelines", project / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    deploy = [sys.executable, "-m", "pipelines.deploy"]
    names = ["--name", "weekly-test", "--pool", "test-pool"]
    applied = run_cli([*deploy, "apply", *names], env, project)
    assert applied.returncode == 0, applied.stderr

    deployment = api(url, "deployments/name/retrain/weekly-test")
    assert deployment["work_pool_name"] == "test-pool"
    assert deployment["global_concurrency_limit"]["limit"] == 1  # one run of the deployment at a time
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 1"]
    assert api(url, "work_pools/test-pool")["type"] == "process"

    scheduled = wait_for_scheduled_runs(url, deployment["id"])
    starts = [datetime.fromisoformat(run["expected_start_time"]) for run in scheduled]
    assert all((t.weekday(), t.hour, t.minute) == (0, 3, 0) for t in starts), starts  # Mondays 03:00 UTC

    before = run_cli([*deploy, "status", *names], env, project)
    assert before.returncode == 1, before.stdout + before.stderr
    assert "cron '0 3 * * 1' UTC" in before.stdout and "Scheduled" in before.stdout
    assert "no worker is polling pool 'test-pool'" in before.stdout

    flow_run = api(url, f"deployments/{deployment['id']}/create_flow_run", {})  # "run now"
    code, output = run_worker_once("test-pool", env, project)
    assert code == 0, output[-3000:]
    finished = api(url, f"flow_runs/{flow_run['id']}")
    assert finished["state"]["type"] == "COMPLETED", (finished["state"], output[-3000:])
    assert states(task_runs(url, flow_run["id"])) == {stage: "COMPLETED" for stage in STAGES}
    assert "| metrics/validate.json | train.rows | 60000 |" in summary(url, flow_run["id"])
    assert (project / "metrics" / "validate.json").exists()

    # The run-once worker has exited: only a worker that is polling now (a fresh heartbeat) counts. The exited
    # one counts until its last heartbeat is older than the freshness window (90 s): on a loaded machine the
    # flow run can end inside it, so wait for the count to settle at the polling worker alone.
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "test-pool"], env=env, cwd=project,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while ("1 online polling" not in (after := run_cli([*deploy, "status", *names], env, project)).stdout
               and time.monotonic() < deadline):
            time.sleep(2)
    finally:
        stop(worker)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "1 online polling pool 'test-pool'" in after.stdout


def wait_for_scheduled_runs(url: str, deployment_id: str, timeout: float = 60) -> list[dict]:
    """The runs the server's scheduler creates for the deployment (its loop runs every 5 s here)."""
    query = {"deployments": {"id": {"any_": [deployment_id]}},
             "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runs := api(url, "flow_runs/filter", query):
            return runs
        time.sleep(1)
    pytest.fail(f"the scheduler created no run for deployment {deployment_id} within {timeout} s")


# --- (e) two retrains at once on one checkout: one runs, the other ends Cancelled without touching it

def test_two_retrains_at_once_one_runs_the_other_is_cancelled(prefect_server, data_project):
    import json

    from pipelines.retrain import LOCK

    url, env = prefect_server
    command = [sys.executable, "-m", "pipelines.retrain", "--repo", str(data_project), "--fetch-retries", "0"]
    processes = [subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True) for _ in range(2)]
    try:
        outputs = [process.communicate(timeout=900)[0] for process in processes]
    finally:
        for process in processes:
            stop(process)
    runs = api(url, "flow_runs/filter", {})
    by_state = {run["state"]["type"]: run for run in runs}
    assert sorted(by_state) == ["CANCELLED", "COMPLETED"], (runs, outputs)
    cancelled, completed = by_state["CANCELLED"], by_state["COMPLETED"]
    assert cancelled["state"]["message"].startswith("another retrain is running in this checkout (flow run ")
    assert completed["id"] in cancelled["state"]["message"]  # it names the run holding the checkout
    assert task_runs(url, cancelled["id"]) == {}  # no stage, no dvc command
    assert states(task_runs(url, completed["id"])) == {stage: "COMPLETED" for stage in STAGES}
    assert cancelled["end_time"] < completed["end_time"]  # it did not wait for the other to finish
    assert sorted(process.returncode for process in processes) == [0, 1]
    status = subprocess.run(["dvc", "status", "--json"], cwd=data_project, capture_output=True, text=True)
    assert status.returncode == 0 and json.loads(status.stdout) == {}  # dvc.lock is what one whole run wrote
    assert (data_project / LOCK).read_text() == ""  # released: the next run can start
