"""The evaluate stage: sample each trained model, score the samples against the test split,
add the VAE's likelihood numbers, draw the pictures; metrics/evaluate.json + an MLflow run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from imagegen.config import MIN_EVAL_SAMPLES, Config, flat_section
from imagegen.data.arrays import load_split
from imagegen.data.integrity import require_validated
from imagegen.device import select_device
from imagegen.errors import ImagegenError
from imagegen.evaluation import metrics as m
from imagegen.evaluation.features import FEATURES_DIR, embed, load_features
from imagegen.evaluation.pictures import SIDE_BY_SIDE, draw_pictures, side_by_side
from imagegen.evaluation.sampling import generate
from imagegen.evaluation.vae_metrics import vae_test_metrics
from imagegen.fsutil import atomic_dir, sha256_file, write_json
from imagegen.layout import PREPARED_DIR, experiment_name
from imagegen.models.description import ModelDescription
from imagegen.models.features import FeatureNet
from imagegen.models.io import WEIGHTS, load_model, read_description
from imagegen.models.kinds import GENERATORS, kind_of

if TYPE_CHECKING:
    from imagegen.evaluation.inception import InceptionFID

log = logging.getLogger(__name__)

REPORTS = Path("reports/evaluate")
METRICS = Path("metrics/evaluate.json")


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict


def run_evaluate(cfg: Config, root: Path = Path(".")) -> EvaluateResult:
    with tracked_run(cfg, root) as tracked:  # the MLflow run spans the whole stage
        results = evaluate_models(cfg, root)
        if tracked:
            log_results(root, results)
    return EvaluateResult(results)


def evaluate_models(cfg: Config, root: Path) -> dict:
    started = time.perf_counter()
    if cfg.train.mlflow:
        from imagegen import tracking

        tracking.check_store(root)  # now, not after minutes of evaluation
    require_validated(root, "evaluate")
    scorer = Scorer.load(cfg, root, select_device(cfg.train.device))
    test_images, test_labels = load_split(root / PREPARED_DIR / "test.npz")
    results: dict = {"reference": reference_metrics(cfg, root, scorer)}
    grids = {}
    with atomic_dir(root / REPORTS) as pictures_dir:
        for kind in GENERATORS:
            module, description = load_model(root / "models" / kind, scorer.device)
            scorer.check_shape(description, root / "models" / kind)
            samples = generate(module, description, cfg.eval.n_samples, cfg.eval.seed, device=scorer.device)
            scores = scorer.score(samples)
            if description.num_classes:
                scores["class_accuracy"] = conditional_accuracy(module, description, scorer, cfg)
            if kind_of(description).reconstructs:
                n = cfg.eval.iwae_images or len(test_images)
                scores.update(vae_test_metrics(module, test_images[:n], test_labels[:n], cfg.eval.iwae_k,
                                               cfg.eval.seed, device=scorer.device))
                scores["iwae_k"] = cfg.eval.iwae_k
            results[kind] = rounded(scores)
            log.info("evaluate %s: %s", kind, results[kind])
            draw_pictures(pictures_dir, module, description, samples, (test_images, test_labels), cfg.eval.seed,
                          scorer.device)
            grids[kind.upper()] = samples[:64]
        side_by_side(pictures_dir / SIDE_BY_SIDE, grids)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_json(root / METRICS, results)
    return results


@dataclass
class Scorer:
    """Scores uint8 samples against the test split; the reference features are computed once."""

    cfg: Config
    net: FeatureNet
    description: ModelDescription  # the feature net's: the image shape every scored sample must have
    reference: np.ndarray  # the test split's domain features
    device: torch.device | str
    inception: InceptionFID | None = None

    @classmethod
    def load(cls, cfg: Config, root: Path, device: torch.device | str) -> Scorer:
        net, description, reference = load_features(root, device)
        return cls(cfg, net, description, reference["features"], device, load_inception(cfg, root, device))

    def check_shape(self, model: ModelDescription, folder: Path) -> None:
        if model.image_shape != self.description.image_shape:
            raise ImagegenError(f"{folder}: makes {model.shape_text} images, but the feature net in {FEATURES_DIR} "
                                f"scores {self.description.shape_text} ones; retrain one of them on today's data")

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return embed(self.net, images, self.device)

    def score(self, samples: np.ndarray) -> dict:
        """FID (and its bootstrap standard deviation), KID, precision/recall and class coverage (and the Inception FID when configured)."""
        features, probs = self.embed(samples)
        ev = self.cfg.eval
        kid_mean, kid_std = m.kid(features, self.reference, ev.kid_subsets, ev.kid_subset_size, ev.seed)
        precision, recall = m.precision_recall(features, self.reference, ev.pr_k)
        scores = {"fid": m.fid(features, self.reference),
                  "fid_std": m.fid_std(features, self.reference, ev.fid_bootstrap, ev.seed), "kid_mean": kid_mean, "kid_std": kid_std,
                  "precision": precision, "recall": recall, **m.class_coverage(probs), "n_samples": len(samples)}
        if self.inception is not None:
            scores["fid_inception"] = self.inception.fid(samples)
        return scores


def reference_metrics(cfg: Config, root: Path, scorer: Scorer) -> dict:
    """What a perfect generator would score: train images (as many as the samples) vs the test split."""
    train_images, _ = load_split(root / PREPARED_DIR / "train.npz")
    subset = train_images[np.random.default_rng(cfg.eval.seed).permutation(len(train_images))[:cfg.eval.n_samples]]
    features, _ = scorer.embed(subset)
    return {"fid_train_vs_test": round(m.fid(features, scorer.reference), 4), "n_samples": len(subset)}


def conditional_accuracy(module, description: ModelDescription, scorer: Scorer, cfg: Config) -> dict[str, float]:
    """Per class: the share of samples conditioned on it that the feature net assigns to it."""
    per_class = max(cfg.eval.n_samples // description.num_classes, 1)
    accuracy = {}
    for label, name in enumerate(description.classes):
        samples = generate(module, description, per_class, cfg.eval.seed + 1 + label, label, scorer.device)
        _, probs = scorer.embed(samples)
        accuracy[name] = float((probs.argmax(1) == label).mean())
    accuracy["mean"] = float(np.mean(list(accuracy.values())))
    return accuracy


def load_inception(cfg: Config, root: Path, device) -> InceptionFID | None:
    """The standard FID network (pt_inception-2015-12-05), when its weights file is configured and present."""
    path = cfg.eval.inception_weights
    if not path:
        log.info("evaluate: standard Inception FID not computed (eval.inception_weights is not set)")
        return None
    if not Path(path).is_file():
        log.warning("evaluate: standard Inception FID skipped: eval.inception_weights %s does not exist", path)
        return None
    from imagegen.evaluation.inception import InceptionFID

    test_images, _ = load_split(root / PREPARED_DIR / "test.npz")
    return InceptionFID(Path(path), test_images, device)


def rounded(scores: dict) -> dict:
    return {k: rounded(v) if isinstance(v, dict) else round(v, 5) if isinstance(v, float) else v
            for k, v in scores.items()}


def read_samples(path: Path) -> np.ndarray:
    """The array in a user's .npy samples file, or a one-line error when it is not one."""
    not_npy = (f"{path}: not a .npy array file; expected one written by numpy.save "
               "(N x H x W grey or N x H x W x 3 RGB images)")
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ImagegenError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError):  # pickled objects, text, truncated or unknown bytes, a folder
        raise ImagegenError(not_npy) from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ImagegenError(not_npy)
    return array


def conform_samples(path: Path, array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    if c == 1 and array.ndim == 3 and array.shape[1:] == (h, w):
        array = array[:, None]
    elif c == 3 and array.ndim == 4 and array.shape[1:] == (h, w, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.ndim != 4 or array.shape[1:] != shape:
        expected = (f"N x {h} x {w} (or N x 1 x {h} x {w})" if c == 1
                    else f"N x {h} x {w} x 3 (or N x 3 x {h} x {w})")
        raise ImagegenError(f"{path}: shape {array.shape}, expected {expected}: the feature net scores "
                            f"{h} x {w} {'grey' if c == 1 else 'RGB'} images")
    if len(array) < MIN_EVAL_SAMPLES:
        raise ImagegenError(f"{path}: {len(array)} samples, expected at least {MIN_EVAL_SAMPLES}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ImagegenError(f"{path}: dtype {array.dtype}, expected uint8 (0..255) or float (0..1)")
    if not np.isfinite(array).all():
        raise ImagegenError(f"{path}: {int((~np.isfinite(array)).sum())} values are NaN or infinite")
    if array.min() < 0 or array.max() > 1:
        raise ImagegenError(f"{path}: float values span {array.min():.3g}..{array.max():.3g}, expected 0..1")
    return (array * 255).round().astype(np.uint8)


def score_samples_file(cfg: Config, root: Path, path: Path) -> dict:
    """`imagegen evaluate --samples FILE.npy`: any generator's samples, scored like ours, if they have the
    feature net's image shape (checked before anything slow is loaded)."""
    array = read_samples(path)
    samples = conform_samples(path, array, read_description(root / FEATURES_DIR).image_shape)
    return rounded(Scorer.load(cfg, root, select_device(cfg.train.device)).score(samples))


@contextlib.contextmanager
def tracked_run(cfg: Config, root: Path) -> Iterator[bool]:
    """The stage's MLflow run (when train.mlflow), tagged with the weights it evaluates, the data as input."""
    if not cfg.train.mlflow:
        yield False
        return
    from imagegen import dataset_input, lineage, tracking

    params = flat_section("eval", cfg.eval)
    tags = lineage.lineage_tags(root, params, str(select_device(cfg.train.device)))
    for kind in GENERATORS:  # the register stage links a version's model card to this run by these tags
        weights = root / "models" / kind / WEIGHTS
        if weights.is_file():
            tags[f"{kind}_weights_sha256"] = sha256_file(weights)
    with tracking.stage_run(root, experiment_name(cfg.data.dataset), "evaluate", params, tags):
        dataset_input.log_dataset(root, cfg.data.dataset, "evaluation")
        yield True


def log_results(root: Path, results: dict) -> None:
    import mlflow

    from imagegen import tracking

    metrics = {name: value for name, value in tracking.flatten(results, "/").items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    mlflow.log_metrics(metrics)
    mlflow.log_artifacts(str(root / REPORTS), artifact_path="evaluate")
    mlflow.log_artifact(str(root / METRICS))
