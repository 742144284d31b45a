"""The training stages on small random data: determinism, resume after kill, NaN guard, DDP, MLflow."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import socket
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
from tests.helpers import mark_validated

TINY = {
    # One thread: with two, a loaded machine made CPU reductions differ in the last bits (seen once in ~10 runs).
    "train": {"mlflow": False, "checkpoint_every": 3, "seed": 3, "threads": 1},
    "gan": {"epochs": 2, "batch_size": 16, "latent_dim": 8, "width": 4},
    "vae": {"epochs": 2, "batch_size": 16, "latent_dim": 4, "width": 4},
}


def make_root(root: Path, n: int = 128, **overrides) -> tuple[Path, Config]:
    """A project folder with n random training images (validated) and a params.yaml of tiny sizes."""
    rng = np.random.default_rng(0)
    folder = root / "data" / "prepared"
    folder.mkdir(parents=True)
    with (folder / "train.npz").open("wb") as f:
        np.savez(f, images=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), labels=np.arange(n) % 10)
    params = {section: {**values, **overrides.get(section, {})} for section, values in TINY.items()}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    mark_validated(root)
    return root, Config.model_validate(params)


def weights(root: Path, kind: str) -> dict[str, torch.Tensor]:
    return torch.load(paths(root, kind)["model"] / "weights.pt", weights_only=True)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_outputs_and_bitwise_determinism(tmp_path, kind):
    root_a, cfg = make_root(tmp_path / "a")
    root_b, _ = make_root(tmp_path / "b")
    result = run_train(cfg, kind, root_a)
    run_train(cfg, kind, root_b)
    assert_same(weights(root_a, kind), weights(root_b, kind))

    out = paths(root_a, kind)
    assert result.metrics["epochs"] == 2 and result.metrics["steps"] == 16
    assert sorted(p.name for p in out["samples"].iterdir()) == ["samples-epoch-001.png", "samples-epoch-002.png"]
    rows = out["plot"].read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,")

    other_seed, cfg_c = make_root(tmp_path / "c", train={"seed": 4})
    run_train(cfg_c, kind, other_seed)
    assert not all(torch.equal(x, y) for x, y in zip(weights(root_a, kind).values(), weights(other_seed, kind).values()))


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_a_budget_in_images_sets_the_epochs_and_a_small_set_is_reported_as_often_as_fashion_mnist(tmp_path, kind):
    root, cfg = make_root(tmp_path, **{kind: {"epochs": None, "images": 512}})  # 128 images, batch 16
    result = run_train(cfg, kind, root)
    assert result.metrics["epochs"] == 4 and result.metrics["steps"] == 32
    out = paths(root, kind)
    assert len(out["plot"].read_text().splitlines()) == 1 + 4  # every epoch's losses
    # but one grid (and one best-epoch probe): 128-image epochs are reported about every 60,000 images
    assert sorted(p.name for p in out["samples"].iterdir()) == ["samples-epoch-004.png"]


def test_conditional_gan_trains_and_exports_a_conditional_model(tmp_path):
    root, cfg = make_root(tmp_path, gan={"conditional": True, "epochs": 1})
    run_train(cfg, "gan", root)
    from imagegen.models.io import load_model

    model, meta = load_model(paths(root, "gan")["model"])
    assert meta.num_classes == 10 and meta.kind == "gan"
    assert model(torch.randn(3, 8), torch.tensor([1, 2, 3])).shape == (3, 1, 28, 28)


def test_vae_prior_is_fitted_after_training_and_leaves_the_first_stage_alone(tmp_path):
    from imagegen.evaluation.sampling import generate
    from imagegen.models.io import load_model

    folders = {}
    for prior in ("standard", "mixture", "class_mixture", "two_stage"):
        # class_mixture: at least one component per class (it is fitted with the training labels)
        root, cfg = make_root(tmp_path / prior, vae={"prior": prior, "prior_components": 12, "prior_width": 8,
                                                     "prior_epochs": 2})
        result = run_train(cfg, "vae", root)
        folders[prior] = paths(root, "vae")["model"]
        model, meta = load_model(folders[prior])
        assert meta.arch["prior"] == prior and model.prior.kind == prior
        assert ("prior_fit_seconds" in result.metrics) == (prior != "standard")
        assert generate(model, meta, 5, seed=1).shape == (5, 1, 28, 28)
    first_stage = {k: v for k, v in torch.load(folders["standard"] / "weights.pt", weights_only=True).items()}
    for prior in ("mixture", "class_mixture", "two_stage"):
        state = torch.load(folders[prior] / "weights.pt", weights_only=True)
        assert_same(first_stage, {k: v for k, v in state.items() if not k.startswith("prior.")})
        assert any(k.startswith("prior.") for k in state)


@pytest.mark.parametrize("augment", [False, True])
def test_resume_after_kill_matches_uninterrupted(tmp_path, augment):
    overrides = {"gan": {"epochs": 3, "augment": augment, "ada_speed_images": 2000}, "train": {"checkpoint_every": 2}}
    reference, cfg = make_root(tmp_path / "reference", n=1024, **overrides)
    run_train(cfg, "gan", reference)

    killed, _ = make_root(tmp_path / "killed", n=1024, **overrides)
    checkpoint = paths(killed, "gan")["checkpoint"]
    command = [sys.executable, "-m", "imagegen.cli", "train-gan"]
    proc = subprocess.Popen(command, cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the run ended before writing a checkpoint"
    assert not paths(killed, "gan")["model"].exists()  # killed before the end: no final weights

    resumed = subprocess.run(command, cwd=killed, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert_same(weights(reference, "gan"), weights(killed, "gan"))


def test_changed_params_do_not_resume(tmp_path):
    root, cfg = make_root(tmp_path, vae={"epochs": 1})
    run_train(cfg, "vae", root)
    _, cfg_more = make_root(tmp_path / "unused", vae={"epochs": 2})
    again = run_train(cfg_more, "vae", root)
    assert again.metrics["resumed_from_step"] is None and again.metrics["steps"] == 16
    same = run_train(cfg_more, "vae", root)  # a finished run with the same params resumes at its end
    assert same.metrics["resumed_from_step"] == 16 and same.metrics["steps"] == 16  # the run's steps, all of them


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    root, cfg = make_root(tmp_path, vae={"epochs": 3})
    calls = {"n": 0}
    real_step = stage.VAETask.step

    def step_going_nan(self, images, labels, noise):
        calls["n"] += 1
        losses = real_step(self, images, labels, noise)
        if calls["n"] > 10:  # epoch 2, step 3 (8 steps per epoch)
            losses["loss"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(stage.VAETask, "step", step_going_nan)
    with pytest.raises(ImagegenError, match=r"train-vae: non-finite loss in epoch 2 by step 3 \(loss=nan\)"):
        run_train(cfg, "vae", root)
    state = torch.load(paths(root, "vae")["checkpoint"], weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)  # the end-of-epoch-1 checkpoint, not a later one
    assert all(torch.isfinite(v).all() for v in state["task"]["modules"]["vae"].values())
    assert not paths(root, "vae")["model"].exists()


def _ddp_worker(rank: int, world: int, port: int, root: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from imagegen.training.loop import LoopConfig, train
    from imagegen.training.runtime import setup_runtime, teardown_runtime
    from imagegen.training.data import DeviceBatches
    from imagegen.training.tasks import GANTask

    cfg = Config.model_validate(yaml.safe_load((Path(root) / "params.yaml").read_text()))
    runtime = setup_runtime("cpu")
    torch.manual_seed(cfg.train.seed)
    task = GANTask(cfg.gan, 10, runtime.device)
    task.prepare_models(compile_models=False, ddp=True)
    with np.load(Path(root) / "data/prepared/train.npz") as arrays:
        data = DeviceBatches(arrays["images"], arrays["labels"], 16, runtime.device, 0, runtime.rank, world)
    loop = LoopConfig(epochs=2, seed=0, checkpoint_path=Path(root) / f"ckpt-{rank}.pt", checkpoint_every=100,
                      fingerprint="ddp")
    train(task, data, loop, runtime)
    # Parameters, not buffers: BatchNorm statistics are per rank and DDP broadcasts rank 0's.
    parameters = {name: {k: p.detach() for k, p in m.named_parameters()} for name, m in task.modules.items()}
    torch.save(parameters, Path(root) / f"rank{rank}.pt")
    teardown_runtime(runtime)


def test_ddp_two_gloo_processes_keep_replicas_identical(tmp_path):
    """Each rank trains on its own share of every batch; only DDP's gradient averaging keeps them equal."""
    root, _ = make_root(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(root)), nprocs=2, join=True)
    rank0 = torch.load(root / "rank0.pt", weights_only=True)
    rank1 = torch.load(root / "rank1.pt", weights_only=True)
    for module in ("generator", "discriminator", "ema"):
        assert_same(rank0[module], rank1[module])


def test_mlflow_run_in_real_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, cfg = make_root(tmp_path, train={"mlflow": True})
    run_train(cfg, "gan", root)
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("imagegen-fashion-mnist")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "train-gan"
    assert run.data.params["gan.width"] == "4" and run.data.params["train.seed"] == "3"
    assert {"git_commit", "params_hash", "dvc_data_md5", "device", "pipeline_run"} <= run.data.tags.keys()
    assert run.data.tags["device"] == "cpu"
    weights = (root / "models/gan/weights.pt").read_bytes()
    assert run.data.tags["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    history = client.get_metric_history(run.info.run_id, "loss/d")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/samples-epoch-001.png", "samples/samples-epoch-002.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/weights.pt", "model/model.json"}
    assert (root / "mlruns").is_dir()
    # on its own (no DVC, no orchestrator): not nested, says so; the experiment opens on the runs table
    assert run.data.tags["pipeline_run"] == "standalone" and "mlflow.parentRunId" not in run.data.tags
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest.startswith("untracked-")  # no dvc.lock here
    assert json.loads(dataset.dataset.profile)["images"] == {"train": 128}
    assert run.data.tags["data_images"] == "128" and sum(json.loads(run.data.tags["data_images_per_class"]).values()) == 128
    assert run.data.metrics["summary/epochs"] == 2 and not any(k.startswith("final_") for k in run.data.metrics)
    assert "loss/d" in run.data.metrics and "summary/d_loss" not in run.data.metrics  # per epoch, not again


def test_a_limited_run_counts_what_it_trained_on(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, cfg = make_root(tmp_path, train={"mlflow": True, "limit": 40}, vae={"epochs": 1})
    run_train(cfg, "vae", root)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("imagegen-fashion-mnist").experiment_id])
    profile = json.loads(run.inputs.dataset_inputs[0].dataset.profile)
    assert profile["images"] == {"train": 40} and profile["train_limit"] == 40
    assert run.data.tags["data_images"] == "40" and sum(json.loads(run.data.tags["data_images_per_class"]).values()) == 40


def test_stage_runs_of_one_pipeline_nest_under_one_parent(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("IMAGEGEN_PIPELINE_RUN", "test-pipeline-1")
    root, cfg = make_root(tmp_path, train={"mlflow": True}, gan={"epochs": 1}, vae={"epochs": 1})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")  # an experiment made before kinds existed
    client.create_experiment("imagegen-fashion-mnist", artifact_location=(root / "mlruns").as_uri())
    run_train(cfg, "gan", root)
    run_train(cfg, "vae", root)
    experiment = client.get_experiment_by_name("imagegen-fashion-mnist")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # set on first use
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("run_kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("run_kind") == "stage"]
    assert len(runs) == 3
    assert sorted(r.data.tags["stage"] for r in stages) == ["train-gan", "train-vae"]
    assert {r.info.run_name for r in stages} == {f"{parent.info.run_name} · {s}" for s in ("train-gan", "train-vae")}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages)
    assert parent.data.tags["pipeline_run"] == "test-pipeline-1" and parent.info.status == "FINISHED"
    assert parent.info.end_time >= max(r.info.end_time for r in stages)
    assert parent.data.params["gan.epochs"] == "1"  # the pipeline's params.yaml: the variant's params only
    assert "gan.batch_size" not in parent.data.params and parent.data.tags["stages_ran"] == "train-gan, train-vae"


def test_gan_ships_the_epoch_with_the_best_fid_probe(tmp_path):
    from imagegen.evaluation.features import FEATURES_DIR
    from tests.helpers import make_model

    root, cfg = make_root(tmp_path, gan={"epochs": 3})
    make_model(root / FEATURES_DIR, "features", seed=0)
    metrics = run_train(cfg, "gan", root).metrics
    rows = list(csv.DictReader(paths(root, "gan")["plot"].open()))
    scores = [float(row["fid_probe"]) for row in rows]
    assert len(scores) == 3 and metrics["best_fid_probe"] == min(scores)
    assert metrics["best_epoch"] == scores.index(min(scores)) + 1


def test_keep_if_best_ships_the_best_weights_not_the_last():
    from imagegen.config import GANConfig
    from imagegen.training.tasks import GANTask

    task = GANTask(GANConfig(latent_dim=8, width=4), 10, torch.device("cpu"))
    task.keep_if_best(1, 5.0)
    best = {k: v.clone() for k, v in task.ema.named_parameters()}
    with torch.no_grad():
        for p in task.ema.parameters():
            p.add_(1.0)
    task.keep_if_best(2, 6.0)  # worse: not kept
    exported = dict(task.export().named_parameters())
    assert task.best["epoch"] == 1
    assert_same(best, exported)
