"""The train-features stage: the domain feature network (models/features.py) trained on the train split.

Its penultimate layer is the space FID, KID and precision/recall are computed in (`embed`); its class
predictions give the mode-coverage metrics. The stage also stores the test split's features
(models/features/reference.npz) so evaluation never recomputes them.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imagegen.config import Config
from imagegen.data.arrays import DatasetInfo, as_nchw, load_split, read_info
from imagegen.data.integrity import require_validated
from imagegen.device import select_device
from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_dir, atomic_file, write_json
from imagegen.layout import PREPARED_DIR, experiment_name
from imagegen.models.description import ModelDescription
from imagegen.models.features import FeatureNet
from imagegen.models.io import load_model, save_model

log = logging.getLogger(__name__)

FEATURES_DIR = Path("models/features")
REFERENCE = "reference.npz"


@torch.no_grad()
def embed(net: FeatureNet, images: np.ndarray, device: torch.device | str = "cpu",
          batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 N x D, class probabilities float64 N x K) of uint8 N x C x H x W images
    (N x H x W: grey)."""
    from imagegen.evaluation.sampling import batch_size_for

    batch_size = batch_size or batch_size_for(device)
    net.eval()
    images = as_nchw(images)
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).to(device).float().div(255)
        h = net.body(x)
        feats.append(h.double().cpu())
        probs.append(torch.softmax(net.head(h), dim=1).double().cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


@dataclass(frozen=True)
class FeaturesResult:
    model_dir: Path
    metrics: dict


def run_train_features(cfg: Config, root: Path = Path(".")) -> FeaturesResult:
    fc = cfg.features
    require_validated(root, "train-features")
    device = select_device(cfg.train.device)
    info = read_info(root / PREPARED_DIR, cfg.data.dataset)
    train_images, train_labels = load_split(root / PREPARED_DIR / "train.npz", cfg.train.limit)
    test_images, test_labels = load_split(root / PREPARED_DIR / "test.npz")
    with tracked_run(cfg, root, device) as on_epoch:
        torch.manual_seed(cfg.train.seed)
        net = FeatureNet(fc.width, fc.feature_dim, info.num_classes, info.shape).to(device)
        history = fit(net, train_images, train_labels, test_images, test_labels, fc, cfg.train.seed, device, on_epoch)
        result = save_outputs(cfg, root, net, history, test_images, test_labels, device, info)
        on_epoch(None, result.metrics)
    return result


@contextlib.contextmanager
def tracked_run(cfg: Config, root: Path, device) -> Iterator[Callable[[dict | None, dict], None]]:
    """The stage's MLflow run (train.mlflow): params, the data, accuracy per epoch, the final metrics.
    Yields a callback: (epoch row, {}) after each epoch; (None, final metrics) at the end."""
    if not cfg.train.mlflow:
        yield lambda row, final: None
        return
    import mlflow

    from imagegen import dataset_input, lineage, tracking
    from imagegen.config import flat_section

    params = {"data.dataset": cfg.data.dataset, "train.seed": cfg.train.seed, "train.limit": cfg.train.limit,
              **flat_section("features", cfg.features)}
    tags = lineage.lineage_tags(root, params, str(device))
    with tracking.stage_run(root, experiment_name(cfg.data.dataset), "train-features", params, tags):
        dataset_input.log_dataset(root, cfg.data.dataset, "training", cfg.train.limit)

        def on_epoch(row: dict | None, final: dict) -> None:
            if row is not None:
                mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            else:
                tracking.log_summary(final, per_epoch={"loss", "test_accuracy"})
                mlflow.log_artifact(str(root / "plots" / "train-features.csv"))

        yield on_epoch


def save_outputs(cfg: Config, root: Path, net: FeatureNet, history: list[dict], test_images, test_labels,
                 device, info: DatasetInfo) -> FeaturesResult:
    fc = cfg.features

    test_features, test_probs = embed(net, test_images, device)
    accuracy = float((test_probs.argmax(1) == test_labels).mean())
    description = ModelDescription(
        "features", {"width": fc.width, "feature_dim": fc.feature_dim}, info.num_classes, info.classes,
        info.shape, dataset=cfg.data.dataset, parameters=sum(p.numel() for p in net.parameters()))
    with atomic_dir(root / FEATURES_DIR) as tmp:
        save_model(tmp, net, description)
        np.savez(tmp / REFERENCE, features=test_features.astype(np.float32), labels=test_labels)
    metrics = {"test_accuracy": round(accuracy, 5), "epochs": fc.epochs,
               "train_minutes": round(sum(r["seconds"] for r in history) / 60, 2),
               "parameters": description.parameters, "device": str(device)}
    write_json(root / "metrics" / "features.json", metrics)
    write_rows(root / "plots" / "train-features.csv", history)
    log.info("train-features: test accuracy %.4f", accuracy)
    return FeaturesResult(root / FEATURES_DIR, metrics)


def fit(net, images, labels, test_images, test_labels, fc, seed, device, on_epoch=None) -> list[dict]:
    """Adam with a cosine schedule; random horizontal flips (clothes are left-right symmetric)."""
    x_all = torch.from_numpy(as_nchw(images)).to(device)
    y_all = torch.from_numpy(labels.astype(np.int64)).to(device)
    steps = len(x_all) // fc.batch_size
    optimizer = torch.optim.Adam(net.parameters(), lr=fc.lr, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, fc.lr, total_steps=fc.epochs * steps)
    order_gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, fc.epochs + 1):
        started, total = time.perf_counter(), torch.zeros((), device=device)
        net.train()
        order = torch.randperm(len(x_all), generator=order_gen).to(device)
        # The epoch's flips in one draw (the same numbers as a draw per step) and one copy: a copy
        # from the CPU in every step would make the host wait for the GPU in every step.
        flips = (torch.rand(steps, fc.batch_size, generator=order_gen) < 0.5).to(device)
        for step in range(steps):
            index = order[step * fc.batch_size:(step + 1) * fc.batch_size]
            x = x_all[index].float().div(255)
            x = torch.where(flips[step][:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(net(x), y_all[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach()
        _, probs = embed(net, test_images, device)
        accuracy = float((probs.argmax(1) == test_labels).mean())
        row = {"epoch": epoch, "loss": round(float(total) / steps, 5), "test_accuracy": round(accuracy, 5),
               "seconds": round(time.perf_counter() - started, 2)}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row, {})
        log.info("train-features: epoch %d/%d loss=%.4f test_accuracy=%.4f (%.1f s)", epoch, fc.epochs,
                 row["loss"], accuracy, row["seconds"])
    return history


def write_rows(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def load_features(root: Path = Path("."), device: torch.device | str = "cpu"
                  ) -> tuple[FeatureNet, ModelDescription, dict]:
    """The trained feature net, its description, and the stored test-split reference (features, labels)."""
    net, description = load_model(root / FEATURES_DIR, device)
    path = root / FEATURES_DIR / REFERENCE
    try:
        with np.load(path, allow_pickle=False) as ref:
            reference = {"features": ref["features"].astype(np.float64), "labels": ref["labels"]}
    except (OSError, ValueError, KeyError) as exc:
        raise ImagegenError(f"{path}: unreadable test-split features ({exc}); re-run the train-features stage") from None
    return net, description, reference
