"""Per-channel moments of BatchNorm inputs and their exact streaming merge. numpy here; torch only inside the
functions that reduce a tensor, imported there.

Means and sums of squared deviations (M2) are merged across batches with Chan et al.'s formula, third and fourth
central sums (M3, M4) with Pébay's (2008), so the pooled result does not depend on how the samples were split into
batches. The fourth moment only feeds a noise floor (the kurtosis of each channel), so it is measured on a
subsample: at most ``TAIL_POSITIONS`` places per spatial axis of the first ``TAIL_SAMPLES`` samples or so (whole
batches). Measured on every value it cost more than the mean and variance themselves (bench/recompute_speed.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# places kept per spatial axis for the kurtosis subsample (a 32x32 map gives 16 values per sample and channel)
TAIL_POSITIONS = 4
# batches measured for the kurtosis until this many samples are in (BN012 is typically judged on a few hundred)
TAIL_SAMPLES = 1024


@dataclass
class Moments:
    """Per-channel count, mean and central sums M2 (and optionally M3, M4), merged exactly."""

    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    m3: np.ndarray | None = None
    m4: np.ndarray | None = None

    def merge(self, other: Moments) -> None:
        """Add ``other`` (same channels) to these moments; higher sums are kept only when both sides have them."""
        if other.count == 0 or other.mean is None or other.m2 is None:
            return
        if self.count == 0 or self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            self.m3 = None if other.m3 is None else other.m3.copy()
            self.m4 = None if other.m4 is None else other.m4.copy()
            return
        na, nb = float(self.count), float(other.count)
        n = na + nb
        delta = other.mean - self.mean
        if self.m3 is not None and self.m4 is not None and other.m3 is not None and other.m4 is not None:
            # Pébay's pairwise formulas; they use the old M2 and M3, so they come first
            m4 = (
                self.m4
                + other.m4
                + delta**4 * (na * nb * (na * na - na * nb + nb * nb) / n**3)
                + 6 * delta**2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
                + 4 * delta * (na * other.m3 - nb * self.m3) / n
            )
            m3 = (
                self.m3
                + other.m3
                + delta**3 * (na * nb * (na - nb) / n**2)
                + 3 * delta * (na * other.m2 - nb * self.m2) / n
            )
            self.m3, self.m4 = m3, m4
        else:
            self.m3 = self.m4 = None
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (na * nb / n)
        self.count = self.count + other.count

    def variance(self) -> np.ndarray:
        """The unbiased variance (NaN with fewer than two values)."""
        assert self.m2 is not None
        return self.m2 / (self.count - 1) if self.count > 1 else np.full_like(self.m2, np.nan)

    def kurtosis(self) -> np.ndarray | None:
        """The (non-excess) sample kurtosis n·M4/M2² per channel (3 for Gaussian data); NaN for a constant
        channel; None without fourth moments."""
        if self.m4 is None or self.m2 is None:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            kurtosis: np.ndarray = self.count * self.m4 / self.m2**2
        return np.where(self.m2 > 0, kurtosis, np.nan)


def reduced_dims(x: torch.Tensor) -> list[int]:
    """Every axis of a BatchNorm input but the channel axis 1."""
    return [0, *range(2, x.dim())]


def channel_moments(x: torch.Tensor) -> Moments:
    """Count, mean and M2 of each channel of ``x`` in float64 (two passes, no transpose: any memory format)."""
    import torch

    dims = reduced_dims(x)
    values = x.detach().to(torch.float64)
    mean = values.mean(dim=dims, keepdim=True)
    m2 = (values - mean).square_().sum(dim=dims)
    return Moments(x.numel() // x.shape[1], mean.flatten().cpu().numpy(), m2.cpu().numpy())


def tail_moments(x: torch.Tensor) -> Moments:
    """Count, mean, M2, M3 and M4 of each channel on a subsample of ``x``: every sample, at most
    ``TAIL_POSITIONS`` evenly spaced places per spatial axis (the fourth moment needs no more for a noise floor)."""
    import torch

    index: list[slice] = [slice(None), slice(None)]
    for size in x.shape[2:]:
        step = -(-size // TAIL_POSITIONS)
        index.append(slice(step // 2, None, step))
    values = x.detach()[tuple(index)].to(torch.float64)
    dims = reduced_dims(values)
    mean = values.mean(dim=dims, keepdim=True)
    deviation = values - mean
    squared = deviation.square()
    return Moments(
        values.numel() // values.shape[1],
        mean.flatten().cpu().numpy(),
        squared.sum(dim=dims).cpu().numpy(),
        (squared * deviation).sum(dim=dims).cpu().numpy(),
        squared.square_().sum(dim=dims).cpu().numpy(),
    )
