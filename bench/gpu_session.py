"""One prepared GPU session: the throughput benchmark, correctness checks of the CUDA-graph step, a
kernel profile, and the GPU pipeline's stages (train-features, train-gan, train-vae at the GPU
profile, evaluate) through the real CLI, each timed. Writes everything under --out; prints a summary.

Needs data/prepared/{train,test}.npz under --data-root. MLflow is off (train.mlflow: false); the
register stage is not run here (it needs MLflow and takes seconds on CPU).
Run: python bench/gpu_session.py --out DIR [--budget-s 400]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402

from imagegen.config import GPU_PROFILE, Config, with_overrides  # noqa: E402
from imagegen.data.arrays import load_split  # noqa: E402
from imagegen.training.data import DeviceBatches  # noqa: E402
from imagegen.training.runtime import Runtime, tune_cuda  # noqa: E402

STARTED = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - STARTED


def graph_matches_eager(kind: str, images, labels, steps: int = 40) -> dict:
    """The same steps eagerly and as graph replays, from the same weights and seeds: how far apart the
    losses and weights end (bf16 and cuDNN's algorithm choice make them differ slightly, not grossly)."""
    cfg = with_overrides(Config(), {**GPU_PROFILE, "train.compile": False})
    device = torch.device("cuda")
    results = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        task = tt.TASKS[kind](getattr(cfg, kind), 10, device, cfg.train.amp, cfg.train.channels_last)
        task.prepare_models(False, ddp=False, cuda_graphs=graphs)
        batches = tt.batches_forever(DeviceBatches(images, labels, getattr(cfg, kind).batch_size, device, seed=0))
        noise = torch.Generator(device=device)
        losses = []
        for i in range(steps):
            x, y = next(batches)
            noise.manual_seed(1000 + i)
            losses.append({k: float(v) for k, v in task.step(x, y, noise).items()})
        weights = torch.cat([p.detach().float().flatten() for m in task.modules.values() for p in m.parameters()])
        results[graphs] = (losses, weights, task)
    (le, we, _), (lg, wg, task) = results[False], results[True]
    # Steps 0-2 run eagerly in both; 3 is the capture + first replay, 4-7 replays.
    early = [max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-6) for k in a) for a, b in zip(le[:8], lg[:8], strict=True)]
    last = {k: (round(le[-1][k], 4), round(lg[-1][k], 4)) for k in le[-1]}
    return {"model": kind, "graph_captured": task.graph is not None and task.graph.graph is not None,
            "steps_0_7_loss_rel_diff": [f"{d:.1e}" for d in early], "last_step_eager_vs_graph": last,
            "weights_rel_diff": round(float((we - wg).norm() / we.norm()), 5)}


def kernel_profile(kind: str, images, labels, out: Path, steps: int = 20) -> dict:
    """GPU kernel time per step of the eager step (what a graph replay cannot go below) and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    cfg = with_overrides(Config(), {**GPU_PROFILE, "train.compile": False})
    device = torch.device("cuda")
    torch.manual_seed(0)
    task = tt.TASKS[kind](getattr(cfg, kind), 10, device, cfg.train.amp, cfg.train.channels_last)
    task.prepare_models(False, ddp=False, cuda_graphs=False)
    batches = tt.batches_forever(DeviceBatches(images, labels, getattr(cfg, kind).batch_size, device, seed=0))
    noise = torch.Generator(device=device).manual_seed(0)
    for _ in range(5):
        x, y = next(batches)
        task.step(x, y, noise)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            x, y = next(batches)
            task.step(x, y, noise)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    kernels = sum(e.count for e in events) / steps
    total_us = sum(e.self_device_time_total for e in events) / steps
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
    (out / f"profile-{kind}.txt").write_text(table)
    return {"model": kind, "gpu_us_per_step": round(total_us, 1), "kernels_per_step": round(kernels, 1),
            "images_per_s_if_gpu_bound": round(getattr(cfg, kind).batch_size / total_us * 1e6)}


def resume_check(kind: str, images, labels, workdir: Path) -> dict:
    """A GPU run stopped in epoch 3 and resumed from its last checkpoint vs an uninterrupted one."""
    from imagegen.training.loop import LoopConfig, TrainingLogger, train

    class Crash(TrainingLogger):
        def on_epoch_end(self, epoch, metrics, samples):
            if epoch == 2:
                raise KeyboardInterrupt  # after epoch 2's mid-epoch checkpoints, before its end checkpoint

    cfg = with_overrides(Config(), {**GPU_PROFILE, "train.compile": False})
    device = torch.device("cuda")
    curves = {}
    for name in ("straight", "resumed"):
        ckpt = workdir / f"{kind}-{name}.pt"
        loop = LoopConfig(epochs=3, seed=0, checkpoint_path=ckpt, checkpoint_every=100, fingerprint="x")
        runs = [Crash(), None] if name == "resumed" else [None]
        for logger in runs:
            torch.manual_seed(0)
            task = tt.TASKS[kind](getattr(cfg, kind), 10, device, cfg.train.amp, cfg.train.channels_last)
            task.prepare_models(False, ddp=False, cuda_graphs=True)
            data = DeviceBatches(images[:30000], labels[:30000], getattr(cfg, kind).batch_size, device, seed=0)
            try:
                history = train(task, data, loop, Runtime(device), logger)
            except KeyboardInterrupt:
                continue
        curves[name] = [{k: round(v, 4) for k, v in r.items() if k not in ("seconds", "images_per_s")}
                        for r in history.epochs]
    return {"model": kind, "resumed_from": history.resumed_from, **curves}


def compiled(kind: str, images, labels) -> dict:
    """torch.compile (default mode: fused elementwise kernels) inside the CUDA-graph step."""
    cfg = with_overrides(Config(), {**GPU_PROFILE, "train.compile": True})
    rate, warm, _ = tt.ours(cfg, kind, torch.device("cuda"), images, labels, 300, 10)
    r = tt.row(torch.device("cuda"), "gpu", kind, "graph + compile", cfg, rate, None, warm,
               tt.flops_per_image(cfg, kind), len(images))
    tt.show(r)
    return r


def fresh_compile(args) -> list[dict]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--data-root", str(args.data_root),
                           "--compile-only"], capture_output=True, text=True)
    print(proc.stdout.strip()[:2000], proc.stderr.strip()[-1500:], f"process {time.perf_counter() - started:.1f} s",
          sep="\n", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_stage(root: Path, command: str, env: dict) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imagegen.cli", command], cwd=root, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (root / f"{command}.log").write_text(proc.stdout + proc.stderr)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"stage": command, "seconds": round(seconds, 1), "rc": proc.returncode, "said": last[:300]}


def pipeline(data_root: Path, workdir: Path, overrides: dict) -> dict:
    root = workdir / "pipeline"
    (root / "data").mkdir(parents=True)
    os.symlink((data_root / "data" / "prepared").resolve(), root / "data" / "prepared")
    cfg = with_overrides(Config(), {**GPU_PROFILE, **overrides, "train.mlflow": False})
    raw = cfg.model_dump(by_alias=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    env = dict(os.environ)
    stages, started = [], time.perf_counter()
    for command in ("train-features", "train-gan", "train-vae", "evaluate"):
        stages.append(run_stage(root, command, env))
        print("  ", stages[-1], flush=True)
        if stages[-1]["rc"] != 0:
            break
    result = {"stages": stages, "total_s": round(time.perf_counter() - started, 1), "params": overrides}
    for kind in ("gan", "vae"):
        plot = root / "plots" / f"train-{kind}.csv"
        if plot.exists():
            rows = list(csv.DictReader(plot.open()))
            seconds = [float(r["seconds"]) for r in rows]
            result[f"{kind}_epoch_1_s"] = seconds[0]
            result[f"{kind}_epoch_median_s"] = sorted(seconds[1:])[len(seconds[1:]) // 2] if len(seconds) > 1 else None
            result[f"{kind}_last_row"] = rows[-1]
        metrics = root / "metrics" / f"train-{kind}.json"
        if metrics.exists():
            result[f"{kind}_metrics"] = json.loads(metrics.read_text())
    for name in ("features", "evaluate"):
        path = root / "metrics" / f"{name}.json"
        if path.exists():
            result[name] = json.loads(path.read_text())
    return result


def sampling_speed(workdir: Path) -> dict:
    """`imagegen sample`'s generate() for 10,000 GAN images on CPU and CUDA (the trained model)."""
    from imagegen.evaluation.sampling import generate
    from imagegen.models.io import load_model

    folder = workdir / "pipeline" / "models" / "gan"
    if not folder.exists():
        return {}
    out = {}
    for device in ("cpu", "cuda"):
        module, meta = load_model(folder, device)
        generate(module, meta, 100, device=device)
        started = time.perf_counter()
        generate(module, meta, 10_000, device=device)
        out[device] = round(time.perf_counter() - started, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, default=Path("."))
    parser.add_argument("--budget-s", type=float, default=400, help="skip the optional parts after this")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip")
    parser.add_argument("--compile-runs", type=int, default=0,
                        help="time train.compile in this many fresh processes in turn (the 2nd+ find inductor's cache)")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_only:
        tune_cuda()
        images, labels = load_split(args.data_root / "data" / "prepared" / "train.npz")
        print(json.dumps([compiled(k, images, labels) for k in ("gan", "vae")]))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "imagegen-gpu-session"
    workdir.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    summary: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    tune_cuda()
    images, labels = load_split(args.data_root / "data" / "prepared" / "train.npz")

    def part(name, fn, *a, optional=False):
        if name in skip or (optional and elapsed() > args.budget_s):
            print(f"[{elapsed():6.1f}s] {name}: skipped", flush=True)
            return None
        print(f"[{elapsed():6.1f}s] {name}", flush=True)
        try:
            value = fn(*a)
        except Exception as exc:
            import traceback

            with (args.out / "errors.txt").open("a") as f:
                f.write(f"== {name}\n{traceback.format_exc()}\n")
            print(f"  {name} failed: {type(exc).__name__}: {exc}"[:400], flush=True)
            value = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        summary[name] = value
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        return value

    part("checks", lambda: [graph_matches_eager(k, images, labels) for k in ("gan", "vae")])
    print(json.dumps(summary.get("checks"), default=str)[:1500], flush=True)
    rows = part("throughput", tt.main, ["--devices", "cuda", "--sweep", "--json", str(args.out / "throughput.json"),
                                        "--data", str(args.data_root / "data" / "prepared" / "train.npz")])
    best = {}
    for kind in ("gan", "vae"):
        graph_rows = [r for r in rows or [] if r["model"] == kind and r["profile"] == "gpu"
                      and r["variant"].startswith("graph")]
        if graph_rows:
            top = max(graph_rows, key=lambda r: r["ours"])
            best[kind] = tt.VARIANTS[top["variant"]]
    summary["best_variants"] = best
    part("profile", lambda: [kernel_profile(k, images, labels, args.out) for k in ("gan", "vae")])
    print(json.dumps(summary.get("profile")), flush=True)
    # The stages run with the project's defaults (what a user gets); the best variant is reported above.
    part("pipeline", pipeline, args.data_root, workdir, {"train.compile": False})
    print(json.dumps({k: v for k, v in (summary.get("pipeline") or {}).items() if "metrics" not in k},
                     default=str)[:3000], flush=True)
    part("sampling", sampling_speed, workdir, optional=True)
    part("evaluate_speed", lambda: subprocess.run(
        [sys.executable, str(Path(__file__).parent / "evaluate_speed.py"), "--root", str(workdir / "pipeline")],
        capture_output=True, text=True).stdout, optional=True)
    print(summary.get("evaluate_speed"), flush=True)
    part("resume", lambda: [resume_check(k, images, labels, workdir) for k in ("vae", "gan")], optional=True)
    if args.compile_runs:
        part("compile", lambda: [fresh_compile(args) for _ in range(args.compile_runs)], optional=True)
    else:
        part("compile", lambda: [compiled(k, images, labels) for k in ("gan", "vae")], optional=True)
    print(f"[{elapsed():6.1f}s] done", flush=True)
    print(json.dumps({k: summary.get(k) for k in ("sampling", "resume", "best_variants")}, default=str)[:3000])


if __name__ == "__main__":
    main()
