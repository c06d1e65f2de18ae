"""The PyTorch behaviour that rule texts and the README state, checked by running PyTorch."""

from __future__ import annotations

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
