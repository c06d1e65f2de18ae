"""The PyTorch behaviour that rule texts and the README state, checked by running PyTorch."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from bncheck.checks import RULES


def doc(code: str) -> str:
    return " ".join(RULES[code].doc.split())


def trained_bn(momentum: float | None = 0.1) -> tuple[nn.BatchNorm1d, torch.Tensor]:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=momentum)
    x = torch.randn(16, 3) * 2 + 1
    bn.train()
    bn(x)
    return bn, x


def test_momentum_weighs_the_new_batch_with_the_unbiased_variance() -> None:
    bn, x = trained_bn()
    assert torch.allclose(bn.running_mean, 0.9 * 0 + 0.1 * x.mean(0))
    assert torch.allclose(bn.running_var, 0.9 * 1 + 0.1 * x.var(0, unbiased=True))
    assert "running = (1 - momentum) * running + momentum * batch_statistic" in doc("BN007")
    assert "opposite of Keras" in doc("BN007")


def test_train_mode_normalises_with_the_biased_batch_variance_and_ignores_the_stored_statistics() -> None:
    bn, x = trained_bn()
    with torch.no_grad():
        bn.running_mean.fill_(100.0)
    out = bn(x)
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps)
    assert torch.allclose(out, expected, atol=1e-5)


def test_eval_mode_uses_the_stored_statistics() -> None:
    bn, x = trained_bn()
    bn.eval()
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(bn(x), expected, atol=1e-5)
    assert "uses them only in eval() mode" in doc("BN007")


def test_flipping_track_running_stats_off_after_training() -> None:
    bn, x = trained_bn()
    stored = bn.running_mean.clone(), bn.running_var.clone()
    bn.track_running_stats = False
    bn.train()
    out = bn(x)
    assert torch.allclose(out, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps), atol=1e-5)
    assert torch.equal(bn.running_mean, stored[0]) and torch.equal(bn.running_var, stored[1])  # not updated
    bn.eval()  # in eval() the stored statistics are used whatever the flag says
    assert torch.allclose(bn(x), (x - stored[0]) / torch.sqrt(stored[1] + bn.eps), atol=1e-5)
    assert (
        "track_running_stats=False set after construction (the layer then normalises with batch statistics "
        "in train mode and never updates the stored ones)" in doc("BN007")
    )


def test_momentum_none_is_a_cumulative_average_by_num_batches_tracked() -> None:
    bn = nn.BatchNorm1d(2, momentum=None)
    bn.train()
    batches = [torch.randn(8, 2) for _ in range(3)]
    for batch in batches:
        bn(batch)
    assert int(bn.num_batches_tracked) == 3
    assert torch.allclose(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0), atol=1e-6)
    assert "momentum=None" in doc("BN005") and "cumulative average" in doc("BN005")


def test_strict_false_silently_keeps_the_initial_statistics() -> None:
    bn, _ = trained_bn()
    state = {k: v for k, v in bn.state_dict().items() if k != "running_var"}
    fresh = nn.BatchNorm1d(3)
    result = fresh.load_state_dict(state, strict=False)
    assert result.missing_keys == ["running_var"]
    assert torch.equal(fresh.running_var, torch.ones(3))
    assert "load_state_dict(strict=False) silently skips the missing tensor" in doc("BN006")


def test_instance_norm_never_counts_batches() -> None:
    norm = nn.InstanceNorm1d(3, track_running_stats=True)
    norm.train()
    norm(torch.randn(4, 3, 5))
    assert int(norm.num_batches_tracked) == 0
    assert not torch.equal(norm.running_mean, torch.zeros(3))
    assert "InstanceNorm layers are skipped" in doc("BN013")


def test_half_cast_of_a_large_variance_is_inf() -> None:
    assert torch.isinf(torch.tensor([70000.0]).half()).all()
    assert "65504" in doc("BN001") and "model.half()" in doc("BN001")


def test_num_batches_tracked_is_an_int64_scalar_buffer() -> None:
    bn, _ = trained_bn()
    counter = bn.state_dict()["num_batches_tracked"]
    assert counter.dtype == torch.int64 and counter.shape == ()
    assert "int64 scalar" in doc("BN005")


def test_momentum_099_leaves_the_running_mean_within_1_percent_of_the_last_batch() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=0.99)
    bn.train()
    for _ in range(5):
        bn(torch.randn(32, 3) * 3 + 2)
    before = bn.running_mean.clone()
    last = torch.randn(32, 3) * 3 - 4
    bn(last)
    # 99% the last batch's mean, 1% the history: its distance to the last batch is 1% of the history's
    assert torch.allclose(bn.running_mean, 0.01 * before + 0.99 * last.mean(0), atol=1e-6)
    assert ((bn.running_mean - last.mean(0)).abs() <= 0.0101 * (before - last.mean(0)).abs()).all()
    assert "0.99 keeps 1% of the history: the stored statistics are 99% those of the last training batch" in doc(
        "BN014"
    )


def test_keras_momentum_099_is_pytorch_001_and_higher_momentum_adapts_faster() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(16, 2) + 3 for _ in range(4)]
    keras_moving_mean = torch.zeros(2)
    bn = nn.BatchNorm1d(2, momentum=0.01)
    bn.train()
    for batch in batches:
        keras_moving_mean = keras_moving_mean * 0.99 + batch.mean(0) * (1 - 0.99)  # Keras' BatchNormalization
        bn(batch)
    assert torch.allclose(bn.running_mean, keras_moving_mean, atol=1e-6)
    distance = {}
    for momentum in (0.1, 0.5):
        layer = nn.BatchNorm1d(2, momentum=momentum)
        layer(batches[0])
        distance[momentum] = (layer.running_mean - batches[0].mean(0)).abs().max()
    assert distance[0.5] < distance[0.1]  # a higher momentum moves further toward the new batch
    assert "Keras 0.99 is PyTorch 0.01" in doc("BN014") and "adapts faster, not slower" in doc("BN014")


def test_eps_is_the_second_parameter_and_only_enters_the_square_root() -> None:
    bn = nn.BatchNorm1d(3, 0.9)  # written for momentum 0.9
    assert bn.eps == 0.9 and bn.momentum == 0.1
    assert "nn.BatchNorm1d(64, 0.9) sets eps=0.9 and keeps momentum 0.1" in doc("BN015")
    trained, x = trained_bn()
    for eps in (1e-5, 0.5):
        trained.eps = eps
        trained.eval()
        expected = (x - trained.running_mean) / torch.sqrt(trained.running_var + eps)
        assert torch.allclose(trained(x), expected, atol=1e-5)
    assert "y = (x - mean) / sqrt(var + eps) * weight + bias" in doc("BN015")
    flat = nn.BatchNorm1d(1, eps=0.0).eval()
    with torch.no_grad():
        flat.running_var.zero_()
    assert not torch.isfinite(flat(torch.ones(2, 1))).all()  # a variance of 0 and eps 0 divides by zero
    assert "With eps = 0 a channel whose variance is 0" in doc("BN015")


def test_a_model_keeps_the_mode_it_was_saved_in(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model.train()
    model(torch.randn(8, 3))
    torch.save(model, tmp_path / "full.pt")
    loaded = torch.load(tmp_path / "full.pt", weights_only=False)
    assert loaded.training and loaded[1].training
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    assert torch.jit.load(str(tmp_path / "scripted.pt")).training
    assert "keeps the mode it was saved in" in doc("BN016")
    stored = loaded[1].running_mean.clone()
    loaded(torch.randn(4, 3))
    assert not torch.equal(loaded[1].running_mean, stored)
    try:
        loaded(torch.randn(1, 3))
    except ValueError as exc:
        assert "Expected more than 1 value per channel when training" in str(exc)
    else:
        raise AssertionError("a batch of one sample was accepted in train mode")
    assert "BatchNorm1d refuses a batch of one sample" in doc("BN016")
    assert "every forward pass moves the stored statistics toward that batch" in doc("BN016")


def test_a_graph_traced_in_train_mode_ignores_eval() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    bn.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing is deprecated, yet it is what users ship
        traced = torch.jit.trace(bn, torch.randn(8, 3), check_trace=False)
    traced.eval()
    stored = traced.running_mean.clone()
    x = torch.randn(16, 3) * 2 + 5
    out = traced(x)
    assert torch.allclose(out, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5), atol=1e-4)
    assert not torch.equal(traced.running_mean, stored)  # the stored statistics were overwritten
    assert "eval() on the traced module changes nothing" in doc("BN016")


def test_tracking_off_is_not_inference_mode() -> None:
    # the behaviour itself is checked by test_flipping_track_running_stats_off_after_training
    assert "in train mode normalises with batch statistics and stops updating the stored ones" in doc("BN017")
    assert "in eval() it still uses the stored ones whatever the flag says" in doc("BN017")
