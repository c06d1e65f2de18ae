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
    # With per-channel kurtosis each channel has its own variance floor (heavy-tailed channels are noisier); the
    # worst-channel test then asks whether any channel is beyond both the limit and its own floor. Empty: one
    # floor (noise_log_var_ratio_worst) for every channel.
    channel_log_var_ratio: tuple[float, ...] = ()
    channel_noise_log_var_ratio: tuple[float, ...] = ()

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
            self._worst_variance_check(limits.log_var_ratio_worst),
        ]
        return [
            f"{label} {value:.3g}{unit and ' ' + unit} > {max(limit, noise):.3g}"
            for label, value, limit, noise, unit in checks
            if value > max(limit, noise)
        ]

    def _worst_variance_check(self, limit: float) -> tuple[str, float, float, float, str]:
        """The worst-channel variance test: the largest ratio, or with per-channel floors the largest ratio among
        the channels beyond both the limit and their own floor (any such channel makes the layer stale)."""
        channel, value = self.log_var_ratio_worst_channel, self.log_var_ratio_worst
        noise = self.noise_log_var_ratio_worst
        if self.channel_noise_log_var_ratio:
            pairs = zip(self.channel_log_var_ratio, self.channel_noise_log_var_ratio, strict=True)
            beyond = [(ratio, c, floor) for c, (ratio, floor) in enumerate(pairs) if ratio > max(limit, floor)]
            value, channel, noise = max(beyond, default=(0.0, channel, math.inf))
        return f"worst |log var ratio| (channel {channel})", value, limit, noise, ""

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
    kurtosis: np.ndarray | None = None,
) -> Drift:
    """Compare stored statistics with freshly measured ones.

    ``samples`` is the number of independent samples behind the new statistics (not the number of values: the
    positions of one sequence or image are correlated); None when both sides are stored statistics, which carry no
    sampling noise of the comparison's own. ``other_var`` is the same variance under the other
    convention (pooled vs per-batch average); a stored variance is judged against whichever of the two it is closer
    to, so that the convention alone never makes a healthy layer look stale. ``kurtosis`` is each channel's
    (non-excess) kurtosis measured on the same samples; it sets the noise floor of the variance, which grows with
    the tails of the data. None (unknown: two stored checkpoints, a TorchScript model) keeps one floor for all
    channels, fit for moderately heavy tails.
    """
    shift, ratio = _distances(stored_mean, stored_var, new_mean, new_var, eps, other_var)
    channels = max(int(shift.size), 1)
    n = max(samples, 2) if samples is not None else math.inf
    # The worst of C channels reaches about sqrt(2 ln 2C) standard errors by chance, plus a margin.
    worst_factor = math.sqrt(2 * math.log(2 * channels)) + 1
    se_mean = 1 / math.sqrt(n)
    se_log_var = log_var_standard_error(n, kurtosis, channels)
    floors = worst_factor * se_log_var
    per_channel = kurtosis is not None and samples is not None and floors.size == ratio.size
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
        noise_log_var_ratio_median=2 * _median(se_log_var),
        noise_log_var_ratio_worst=_median(floors),
        channel_log_var_ratio=tuple(float(r) for r in ratio) if per_channel else (),
        channel_noise_log_var_ratio=tuple(float(f) for f in floors) if per_channel else (),
    )


def measure_stored_drifts(
    stored_mean: np.ndarray, stored_var: np.ndarray, new_mean: np.ndarray, new_var: np.ndarray, *, eps: float = 1e-5
) -> list[Drift]:
    """``measure_drift(..., samples=None)`` for each row of layers x channels matrices, in one pass over all of them:
    the comparison of two stored checkpoints (diff) of thousands of equal-width layers, which carries no sampling
    noise (every floor is 0)."""
    shift, ratio = _distances(stored_mean, stored_var, new_mean, new_var, eps, None)
    if shift.ndim != 2 or shift.shape[1] == 0:
        rows = zip(stored_mean, stored_var, new_mean, new_var, strict=True)
        return [measure_drift(*row, samples=None, eps=eps) for row in rows]
    summaries = zip(
        np.median(shift, axis=1).tolist(),
        shift.max(axis=1).tolist(),
        shift.argmax(axis=1).tolist(),
        np.median(ratio, axis=1).tolist(),
        ratio.max(axis=1).tolist(),
        ratio.argmax(axis=1).tolist(),
        strict=True,
    )
    return [
        Drift(
            mean_shift_median=shift_median,
            mean_shift_worst=shift_worst,
            mean_shift_worst_channel=shift_channel,
            log_var_ratio_median=ratio_median,
            log_var_ratio_worst=ratio_worst,
            log_var_ratio_worst_channel=ratio_channel,
            samples=None,
            noise_mean_shift_median=0.0,
            noise_mean_shift_worst=0.0,
            noise_log_var_ratio_median=0.0,
            noise_log_var_ratio_worst=0.0,
        )
        for shift_median, shift_worst, shift_channel, ratio_median, ratio_worst, ratio_channel in summaries
    ]


def _distances(
    stored_mean: np.ndarray,
    stored_var: np.ndarray,
    new_mean: np.ndarray,
    new_var: np.ndarray,
    eps: float,
    other_var: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's mean shift (in the new standard deviations) and |log variance ratio|, inf where not finite."""
    stored_mean, stored_var = np.asarray(stored_mean, np.float64), np.asarray(stored_var, np.float64)
    new_mean, new_var = np.asarray(new_mean, np.float64), np.asarray(new_var, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.abs(stored_mean - new_mean) / np.sqrt(np.maximum(new_var, 0) + eps)
        ratio = np.abs(np.log((np.maximum(stored_var, 0) + eps) / (np.maximum(new_var, 0) + eps)))
        if other_var is not None:
            other = np.abs(np.log((np.maximum(stored_var, 0) + eps) / (np.maximum(other_var, 0) + eps)))
            ratio = np.minimum(ratio, other)
    # non-finite stored values are BN001's business; here they count as infinitely far
    return np.where(np.isfinite(shift), shift, np.inf), np.where(np.isfinite(ratio), ratio, np.inf)


def _median(values: np.ndarray) -> float:
    """np.median, without its overhead (tens of microseconds, per layer of a diff) for the one-value floors that
    stored-against-stored comparisons and unknown kurtosis give."""
    return float(values.reshape(-1)[0]) if values.size == 1 else float(np.median(values))


# The stored statistics are a running average over training batches: an estimate with noise of its own, from
# an effective sample count of about batch * (2 - momentum) / momentum (608 for batches of 32 and momentum 0.1).
# Taking it as noisy as the recomputed side (at least as many samples) multiplies the standard error by sqrt(2).
STORED_NOISE_MARGIN = math.sqrt(2)


def log_var_standard_error(n: float, kurtosis: np.ndarray | None, channels: int) -> np.ndarray:
    """Standard error of |log(stored var / new var)| per channel (one value for all without kurtosis).

    A variance estimated from n samples has Var(s^2) = sigma^4 (kappa - (n-3)/(n-1)) / n, so se(log s^2) is about
    sqrt((kappa - 1 + 2/(n-1)) / n): sqrt(2/n) for Gaussian data (kappa = 3), several times more for heavy tails
    (kappa of lognormal(1) data is about 110). A measured kappa below 3 is taken as 3 (a sample of a heavy-tailed
    channel that missed its rare large values looks light-tailed), NaN (a constant channel) as 3. Without
    kurtosis: sqrt(2/(n-1)) doubled, for moderately heavy tails such as post-ReLU activations.
    """
    if n == math.inf:
        return np.zeros(1 if kurtosis is None else max(int(np.size(kurtosis)), 1))
    if kurtosis is None:
        return np.full(1, 2 * math.sqrt(2 / (n - 1)))
    kappa = np.asarray(kurtosis, np.float64).reshape(-1)
    kappa = np.maximum(np.where(np.isfinite(kappa), kappa, 3.0), 3.0)
    if kappa.size == 0:
        kappa = np.full(max(channels, 1), 3.0)
    result: np.ndarray = STORED_NOISE_MARGIN * np.sqrt((kappa - 1 + 2 / (n - 1)) / n)
    return result
