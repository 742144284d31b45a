"""The drift gate's statistics against closed forms, and its decision rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imagegen.config import DriftConfig
from imagegen.data import drift


def test_psi_of_two_two_bin_histograms_is_a_quarter_of_ln3():
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5) = 0.25 ln 2 + 0.25 ln 1.5 = 0.25 ln 3
    assert drift.psi(np.array([50, 50]), np.array([25, 75])) == pytest.approx(0.25 * math.log(3))
    assert drift.psi(np.array([25, 75]), np.array([50, 50])) == pytest.approx(0.25 * math.log(3))  # symmetric
    assert drift.psi(np.array([3, 7, 0]), np.array([30, 70, 0])) == 0.0  # counts or shares alike


def test_psi_stays_finite_when_a_bin_empties():
    value = drift.psi(np.array([100, 0]), np.array([0, 100]), eps=1e-4)
    # shares clipped to 1e-4: 2 * (1 - 1e-4) ln(1 / 1e-4)
    assert value == pytest.approx(2 * (1 - 1e-4) * math.log(1e4))


def test_ks_is_the_largest_cdf_gap():
    uniform_low = np.r_[np.ones(10), np.zeros(5)]  # uniform on bins 0..9
    uniform_high = np.r_[np.zeros(5), np.ones(10)]  # uniform on bins 5..14
    assert drift.ks(uniform_low, uniform_high) == pytest.approx(0.5)
    assert drift.ks(np.array([1, 0, 0]), np.array([0, 0, 1])) == 1.0
    assert drift.ks(np.array([2, 2]), np.array([5, 5])) == 0.0


def test_total_variation_of_one_class_dropped_from_ten_balanced():
    assert drift.total_variation(np.full(10, 100), np.r_[np.full(9, 100), 0]) == pytest.approx(0.1)
    assert drift.total_variation(np.array([1, 0]), np.array([0, 1])) == 1.0


def test_relative_frechet_of_isotropic_gaussians():
    d, m, s = 8, 0.5, 2.0
    mu1, mu2 = np.zeros(d), np.full(d, m)
    # ||mu1 - mu2||^2 + tr(I + s^2 I - 2 s I) = d m^2 + d (1 - s)^2, divided by tr(I) = d
    assert drift.relative_frechet(mu1, np.eye(d), mu2, s**2 * np.eye(d)) == pytest.approx(m**2 + (1 - s) ** 2)
    assert drift.relative_frechet(mu1, np.eye(d), mu1, np.eye(d)) == pytest.approx(0, abs=1e-9)


def test_histograms_count_pixels_per_channel_in_32_bins():
    images = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    images[:, 1] = 255
    images[0, 2, 0, 0] = 8  # 8 // 8 = bin 1
    hist = drift.histograms(images)
    assert hist.shape == (3, drift.BINS)
    assert hist[0, 0] == 32 and hist[1, -1] == 32 and hist[2, 1] == 1 and hist[2, 0] == 31


def test_embedding_is_fixed_and_sees_inversion():
    a, b = drift.embedding_net(1), drift.embedding_net(1)
    assert all((a.state_dict()[k] == b.state_dict()[k]).all() for k in a.state_dict())
    rng = np.random.default_rng(0)
    images = np.zeros((400, 1, 28, 28), dtype=np.uint8)
    images[:, :, 6:22, 8:20] = rng.integers(100, 256, size=(400, 1, 16, 12))  # bright objects on black
    other = images.copy()
    other[:, :, 6:22, 8:20] = rng.integers(100, 256, size=(400, 1, 16, 12))  # a new sample of the same kind
    f, g, inverted = (drift.embed(a, x) for x in (images, other, 255 - images))
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (f, g, inverted)]
    same = drift.relative_frechet(*stats[0], *stats[1])
    shifted = drift.relative_frechet(*stats[0], *stats[2])
    assert same < 0.2 < 100 < shifted, (same, shifted)  # 400 samples in 256 dimensions: some sampling noise


def check(value: float, fail: float = 0.25) -> dict:
    return {"name": "intensity_psi", "param": "intensity_psi", "value": value, "warn": 0.1, "fail": fail,
            "status": "fail" if value >= fail else "warn" if value >= 0.1 else "ok"}


def test_gate_fails_with_one_line_naming_the_check_and_value():
    from imagegen.errors import ImagegenError

    gate = drift.Gate([check(3.21)], {"previous_data_version": "abc123"}, None, None)
    assert not gate.passed
    with pytest.raises(ImagegenError) as raised:
        gate.raise_if_failed()
    message = str(raised.value)
    assert "\n" not in message
    assert "intensity_psi 3.21 >= fail level 0.25 (validate.drift.intensity_psi_fail)" in message
    assert "abc123" in message and "reports/validation/drift.html" in message
    assert drift.Gate([check(0.2)], {}, None, None).passed  # a warning does not fail


def test_warning_level_above_failure_level_is_refused():
    with pytest.raises(ValueError, match="frechet_warn must not exceed frechet_fail"):
        DriftConfig(frechet_warn=0.5, frechet_fail=0.2)
