"""Drift between stored and other statistics: the two measures, the noise floor, and the verdict."""

from __future__ import annotations

import math

import numpy as np

from bncheck.drift import DriftThresholds, measure_drift, measure_stored_drifts

LIMITS = DriftThresholds()


def test_identical_statistics_have_no_drift() -> None:
    mean, var = np.array([0.5, -1.0, 2.0]), np.array([1.0, 4.0, 0.25])
    drift = measure_drift(mean, var, mean, var, samples=None)
    assert drift.mean_shift_worst == 0 and drift.log_var_ratio_worst == 0
    assert drift.reasons(LIMITS) == []


def test_measures_are_standardised_by_the_new_variance() -> None:
    stored_mean, stored_var = np.array([0.0, 0.0, 3.0]), np.array([1.0, 1.0, 1.0])
    new_mean, new_var = np.array([0.0, 0.0, 0.0]), np.array([1.0, 1.0, 4.0])
    drift = measure_drift(stored_mean, stored_var, new_mean, new_var, samples=None, eps=0.0)
    assert drift.mean_shift_worst == 1.5 and drift.mean_shift_worst_channel == 2  # |3 - 0| / sqrt(4)
    assert drift.mean_shift_median == 0.0
    assert math.isclose(drift.log_var_ratio_worst, math.log(4))
    reasons = drift.reasons(LIMITS)
    assert any(r.startswith("worst mean shift (channel 2) 1.5 std") for r in reasons)
    assert not any(r.startswith("median") for r in reasons)


def test_sampling_noise_raises_the_bar() -> None:
    stored_mean, var = np.zeros(64), np.ones(64)
    new_mean = np.full(64, 0.3)  # beyond the practical 0.25 std median limit
    with_many = measure_drift(stored_mean, var, new_mean, var, samples=10_000)
    with_few = measure_drift(stored_mean, var, new_mean, var, samples=20)
    assert any("median mean shift" in r for r in with_many.reasons(LIMITS))
    assert with_few.reasons(LIMITS) == []  # 2/sqrt(20) = 0.45 std could be chance
    assert with_few.too_few_samples(LIMITS) and not with_many.too_few_samples(LIMITS)


def test_the_closer_variance_convention_is_used() -> None:
    mean, stored_var = np.zeros(4), np.full(4, 2.0)
    pooled, batch_average = np.full(4, 8.0), np.full(4, 2.0)
    alone = measure_drift(mean, stored_var, mean, pooled, samples=None, eps=0.0)
    either = measure_drift(mean, stored_var, mean, pooled, samples=None, eps=0.0, other_var=batch_average)
    assert math.isclose(alone.log_var_ratio_median, math.log(4))
    assert either.log_var_ratio_median == 0.0


def test_non_finite_stored_values_count_as_infinitely_far() -> None:
    drift = measure_drift(np.array([np.nan, 0.0]), np.ones(2), np.zeros(2), np.ones(2), samples=None)
    assert drift.mean_shift_worst == math.inf and drift.mean_shift_worst_channel == 0


def test_kurtosis_widens_the_variance_floor_per_channel() -> None:
    mean, stored_var = np.zeros(64), np.ones(64)
    new_var = np.ones(64)
    new_var[0] = new_var[1] = 1 / 5  # |log ratio| 1.61 > log(4) in two channels
    gaussian = np.full(64, 3.0)
    heavy = gaussian.copy()
    heavy[0] = 200.0  # channel 0 is so heavy-tailed that a 5x ratio is within its noise at 256 samples
    without = measure_drift(mean, stored_var, mean, new_var, samples=256)
    with_kurtosis = measure_drift(mean, stored_var, mean, new_var, samples=256, kurtosis=heavy)
    assert any("channel 0" in r for r in without.reasons(LIMITS))
    assert [r.split(")")[0] for r in with_kurtosis.reasons(LIMITS)] == ["worst |log var ratio| (channel 1"]
    new_var[1] = 1.0
    assert measure_drift(mean, stored_var, mean, new_var, samples=256, kurtosis=heavy).reasons(LIMITS) == []
    assert measure_drift(mean, stored_var, mean, new_var, samples=256, kurtosis=gaussian).reasons(LIMITS) != []


def test_heavy_tails_raise_the_median_floor() -> None:
    mean, stored_var, new_var = np.zeros(8), np.ones(8), np.full(8, 1 / 1.8)  # beyond log(1.5) in every channel
    assert measure_drift(mean, stored_var, mean, new_var, samples=256, kurtosis=np.full(8, 3.0)).reasons(LIMITS)
    assert not measure_drift(mean, stored_var, mean, new_var, samples=256, kurtosis=np.full(8, 60.0)).reasons(LIMITS)


def test_drift_of_many_stored_layers_at_once_is_each_layers_own() -> None:
    # diff measures thousands of equal-width layers together; each must get what measure_drift gives it alone,
    # with NaN, infinite, negative and zero statistics among them
    rng = np.random.default_rng(3)
    layers, channels = 200, 17
    mean_a, mean_b = rng.normal(size=(2, layers, channels))
    var_a, var_b = rng.lognormal(size=(2, layers, channels))
    for matrix in (mean_a, var_a, mean_b, var_b):
        holes = rng.random((layers, channels)) < 0.02
        matrix[holes] = rng.choice([np.nan, np.inf, -np.inf, -1.0, 0.0], size=int(holes.sum()))
    together = measure_stored_drifts(mean_a, var_a, mean_b, var_b, eps=1e-5)
    alone = [measure_drift(*row, samples=None, eps=1e-5) for row in zip(mean_a, var_a, mean_b, var_b, strict=True)]
    assert together == alone
    assert any(drift.mean_shift_worst == math.inf for drift in together)  # the holes were seen
