"""Sample-quality metrics in a feature space: FID, KID, precision/recall, class coverage.

All take feature matrices (N x D float64 arrays); features.embed makes them from images.
"""

from __future__ import annotations

import numpy as np
import torch

from imagegen.frechet import frechet_distance, gaussian_stats


def fid(features: np.ndarray, reference: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(features), *gaussian_stats(reference))


def fid_std(features: np.ndarray, reference: np.ndarray, rounds: int = 20, seed: int = 0) -> float:
    """The FID's standard deviation over bootstrap rounds: both sets drawn again with replacement at their own
    size. How far the number would move with other samples and another test split of the same size (a small
    test split moves it more)."""
    rng = np.random.default_rng(seed)
    values = [frechet_distance(*gaussian_stats(features[rng.integers(0, len(features), len(features))]),
                               *gaussian_stats(reference[rng.integers(0, len(reference), len(reference))]))
              for _ in range(rounds)]
    return float(np.std(values, ddof=1))


def kid(features: np.ndarray, reference: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al., 2018): the unbiased MMD^2 with the kernel
    k(x, y) = (x.y / d + 1)^3, averaged over random subsets; returns (mean, std over subsets)."""
    m = min(subset_size, len(features), len(reference))
    d = features.shape[1]
    rng = np.random.default_rng(seed)
    x_all, y_all = torch.from_numpy(features), torch.from_numpy(reference)
    values = []
    for _ in range(subsets):
        x = x_all[torch.from_numpy(rng.choice(len(x_all), m, replace=False))]
        y = y_all[torch.from_numpy(rng.choice(len(y_all), m, replace=False))]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(float(within - 2 * kxy.mean()))
    return float(np.mean(values)), float(np.std(values))


def precision_recall(features: np.ndarray, reference: np.ndarray, k: int = 3,
                     chunk: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019).

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour. Precision: share of samples inside the reference manifold; recall: share of
    reference points inside the samples' manifold.
    """
    fake, real = torch.from_numpy(features).float(), torch.from_numpy(reference).float()
    real_radii, fake_radii = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    inside_real = torch.zeros(len(fake), dtype=torch.bool)
    covered = torch.zeros(len(real), dtype=torch.bool)
    for start in range(0, len(fake), chunk):
        dist = torch.cdist(fake[start:start + chunk], real)
        inside_real[start:start + chunk] = (dist <= real_radii[None]).any(dim=1)
        covered |= (dist <= fake_radii[start:start + chunk, None]).any(dim=0)
    return float(inside_real.float().mean()), float(covered.float().mean())


def knn_radii(points: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point."""
    radii = []
    for start in range(0, len(points), chunk):
        dist = torch.cdist(points[start:start + chunk], points)
        radii.append(dist.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def class_coverage(probs: np.ndarray) -> dict[str, float]:
    """Mode coverage from the feature net's predictions on the samples.

    class_entropy: entropy (nats) of the predicted-class histogram; ln(C) when every class is
    equally frequent. min_class_ratio: share of the rarest class times C (1 = perfectly balanced).
    domain_is: exp(E[KL(p(y|x) || p(y))]), the Inception Score computed with the domain net.
    """
    num_classes = probs.shape[1]
    share = np.bincount(probs.argmax(axis=1), minlength=num_classes) / len(probs)
    nonzero = share[share > 0]
    marginal = probs.mean(axis=0)
    kl = (probs * (np.log(np.clip(probs, 1e-12, None)) - np.log(np.clip(marginal, 1e-12, None)))).sum(axis=1)
    return {
        "class_entropy": float(-(nonzero * np.log(nonzero)).sum()),
        "min_class_ratio": float(share.min() * num_classes),
        "domain_is": float(np.exp(kl.mean())),
    }
