"""The Fréchet distance of two Gaussians fitted to feature matrices: the FID (evaluation.metrics) and the drift
gate's distance between the accepted data and a new batch (data.drift)."""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), the Fréchet distance of two Gaussians.

    tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix S1^1/2 S2 S1^1/2, which has the same spectrum as S1 S2: no complex parts to drop.
    """
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
