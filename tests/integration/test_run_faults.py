"""Faults around training runs, through real subprocesses: kill -9 under `dvc repro` and during a
checkpoint write, MLflow runs of killed and failed runs (real SQLite store), a tracking server
that is down, and stages refusing data that did not pass validation."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from imagegen.config import Config
from imagegen.errors import ImagegenError
from imagegen.training import stage
from imagegen.training.stage import paths, run_train
from tests.conftest import set_params
from tests.helpers import cli_env, free_port, make_project, mark_validated
from tests.integration.test_training import make_root

TIMING = {"metrics": ("images_per_s", "train_minutes", "resumed_from_step"), "plot": ("images_per_s", "seconds")}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imagegen.cli", *args]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL the process group of proc (started with start_new_session) as soon as ready() holds."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def checkpoint_epoch(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except Exception:  # not there yet, or being replaced
        return -1


def without(mapping: dict, keys) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


# ---- item 4: kill -9 under dvc repro, resume, same outputs ---------------------------------------

def gan_project(root: Path) -> Path:
    """The project's own dvc.yaml and code, with tiny params, random validated data and a tiny feature net."""
    from imagegen.evaluation.features import FEATURES_DIR
    from tests.helpers import make_model

    set_params(root, train={"mlflow": False, "threads": 1, "seed": 3, "checkpoint_every": 5},
               gan={"epochs": 5, "batch_size": 16, "latent_dim": 8, "width": 4})
    folder = root / "data" / "prepared"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with (folder / "train.npz").open("wb") as f:
        np.savez(f, images=rng.integers(0, 256, (1024, 28, 28), dtype=np.uint8), labels=np.arange(1024) % 10)
    mark_validated(root)
    make_model(root / FEATURES_DIR, "features", seed=0)
    return root


def repro(root: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(["dvc", "repro", "-s", "train-gan"], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def outputs(root: Path) -> dict[str, object]:
    """Everything train-gan produced, timing fields left out (they differ between any two runs)."""
    files = {str(p.relative_to(root)): p.read_bytes()
             for folder in ("models/gan", "reports/gan") for p in sorted((root / folder).iterdir())}
    metrics = without(json.loads((root / "metrics/train-gan.json").read_text()), TIMING["metrics"])
    with (root / "plots/train-gan.csv").open() as f:
        plot = [without(row, TIMING["plot"]) for row in csv.DictReader(f)]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train-gan"]["outs"]
    hashed = [out for out in lock if out["path"] in ("models/gan", "reports/gan")]  # metrics and plots hold timings
    assert len(hashed) == 2
    return {"files": files, "metrics": metrics, "plot": plot, "dvc.lock outs": hashed}


def test_killed_and_resumed_under_dvc_repro_ends_with_the_outputs_of_an_uninterrupted_run(project, tmp_path):
    gan_project(project)
    killed = tmp_path / "killed"
    shutil.copytree(project, killed, symlinks=True)
    repro(project)  # the uninterrupted reference

    checkpoint = paths(killed, "gan")["checkpoint"]
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(["dvc", "repro", "-s", "train-gan"], cwd=killed, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    kill_when(proc, lambda: checkpoint_epoch(checkpoint) >= 2)  # two epochs' grids made before the kill
    assert not (killed / "models/gan").exists() and not (killed / "reports/gan").exists()  # nothing half-written
    assert not list(killed.glob("reports/.*")) and not list(killed.glob("models/.*"))  # no temporary leftovers

    resumed = repro(killed)
    assert "resuming from" in resumed.stderr + resumed.stdout
    reference, after_kill = outputs(project), outputs(killed)
    assert sorted(reference["files"]) == [*(f"models/gan/{n}" for n in ("model.json", "weights.pt")),
                                          *(f"reports/gan/samples-epoch-{e:03d}.png" for e in range(1, 6))]
    assert after_kill["files"].keys() == reference["files"].keys()
    for name, content in reference["files"].items():
        assert after_kill["files"][name] == content, name
    assert after_kill["metrics"] == reference["metrics"] and reference["metrics"]["steps"] == 5 * 64
    assert after_kill["plot"] == reference["plot"]
    assert after_kill["dvc.lock outs"] == reference["dvc.lock outs"]
    metrics = json.loads((killed / "metrics/train-gan.json").read_text())
    assert metrics["resumed_from_step"] >= 2 * 64


# ---- item 5: kill -9 during a checkpoint write ----------------------------------------------------

DIE_IN_THIRD_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
real_save, calls = torch.save, []
def dying_save(obj, f, *args, **kwargs):
    calls.append(f)
    if len(calls) == 3:
        Path(f).write_bytes(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
from imagegen.cli import main
sys.exit(main(["train-vae"]))
"""


def test_kill_during_a_checkpoint_write_leaves_no_partial_file(tmp_path):
    root, cfg = make_root(tmp_path, vae={"epochs": 2})
    folder = paths(root, "vae")["checkpoint"].parent
    died = subprocess.run([sys.executable, "-c", DIE_IN_THIRD_SAVE], cwd=root, capture_output=True, timeout=300)
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert [p.name.startswith(".last.pt.") for p in folder.glob("*.partial")] == [True]  # killed mid-write
    assert (folder / "last.pt").exists()

    result = run_train(cfg, "vae", root)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    assert result.metrics["resumed_from_step"] == 6 and result.metrics["steps"] == 16


# ---- item 6: MLflow runs of killed, resumed and failed runs ---------------------------------------

def train_runs(root: Path):
    from mlflow.tracking import MlflowClient

    from imagegen.tracking import embedded_uri

    client = MlflowClient(embedded_uri(root))
    experiment = client.get_experiment_by_name("imagegen-fashion-mnist")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def test_resumed_run_continues_its_mlflow_run_and_abandoned_runs_are_marked(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = {"gan": {"epochs": 3}, "train": {"checkpoint_every": 2, "mlflow": True}}
    root, cfg = make_root(tmp_path, n=1024, **overrides)
    checkpoint = paths(root, "gan")["checkpoint"]
    env = cli_env(None)

    # killed after its first checkpoint, then resumed: one run, continued, FINISHED
    proc = subprocess.Popen(cli("train-gan"), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    kill_when(proc, checkpoint.exists)
    client, (killed,) = train_runs(root)
    assert killed.info.status == "RUNNING"  # what a kill -9 leaves
    resumed = subprocess.run(cli("train-gan"), cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and f"continuing MLflow run {killed.info.run_id}" in resumed.stderr
    client, (run,) = train_runs(root)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/d")] == [1, 2, 3]
    assert torch.load(checkpoint, weights_only=True)["run"] == {"mlflow_run_id": run.info.run_id}

    # other params: killed again; its checkpoint is then discarded by a third set of params
    set_params(root, gan={"epochs": 4})
    before = checkpoint.stat().st_ino
    proc = subprocess.Popen(cli("train-gan"), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    kill_when(proc, lambda: checkpoint.stat().st_ino != before)
    _, (_, abandoned) = train_runs(root)
    assert abandoned.info.status == "RUNNING"
    cfg_other = cfg.model_copy(update={"gan": cfg.gan.model_copy(update={"epochs": 1})})
    run_train(cfg_other, "gan", root)
    _, runs = train_runs(root)
    assert [(r.info.run_id, r.info.status) for r in runs] == [
        (run.info.run_id, "FINISHED"), (abandoned.info.run_id, "KILLED"), (runs[2].info.run_id, "FINISHED")]

    # a run that fails ends FAILED, an interrupted one KILLED
    def failing(exc):
        def step(self, images, labels, noise):
            raise exc
        return step

    for exc, status, epochs in ((ImagegenError("boom"), "FAILED", 2), (KeyboardInterrupt(), "KILLED", 3)):
        monkeypatch.setattr(stage.GANTask, "step", failing(exc))
        cfg_failing = cfg.model_copy(update={"gan": cfg.gan.model_copy(update={"epochs": epochs})})
        with pytest.raises(type(exc)):
            run_train(cfg_failing, "gan", root)
        _, runs = train_runs(root)
        assert runs[-1].info.status == status


# ---- item 2: the tracking server is down ----------------------------------------------------------

def test_stages_fail_within_seconds_when_the_tracking_server_is_down(tmp_path):
    root, _ = make_root(tmp_path, n=256, train={"mlflow": True}, gan={"epochs": 50})  # would train, then hang
    make_project(root, seed=0, fid={"gan": 10.0, "vae": 20.0})  # models and metrics for register
    (root / "params.yaml").write_text(yaml.safe_dump({"train": {"mlflow": True}, "gan": {"epochs": 50}}))
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for command in ("train-gan", "train-vae", "evaluate", "register"):
        started = time.monotonic()
        result = subprocess.run(cli(command), cwd=root, capture_output=True, text=True, env=cli_env(uri), timeout=60)
        seconds = time.monotonic() - started
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"imagegen {command}: error: MLflow tracking server {uri} is not reachable"), lines
        assert seconds < 30, (command, seconds)
    assert not (root / "checkpoints").exists()  # it failed before training


# ---- item 8: the stages refuse data that did not pass validation ----------------------------------

def test_stages_refuse_data_that_failed_validation_or_was_validated_as_other_data(tmp_path):
    from imagegen.evaluation.features import run_train_features
    from imagegen.evaluation.stage import run_evaluate

    root, cfg = make_root(tmp_path)
    with np.load(root / "data/prepared/train.npz") as arrays:
        np.savez(root / "data/prepared/test.npz", images=arrays["images"][:40], labels=arrays["labels"][:40])
    mark_validated(root)
    record = root / "metrics/validate.json"
    passed = json.loads(record.read_text())
    stages = {"train-gan": lambda: run_train(cfg, "gan", root), "train-vae": lambda: run_train(cfg, "vae", root),
              "train-features": lambda: run_train_features(cfg, root), "evaluate": lambda: run_evaluate(cfg, root)}

    def refused(match: str) -> None:
        for name, run in stages.items():
            with pytest.raises(ImagegenError, match=match) as info:
                run()
            assert str(info.value).startswith(f"{name}: ") and "\n" not in str(info.value)

    record.write_text(json.dumps({**passed, "success": False, "failed_expectations": 2}))
    refused(r"metrics/validate.json says validation failed \(2 failed expectation\(s\)\)")
    record.unlink()
    refused("metrics/validate.json not found; run the validate stage first")
    record.write_text(json.dumps(passed))
    with np.load(root / "data/prepared/train.npz") as arrays:
        images = arrays["images"].copy()
        labels = arrays["labels"]
    images[:30] = images[0]
    np.savez(root / "data/prepared/train.npz", images=images, labels=labels)
    refused(r"data/prepared/train.npz is not the data that passed validation")
    assert not (root / "models").exists() and not (root / "checkpoints").exists()

    result = subprocess.run(cli("train-gan"), cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("imagegen train-gan: error: train-gan: data/prepared/train.npz is not the data that "
                           "passed validation (content sha256 ")
    assert line.endswith("re-run the validate stage")


def test_a_run_is_judged_abandoned_only_when_its_process_is_gone():
    from imagegen.lineage import proc_stat
    from imagegen.tracking import process_gone, process_tag

    assert not process_gone(process_tag())  # this process: alive
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, _, start = process_tag().split(":")
    assert process_gone(f"{host}:{int(ended.stdout)}:{start}")  # a pid that has exited
    assert process_gone(f"{host}:{os.getpid()}:{int(start) + 1 if start else 1}") == bool(start)  # pid reused
    assert not process_gone(f"other-host:{int(ended.stdout)}:{start}")  # another machine's: never judged
    assert not process_gone("") and not process_gone("garbage")
    # a killed flow process whose parent (the worker) died too waits, unreaped, for init: it has ended all the same
    child = subprocess.Popen(["sleep", "60"])
    tag = process_tag(child.pid)
    assert not process_gone(tag)
    child.kill()
    for _ in range(100):  # until the kernel has made it a zombie (we do not reap it yet)
        if (proc_stat(child.pid) or ["Z"])[0] == "Z":
            break
        time.sleep(0.05)
    assert process_gone(tag)
    child.wait()
