"""Evaluation speed: the sample metrics on N samples
Features, FID, KID, precision/recall (the test split's features come precomputed from
models/features/reference.npz, as in the evaluate stage).

Needs the outputs of `dvc repro train-features`. The "samples" are N train images, so the
figures also show what a perfect generator scores. One block per device: the CPU, and CUDA when
present. Run: python bench/evaluate_speed.py [--n 10000] [--devices cpu,cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from benchlog import record

from imagegen.config import load_config
from imagegen.data.arrays import load_split
from imagegen.device import select_device
from imagegen.evaluation import metrics as m
from imagegen.evaluation.features import embed, load_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--devices", default=None, help="comma-separated; default: cpu, and cuda when present")
    args = parser.parse_args()
    cfg = load_config(args.root / "params.yaml")
    images, _ = load_split(args.root / "data/prepared/train.npz")
    samples = images[np.random.default_rng(0).permutation(len(images))[:args.n]]
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [measure(cfg, args, select_device(device), samples) for device in devices]
    record("evaluate_speed", ["device", "torch threads", "samples", "features s", "fid s", "kid s",
                              "precision_recall s", "total s", "FID", "KID", "precision", "recall"], rows,
           note="The samples are training images, so the scores are what a perfect generator gets.")


def measure(cfg, args, device, samples) -> list:
    net, _, reference = load_features(args.root, device)
    ref = reference["features"]
    embed(net, samples[:100], device)  # warm-up: CUDA context, cuDNN
    timings, started = {}, time.perf_counter()

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t
        return out

    features, _ = timed("features", lambda: embed(net, samples, device))
    fid = timed("fid", lambda: m.fid(features, ref))
    kid = timed("kid", lambda: m.kid(features, ref, cfg.eval.kid_subsets, cfg.eval.kid_subset_size))
    pr = timed("precision_recall", lambda: m.precision_recall(features, ref, cfg.eval.pr_k))
    total = time.perf_counter() - started
    label = f"{device} ({torch.cuda.get_device_name()})" if device.type == "cuda" else str(device)
    print(f"device {label}, torch threads {torch.get_num_threads()}, {args.n} samples vs {len(ref)} test images")
    for name, seconds in timings.items():
        print(f"  {name:<18} {seconds:6.2f} s")
    print(f"  {'total':<18} {total:6.2f} s   (FID {fid:.4f}, KID {kid[0]:.5f}, P/R {pr[0]:.3f}/{pr[1]:.3f})")
    return [label, torch.get_num_threads(), f"{args.n:,}", *(f"{seconds:.2f}" for seconds in timings.values()),
            f"{total:.2f}", f"{fid:.4f}", f"{kid[0]:.5f}", f"{pr[0]:.3f}", f"{pr[1]:.3f}"]


if __name__ == "__main__":
    main()
