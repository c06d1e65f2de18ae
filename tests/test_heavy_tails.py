"""BN012's noise floor on heavy-tailed data: healthy models trained on Gaussian, t(3) and lognormal features are
not called stale on 256 fresh samples, and real staleness of heavy-tailed data is still caught."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from torch import nn

from bncheck.drift import DriftThresholds, measure_drift
from bncheck.recompute import Batch, batchnorm_modules, recompute_statistics

sys.path.insert(0, str(FIXTURES / "recompute"))
from models import tabular_mlp

LIMITS = DriftThresholds()
FEATURES = 20
# raw features of very different scales, the largest reaching about 1e5 (lognormal)
SCALES = np.logspace(0, 4, FEATURES)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train ten times faster on one thread than on two (and CI has two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def draw(kind: str, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels; the label is a noisy linear rule of the underlying (untransformed) draws."""
    if kind == "gaussian":
        z = rng.standard_normal((n, FEATURES))
        x = z
    elif kind == "t3":
        z = rng.standard_t(3, (n, FEATURES))
        x = z
    else:
        z = rng.standard_normal((n, FEATURES))
        x = np.exp(z) * SCALES  # lognormal, sigma 1
    w = np.linspace(-1, 1, FEATURES)
    y = (z @ w + 0.5 * rng.standard_normal(n) > 0).astype(np.int64)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


def healthy_model(kind: str, seed: int, steps: int = 150, batch: int = 64) -> nn.Module:
    """A tabular MLP trained briefly in train mode (Adam, BatchNorm momentum 0.1) on data of one distribution,
    with a learning rate that decays to zero so that the last running averages describe the final weights."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = tabular_mlp(FEATURES, 64, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    for _ in range(steps):
        x, y = draw(kind, batch, rng)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model


def stale_layers(model: nn.Module, x: torch.Tensor, *, use_kurtosis: bool = True) -> list[str]:
    """BN012's verdict per layer, computed as bncheck.recompute.measure_checkpoint does (exact estimator)."""
    result = recompute_statistics(model, [Batch((x[i : i + 64],)) for i in range(0, len(x), 64)])
    stale = []
    for name, module in batchnorm_modules(model).items():
        stats = result.layers[name]
        drift = measure_drift(
            module.running_mean.numpy(),
            module.running_var.numpy(),
            stats.mean_pooled,
            stats.var_pooled,
            samples=stats.samples,
            eps=module.eps,
            other_var=stats.var_batch_average,
            kurtosis=stats.kurtosis if use_kurtosis else None,
        )
        if drift.reasons(LIMITS):
            stale.append(name)
    return stale


def false_alarms(kind: str, seeds: int = 20, samples: int = 256) -> int:
    alarms = 0
    for seed in range(seeds):
        model = healthy_model(kind, seed)
        x, _ = draw(kind, samples, np.random.default_rng(10_000 + seed))  # fresh samples, same distribution
        alarms += bool(stale_layers(model, x))
    return alarms


@pytest.mark.parametrize("kind", ["gaussian", "t3", "lognormal"])
def test_healthy_models_are_rarely_called_stale_on_256_samples(kind: str) -> None:
    assert false_alarms(kind) <= 1


@pytest.mark.parametrize(
    ("kind", "change"),
    [("lognormal", "rescaled"), ("lognormal", "shifted"), ("t3", "rescaled"), ("t3", "shifted")],
)
def test_stale_statistics_of_heavy_tailed_data_are_still_caught(kind: str, change: str) -> None:
    """Stored statistics from a rescaled (x3) or shifted (+2 scales) version of the data: stale on the real data."""
    model = healthy_model(kind, seed=0)
    rng = np.random.default_rng(1)
    scales = torch.from_numpy((SCALES if kind == "lognormal" else np.ones(FEATURES)).astype(np.float32))
    other, _ = draw(kind, 2048, rng)
    other = other * 3 if change == "rescaled" else other + 2 * scales
    torch.optim.swa_utils.update_bn([other[i : i + 64] for i in range(0, len(other), 64)], model)
    x, _ = draw(kind, 256, rng)
    assert stale_layers(model, x) != []
