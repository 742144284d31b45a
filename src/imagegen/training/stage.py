"""The train-gan / train-vae stages: data -> loop -> weights, metrics, curves, sample grids, MLflow.

Until a run finishes, everything it has made lives with its checkpoint (checkpoints/<kind>/:
last.pt with the weights, history and step, and samples/ with the per-epoch grids), so that a
killed and resumed run (DVC deletes a stage's outputs before running it) ends with the same
outputs as an uninterrupted one. The outputs (models/<kind>, reports/<kind>, metrics, plots)
are written at the end, each whole (temp + rename).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from imagegen.config import Config, model_params
from imagegen.data.arrays import DatasetInfo, load_split, read_info
from imagegen.data.integrity import require_validated
from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_dir, atomic_file, remove_partials, sha256_file, write_json
from imagegen.layout import PREPARED_DIR, experiment_name
from imagegen.models.description import ModelDescription
from imagegen.models.io import WEIGHTS, save_model
from imagegen.training.data import DeviceBatches
from imagegen.training.loop import History, LoopConfig, TrainingLogger, load_checkpoint, report_every, train
from imagegen.training.runtime import Runtime, setup_runtime, teardown_runtime
from imagegen.training.tasks import GANTask, Task, VAETask
from imagegen.training.warm import epochs as warm_epochs
from imagegen.training.warm import warm_start

log = logging.getLogger(__name__)

TASKS = {"gan": GANTask, "vae": VAETask}
GRID_SCALE = 3  # sample grid tiles enlarged x3 (nearest neighbour): 28-pixel tiles are too small to judge
# The params a model folder's description keeps (those a section has), to rebuild the model.
ARCH_KEYS = ("latent_dim", "width", "kernel_size", "decoder_blocks", "prior", "prior_components", "prior_width")


@dataclass(frozen=True)
class TrainResult:
    kind: str
    model_dir: Path
    metrics: dict


def paths(root: Path, kind: str) -> dict[str, Path]:
    return {
        "model": root / "models" / kind,
        "metrics": root / "metrics" / f"train-{kind}.json",
        "plot": root / "plots" / f"train-{kind}.csv",
        "samples": root / "reports" / kind,
        "checkpoint": root / "checkpoints" / kind / "last.pt",
        "staged_samples": root / "checkpoints" / kind / "samples",  # the grids, until the run finishes
    }


def run_train(cfg: Config, kind: str, root: Path = Path(".")) -> TrainResult:
    section = getattr(cfg, kind)
    if cfg.train.mlflow:
        from imagegen import tracking

        tracking.check_store(root)  # before anything slow: a store that is down fails the stage in seconds
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    runtime = setup_runtime(cfg.train.device)
    try:
        require_validated(root, f"train-{kind}", ("train",))
        info = read_info(root / PREPARED_DIR, cfg.data.dataset)
        train_file = root / PREPARED_DIR / "train.npz"
        images, labels = load_split(train_file, cfg.train.limit)
        if images.shape[1:] != info.shape:
            raise ImagegenError(f"{train_file}: images are {' x '.join(map(str, images.shape[1:]))}, but "
                                f"{PREPARED_DIR}/dataset.json says {' x '.join(map(str, info.shape))}; "
                                "run the prepare stage again")
        torch.manual_seed(cfg.train.seed)
        task = TASKS[kind](section, info.num_classes, runtime.device, cfg.train.amp, cfg.train.channels_last,
                           info.shape)
        task.init_info = warm_start(cfg, kind, task, root)  # every rank: they must agree on the epochs
        task.prepare_models(cfg.train.compile, runtime.distributed, cfg.train.cuda_graphs)
        data = DeviceBatches(images, labels, section.batch_size, runtime.device, cfg.train.seed,
                             runtime.rank, runtime.world_size)
        out = paths(root, kind)
        params = model_params(cfg, kind)
        if cfg.train.init_from == "champion":  # a checkpoint resumes only from the same starting weights
            params.update({f"warm.{k}": v for k, v in task.init_info.items()})
        probe = BestByFid.create(task, root, images, cfg.train.seed) if runtime.is_main and task.keeps_best else None
        loop_cfg = LoopConfig(
            epochs=warm_epochs(cfg, kind, task.init_info, data.images_per_epoch), seed=cfg.train.seed, checkpoint_path=out["checkpoint"],
            checkpoint_every=cfg.train.checkpoint_every, resume=cfg.train.resume,
            fingerprint=fingerprint(kind, params, train_file, runtime.world_size, probe),
            report_every=1 if section.epochs else report_every(data.images_per_epoch),  # epochs set: each one
        )
        if not runtime.is_main:
            train(task, data, loop_cfg, runtime)
            return TrainResult(kind, out["model"], {})
        log.info("train-%s: %d images, %d steps/epoch, %d epochs on %s%s", kind, len(images), data.steps_per_epoch,
                 loop_cfg.epochs, runtime.device, f" x {runtime.world_size}" if runtime.distributed else "")
        state = load_checkpoint(loop_cfg) if loop_cfg.resume else None
        grids = GridWriter(out["staged_samples"], keep_through=state["epoch"] if state else 0)
        if not cfg.train.mlflow:
            history = train(task, data, loop_cfg, runtime, Chain(probe, grids), state)
            return finish(task, history, cfg, kind, runtime, out, data, info, loop_cfg)
        from imagegen import dataset_input, lineage, tracking

        tags = lineage.lineage_tags(root, params, str(runtime.device))
        previous_run = (state or {}).get("run", {}).get("mlflow_run_id")
        with tracking.stage_run(root, experiment_name(cfg.data.dataset), f"train-{kind}", params, tags,
                                system_metrics=cfg.train.system_metrics, resume_run_id=previous_run) as run:
            dataset_input.log_dataset(root, cfg.data.dataset, "training", cfg.train.limit)
            loop_cfg = replace(loop_cfg, run_info={"mlflow_run_id": run.info.run_id})
            history = train(task, data, loop_cfg, runtime, Chain(probe, grids, MlflowLogger(grids)), state)
            result = finish(task, history, cfg, kind, runtime, out, data, info, loop_cfg)
            log_outputs(result, out)
        return result
    finally:
        teardown_runtime(runtime)
        torch.set_num_threads(threads)


def fingerprint(kind: str, params: dict, train_file: Path, world_size: int, probe: BestByFid | None = None) -> str:
    """What a checkpoint must match to be resumed: params (but not resume itself), data, world size,
    and the feature net that scores the epochs."""
    digest = sha256_file(train_file)
    ignored = ("train.resume", "train.mlflow", "train.threads", "train.system_metrics")
    relevant = {k: v for k, v in params.items() if k not in ignored}
    blob = json.dumps([kind, relevant, digest, world_size, probe.identity if probe else None], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class GridWriter(TrainingLogger):
    """samples-epoch-NNN.png in the staging folder beside the checkpoint, each written atomically.

    Grids of epochs after `keep_through` (the checkpoint's epoch; 0 for a fresh run) are removed
    first: they belong to another run or will be drawn again."""

    def __init__(self, folder: Path, keep_through: int = 0):
        self.folder = folder
        self.last: Path | None = None
        remove_partials(folder)
        for grid in staged_grids(folder):
            if grid_epoch(grid) > keep_through:
                grid.unlink()

    def on_epoch_end(self, epoch, metrics, samples):
        from imagegen.evaluation.sampling import png_grid, to_uint8

        self.last = self.folder / f"samples-epoch-{epoch:03d}.png"
        with atomic_file(self.last) as tmp:  # the loop's fixed latents: 8 x 8 tiles, each x3 to be readable
            tmp.write_bytes(png_grid(to_uint8(samples.float()), nrow=8, scale=GRID_SCALE))


class Chain(TrainingLogger):
    """Calls each logger in turn (None entries are skipped)."""

    def __init__(self, *loggers: TrainingLogger | None):
        self.loggers = [logger for logger in loggers if logger is not None]

    def on_epoch_end(self, epoch, metrics, samples):
        for logger in self.loggers:
            logger.on_epoch_end(epoch, metrics, samples)


class BestByFid(TrainingLogger):
    """Scores the EMA generator after every epoch (FID of a few thousand samples in the domain
    feature space) and has the task keep the best epoch's weights: GAN quality can peak and then
    degrade. The reference is the train split: choosing on the test split would bias evaluation."""

    def __init__(self, task: GANTask, net, reference, identity: str, n: int = 2000):
        self.task, self.net, self.reference, self.identity, self.n = task, net, reference, identity, n

    @classmethod
    def create(cls, task: GANTask, root: Path, images, seed: int) -> BestByFid | None:
        from imagegen.evaluation.features import FEATURES_DIR, embed

        folder = root / FEATURES_DIR
        if not (folder / WEIGHTS).exists():
            log.warning("train-gan: no %s (train-features stage): keeping the last epoch, not the best", folder)
            return None
        from imagegen.models.io import load_model

        net, description = load_model(folder, task.device)
        if description.image_shape != task.image_shape:
            log.warning("train-gan: %s scores %s images, not this data's: keeping the last epoch, not the best "
                        "(run the train-features stage)", folder, description.shape_text)
            return None
        picked = np.random.default_rng(seed).permutation(len(images))[:10_000]
        reference = embed(net, images[picked], task.device)[0]
        return cls(task, net, reference, sha256_file(folder / WEIGHTS))

    def on_epoch_end(self, epoch, metrics, samples):
        from imagegen.evaluation.features import embed
        from imagegen.evaluation.metrics import fid
        from imagegen.evaluation.sampling import generate

        description = ModelDescription("gan", {"latent_dim": self.task.cfg.latent_dim}, self.task.num_classes,
                                       image_shape=self.task.image_shape)
        images = generate(self.task.ema, description, self.n, seed=epoch, device=self.task.device)
        metrics["fid_probe"] = round(fid(embed(self.net, images, self.task.device)[0], self.reference), 4)
        self.task.keep_if_best(epoch, metrics["fid_probe"])


# MLflow names of per-epoch metrics: MLflow's chart tab puts the metrics of one prefix in one section,
# so a model's losses are side by side (the plots CSV keeps the plain names).
EPOCH_METRICS = {"d_loss": "loss/d", "g_loss": "loss/g", "loss": "loss/total", "recon": "loss/recon", "kl": "loss/kl"}


class MlflowLogger(TrainingLogger):
    def __init__(self, grids: GridWriter):
        self.grids = grids

    def on_epoch_end(self, epoch, metrics, samples):
        import mlflow

        mlflow.log_metrics({EPOCH_METRICS.get(k, k): float(v) for k, v in metrics.items() if k != "epoch"}, step=epoch)
        mlflow.log_artifact(str(self.grids.last), artifact_path="samples")


def finish(task: Task, history: History, cfg: Config, kind: str, runtime: Runtime, out: dict,
           data: DeviceBatches, info: DatasetInfo, loop_cfg: LoopConfig) -> TrainResult:
    section = getattr(cfg, kind)
    fitted = task.finalize(data)
    module = task.export()
    description = ModelDescription(
        kind, {k: getattr(section, k) for k in ARCH_KEYS if hasattr(section, k)}, task.num_classes, info.classes,
        info.shape, dataset=cfg.data.dataset, parameters=sum(p.numel() for p in module.parameters()))
    with atomic_dir(out["model"]) as tmp:
        save_model(tmp, module, description)
    publish_grids(out["staged_samples"], out["samples"],
                  [e for e in range(1, len(history.epochs) + 1) if loop_cfg.reports(e)])
    last = history.epochs[-1] if history.epochs else {}
    metrics = {
        **{k: round(v, 5) for k, v in last.items() if k not in ("epoch", "seconds", "images_per_s")},
        "epochs": len(history.epochs),
        "steps": history.steps,
        "images_per_s": round(history.images / history.seconds, 1) if history.seconds else None,
        "train_minutes": round(history.seconds / 60, 2),
        "resumed_from_step": history.resumed_from,
        "device": str(runtime.device),
        "world_size": runtime.world_size,
        "parameters": description.parameters,
    }
    metrics.update(fitted)
    metrics.update(getattr(task, "init_info", {}))  # warm start: from which champion, if any
    if getattr(task, "best", None):
        metrics.update(best_epoch=task.best["epoch"], best_fid_probe=task.best["score"])
    write_json(out["metrics"], metrics)
    write_plot(out["plot"], history.epochs)
    log.info("train-%s: done: %s", kind, metrics)
    return TrainResult(kind, out["model"], metrics)


def staged_grids(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("samples-epoch-*.png") if grid_epoch(p))


def grid_epoch(path: Path) -> int:
    match = re.fullmatch(r"samples-epoch-(\d+)\.png", path.name)
    return int(match.group(1)) if match else 0


def publish_grids(staged: Path, folder: Path, epochs: list[int]) -> None:
    """reports/<kind>: the staged grids of the reported `epochs`, replacing the folder whole."""
    grids = staged_grids(staged)
    missing = sorted(set(epochs) - {grid_epoch(g) for g in grids})
    if missing:  # e.g. a checkpoint written before grids were kept with it
        log.warning("%s: no sample grid for epoch(s) %s", folder, ", ".join(map(str, missing)))
    with atomic_dir(folder) as tmp:
        for grid in grids:
            shutil.copyfile(grid, tmp / grid.name)


def write_plot(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def log_outputs(result: TrainResult, out: dict) -> None:
    import mlflow

    from imagegen import tracking

    tracking.log_summary(result.metrics, per_epoch=EPOCH_METRICS.keys() | {"d_real", "d_fake", "fid_probe"})
    # The register stage finds the run that trained a model by this tag.
    mlflow.set_tag("weights_sha256", sha256_file(out["model"] / WEIGHTS))
    mlflow.log_artifacts(str(out["model"]), artifact_path="model")
    mlflow.log_artifact(str(out["plot"]))
