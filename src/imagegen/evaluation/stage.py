"""The evaluate stage: sample each trained model, score the samples against the test split,
add the VAE's likelihood numbers, draw the pictures; metrics/evaluate.json + an MLflow run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imagegen.config import MIN_EVAL_SAMPLES, Config, flat_section
from imagegen.data.prepare import PREPARED_DIR
from imagegen.errors import ImagegenError
from imagegen.evaluation import metrics as m
from imagegen.evaluation.features import FeatureNet, embed, load_features
from imagegen.evaluation.pictures import draw_pictures
from imagegen.evaluation.sampling import generate
from imagegen.evaluation.vae_metrics import vae_test_metrics
from imagegen.fsutil import atomic_dir, write_json
from imagegen.models.io import load_model
from imagegen.training.data import load_split
from imagegen.training.runtime import select_device

log = logging.getLogger(__name__)

KINDS = ("gan", "vae")
REPORTS = Path("reports/evaluate")
METRICS = Path("metrics/evaluate.json")


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict


def run_evaluate(cfg: Config, root: Path = Path(".")) -> EvaluateResult:
    started = time.perf_counter()
    device = select_device(cfg.train.device)
    net, features_meta, reference = load_features(root, device)
    test_images, test_labels = load_split(root / PREPARED_DIR / "test.npz")
    results: dict = {"reference": reference_metrics(cfg, root, net, reference, device)}
    with atomic_dir(root / REPORTS) as pictures_dir:
        for kind in KINDS:
            module, meta = load_model(root / "models" / kind, device)
            samples = generate(module, meta, cfg.eval.n_samples, cfg.eval.seed, device=device)
            scores = sample_metrics(cfg, root, samples, net, reference, device)
            if meta["num_classes"]:
                scores["class_accuracy"] = conditional_accuracy(module, meta, net, cfg, device)
            if kind == "vae":
                n = cfg.eval.iwae_images or len(test_images)
                scores.update(vae_test_metrics(module, test_images[:n], test_labels[:n], cfg.eval.iwae_k,
                                               cfg.eval.seed, device=device))
                scores["iwae_k"] = cfg.eval.iwae_k
            results[kind] = rounded(scores)
            log.info("evaluate %s: %s", kind, results[kind])
            draw_pictures(pictures_dir, kind, module, meta, samples, (test_images, test_labels), cfg.eval.seed,
                          device)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_json(root / METRICS, results)
    if cfg.train.mlflow:
        log_to_mlflow(cfg, root, results)
    return EvaluateResult(results)


def sample_metrics(cfg: Config, root: Path, samples: np.ndarray, net: FeatureNet, reference: dict,
                   device: torch.device | str = "cpu") -> dict:
    """FID, KID, precision/recall and class coverage of uint8 samples against the test split."""
    features, probs = embed(net, samples, device)
    ref = reference["features"]
    kid_mean, kid_std = m.kid(features, ref, cfg.eval.kid_subsets, cfg.eval.kid_subset_size, cfg.eval.seed)
    precision, recall = m.precision_recall(features, ref, cfg.eval.pr_k)
    scores = {"fid": m.fid(features, ref), "kid_mean": kid_mean, "kid_std": kid_std,
              "precision": precision, "recall": recall, **m.class_coverage(probs), "n_samples": len(samples)}
    inception = inception_fid(cfg, root, samples, device)
    if inception is not None:
        scores["fid_inception"] = inception
    return scores


def reference_metrics(cfg: Config, root: Path, net: FeatureNet, reference: dict, device) -> dict:
    """What a perfect generator would score: train images (as many as the samples) vs the test split."""
    train_images, _ = load_split(root / PREPARED_DIR / "train.npz")
    subset = train_images[np.random.default_rng(cfg.eval.seed).permutation(len(train_images))[:cfg.eval.n_samples]]
    features, _ = embed(net, subset, device)
    return {"fid_train_vs_test": round(m.fid(features, reference["features"]), 4), "n_samples": len(subset)}


def conditional_accuracy(module, meta: dict, net: FeatureNet, cfg: Config, device) -> dict[str, float]:
    """Per class: the share of samples conditioned on it that the feature net assigns to it."""
    per_class = max(cfg.eval.n_samples // meta["num_classes"], 1)
    accuracy = {}
    for label, name in enumerate(meta["classes"]):
        samples = generate(module, meta, per_class, cfg.eval.seed + 1 + label, label, device)
        _, probs = embed(net, samples, device)
        accuracy[name] = float((probs.argmax(1) == label).mean())
    accuracy["mean"] = float(np.mean(list(accuracy.values())))
    return accuracy


def inception_fid(cfg: Config, root: Path, samples: np.ndarray, device) -> float | None:
    """The standard FID (pt_inception-2015-12-05), when its weights file is configured and present."""
    path = cfg.eval.inception_weights
    if not path:
        log.info("evaluate: standard Inception FID not computed (eval.inception_weights is not set)")
        return None
    if not Path(path).is_file():
        log.warning("evaluate: standard Inception FID skipped: eval.inception_weights %s does not exist", path)
        return None
    from imagegen.evaluation.inception import inception_fid_against_test

    test_images, _ = load_split(root / PREPARED_DIR / "test.npz")
    return inception_fid_against_test(Path(path), samples, test_images, device)


def rounded(scores: dict) -> dict:
    return {k: rounded(v) if isinstance(v, dict) else round(v, 5) if isinstance(v, float) else v
            for k, v in scores.items()}


def load_samples(path: Path) -> np.ndarray:
    """A user's samples file as uint8 N x 28 x 28, or a one-line error naming what is wrong."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ImagegenError(f"{path}: file not found") from None
    except (ValueError, OSError) as exc:
        raise ImagegenError(f"{path}: not a readable .npy array ({exc})") from None
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        raise ImagegenError(f"{path}: shape {array.shape}, expected N x 28 x 28 (or N x 1 x 28 x 28)")
    if len(array) < MIN_EVAL_SAMPLES:
        raise ImagegenError(f"{path}: {len(array)} samples, expected at least {MIN_EVAL_SAMPLES}")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ImagegenError(f"{path}: dtype {array.dtype}, expected uint8 (0..255) or float (0..1)")
    if not np.isfinite(array).all():
        raise ImagegenError(f"{path}: {int((~np.isfinite(array)).sum())} values are NaN or infinite")
    if array.min() < 0 or array.max() > 1:
        raise ImagegenError(f"{path}: float values span {array.min():.3g}..{array.max():.3g}, expected 0..1")
    return (array * 255).round().astype(np.uint8)


def score_samples_file(cfg: Config, root: Path, path: Path) -> dict:
    """`imagegen evaluate --samples FILE.npy`: any generator's samples, scored like ours."""
    samples = load_samples(path)
    device = select_device(cfg.train.device)
    net, _, reference = load_features(root, device)
    return rounded(sample_metrics(cfg, root, samples, net, reference, device))


def log_to_mlflow(cfg: Config, root: Path, results: dict) -> None:
    import mlflow

    from imagegen import tracking

    params = flat_section("eval", cfg.eval)
    tags = tracking.lineage_tags(root, params, str(select_device(cfg.train.device)))
    with tracking.stage_run(root, f"imagegen-{cfg.data.dataset}", "evaluate", params, tags):
        mlflow.log_metrics({name: value for name, value in tracking.flatten(results, "/").items()
                            if isinstance(value, (int, float))})
        mlflow.log_artifacts(str(root / REPORTS), artifact_path="evaluate")
        mlflow.log_artifact(str(root / METRICS))

