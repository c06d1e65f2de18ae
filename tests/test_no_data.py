"""BN018: tensors that a file names without holding their values (lazy modules before their dry run, the meta
device, storages resized to zero) are layers with a finding, not "no BatchNorm layers"; and what the rule text says
torch does with such files is what torch 2.13 does."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import BAD
from torch import nn

from bncheck.api import inspect_file
from bncheck.checks import RULES
from bncheck.errors import NoDataError
from bncheck.loaders import open_checkpoint
from bncheck.read import read_checkpoint
from bncheck.report import Severity


def doc() -> str:
    return " ".join(RULES["BN018"].doc.split())


def bn018(path: Path) -> list[tuple[str | None, str]]:
    report = inspect_file(path)
    assert report.error is None, report.error
    assert "no BatchNorm layers" not in report.notes
    return [(f.layer, f.message) for f in report.findings if f.code == "BN018"]


def test_bn018_is_an_error() -> None:
    assert RULES["BN018"].severity is Severity.ERROR


def test_lazy_state_dict_before_the_dry_run() -> None:
    assert bn018(BAD / "BN018-lazy-before-dry-run.pt") == [
        (name, "no values stored for running_mean, running_var (uninitialised lazy buffer); weight, bias "
         "(uninitialised lazy parameter)")
        for name in ("1", "4")
    ]  # fmt: skip
    report = inspect_file(BAD / "BN018-lazy-before-dry-run.pt")
    # nothing else is said about values that are not there: no BN007 "never updated", no BN003 on empty shapes
    assert {f.code for f in report.findings} == {"BN018"}
    assert [layer.num_features for layer in report.layers] == [0, 0]  # as LazyBatchNorm1d records num_features


def test_lazy_full_module_names_its_lazy_class() -> None:
    path = BAD / "BN018-lazy-before-dry-run-full-module.pt"
    assert [name for name, _ in bn018(path)] == ["1", "4"]
    assert [layer.kind for layer in inspect_file(path).layers] == ["LazyBatchNorm1d", "LazyBatchNorm1d"]


def test_meta_device_model() -> None:
    found = bn018(BAD / "BN018-meta-device.pt")
    assert found == [
        (name, "no values stored for running_mean, running_var, num_batches_tracked, weight, bias (meta-device tensor)")
        for name in ("net.1", "net.4")
    ]
    _, layers = read_checkpoint(BAD / "BN018-meta-device.pt")
    assert [layer.layer.num_features for layer in layers] == [32, 16]  # a meta tensor keeps its shape
    assert all(layer.arrays == {} for layer in layers)


def test_meta_device_full_module(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    torch.save(model, tmp_path / "meta-full.pt")
    assert [name for name, _ in bn018(tmp_path / "meta-full.pt")] == ["1"]


def freed_model() -> nn.Module:
    """A model whose BatchNorm storages were resized to zero, the primitive FSDP uses to free unsharded parameters:
    torch.save writes the tensor's shape beside an empty storage."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model(torch.randn(8, 4))
    model[1].running_var.untyped_storage().resize_(0)
    return model


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_zero_size_storage_behind_a_shape(tmp_path: Path, zipfile_format: bool) -> None:
    path = tmp_path / "freed.pt"
    torch.save(freed_model().state_dict(), path, _use_new_zipfile_serialization=zipfile_format)
    assert bn018(path) == [("1", "no values stored for running_var (zero-size storage)")]
    (finding,) = [f for f in inspect_file(path).findings if f.code == "BN018"]
    assert finding.tensor == "running_var"
    # the other statistics are still read and checked
    _, (layer,) = read_checkpoint(path)
    assert set(layer.arrays) == {"running_mean", "num_batches_tracked", "weight", "bias"}


def test_a_truncated_storage_is_still_corrupt(tmp_path: Path) -> None:
    # only a storage the file records as empty holds "no data"; one that is shorter than its view is a broken file
    import zipfile

    path = tmp_path / "sd.pt"
    torch.save(nn.BatchNorm1d(3).state_dict(), path)
    cut = tmp_path / "cut.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(cut, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:4] if info.filename.endswith("data/1") else data)
    assert inspect_file(cut).error is not None


def test_reading_the_values_says_why_they_are_missing() -> None:
    root = open_checkpoint(BAD / "BN018-meta-device.pt").root
    with pytest.raises(NoDataError, match="meta-device tensor"):
        root["net.1.running_var"].read()
    assert NoDataError.code == "no-data"


def test_healthy_files_have_no_tensor_without_data(tmp_path: Path) -> None:
    bn = nn.BatchNorm1d(0)  # a real zero-width layer: empty shape, empty storage; nothing is missing
    torch.save(bn.state_dict(), tmp_path / "empty.pt")
    assert bn018(tmp_path / "empty.pt") == []


# ------------------------------------------------------------ what the rule text says torch does, checked on torch


def test_torch_writes_lazy_tensors_without_shape_and_cannot_load_them_into_a_batchnorm() -> None:
    state = torch.load(BAD / "BN018-lazy-before-dry-run.pt", weights_only=False)
    assert isinstance(state["1.running_mean"], nn.parameter.UninitializedBuffer)
    model = nn.Sequential(nn.Linear(30, 32, bias=False), nn.BatchNorm1d(32))
    with pytest.raises(RuntimeError, match="uninitialized parameter"):
        model.load_state_dict({k: v for k, v in state.items() if k.startswith(("0.", "1."))})
    # into a lazy module it loads, and the first forward pass, even in eval(), creates mean 0 / variance 1
    lazy = nn.Sequential(nn.LazyLinear(32, bias=False), nn.LazyBatchNorm1d())
    lazy.load_state_dict({k: v for k, v in state.items() if k.startswith(("0.", "1."))})
    lazy.eval()
    lazy(torch.randn(4, 30))
    assert torch.equal(lazy[1].running_mean, torch.zeros(32)) and torch.equal(lazy[1].running_var, torch.ones(32))
    assert "first forward pass then creates running_mean 0 and running_var 1" in doc()


def test_torch_cannot_copy_meta_tensors_into_a_model() -> None:
    state = torch.load(BAD / "BN018-meta-device.pt")
    assert state["net.1.running_var"].device.type == "meta"
    model = nn.Sequential(nn.Linear(30, 32, bias=False), nn.BatchNorm1d(32))
    with pytest.raises(RuntimeError, match="Cannot copy out of meta tensor; no data!"):
        model.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.0.")})
    assert '"Cannot copy out of meta tensor; no data!"' in doc()


def test_torch_refuses_a_zero_size_storage(tmp_path: Path) -> None:
    path = tmp_path / "freed.pt"
    torch.save(freed_model().state_dict(), path)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="Trying to resize storage that is not resizable"):
        torch.load(path)
    assert '"Trying to resize storage that is not resizable"' in doc()
