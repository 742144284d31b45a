"""FID, KID, precision/recall and class coverage on features with known answers."""

import numpy as np
import pytest

from imagegen.evaluation import metrics as m


def random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    var1, var2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert m.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_full_covariances_matches_closed_forms():
    rng = np.random.default_rng(1)
    sigma, mu1, mu2 = random_cov(rng, 12), rng.normal(size=12), rng.normal(size=12)
    # Same covariance: only the means count.
    assert m.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-7)
    # S2 = c^2 S1: tr(S1 + c^2 S1 - 2c S1) = (1 - c)^2 tr(S1).
    c = 1.7
    assert m.frechet_distance(mu1, sigma, mu1, c * c * sigma) == pytest.approx((1 - c) ** 2 * np.trace(sigma), rel=1e-7)


def test_frechet_distance_agrees_with_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    s1, s2 = random_cov(rng, 10), random_cov(rng, 10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    root = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    assert m.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = np.random.default_rng(3).normal(size=(2000, 16))
    assert abs(m.fid(x, x)) < 1e-8
    shifts = [m.fid(x + s, x) for s in (0.1, 0.5, 1.0)]
    assert shifts == sorted(shifts) and shifts[0] > 0


def test_fid_std_matches_the_spread_of_fresh_draws_and_grows_as_the_test_split_shrinks():
    """The bootstrap's standard deviation estimates how far FID moves between independent draws of the same
    size from the same distributions; a smaller test split moves it more."""
    rng = np.random.default_rng(7)

    def draw(n_samples, n_test):
        return rng.normal(0.2, 1, (n_samples, 8)), rng.normal(0, 1, (n_test, 8))

    fresh = np.std([m.fid(*draw(2000, 2000)) for _ in range(60)], ddof=1)
    bootstrap = m.fid_std(*draw(2000, 2000), rounds=60, seed=0)
    assert 0.5 * fresh < bootstrap < 2 * fresh, (bootstrap, fresh)
    samples, test = draw(2000, 4000)
    assert m.fid_std(samples, test[:250], 60) > 1.5 * m.fid_std(samples, test, 60)
    assert m.fid_std(samples, test, 10, seed=3) == m.fid_std(samples, test, 10, seed=3)


def test_kid_is_unbiased_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(3000, 16)), rng.normal(size=(3000, 16))
    same_mean, same_std = m.kid(x, y, subsets=50, subset_size=500)
    assert abs(same_mean) < 3 * same_std / np.sqrt(50) + 1e-4
    shifted_mean, _ = m.kid(x + 0.3, y, subsets=50, subset_size=500)
    assert shifted_mean > 20 * abs(same_mean) and shifted_mean > 0.01


def test_precision_recall_are_one_for_identical_sets():
    x = np.random.default_rng(5).normal(size=(1500, 8))
    assert m.precision_recall(x, x.copy(), k=3, chunk=400) == (1.0, 1.0)


def test_mode_dropping_lowers_recall_not_precision():
    rng = np.random.default_rng(6)
    centres = rng.normal(scale=6, size=(10, 8))
    labels = np.repeat(np.arange(10), 300)
    real = centres[labels] + rng.normal(size=(3000, 8))
    full = centres[labels] + rng.normal(size=(3000, 8))
    kept = labels < 5  # this "generator" covers half of the modes
    dropped = centres[labels[kept]] + rng.normal(size=(kept.sum(), 8))
    full_precision, full_recall = m.precision_recall(full, real, k=3)
    precision, recall = m.precision_recall(dropped, real, k=3)
    assert full_recall > 0.8
    assert precision == pytest.approx(full_precision, abs=0.05)
    assert recall < 0.6 * full_recall


def test_class_coverage_of_balanced_and_collapsed_predictions():
    balanced = np.eye(10)[np.arange(1000) % 10]
    cover = m.class_coverage(balanced)
    assert cover["class_entropy"] == pytest.approx(np.log(10))
    assert cover["min_class_ratio"] == pytest.approx(1.0)
    assert cover["domain_is"] == pytest.approx(10.0)
    half = np.eye(10)[np.arange(1000) % 5]
    cover = m.class_coverage(half)
    assert cover["class_entropy"] == pytest.approx(np.log(5))
    assert cover["min_class_ratio"] == 0.0
    assert cover["domain_is"] == pytest.approx(5.0)
