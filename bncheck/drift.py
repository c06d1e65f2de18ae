"""How far stored BatchNorm statistics are from other statistics of the same layer, and whether that is more than
the sampling noise of the comparison explains. Pure numpy: used after recomputation and by any comparison of two
sets of statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DriftThresholds:
    """Practical drift limits: beyond them, eval() outputs of the layer visibly change."""

    # |mean_stored - mean_new| / sqrt(var_new + eps): in the median channel, and in the worst one
    mean_shift_median: float = 0.25
    mean_shift_worst: float = 1.0
    # |log((var_stored + eps) / (var_new + eps))|: log(1.5) in the median channel, log(4) in the worst
    log_var_ratio_median: float = math.log(1.5)
    log_var_ratio_worst: float = math.log(4.0)
    # PyTorch's default; a state dict does not store the layer's eps
    eps: float = 1e-5


@dataclass(frozen=True)
class Drift:
    """Per-layer drift, worst and median channel, with the noise floor of each measure at this sample size."""

    mean_shift_median: float
    mean_shift_worst: float
    mean_shift_worst_channel: int
    log_var_ratio_median: float
    log_var_ratio_worst: float
    log_var_ratio_worst_channel: int
    samples: int | None
    # what sampling noise alone can produce with this many samples (the verdict needs drift beyond both)
    noise_mean_shift_median: float
    noise_mean_shift_worst: float
    noise_log_var_ratio_median: float
    noise_log_var_ratio_worst: float

    def reasons(self, limits: DriftThresholds) -> list[str]:
        """Why the layer is stale; empty when it is not."""
        checks = [
            (
                "median mean shift",
                self.mean_shift_median,
                limits.mean_shift_median,
                self.noise_mean_shift_median,
                "std",
            ),
            (
                f"worst mean shift (channel {self.mean_shift_worst_channel})",
                self.mean_shift_worst,
                limits.mean_shift_worst,
                self.noise_mean_shift_worst,
                "std",
            ),
            (
                "median |log var ratio|",
                self.log_var_ratio_median,
                limits.log_var_ratio_median,
                self.noise_log_var_ratio_median,
                "",
            ),
            (
                f"worst |log var ratio| (channel {self.log_var_ratio_worst_channel})",
                self.log_var_ratio_worst,
                limits.log_var_ratio_worst,
                self.noise_log_var_ratio_worst,
                "",
            ),
        ]
        return [
            f"{label} {value:.3g}{unit and ' ' + unit} > {max(limit, noise):.3g}"
            for label, value, limit, noise, unit in checks
            if value > max(limit, noise)
        ]

    def too_few_samples(self, limits: DriftThresholds) -> bool:
        """Whether noise, not the practical limits, sets the bar: smaller real drift would go unseen."""
        return (
            self.noise_mean_shift_median > limits.mean_shift_median
            or self.noise_mean_shift_worst > limits.mean_shift_worst
            or self.noise_log_var_ratio_median > limits.log_var_ratio_median
            or self.noise_log_var_ratio_worst > limits.log_var_ratio_worst
        )


def measure_drift(
    stored_mean: np.ndarray,
    stored_var: np.ndarray,
    new_mean: np.ndarray,
    new_var: np.ndarray,
    *,
    samples: int | None,
    eps: float = 1e-5,
    other_var: np.ndarray | None = None,
) -> Drift:
    """Compare stored statistics with freshly measured ones.

    ``samples`` is the number of independent samples behind the new statistics (not the number of values: the
    positions of one sequence or image are correlated); None when both sides are stored statistics, which carry no
    sampling noise of the comparison's own. ``other_var`` is the same variance under the other
    convention (pooled vs per-batch average); a stored variance is judged against whichever of the two it is closer
    to, so that the convention alone never makes a healthy layer look stale.
    """
    stored_mean, stored_var = np.asarray(stored_mean, np.float64), np.asarray(stored_var, np.float64)
    new_mean, new_var = np.asarray(new_mean, np.float64), np.asarray(new_var, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.abs(stored_mean - new_mean) / np.sqrt(np.maximum(new_var, 0) + eps)
        ratio = np.abs(np.log((np.maximum(stored_var, 0) + eps) / (np.maximum(new_var, 0) + eps)))
        if other_var is not None:
            other = np.abs(np.log((np.maximum(stored_var, 0) + eps) / (np.maximum(other_var, 0) + eps)))
            ratio = np.minimum(ratio, other)
    # non-finite stored values are BN001's business; here they count as infinitely far
    shift = np.where(np.isfinite(shift), shift, np.inf)
    ratio = np.where(np.isfinite(ratio), ratio, np.inf)
    channels = max(int(shift.size), 1)
    n = max(samples, 2) if samples is not None else math.inf
    # Standard errors of a standardised mean (1/sqrt(n)) and of a log variance (sqrt(2/(n-1)) for Gaussian data,
    # doubled for the heavier tails of post-ReLU activations); the worst of C channels reaches about
    # sqrt(2 ln 2C) standard errors by chance, plus a margin for the noise of the stored running average itself.
    worst_factor = math.sqrt(2 * math.log(2 * channels)) + 1
    se_mean = 1 / math.sqrt(n)
    se_log_var = 2 * math.sqrt(2 / (n - 1)) if n != math.inf else 0.0
    return Drift(
        mean_shift_median=float(np.median(shift)) if shift.size else 0.0,
        mean_shift_worst=float(shift.max()) if shift.size else 0.0,
        mean_shift_worst_channel=int(shift.argmax()) if shift.size else 0,
        log_var_ratio_median=float(np.median(ratio)) if ratio.size else 0.0,
        log_var_ratio_worst=float(ratio.max()) if ratio.size else 0.0,
        log_var_ratio_worst_channel=int(ratio.argmax()) if ratio.size else 0,
        samples=samples,
        noise_mean_shift_median=2 * se_mean,
        noise_mean_shift_worst=worst_factor * se_mean,
        noise_log_var_ratio_median=2 * se_log_var,
        noise_log_var_ratio_worst=worst_factor * se_log_var,
    )
