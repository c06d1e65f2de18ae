"""The format registry is the one place that knows the formats: dispatch, directory search, the counter rules,
the CLI help and the pre-commit hook all follow it."""

from __future__ import annotations

import re

import numpy as np
import pytest
import toy_format
from conftest import ROOT

import bncheck
from bncheck import loaders
from bncheck.loaders import FORMATS, INDEX_SUFFIX, checkpoint_suffixes


@pytest.fixture
def with_toy_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loaders, "FORMATS", (*FORMATS, toy_format.FORMAT))


def bn_tensors(var: float = 2.0) -> dict[str, np.ndarray]:
    return {
        "body.0.weight": np.ones((4, 3)),
        "body.1.running_mean": np.zeros(4) + 0.5,
        "body.1.running_var": np.full(4, var),
        "body.1.weight": np.ones(4),
        "body.1.bias": np.zeros(4),
    }


def test_a_new_format_is_one_module_and_one_registry_entry(with_toy_format, tmp_path) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    toy_format.write_bnx(folder / "model.bnx", bn_tensors())
    toy_format.write_bnx(folder / "broken.bnx", bn_tensors(var=-1.0))
    report = bncheck.inspect(folder)  # found by the directory search, opened by its leading bytes
    by_name = {file.path.rsplit("/", 1)[-1]: file for file in report.files}
    assert set(by_name) == {"model.bnx", "broken.bnx"}
    healthy, broken = by_name["model.bnx"], by_name["broken.bnx"]
    assert healthy.format == "bnx" and healthy.error is None
    assert [(layer.name, layer.kind) for layer in healthy.layers] == [("body.1", "BatchNorm1d")]
    # the format stores no batch counter, so its absence is no finding (BN010 fires on a torch file without one)
    assert healthy.findings == ()
    assert [f.code for f in broken.findings] == ["BN002"]


def test_a_torch_file_without_a_counter_still_gets_bn010(tmp_path) -> None:
    import torch

    state = {name: torch.from_numpy(values) for name, values in bn_tensors().items()}
    torch.save(state, tmp_path / "old.pt")
    assert [f.code for f in bncheck.inspect(tmp_path / "old.pt").files[0].findings] == ["BN010"]


def test_a_file_named_for_another_format_gets_a_note(with_toy_format, tmp_path) -> None:
    toy_format.write_bnx(tmp_path / "model.pt", bn_tensors())
    file = bncheck.inspect(tmp_path / "model.pt").files[0]
    assert file.format == "bnx"
    assert "named .pt but its bytes are a bnx file; read as what the bytes say" in file.notes


def test_every_format_has_a_distinct_name_and_an_importable_reader() -> None:
    import importlib

    assert len({fmt.name for fmt in FORMATS}) == len(FORMATS)
    for fmt in FORMATS:
        module, _, function = fmt.reader.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), fmt.reader


def test_pre_commit_hook_runs_on_every_single_file_suffix() -> None:
    hooks = (ROOT / ".pre-commit-hooks.yaml").read_text()
    pattern = re.search(r"files: (.+)", hooks)
    assert pattern is not None
    hooked = re.fullmatch(r"\\\.\((.+)\)\$", pattern.group(1).strip())
    assert hooked is not None, pattern.group(1)
    expected = {s.removeprefix(".") for s in checkpoint_suffixes() if s != INDEX_SUFFIX}
    assert set(hooked.group(1).split("|")) == expected


def test_inspect_help_names_every_suffix(cli) -> None:
    result = cli("inspect", "--help")
    text = " ".join(result.stdout.split())
    for suffix in checkpoint_suffixes():
        assert suffix.removeprefix(".index") in text, suffix


def test_a_safetensors_header_whose_length_starts_like_a_pickle(tmp_path) -> None:
    # a 640-byte header makes the file start with 80 02, the first bytes of a protocol-2 pickle
    import struct

    from safetensors.numpy import save

    for pad in range(700):
        tensors = {"bn.running_mean": np.zeros(4, np.float32), "bn.running_var": np.ones(4, np.float32)}
        data = save(tensors, metadata={"pad": "x" * pad})
        if struct.unpack("<Q", data[:8])[0] == 0x280:
            break
    assert data[:2] == b"\x80\x02"
    (tmp_path / "model.safetensors").write_bytes(data)
    file = bncheck.inspect(tmp_path / "model.safetensors").files[0]
    assert file.error is None and file.format == "safetensors" and [layer.name for layer in file.layers] == ["bn"]
