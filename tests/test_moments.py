"""The per-channel moments behind train-mode recomputation: the stand-in forward, the layers that keep their own,
channels_last inputs, and the kurtosis merged across batches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from torch import nn

from bncheck.moments import Moments, tail_moments
from bncheck.recompute import Batch, recompute_statistics


def reference(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    values = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return values.mean(1).numpy(), values.var(1).numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


class ScaledBatchNorm(nn.BatchNorm1d):
    """A subclass with a forward of its own: it must run, and be measured on the input it gets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize("make", [nn.BatchNorm1d, nn.SyncBatchNorm, ScaledBatchNorm])
def test_every_kind_of_batchnorm_is_measured_and_left_as_found(make) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), make(5), nn.ReLU(), nn.Linear(5, 4), nn.BatchNorm1d(4))
    x = torch.randn(40, 3) * 2 + 1
    before = copy.deepcopy(model.state_dict())
    result = recompute_statistics(model, [Batch((x,))])
    with torch.no_grad():
        first = model[0](x)
        reference_model = copy.deepcopy(model)
        reference_model.train()
        second_input = reference_model[3](reference_model[2](reference_model[1](first)))
    for name, values in (("1", first), ("4", second_input)):
        mean, var = reference(values)
        assert rel_err(result.layers[name].mean_pooled, mean) < 1e-6, name
        assert rel_err(result.layers[name].var_pooled, var) < 1e-6, name
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert all("forward" not in vars(m) for m in model.modules())


def test_lazy_batchnorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LazyBatchNorm1d())
    with torch.no_grad():
        model.eval()(torch.randn(2, 3))  # materialised, as after loading a checkpoint
    x = torch.randn(30, 3)
    stats = recompute_statistics(model, [Batch((x,))]).layers["1"]
    mean, var = reference(model[0](x).detach())
    assert rel_err(stats.mean_pooled, mean) < 1e-6 and rel_err(stats.var_pooled, var) < 1e-6


def test_channels_last_matches_float64() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)).to(memory_format=torch.channels_last)
    x = (torch.randn(16, 3, 12, 12) * 3 + 5).contiguous(memory_format=torch.channels_last)
    stats = recompute_statistics(model, [Batch((x[:9],)), Batch((x[9:],))]).layers["1"]
    with torch.no_grad():
        mean, var = reference(model[0].double()(x.double()))
    assert rel_err(stats.mean_pooled, mean) < 1e-6 and rel_err(stats.var_pooled, var) < 1e-6


@pytest.mark.parametrize("dims", [2, 3])
def test_stacked_channels_last_layers_match_a_float64_train_mode_run(dims: int) -> None:
    """Two layers of different widths share one scratch buffer for their deviations, across batches of different
    sizes; the second layer's input depends on the first one's train-mode output."""
    torch.manual_seed(0)
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    model = nn.Sequential(conv(3, 8, 3), norm(8), nn.ReLU(), conv(8, 4, 3), norm(4))
    model = model.to(memory_format=layout)
    x = (torch.randn(16, 3, *[9] * dims) * 3 + 5).contiguous(memory_format=layout)
    batches = [x[:9], x[9:]]
    result = recompute_statistics(model, [Batch((b,)) for b in batches]).layers
    double = copy.deepcopy(model).double().train()
    inputs: dict[str, list[torch.Tensor]] = {"1": [], "4": []}
    for name in inputs:
        double.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: inputs[n].append(a[0]))
    with torch.no_grad():
        for b in batches:
            double(b.double())
    for name, seen in inputs.items():
        mean, var = reference(torch.cat(seen))
        stats = result[name]
        # a mean near 0 has no relative error worth the name: measured against the channel's spread
        assert np.max(np.abs(stats.mean_pooled - mean) / np.sqrt(var)) < 1e-6
        assert rel_err(stats.var_pooled, var) < 1e-6


def test_forward_is_restored_when_the_model_fails() -> None:
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.bn(x)
            raise RuntimeError("boom")

    model = Fails()
    with pytest.raises(Exception, match="boom"):
        recompute_statistics(model, [Batch((torch.randn(4, 3),))])
    assert "forward" not in vars(model.bn) and model.bn.momentum == 0.1


@pytest.mark.parametrize("split", [1, 7, 50])
def test_kurtosis_merges_exactly_across_batches(split: int) -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.lognormal(0, 1, (200, 4)))
    merged = Moments()
    for i in range(0, 200, split):
        merged.merge(tail_moments(x[i : i + split]))
    expected = scipy_stats.kurtosis(x.numpy(), axis=0, fisher=False)
    kurtosis = merged.kurtosis()
    assert kurtosis is not None
    np.testing.assert_allclose(kurtosis, expected, rtol=1e-10)
    np.testing.assert_allclose(merged.variance(), x.numpy().var(0, ddof=1), rtol=1e-12)


def test_recomputation_reports_kurtosis() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(2))
    x = torch.cat([torch.randn(300, 1), torch.from_numpy(np.random.default_rng(0).lognormal(0, 1, (300, 1)))], 1)
    stats = recompute_statistics(model, [Batch((x[i : i + 64].float(),)) for i in range(0, 300, 64)]).layers["0"]
    assert stats.kurtosis is not None
    assert 2 < stats.kurtosis[0] < 4 and stats.kurtosis[1] > 6
