"""Training throughput (images/s) of the GAN and VAE steps: this project's loop vs a plain DataLoader loop.

Both run the same models and the same optimisation step; the project's loop keeps the uint8
dataset on the device and slices batches there (plus bf16 autocast and channels_last on CUDA),
the plain loop feeds float batches from a torch DataLoader in fp32. Prints one row per
(device, profile, model) and the ratio. Run: python bench/train_throughput.py [--steps N]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from imagegen.config import GPU_PROFILE, Config, with_overrides
from imagegen.training.data import DeviceBatches, load_split
from imagegen.training.tasks import GANTask, VAETask

TASKS = {"gan": GANTask, "vae": VAETask}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(cfg, kind, device, images, labels, steps, warmup):
    section = getattr(cfg, kind)
    task = TASKS[kind](section, 10, device, cfg.train.amp, cfg.train.channels_last)
    task.prepare_models(cfg.train.compile and device.type == "cuda", ddp=False)
    data = DeviceBatches(images, labels, section.batch_size, device, seed=0)
    noise = torch.Generator(device=device).manual_seed(0)
    batches = iter(data.epoch(0))
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x, y = next(batches)
        task.step(x, y, noise)
    sync(device)
    return steps * section.batch_size / (time.perf_counter() - start)


def plain(cfg, kind, device, images, labels, steps, warmup):
    section = getattr(cfg, kind)
    task = TASKS[kind](section, 10, device, amp=False, channels_last=False)
    task.prepare_models(False, ddp=False)
    dataset = TensorDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels))
    loader = DataLoader(dataset, batch_size=section.batch_size, shuffle=True, drop_last=True,
                        num_workers=2 if device.type == "cuda" else 0, pin_memory=device.type == "cuda")
    noise = torch.Generator(device=device).manual_seed(0)
    batches = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x, y = next(batches)
        task.step(x.to(device, non_blocking=True), y.to(device, non_blocking=True), noise)
    sync(device)
    return steps * section.batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--data", default="data/prepared/train.npz")
    args = parser.parse_args()
    images, labels = load_split(args.data)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))
    print(f"{'device':6} {'profile':8} {'model':5} {'ours img/s':>11} {'plain img/s':>12} {'ratio':>6} {'epoch (s)':>10}")
    for device in devices:
        for profile, overrides in (("default", {}), ("gpu", GPU_PROFILE)):
            cfg = with_overrides(Config(), overrides)
            for kind in ("gan", "vae"):
                steps = args.steps if device.type == "cuda" or profile == "default" else max(args.steps // 4, 5)
                a = ours(cfg, kind, device, images, labels, steps, args.warmup)
                b = plain(cfg, kind, device, images, labels, steps, args.warmup)
                print(f"{device.type:6} {profile:8} {kind:5} {a:11.0f} {b:12.0f} {a / b:6.2f} {len(images) / a:10.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
