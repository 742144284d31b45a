"""Training throughput: this project's GAN and VAE steps vs a plain DataLoader loop
Images/s of each step. "ours" is the step as train-gan / train-vae run it, with the loop's per-step work
(noise seed, loss sums): the uint8 data on the device, bf16 autocast / channels_last as params say, and on CUDA the
whole step replayed as a CUDA graph. "plain" is what a user would write: the same models and losses
in fp32, fed by a torch DataLoader, default Adam, an EMA loop over parameters, PyTorch's default
settings. One row per (device, profile, model): images/s, the ratio, seconds per 60k-image epoch,
the step's FLOP rate (matrix and convolution FLOPs per image, counted by torch's FlopCounterMode)
with its share of the GPU's dense peak, and the warm-up (first steps: cuDNN tuning, capture, compile).
--sweep adds variants of ours: on CUDA eager, bf16/fp32 x channels_last, spectral norm off, compile;
on the CPU fp32 with and without channels_last.

Run: python bench/train_throughput.py [--steps N] [--devices cpu,cuda] [--sweep] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from benchlog import record
from torch.utils.data import DataLoader, TensorDataset

from imagegen.config import GPU_PROFILE, Config, with_overrides
from imagegen.data.arrays import load_split
from imagegen.models.gan import Discriminator, Generator
from imagegen.models.vae import VAE, negative_elbo
from imagegen.training.data import DeviceBatches
from imagegen.training.runtime import tune_cuda
from imagegen.training.tasks import GANTask, VAETask

TASKS = {"gan": GANTask, "vae": VAETask}
# Dense tensor-core peaks from the datasheets (SXM parts), TFLOP/s: bf16 autocast, else TF32.
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "tf32": 494.7}, "H200": {"bf16": 989.4, "tf32": 494.7},
               "A100": {"bf16": 312.0, "tf32": 156.0}}
# CUDA variants of ours for --sweep: name -> overrides on top of the profile.
VARIANTS = {
    "eager": {"train.cuda_graphs": False},
    "graph bf16 CL": {"train.amp": True, "train.channels_last": True},
    "graph bf16": {"train.amp": True, "train.channels_last": False},
    "graph tf32 CL": {"train.amp": False, "train.channels_last": True},
    "graph tf32": {"train.amp": False, "train.channels_last": False},
}
# CPU variants of ours for --sweep (default profile): ours is bf16 where the CPU does bf16 in hardware.
CPU_VARIANTS = {"fp32 CL": {"train.amp": False}, "fp32": {"train.amp": False, "train.channels_last": False}}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def batches_forever(data: DeviceBatches):
    return itertools.chain.from_iterable(data.epoch(epoch) for epoch in itertools.count())


def ours(cfg: Config, kind, device, images, labels, steps, warmup) -> tuple[float, float, dict]:
    """(images/s, warm-up seconds, mean losses) of the project's step as the training loop drives it."""
    section = getattr(cfg, kind)
    torch.manual_seed(0)
    task = TASKS[kind](section, 10, device, cfg.train.amp, cfg.train.channels_last, tuple(images.shape[1:]))
    task.prepare_models(cfg.train.compile and device.type == "cuda", ddp=False, cuda_graphs=cfg.train.cuda_graphs)
    batches = batches_forever(DeviceBatches(images, labels, section.batch_size, device, seed=0))
    noise = torch.Generator(device=device)
    sums: dict[str, torch.Tensor] = {}
    sync(device)
    started = start = time.perf_counter()
    warm = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
            warm = start - started
        x, y = next(batches)
        noise.manual_seed(i)
        for k, v in task.step(x, y, noise).items():
            sums[k] = sums.get(k, 0) + v
    sync(device)
    rate = steps * section.batch_size / (time.perf_counter() - start)
    means = {k: float(v) / (warmup + steps) for k, v in sums.items()}
    if not all(math.isfinite(v) for v in means.values()):
        raise RuntimeError(f"{kind}: non-finite losses {means}")
    return rate, warm, means


@contextlib.contextmanager
def pytorch_defaults():
    """PyTorch's own CUDA settings for the plain loop (no cuDNN autotuning, no TF32 matmuls)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (
        False, False, True)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class PlainGAN:
    """The GAN step as a plain PyTorch loop writes it: fp32, default Adam, a Python EMA loop."""

    def __init__(self, cfg, device, shape):
        self.cfg, self.device = cfg, device
        self.g = Generator(cfg.latent_dim, cfg.width, 0, cfg.kernel_size, shape).to(device)
        self.d = Discriminator(cfg.width, 0, cfg.spectral_norm, cfg.kernel_size, shape).to(device)
        self.ema = Generator(cfg.latent_dim, cfg.width, 0, cfg.kernel_size, shape).to(device).requires_grad_(False)
        self.ema.load_state_dict(self.g.state_dict())
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=cfg.lr_g, betas=tuple(cfg.betas))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=cfg.lr_d, betas=tuple(cfg.betas))
        self.updates = 0

    def step(self, images, labels, noise):
        real = images.float() / 127.5 - 1
        z = torch.randn(len(real), self.cfg.latent_dim, generator=noise, device=self.device)
        fake = self.g(z)
        real_out, fake_out = self.d(torch.cat([real, fake.detach()])).chunk(2)
        d_loss = F.relu(1 - real_out).mean() + F.relu(1 + fake_out).mean()
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        g_loss = -self.d(fake).mean()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        with torch.no_grad():
            self.updates += 1
            decay = min(self.cfg.ema_decay, (1 + self.updates) / (10 + self.updates))
            for ema_p, p in zip(self.ema.parameters(), self.g.parameters(), strict=True):
                ema_p.lerp_(p, 1 - decay)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}


class PlainVAE:
    def __init__(self, cfg, device, shape):
        self.cfg = cfg
        self.vae = VAE(cfg.latent_dim, cfg.width, 0, image_shape=shape, decoder_blocks=cfg.decoder_blocks).to(device)
        self.opt = torch.optim.Adam(self.vae.parameters(), lr=cfg.lr)

    def step(self, images, labels, noise):
        x = images.float() / 255
        logits, mu, logvar = self.vae(x, generator=noise)
        loss = negative_elbo(logits, x, mu, logvar, self.cfg.beta)[0].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach()}


def plain(cfg: Config, kind, device, images, labels, steps, warmup) -> float:
    section = getattr(cfg, kind)
    torch.manual_seed(0)
    model = {"gan": PlainGAN, "vae": PlainVAE}[kind](section, device, tuple(images.shape[1:]))
    dataset = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels).long())
    loader = DataLoader(dataset, batch_size=section.batch_size, shuffle=True, drop_last=True,
                        num_workers=2 if device.type == "cuda" else 0, pin_memory=device.type == "cuda",
                        persistent_workers=device.type == "cuda")
    noise = torch.Generator(device=device).manual_seed(0)
    batches = itertools.chain.from_iterable(loader for _ in itertools.count())
    start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x, y = next(batches)
        model.step(x.to(device, non_blocking=True), y.to(device, non_blocking=True), noise)
    sync(device)
    return steps * section.batch_size / (time.perf_counter() - start)


def flops_per_image(cfg: Config, kind: str, shape=(1, 28, 28)) -> float:
    """Matrix and convolution FLOPs of one training step per image (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    n = 4
    torch.manual_seed(0)
    task = TASKS[kind](getattr(cfg, kind), 10, torch.device("cpu"), amp=False, channels_last=False, image_shape=shape)
    task.prepare_models(False, ddp=False)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        task.step(images, torch.arange(n) % 10, torch.Generator().manual_seed(0))
    return counter.get_total_flops() / n


def peak_tflops(device, amp: bool) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((p["bf16" if amp else "tf32"] for key, p in PEAK_TFLOPS.items() if key in name), None)


def row(device, profile, kind, variant, cfg, rate, base, warm, flops, n_images) -> dict:
    tflops = rate * flops / 1e12
    peak = peak_tflops(device, cfg.train.amp)
    return {"device": device.type, "profile": profile, "model": kind, "variant": variant,
            "batch": getattr(cfg, kind).batch_size, "ours": round(rate), "plain": round(base) if base else None,
            "ratio": round(rate / base, 2) if base else None, "epoch_s": round(n_images / rate, 2),
            "mflop_per_image": round(flops / 1e6, 1), "tflops": round(tflops, 2), "peak_pct": round(100 * tflops / peak, 1) if peak else None,
            "warmup_s": round(warm, 2)}


HEADER = (f"{'device':6} {'profile':8} {'model':5} {'variant':15} {'batch':>5} {'ours img/s':>10} {'plain':>8} "
          f"{'ratio':>5} {'epoch s':>7} {'TFLOP/s':>7} {'% peak':>6} {'warm s':>6}")


def show(r: dict) -> None:
    def fmt(value, spec):
        return format(value, spec) if value is not None else format("-", spec.rstrip(".0123456789f") or ">")

    print(f"{r['device']:6} {r['profile']:8} {r['model']:5} {r['variant']:15} {r['batch']:5d} {r['ours']:10d} "
          f"{fmt(r['plain'], '>8')} {fmt(r['ratio'], '>5.2f')} {r['epoch_s']:7.2f} {r['tflops']:7.2f} "
          f"{fmt(r['peak_pct'], '>6.1f')} {r['warmup_s']:6.2f}", flush=True)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 300 on CUDA, 60 on CPU)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--data", default="data/prepared/train.npz")
    parser.add_argument("--shape", help="C,H,W: time on 10,000 random images of this shape instead of --data "
                                        "(e.g. 3,32,32)")
    parser.add_argument("--devices", default=None, help="comma-separated, default: cpu and cuda when present")
    parser.add_argument("--profiles", default="default,gpu")
    parser.add_argument("--sweep", action="store_true", help="also time variants of ours (CUDA: gpu profile, CPU: default)")
    parser.add_argument("--compile", action="store_true", help="with --sweep: also time train.compile (slow warm-up)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.shape:
        shape = tuple(int(v) for v in args.shape.split(","))
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (10_000, *shape), dtype=np.uint8), np.arange(10_000) % 10
    else:
        images, labels = load_split(args.data)
    devices = [torch.device(d) for d in (args.devices.split(",") if args.devices else
                                         ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    print(f"torch {torch.__version__}, {gpu}, {torch.get_num_threads()} CPU threads")
    print(HEADER)
    rows = []
    profiles = {"default": {}, "gpu": GPU_PROFILE}
    for device in devices:
        for profile in args.profiles.split(","):
            base_cfg = with_overrides(Config(), {**profiles[profile], "train.compile": False})
            for kind in ("gan", "vae"):
                steps = args.steps or (300 if device.type == "cuda" else 60 if profile == "default" else 15)
                flops = flops_per_image(base_cfg, kind, tuple(images.shape[1:]))
                if device.type == "cuda":
                    tune_cuda()
                rate, warm, _ = ours(base_cfg, kind, device, images, labels, steps, args.warmup)
                with pytorch_defaults():
                    base = plain(base_cfg, kind, device, images, labels, steps, args.warmup)
                rows.append(row(device, profile, kind, "ours", base_cfg, rate, base, warm, flops, len(images)))
                show(rows[-1])
                if not args.sweep or profile != ("gpu" if device.type == "cuda" else "default"):
                    continue
                variants = dict(VARIANTS if device.type == "cuda" else CPU_VARIANTS)
                if kind == "gan" and device.type == "cuda":
                    variants["no spectral norm"] = {"gan.spectral_norm": False}
                if args.compile:
                    variants["compile"] = {"train.compile": True}
                for name, overrides in variants.items():
                    cfg = with_overrides(base_cfg, overrides)
                    try:
                        rate, warm, _ = ours(cfg, kind, device, images, labels, steps, args.warmup)
                    except Exception as exc:  # a variant that fails is reported, not fatal
                        print(f"{device.type:6} {profile:8} {kind:5} {name:15} failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:150] if str(exc) else ''}", flush=True)
                        continue
                    flops_v = flops_per_image(cfg, kind) if "gan.spectral_norm" in overrides else flops
                    rows.append(row(device, profile, kind, name, cfg, rate, base, warm, flops_v, len(images)))
                    show(rows[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "gpu": gpu, "rows": rows}, f, indent=1)
    record("train_throughput", list(COLUMNS.values()), table(rows),
           note=f"torch {torch.__version__}, {gpu}, {torch.get_num_threads()} CPU threads; {args.warmup} warm-up steps.")
    return rows


COLUMNS = {"device": "device", "profile": "profile", "model": "model", "variant": "variant", "batch": "batch",
           "ours": "ours img/s", "plain": "plain img/s", "ratio": "ratio", "epoch_s": "epoch s",
           "mflop_per_image": "MFLOP/img", "tflops": "TFLOP/s", "peak_pct": "% peak", "warmup_s": "warm-up s"}


def table(rows: list[dict]) -> list[list]:
    return [[f"{r[key]:,}" if key in ("ours", "plain") and r[key] is not None else r[key] for key in COLUMNS]
            for r in rows]


if __name__ == "__main__":
    main()
