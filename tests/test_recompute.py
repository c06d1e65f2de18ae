"""Recomputed statistics against PyTorch's own update_bn and float64 references; the model is left as found."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from bncheck.recompute import Batch, batchnorm_modules, recompute_statistics


def conv_model(dropout: float = 0.0) -> nn.Module:
    """update_bn trains the whole model, dropout included; compare with it only without dropout."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 6, 3),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(36, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 2),
    )


def image_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def inputs(n: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, generator=g) * 3 + 1


def batches_of(x: torch.Tensor, size: int) -> list[Batch]:
    return [Batch((x[i : i + size],)) for i in range(0, len(x), size)]


# Train mode reduces each batch in the input's dtype (float32 here) and merges batches exactly in float64: about
# 1e-7 of a float64 computation over everything (bench/recompute_speed.py measures it on larger nets). Eval mode
# measures in float64 throughout.
TRAIN_TOLERANCE = 1e-6


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def mean_err(mean: np.ndarray, ref_mean: np.ndarray, ref_var: np.ndarray) -> float:
    """A mean's error relative to the channel's std + |mean|: a later layer's mean can be near 0, where the
    ~1e-7 differences between two float32 normalisations of the layers before it are not small relatively."""
    return float(np.max(np.abs(mean - ref_mean) / (np.sqrt(ref_var) + np.abs(ref_mean))))


def test_single_batch_equals_update_bn() -> None:
    model, x = conv_model(), inputs()
    reference = copy.deepcopy(model)
    update_bn([x], reference)
    result = recompute_statistics(model, [Batch((x,))])
    for name, stats in result.layers.items():
        module = reference.get_submodule(name)
        for estimator in ("exact", "pytorch"):
            mean, var = stats.for_estimator(estimator)
            ref_mean, ref_var = module.running_mean.double().numpy(), module.running_var.double().numpy()
            assert mean_err(mean, ref_mean, ref_var) < TRAIN_TOLERANCE
            assert rel_err(var, module.running_var.double().numpy()) < 1e-6  # the unbiased batch variance


def test_pytorch_estimator_equals_update_bn_on_many_batches() -> None:
    model, x = conv_model(), inputs(100)
    reference = copy.deepcopy(model)
    update_bn([x[i : i + 16] for i in range(0, 96, 16)], reference)  # equal batches: update_bn weighs batches equally
    result = recompute_statistics(model, batches_of(x[:96], 16))
    for name, stats in result.layers.items():
        module = reference.get_submodule(name)
        mean, var = stats.for_estimator("pytorch")
        ref_mean, ref_var = module.running_mean.double().numpy(), module.running_var.double().numpy()
        assert mean_err(mean, ref_mean, ref_var) < TRAIN_TOLERANCE
        assert rel_err(var, module.running_var.double().numpy()) < 1e-6


def captured_inputs(model: nn.Module, batches: list[Batch]) -> dict[str, torch.Tensor]:
    """What each BatchNorm received over all batches in train mode, concatenated (float64)."""
    model = copy.deepcopy(model)
    seen: dict[str, list[torch.Tensor]] = {}
    for name, module in batchnorm_modules(model).items():
        module.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0].double()))
    model.eval()
    for module in batchnorm_modules(model).values():
        module.train()
    with torch.no_grad():
        for batch in batches:
            model(*batch.args)
    return {name: torch.cat(parts) for name, parts in seen.items()}


@pytest.mark.parametrize("batch_size", [7, 32, 96])
def test_exact_estimator_equals_a_float64_reference_over_all_samples(batch_size: int) -> None:
    model, x = conv_model(), inputs()
    batches = batches_of(x, batch_size)
    result = recompute_statistics(model, batches)
    for name, values in captured_inputs(model, batches).items():
        per_channel = values.transpose(0, 1).reshape(values.shape[1], -1)
        stats = result.layers[name]
        ref_var = per_channel.var(1, unbiased=True).numpy()
        assert mean_err(stats.mean_pooled, per_channel.mean(1).numpy(), ref_var) < TRAIN_TOLERANCE
        assert rel_err(stats.var_pooled, per_channel.var(1, unbiased=True).numpy()) < TRAIN_TOLERANCE
        assert stats.values_per_channel == per_channel.shape[1]
        assert stats.samples == len(x)


def test_first_layer_statistics_do_not_depend_on_batching() -> None:
    model, x = conv_model(), inputs()
    first = "1"
    a = recompute_statistics(model, batches_of(x, 8)).layers[first]
    b = recompute_statistics(model, batches_of(x, 96)).layers[first]
    tolerance = TRAIN_TOLERANCE
    assert rel_err(a.mean_pooled, b.mean_pooled) < tolerance and rel_err(a.var_pooled, b.var_pooled) < tolerance


def test_2d_layers_reduce_over_every_axis_but_channels() -> None:
    model = image_model()
    x = torch.randn(10, 3, 6, 6)
    reference = copy.deepcopy(model)
    update_bn([x], reference)
    stats = recompute_statistics(model, [Batch((x,))]).layers["1"]
    assert rel_err(stats.mean_pooled, reference[1].running_mean.double().numpy()) < 1e-6
    assert rel_err(stats.var_pooled, reference[1].running_var.double().numpy()) < 1e-6
    assert stats.values_per_channel == 10 * 4 * 4


def test_dropout_stays_in_eval_mode() -> None:
    torch.manual_seed(0)
    with_dropout = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.9), nn.BatchNorm1d(6))
    without = copy.deepcopy(with_dropout)
    without[1].p = 0.0
    x = torch.randn(50, 4)
    a = recompute_statistics(with_dropout, [Batch((x,))]).layers["2"]
    b = recompute_statistics(without, [Batch((x,))]).layers["2"]
    np.testing.assert_array_equal(a.var_pooled, b.var_pooled)


def test_model_is_left_as_found() -> None:
    model = conv_model(dropout=0.5)
    model.train()
    model[5].eval()  # a mixed state must survive too
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    recompute_statistics(model, batches_of(inputs(), 32))
    recompute_statistics(model, batches_of(inputs(), 32), mode="eval")
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_batch_with_one_value_per_channel_is_skipped() -> None:
    model, x = conv_model(), inputs(65)
    result = recompute_statistics(model, batches_of(x, 32))  # the last batch holds one sample
    assert (result.batches_used, result.batches_skipped, result.samples) == (2, 1, 64)
    # in eval mode nothing normalises with batch statistics, so the batch counts
    assert recompute_statistics(model, batches_of(x, 32), mode="eval").batches_used == 3


def test_eval_mode_measures_inputs_under_stored_statistics() -> None:
    model, x = conv_model(), inputs()
    update_bn([x * 0.1], model)  # stored statistics from other data
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    handle = model[6].register_forward_pre_hook(lambda m, a: captured.update(x=a[0].double()))
    with torch.no_grad():
        model(x)
    handle.remove()
    stats = recompute_statistics(model, [Batch((x,))], mode="eval").layers["6"]
    assert rel_err(stats.mean_pooled, captured["x"].mean(0).numpy()) < 1e-9
    train_stats = recompute_statistics(model, [Batch((x,))], mode="train").layers["6"]
    assert rel_err(stats.mean_pooled, train_stats.mean_pooled) > 1e-3  # the two modes really differ here


def test_forward_stops_after_the_last_batchnorm() -> None:
    model, x = conv_model(), inputs()
    full = recompute_statistics(copy.deepcopy(model), batches_of(x, 32))
    head_calls = []
    model[8].register_forward_hook(lambda *_: head_calls.append(1))
    result = recompute_statistics(model, batches_of(x, 32))
    assert len(head_calls) == 1  # only the first batch, which learns how often each BatchNorm runs
    for name in full.layers:
        np.testing.assert_array_equal(full.layers[name].var_pooled, result.layers[name].var_pooled)


def test_keyword_batches_are_passed_as_keywords() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, *, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.bn(a + b)

    a, b = torch.randn(20, 3), torch.randn(20, 3)
    stats = recompute_statistics(TwoInputs(), [Batch((), {"a": a, "b": b})]).layers["bn"]
    assert rel_err(stats.mean_pooled, (a + b).double().mean(0).numpy()) < TRAIN_TOLERANCE


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_far_below_eps_and_far_from_zero_are_exact(channels_last: bool) -> None:
    """The fused kernel gives 1/sqrt(var + eps); a variance far below eps must not lose its digits there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
    with torch.no_grad():
        model[0].weight[:2] *= 1e-5  # two channels with variance ~1e-10, far below eps = 1e-5
    x = torch.randn(64, 3, 16, 16) * 2 + 50
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    stats = recompute_statistics(model, [Batch((x[i : i + 16],)) for i in range(0, 64, 16)]).layers["1"]
    with torch.no_grad():
        values = model[0](x).double().transpose(0, 1).reshape(8, -1)
    variance, mean = values.var(1).numpy(), values.mean(1).numpy()
    assert variance[:2].max() < 1e-8
    assert rel_err(stats.var_pooled, variance) < 1e-6
    assert np.max(np.abs(stats.mean_pooled - mean) / (np.sqrt(variance) + np.abs(mean))) < 1e-6
