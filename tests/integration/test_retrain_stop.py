"""Stopping a retrain, for real (a `prefect server start`, `dvc repro`, the train-gan stage logging to
the embedded MLflow store): SIGTERM to the flow stops the whole stage within seconds and the run ends
Cancelled; a worker that dies mid-training leaves no run Running (so the deployment's only slot is
free) and no MLflow run RUNNING, and the next run goes through with no manual state change."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from imagegen.tracking import embedded_uri
from imagegen.training.stage import paths
from pipelines.stack import stop_worker
from tests.conftest import REPO_ROOT, set_params
from tests.helpers import stop
from tests.integration.test_retrain_flow import api
from tests.integration.test_run_faults import gan_project

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


@pytest.fixture
def train_project(project: Path) -> Path:
    """The project with only its train-gan stage (tiny random data, MLflow on), long enough to be stopped."""
    gan_project(project)
    set_params(project, train={"mlflow": True}, gan={"epochs": 400})
    pipeline = yaml.safe_load((project / "dvc.yaml").read_text())
    pipeline["stages"] = {"train-gan": pipeline["stages"]["train-gan"]}
    pipeline.pop("plots", None)
    (project / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return project


def stage_processes(root: Path) -> list[str]:
    """Command lines of the processes working on root's train-gan stage (dvc, the shell, imagegen)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "train-gan" in cmdline and Path(os.readlink(proc / "cwd")) == root:
                found.append(f"{proc.name}: {cmdline}")
        except (OSError, ValueError):
            continue
    return found


def wait_for(condition, what: str, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.2)
    return time.monotonic() - started


def mlflow_runs(root: Path) -> dict[str, str]:
    client = MlflowClient(tracking_uri=embedded_uri(root))
    return {f"{run.info.run_name} {run.info.run_id[:6]}": run.info.status
            for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])}


def flow_runs(url: str) -> list[dict]:
    return sorted(api(url, "flow_runs/filter", {}), key=lambda run: run["created"])


def client_env(env: dict) -> dict:
    env = dict(env)
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's embedded store
    return env


def test_sigterm_to_the_flow_stops_the_stage_within_seconds_and_the_run_ends_cancelled(prefect_server, train_project,
                                                                                        tmp_path):
    url, env = prefect_server
    root, env = train_project, client_env(prefect_server[1])
    command = [sys.executable, "-m", "pipelines.retrain", "--repo", str(root), "--target", "train-gan"]
    with (tmp_path / "flow.log").open("w") as log:
        flow = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(paths(root, "gan")["checkpoint"].exists, "a first checkpoint", 300)
        os.kill(flow.pid, signal.SIGTERM)  # the flow process only, as a `kill PID` or a Prefect cancel does
        seconds = wait_for(lambda: not stage_processes(root), "the stage's processes gone", 10)
        flow.wait(30)
    finally:
        stop(flow)
    output = (tmp_path / "flow.log").read_text()
    print(f"stage processes gone {seconds:.1f} s after SIGTERM to the flow")
    (run,) = flow_runs(url)
    assert run["state"]["type"] == "CANCELLED", (run["state"], output[-3000:])
    assert "stopped by SIGTERM" in run["state"]["message"]
    statuses = mlflow_runs(root)
    assert "RUNNING" not in statuses.values() and "KILLED" in statuses.values(), statuses

    set_params(root, gan={"epochs": 2})  # the next run: starts cleanly (no stale DVC lock) and finishes
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert flow_runs(url)[-1]["state"]["type"] == "COMPLETED"
    assert "RUNNING" not in mlflow_runs(root).values()


def start_worker(pool: str, env: dict, root: Path, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                                env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def apply(root: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipelines.deploy", "apply", "--name", "weekly-test", "--pool",
                           "test-pool", "--target", "train-gan"], env=env, cwd=root, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.parametrize("death", ["cancel", "worker-sigterm", "machine-crash"])
def test_a_worker_dying_mid_training_leaves_no_run_holding_the_slot(prefect_server, train_project, tmp_path, death):
    """cancel: Cancel in the UI (state Cancelling; the worker stops the run); worker-sigterm: `make stack-down`
    stops the worker (SIGTERM to its flow runs, then to it); machine-crash: the worker and the flow's processes
    are SIGKILLed, nothing reports. Then the worker starts again after `deploy apply`, as `make stack-up` does."""
    url, env = prefect_server
    root, env = train_project, client_env(prefect_server[1])
    shutil.copytree(REPO_ROOT / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    apply(root, env)
    deployment = api(url, "deployments/name/retrain/weekly-test")
    first = api(url, f"deployments/{deployment['id']}/create_flow_run", {})
    worker = start_worker("test-pool", env, root, tmp_path / "worker.log")
    try:
        wait_for(paths(root, "gan")["checkpoint"].exists, "a first checkpoint", 300)
        if death == "cancel":
            api(url, f"flow_runs/{first['id']}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
        elif death == "worker-sigterm":
            stop_worker(worker.pid)  # as `make stack-down` stops it
            worker.wait(10)
        else:
            for line in stage_processes(root):
                os.killpg(os.getpgid(int(line.split(":")[0])), signal.SIGKILL)
            for pid in [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]:
                try:  # the flow process: its command names the deployment's entry point
                    if b"prefect.engine" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                            Path(os.readlink(f"/proc/{pid}/cwd")) == root:
                        os.kill(pid, signal.SIGKILL)
                except OSError:
                    continue
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(30)
        seconds = wait_for(lambda: not stage_processes(root), "the stage's processes gone", 30)
        if death == "cancel":
            wait_for(lambda: api(url, f"flow_runs/{first['id']}")["state"]["type"] == "CANCELLED", "Cancelled", 30)
        left = api(url, f"flow_runs/{first['id']}")["state"]
        print(f"{death}: stage processes gone in {seconds:.1f} s; the first run was left {left['type']} "
              f"({left.get('message')})")

        set_params(root, gan={"epochs": 2})
        if death != "cancel":
            restarted = apply(root, env)  # what `make stack-up` / `deploy serve` run before the worker starts
            if left["type"] in ("RUNNING", "CANCELLING"):
                assert f"{first['name']} ({first['id']}) was " in restarted.stdout, restarted.stdout
            worker = start_worker("test-pool", env, root, tmp_path / "worker.log")
        second = api(url, f"deployments/{deployment['id']}/create_flow_run", {})
        wait_for(lambda: api(url, f"flow_runs/{second['id']}")["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED"),
                 "the next run finished", 400)
    finally:
        stop(worker)
    log = (tmp_path / "worker.log").read_text()
    assert api(url, f"flow_runs/{second['id']}")["state"]["type"] == "COMPLETED", log[-4000:]
    assert api(url, f"flow_runs/{first['id']}")["state"]["type"] in ("CRASHED", "CANCELLED")
    assert "RUNNING" not in mlflow_runs(root).values(), mlflow_runs(root)


def test_worker_health_counts_fresh_heartbeats_only(prefect_server, tmp_path, monkeypatch):
    """A worker the server still lists ONLINE counts only while its heartbeat is fresh, and the stack's own
    worker never while its process is down (`make stack-status` printed "worker down" and "1 online")."""
    import httpx

    import pipelines.stack as stack_module
    from pipelines.stack import Stack, online_workers, worker_name

    url, _ = prefect_server
    stack = Stack(tmp_path, REPO_ROOT, {"ports": {"prefect": int(url.split(":")[2].split("/")[0])}})
    api(url, "work_pools/", {"name": stack_module.POOL, "type": "process"})
    for name in (worker_name(stack), "imagegen-elsewhere"):  # what a polling worker sends (answer: 204, no body)
        httpx.post(f"{url}/work_pools/{stack_module.POOL}/workers/heartbeat",
                   json={"name": name, "heartbeat_interval_seconds": 30}, timeout=30).raise_for_status()
    assert online_workers(stack) == ["imagegen-elsewhere"]  # ours has no running process (no PID file)
    monkeypatch.setattr(stack_module, "WORKER_FRESH_S", 1.0)
    time.sleep(1.5)
    assert online_workers(stack) == []  # the server still says ONLINE: the heartbeat is what counts
