"""The training loop shared by the GAN and the VAE: epochs, checkpoints, resume, NaN guard.

It reports through a `TrainingLogger` (no MLflow import here), so it runs on a bare GPU box.
Checkpoints hold models, optimisers, EMA, the epoch and the step within it, the per-epoch history
and the running loss sums of the current epoch; the data order is drawn from (seed, epoch) and the
noise from (seed, rank, epoch, step), so a resumed CPU run finishes with the same weights, history
and step count as an uninterrupted one. A kill during a checkpoint write leaves a temporary file:
the next run removes it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_file, remove_partials
from imagegen.training.data import DeviceBatches
from imagegen.training.runtime import Runtime
from imagegen.training.tasks import Task

log = logging.getLogger(__name__)


class TrainingLogger:
    """Callbacks the loop calls on the main process; the default does nothing."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], samples: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    seed: int
    checkpoint_path: Path
    checkpoint_every: int  # steps
    fingerprint: str  # a checkpoint is resumed only when this matches
    resume: bool = True
    grid_size: int = 64
    check_every: int = 50  # steps between finiteness checks (each one syncs the device)
    run_info: dict = field(default_factory=dict)  # kept in every checkpoint (e.g. the MLflow run id)
    # Epochs between the loggers' epoch-end work (sample grid, best-epoch probe, MLflow): a small folder runs
    # many short epochs for its budget in images, and is reported about as often as Fashion-MNIST
    # (report_every()); a run of a set number of epochs reports each.
    report_every: int = 1

    def reports(self, epoch: int) -> bool:
        """Whether the end of `epoch` (1-based) is reported: every report_every-th, and the last."""
        return epoch % self.report_every == 0 or epoch == self.epochs


REPORT_IMAGES = 60_000  # about one report per this many images seen (one epoch of Fashion-MNIST)


def report_every(images_per_epoch: int) -> int:
    return max(1, round(REPORT_IMAGES / images_per_epoch))


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None  # global step
    steps: int = 0  # global step at the end: the same for a resumed run as for an uninterrupted one
    seconds: float = 0.0  # this process only (throughput)
    images: int = 0  # this process only


def train(task: Task, data: DeviceBatches, cfg: LoopConfig, runtime: Runtime,
          logger: TrainingLogger | None = None, state: dict | None | str = "read") -> History:
    """`state`: the checkpoint to resume from as load_checkpoint returned it (None: start afresh);
    by default the loop reads cfg.checkpoint_path itself when cfg.resume."""
    logger = logger or TrainingLogger()
    noise = torch.Generator(device=runtime.device)
    fixed_z, fixed_labels = fixed_inputs(task, cfg, runtime.device)
    history = History()
    epoch, step_in_epoch = 0, 0
    if runtime.is_main:
        remove_partials(cfg.checkpoint_path.parent)  # left by a kill during a checkpoint write
    if isinstance(state, str):  # not given: rank 0 reads it
        state = load_checkpoint(cfg) if cfg.resume and runtime.is_main else None
    state = shared_checkpoint(state, runtime)
    sums: dict[str, torch.Tensor] = {}
    summed = 0  # steps of the current epoch in `sums`
    if state is not None:
        task.load_state_dict(state["task"])
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        history.epochs = state["history"]
        history.resumed_from = history.steps = epoch * data.steps_per_epoch + step_in_epoch
        if "sums" in state:  # the epoch's losses so far, so that its mean is the uninterrupted run's
            sums = {k: v.to(runtime.device) for k, v in state["sums"].items()}
            summed = step_in_epoch
        log.info("%s: resuming from %s at epoch %d, step %d", task.kind, cfg.checkpoint_path, epoch + 1, step_in_epoch)

    started = time.perf_counter()
    while epoch < cfg.epochs:
        epoch_start, done = time.perf_counter(), 0
        bar = progress(task.kind, epoch, cfg.epochs, data, step_in_epoch, runtime)
        for images, labels in data.epoch(epoch, step_in_epoch):
            # Noise seeded per (rank, step): a resumed or distributed run needs no generator state.
            noise.manual_seed(hash((cfg.seed, runtime.rank, epoch, step_in_epoch)) & 0xFFFF_FFFF_FFFF)
            losses = task.step(images, labels, noise)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v
            step_in_epoch += 1
            done += 1
            summed += 1
            if step_in_epoch % cfg.check_every == 0 or step_in_epoch % cfg.checkpoint_every == 0:
                means = check_finite(task, sums, summed, epoch, step_in_epoch, cfg)
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)
            if step_in_epoch % cfg.checkpoint_every == 0 and runtime.is_main:
                save_checkpoint(task, epoch, step_in_epoch, history, cfg, sums)
            bar.update(len(images))
        bar.close()
        seconds = time.perf_counter() - epoch_start
        means = check_finite(task, sums, summed, epoch, step_in_epoch, cfg) if summed else {}
        images_per_s = done * data.batch_size * runtime.world_size / seconds if done else 0.0
        history.steps += done
        history.images += done * data.batch_size * runtime.world_size
        epoch += 1
        step_in_epoch = 0
        sums, summed = {}, 0
        row = {"epoch": epoch, **means, "images_per_s": round(images_per_s, 1), "seconds": round(seconds, 2)}
        history.epochs.append(row)
        if runtime.is_main:
            log.info("%s: epoch %d/%d %s", task.kind, epoch, cfg.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
            if cfg.reports(epoch):
                logger.on_epoch_end(epoch, row, task.sample(fixed_z, fixed_labels))
            save_checkpoint(task, epoch, 0, history, cfg)
    history.seconds = time.perf_counter() - started
    return history


def fixed_inputs(task: Task, cfg: LoopConfig, device: torch.device):
    """The same latents every epoch, so the sample grids show progress; one row per class if conditional."""
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    z = torch.randn(cfg.grid_size, task.cfg.latent_dim, generator=gen).to(device)
    if not task.num_classes:
        return z, None
    labels = torch.arange(cfg.grid_size) * task.num_classes // cfg.grid_size
    return z, labels.to(device)


def check_finite(task, sums, count, epoch, step_in_epoch, cfg) -> dict[str, float]:
    means = {k: float(v) / count for k, v in sums.items()}
    bad = {k: v for k, v in means.items() if not math.isfinite(v)}
    if bad:
        kept = cfg.checkpoint_path if cfg.checkpoint_path.exists() else "none yet"
        raise ImagegenError(
            f"train-{task.kind}: non-finite loss in epoch {epoch + 1} by step {step_in_epoch} "
            f"({', '.join(f'{k}={v}' for k, v in bad.items())}); last good checkpoint: {kept}. "
            "Lower the learning rate or check the data"
        )
    return means


def progress(kind, epoch, epochs, data: DeviceBatches, start_step, runtime):
    """A bar per epoch counting images (so its rate is images/s), losses as its postfix."""
    from tqdm import tqdm

    return tqdm(total=data.steps_per_epoch * data.batch_size, initial=start_step * data.batch_size,
                desc=f"{kind} epoch {epoch + 1}/{epochs}", unit="img", unit_scale=True,
                disable=None if runtime.is_main else True, leave=False, dynamic_ncols=True)


def save_checkpoint(task, epoch, step_in_epoch, history, cfg: LoopConfig, sums: dict | None = None) -> None:
    state = {
        "fingerprint": cfg.fingerprint,
        "task": task.state_dict(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "history": history.epochs,
        "sums": {k: v.detach().cpu() for k, v in (sums or {}).items()},
        "run": dict(cfg.run_info),
    }
    with atomic_file(cfg.checkpoint_path) as tmp:
        torch.save(state, tmp)


def shared_checkpoint(state: dict | None, runtime: Runtime) -> dict | None:
    """Rank 0's checkpoint goes to the other ranks: rank 0 alone writes checkpoints, so on other
    nodes there is none (or a stale one), and every rank must resume the same state."""
    if runtime.distributed:
        import torch.distributed as dist

        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    return state


def load_checkpoint(cfg: LoopConfig) -> dict | None:
    if not cfg.checkpoint_path.exists():
        return None
    try:
        state = torch.load(cfg.checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file is not worth failing over: start afresh
        from imagegen.models.io import describe_load_error

        log.warning("ignoring checkpoint %s: %s; starting afresh", cfg.checkpoint_path, describe_load_error(exc))
        return None
    if state.get("fingerprint") != cfg.fingerprint:
        log.info("checkpoint %s is for other params or data; starting afresh", cfg.checkpoint_path)
        return None
    return state
