"""TorchScript models: a traced BatchNorm call keeps the training flag and momentum it was traced with, so each
layer is measured with the real factor, and a layer traced in eval mode is said to be unmeasurable, never passed."""

from __future__ import annotations

import copy
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from torch import nn
from torch.optim.swa_utils import update_bn

from bncheck.recompute import Batch, recompute_statistics

R = FIXTURES / "recompute"
ORIGINAL = R / "sample-original.npy"


def healthy_mlp(momentum: float | None = 0.1) -> nn.Module:
    """The healthy fixture's model and weights, without dropout (a trace would bake it in train mode)."""
    sys.path.insert(0, str(R))
    from models import tabular_mlp

    model = tabular_mlp()
    model.load_state_dict(torch.load(R / "healthy.pt", weights_only=True))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.BatchNorm1d):
            module.momentum = momentum
    return model


def traced(model: nn.Module, mode: str, path: Path) -> Path:
    model = copy.deepcopy(model).train(mode == "train")
    example = torch.from_numpy(np.load(ORIGINAL)[:32])
    with torch.no_grad(), warnings.catch_warnings():
        # tracing is deprecated (yet it is what users ship), and it warns about the Python control flow it bakes in
        warnings.simplefilter("ignore")
        torch.jit.trace(model, example, check_trace=False).save(str(path))
    return path


def batches(size: int = 100) -> list[Batch]:
    x = torch.from_numpy(np.load(ORIGINAL))
    return [Batch((x[i : i + size],)) for i in range(0, len(x), size)]


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_a_model_traced_in_train_mode_is_measured_with_its_baked_momentum(tmp_path: Path, momentum) -> None:
    model = healthy_mlp(momentum)
    archive = torch.jit.load(str(traced(model, "train", tmp_path / "traced.pt")))
    measured = recompute_statistics(archive, batches())
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.momentum = None  # update_bn's cumulative average of the per-batch statistics
    update_bn([b.args[0] for b in batches()], reference)
    assert sorted(measured.layers) == ["1", "5"] and not measured.unmeasured
    for name, stats in measured.layers.items():
        bn = reference.get_submodule(name)
        np.testing.assert_allclose(stats.mean_batch_average, bn.running_mean.double().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var_batch_average, bn.running_var.double().numpy(), rtol=1e-5)


def test_a_model_traced_in_eval_mode_is_never_reported_as_recomputed(cli, tmp_path: Path) -> None:
    path = traced(healthy_mlp(), "eval", tmp_path / "traced-eval.pt")
    result = cli("inspect", path, "--model", path, "--data", ORIGINAL, "--json")
    assert result.exit_code == 2
    (file,) = result.json()["files"]
    assert file["recompute"] is None
    assert file["recompute_error"]["code"] == "bad-model"
    assert "traced in eval mode" in file["recompute_error"]["message"]
    assert file["error"] is None and len(file["layers"]) == 2  # the static checks still ran
    out = tmp_path / "out.pt"
    refused = cli("recalibrate", path, "--model", path, "--data", ORIGINAL, "-o", out)
    assert refused.exit_code == 2 and "traced in eval mode" in refused.stderr
    assert not out.exists()


def test_traced_train_model_passes_and_recalibrates_to_the_real_statistics(cli, tmp_path: Path) -> None:
    model = healthy_mlp()
    path = traced(model, "train", tmp_path / "traced.pt")
    inspected = cli("inspect", path, "--model", path, "--data", ORIGINAL, "--json", "--batch-size", "100")
    # nothing is stale; the only findings are BN016's errors: training=True is baked into every batch_norm call
    findings = inspected.json()["files"][0]["findings"]
    assert {(f["code"], f["severity"]) for f in findings} == {("BN016", "error")}, inspected.stdout
    info = inspected.json()["files"][0]["recompute"]
    assert [row["stale"] for row in info["layers"]] == [False, False]
    assert info["unmeasured"] == [] and info["samples"] == 1000
    out = tmp_path / "recalibrated.pt"
    written = cli("recalibrate", path, "--model", path, "--data", ORIGINAL, "-o", out, "--batch-size", "100")
    # written; the copy keeps its graph, whose baked training=True is still BN016 (exit 1), and nothing else
    assert written.exit_code == 1 and out.exists(), written.stderr
    assert set(re.findall(r"BN\d{3}", written.stdout)) == {"BN016"}, written.stdout
    reference = copy.deepcopy(model)
    update_bn([b.args[0] for b in batches()], reference)  # momentum None: the per-batch average
    for name, buffer in torch.jit.load(str(out)).named_buffers():
        if name.endswith(("running_mean", "running_var")):
            expected = reference.get_buffer(name).numpy()
            np.testing.assert_allclose(buffer.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_a_dropout_baked_in_train_mode_is_said(cli, tmp_path: Path) -> None:
    model = healthy_mlp()
    model[3].p = 0.2
    path = traced(model, "train", tmp_path / "traced-dropout.pt")
    info = cli("inspect", path, "--model", path, "--data", ORIGINAL, "--json").json()["files"][0]["recompute"]
    assert any("dropout in train mode" in note for note in info["notes"])
    clean = traced(healthy_mlp(), "train", tmp_path / "traced.pt")
    info = cli("inspect", clean, "--model", clean, "--data", ORIGINAL, "--json").json()["files"][0]["recompute"]
    assert not any("dropout" in note for note in info["notes"])
