"""The fast training step: EMA on the device, CUDA-graph replay (on a GPU), MLflow system metrics."""

from __future__ import annotations

import pytest
import torch

from imagegen.config import GANConfig, VAEConfig
from imagegen.training.tasks import GANTask, VAETask
from tests.integration.test_training import make_root


@pytest.mark.parametrize("on_device", [False, True], ids=["host count", "device count (the CUDA path)"])
def test_ema_update_follows_the_warm_up_schedule_and_survives_a_checkpoint(on_device):
    task = GANTask(GANConfig(latent_dim=8, width=4, ema_decay=0.9), 10, torch.device("cpu"))
    if on_device:
        task.ema_updates = torch.zeros(())  # what a CUDA task holds, here on the CPU
    ema = {k: v.clone() for k, v in task.ema.named_parameters()}
    for n in range(1, 40):
        with torch.no_grad():
            for p in task.generator.parameters():
                p.add_(0.01 * n)
        task.update_ema()
        decay = min(0.9, (1 + n) / (10 + n))  # warm-up, then the configured decay
        for k, p in task.generator.named_parameters():
            ema[k] += (1 - decay) * (p.detach() - ema[k])
    for k, p in task.ema.named_parameters():
        torch.testing.assert_close(p, ema[k], rtol=1e-5, atol=1e-6)

    state = task.state_dict()
    assert state["ema_updates"] == 39 and isinstance(state["ema_updates"], int)
    other = GANTask(GANConfig(latent_dim=8, width=4, ema_decay=0.9), 10, torch.device("cpu"))
    if on_device:
        other.ema_updates = torch.zeros(())
    other.load_state_dict(state)
    assert int(other.ema_updates) == 39 and isinstance(other.ema_updates, torch.Tensor) == on_device


@pytest.mark.parametrize("task_class, cfg", [(GANTask, GANConfig(latent_dim=8, width=4)),
                                             (VAETask, VAEConfig(latent_dim=4, width=4))])
def test_cpu_keeps_the_eager_step_and_plain_adam(task_class, cfg):
    task = task_class(cfg, 10, torch.device("cpu"))
    task.prepare_models(compile_models=False, ddp=False, cuda_graphs=True)
    assert task.graph is None  # graphs are CUDA-only
    for optimizer in task.optimizers.values():
        assert not optimizer.defaults["fused"] and not optimizer.defaults["capturable"]


def run_steps(task_class, cfg, graphs: bool, steps: int = 8):
    device = torch.device("cuda")
    torch.manual_seed(0)
    task = task_class(cfg, 10, device)
    task.prepare_models(compile_models=False, ddp=False, cuda_graphs=graphs)
    images = torch.randint(0, 256, (steps, 32, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    noise = torch.Generator(device=device)
    losses = []
    for i in range(steps):
        noise.manual_seed(100 + i)
        out = task.step(images[i].to(device), (torch.arange(32) % 10).to(device), noise)
        losses.append({k: float(v) for k, v in out.items()})
    return task, losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("task_class, cfg", [(GANTask, GANConfig(latent_dim=8, width=8)),
                                             (VAETask, VAEConfig(latent_dim=4, width=8))])
def test_cuda_graph_step_matches_the_eager_step(task_class, cfg):
    eager, eager_losses = run_steps(task_class, cfg, graphs=False)
    graphed, graph_losses = run_steps(task_class, cfg, graphs=True)
    assert graphed.graph is not None and graphed.graph.graph is not None  # captured and replayed
    for a, b in zip(eager_losses, graph_losses, strict=True):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=0.05, abs=0.05), k  # bf16 and cuDNN choices, no more
    for name, module in eager.modules.items():
        for (k, p), q in zip(module.named_parameters(), graphed.modules[name].parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0.05, atol=0.02, msg=f"{name}.{k}")


def system_metric_keys(root):
    from mlflow.tracking import MlflowClient

    from imagegen.tracking import embedded_uri

    client = MlflowClient(embedded_uri(root))
    (run,) = client.search_runs([client.get_experiment_by_name("imagegen-fashion-mnist").experiment_id])
    return {k for k in run.data.metrics if k.startswith("system/")}


@pytest.mark.parametrize("enabled", [True, False])
def test_training_run_logs_system_metrics_unless_switched_off(tmp_path, monkeypatch, enabled):
    from imagegen.training.stage import run_train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    root, cfg = make_root(tmp_path, n=512, train={"mlflow": True, "system_metrics": enabled}, vae={"epochs": 3})
    run_train(cfg, "vae", root)
    keys = system_metric_keys(root)
    if enabled:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    else:
        assert not keys
