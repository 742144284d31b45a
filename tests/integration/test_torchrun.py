"""Multi-node training for real: `torchrun` with c10d rendezvous, 2 "nodes" x 1 process on loopback (gloo,
CPU), each node in its own folder (its own checkout), through the `imagegen train-gan` entry point.

Node 0 runs with --local-addr 127.0.0.1 and node 1 with 127.0.0.2 (both loopback): c10d ranks nodes by
address, as it ranks real hosts by name, so node 0's folder gets rank 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port
from tests.integration.test_training import make_root

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PARAMS = {"train": {"mlflow": True, "checkpoint_every": 2, "threads": 1},
          "gan": {"epochs": 3, "batch_size": 16, "latent_dim": 8, "width": 8}}
OUTPUTS = ("models", "metrics/train-gan.json", "plots", "reports", "checkpoints", "mlflow.db", "mlruns")


def nodes(root: Path, mlflow: bool = True) -> list[Path]:
    """Two node folders with the same data and params (as two clones after `dvc pull` would be).
    train.mlflow does not change what a checkpoint resumes."""
    folders = [root / "node0", root / "node1"]
    for folder in folders:
        make_root(folder, n=512, **{**PARAMS, "train": {**PARAMS["train"], "mlflow": mlflow}})
    return folders


def launch(folders: list[Path], port: int, run_id: str) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "WORLD_SIZE", "RANK")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")  # gloo on the loopback interface only
    procs = []
    for index, folder in enumerate(folders):
        cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, "--local-addr", f"127.0.0.{index + 1}",
               "--max-restarts", "0", "--no-python", str(BIN / "imagegen"), "train-gan"]
        log = (folder.parent / f"{folder.name}-{run_id}.log").open("w")
        procs.append(subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def wait(procs: list[subprocess.Popen], folders: list[Path], run_id: str, timeout: float = 240) -> None:
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        kill(procs)
    logs = "\n".join((f.parent / f"{f.name}-{run_id}.log").read_text()[-2000:] for f in folders)
    assert [proc.returncode for proc in procs] == [0, 0], logs


def kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "models/gan/weights.pt", weights_only=True)


def test_two_nodes_train_resume_under_ddp_and_only_rank0_writes(tmp_path):
    # An uninterrupted 2-node run: the reference.
    reference = nodes(tmp_path / "reference")
    wait(launch(reference, free_port(), "ref"), reference, "ref")
    metrics = json.loads((reference[0] / "metrics/train-gan.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 3 and metrics["resumed_from_step"] is None
    assert metrics["steps"] == 3 * 16  # 512 images / (batch 16 x 2 ranks)
    assert [p.name for p in sorted((reference[0] / "reports/gan").iterdir())] == [
        "samples-epoch-001.png", "samples-epoch-002.png", "samples-epoch-003.png"]
    assert [name for name in OUTPUTS if (reference[1] / name).exists()] == []  # rank 1 wrote nothing

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{reference[0] / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("imagegen-fashion-mnist").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "train-gan"  # one run: rank 0's
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/d")] == [1, 2, 3]

    # The same run killed after its first checkpoints, then launched again: it resumes under DDP.
    folders = nodes(tmp_path / "resumed", mlflow=False)
    checkpoint = folders[0] / "checkpoints/gan/last.pt"
    procs = launch(folders, free_port(), "first")
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    kill(procs)
    assert checkpoint.exists(), (folders[0].parent / "node0-first.log").read_text()[-2000:]
    assert not (folders[0] / "models/gan").exists(), "the run finished before it could be killed"
    assert not (folders[1] / "checkpoints").exists()  # rank 0 alone writes checkpoints
    wait(launch(folders, free_port(), "second"), folders, "second")
    resumed = json.loads((folders[0] / "metrics/train-gan.json").read_text())
    assert resumed["resumed_from_step"] > 0 and resumed["steps"] == 3 * 16  # counted over the whole run
    expected, got = weights(reference[0]), weights(folders[0])
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert [name for name in OUTPUTS if (folders[1] / name).exists()] == []
