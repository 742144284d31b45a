"""The champion/challenger rule: better by a relative margin, in the metric's direction."""

import math

import pytest

from imagegen.registry import Uncertainty, decide


def test_no_champion_promotes():
    assert decide("fid", 50.0, None, 0.01).promote
    assert decide("fid", 50.0, math.nan, 0.01).promote


@pytest.mark.parametrize("value, promote", [(9.89, True), (9.9, False), (9.95, False), (10.0, False), (11.0, False)])
def test_lower_is_better_needs_margin(value, promote):
    assert decide("fid", value, 10.0, 0.01).promote is promote
    assert decide("kid_mean", value / 1000, 0.01, 0.01).promote is promote


@pytest.mark.parametrize("value, promote", [(0.71, True), (0.707, False), (0.7, False), (0.6, False)])
def test_higher_is_better_needs_margin(value, promote):
    assert decide("precision", value, 0.7, 0.01).promote is promote
    assert decide("recall", value, 0.7, 0.01).promote is promote


def test_zero_margin_needs_strictly_better():
    assert not decide("fid", 10.0, 10.0, 0.0).promote
    assert decide("fid", 9.999, 10.0, 0.0).promote
    assert not decide("recall", 0.5, 0.5, 0.0).promote


def test_reason_names_metric_values_and_verdict():
    kept = decide("fid", 12.0, 10.0, 0.05)
    assert not kept.promote and "does not beat" in kept.reason and "12" in kept.reason and "10" in kept.reason
    assert "lower is better" in kept.reason
    assert "beats" in decide("recall", 0.9, 0.5, 0.05).reason


@pytest.mark.parametrize("value, promote", [(9.5, True), (9.7, False), (9.89, False)])
def test_a_gain_within_the_noise_promotes_nothing(value, promote):
    decision = decide("fid", value, 10.0, 0.01, noise=0.4)  # the margin alone asks for 0.1
    assert decision.promote is promote and "noise 0.4" in decision.reason


def test_noise_is_sigmas_times_the_std_of_the_difference():
    assert Uncertainty(std=0.3, sigmas=2).noise(0.4) == pytest.approx(2 * 0.5)
    assert Uncertainty(std=0.3, sigmas=2).noise(None) == pytest.approx(2 * 0.3 * math.sqrt(2))  # champion unknown
    assert Uncertainty(std=0.3, sigmas=2).noise(math.nan) == pytest.approx(2 * 0.3 * math.sqrt(2))
    assert Uncertainty(std=0.3, sigmas=0).noise(0.4) == 0


def test_uncertainty_is_read_from_the_evaluation_for_fid_only():
    from imagegen.config import Config

    fid = Config.model_validate({"register": {"metric": "fid", "sigmas": 3.0}})
    assert Uncertainty.of(fid, {"fid": 5.0, "fid_std": 0.2}) == Uncertainty(0.2, 3.0)
    assert Uncertainty.of(fid, {"fid": 5.0}) is None  # evaluated before fid_std existed: the margin alone
    assert Uncertainty.of(fid, {"fid": 5.0, "fid_std": math.nan}) is None
    recall = Config.model_validate({"register": {"metric": "recall"}})
    assert Uncertainty.of(recall, {"recall": 0.5, "fid_std": 0.2}) is None
