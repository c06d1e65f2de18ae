"""Issue 11, no hostile file passes clean: live payloads through globals a deny-list forgets, dotted attribute paths,
every pickle of a legacy file and every shard; healthy files with harmless classes get no finding."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pathlib
import platform
import types
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from picklescan.scanner import _unsafe_globals
from test_hostile_corpus import Reduce, healthy_model_state, python_code, shell
from torch import nn

from bncheck.pickle_globals import Risk, grade_global


def nested_torch_load(marker: Path) -> object:
    buffer = io.BytesIO()
    torch.save({"x": Reduce(os.system, shell(marker))}, buffer)
    return Reduce(torch.storage._load_from_bytes, buffer.getvalue())


def numpy_allow_pickle(marker: Path) -> object:
    npy = marker.with_name(marker.name + ".npy")
    np.save(npy, np.array([Reduce(os.system, shell(marker))], dtype=object), allow_pickle=True)
    return Reduce(np.load, str(npy), None, True)  # np.load(file, mmap_mode, allow_pickle)


def collect_env_run(marker: Path) -> object:
    from torch.utils import collect_env

    return Reduce(collect_env.run, shell(marker))


def fx_exec(marker: Path) -> object:
    from torch.fx import graph_module

    return Reduce(graph_module._exec_with_source, python_code(marker), {})


def imap_stream(marker: Path) -> object:
    import imaplib

    return Reduce(imaplib.IMAP4_stream, shell(marker))


# Each runs code or creates the marker file when torch.load(weights_only=False) unpickles it; none is on the old
# deny-list of BN101.
LIVE: dict[str, Callable[[Path], object]] = {
    "torch.storage._load_from_bytes": nested_torch_load,
    "numpy.load": numpy_allow_pickle,
    "torch.utils.collect_env.run": collect_env_run,
    "torch.fx.graph_module._exec_with_source": fx_exec,
    "imaplib.IMAP4_stream": imap_stream,
    "uuid._get_command_stdout": lambda m: Reduce(uuid._get_command_stdout, "touch", str(m)),
    "logging.FileHandler": lambda m: Reduce(logging.FileHandler, str(m)),
    "zipfile.ZipFile": lambda m: Reduce(zipfile.ZipFile, str(m), "w"),
}


def armed(make: Callable[[Path], object], folder: Path) -> None:
    """Check that a payload is live: torch.load(weights_only=False) of it creates the marker."""
    marker = folder / "armed"
    path = folder / "armed.pt"
    torch.save({"extra": make(marker)}, path)
    try:
        loaded = torch.load(path, weights_only=False)
    except Exception:  # several payloads run and then fail to return an object
        loaded = {}
    for value in loaded.values():
        if hasattr(value, "close"):
            value.close()  # the file handler or archive the payload opened
    assert marker.exists(), "payload is not live"


def bn101_names(result) -> list[str]:
    (file,) = result.json()["files"]
    assert file["error"] is None, file["error"]
    (finding,) = [f for f in file["findings"] if f["code"] == "BN101"]
    return finding["message"].removeprefix("pickle names ").split("; ")[0].split(", ")


@pytest.mark.parametrize("kind", sorted(LIVE))
def test_globals_a_deny_list_forgets_are_bn101_and_never_run(cli, tmp_path: Path, kind: str) -> None:
    armed(LIVE[kind], tmp_path)
    marker = tmp_path / "marker"
    path = tmp_path / "hostile.pt"
    torch.save({"state_dict": healthy_model_state(), "extra": LIVE[kind](marker)}, path)
    result = cli("inspect", path, "--json")
    assert not marker.exists()
    assert kind in bn101_names(result)
    assert len(result.json()["files"][0]["layers"]) == 2
    assert result.exit_code == 1


def with_dotted_global(path: Path, module: str, name: str) -> None:
    """Rewrite the archive's posix.system global as module + dotted name, under protocol 4 (which walks dots)."""
    rewritten = path.with_name("dotted-" + path.name)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(rewritten, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.startswith(b"\x80\x02") and b"cposix\nsystem\n" in data
                data = b"\x80\x04" + data[2:].replace(b"cposix\nsystem\n", f"c{module}\n{name}\n".encode())
            dst.writestr(info, data)
    rewritten.replace(path)


@pytest.mark.parametrize(
    ("module", "name"), [("gzip", "os.system"), ("logging", "os.system"), ("__main__", "__builtins__.exec")]
)
def test_dotted_attribute_paths_are_resolved_as_the_unpickler_walks_them(
    cli, tmp_path: Path, module: str, name: str
) -> None:
    def payload(marker: Path) -> object:
        code = python_code(marker) if name.endswith("exec") else shell(marker)
        return Reduce(os.system, code)

    for marker in (tmp_path / "armed", tmp_path / "marker"):
        path = tmp_path / f"{marker.name}.pt"
        torch.save({"state_dict": healthy_model_state(), "extra": payload(marker)}, path)
        with_dotted_global(path, module, name)
    torch.load(tmp_path / "armed.pt", weights_only=False)
    assert (tmp_path / "armed").exists(), "payload is not live"
    result = cli("inspect", tmp_path / "marker.pt", "--json")
    assert not (tmp_path / "marker").exists()
    assert bn101_names(result) == [f"{module}:{name}"]


def test_a_payload_chained_through_allowed_callables_is_bn101(cli, tmp_path: Path) -> None:
    # numpy's generator constructor and torch's subclass rebuild are allowed; the callable each calls is not
    def chained(marker: Path) -> object:
        from numpy.random import _pickle as np_random_pickle

        return Reduce(np_random_pickle.__randomstate_ctor, shell(marker), os.system)

    armed(chained, tmp_path)
    marker = tmp_path / "marker"
    path = tmp_path / "chained.pt"
    torch.save({"state_dict": healthy_model_state(), "rng": chained(marker)}, path)
    result = cli("inspect", path, "--json")
    assert not marker.exists()
    assert bn101_names(result) == ["posix.system"]


LEGACY_PAYLOAD = "cposix\nsystem\n(S'touch {marker}'\ntR0"  # call, then POP: the pickle's value is unchanged


def legacy_pickle_spans(data: bytes) -> list[tuple[int, int]]:
    import pickletools

    spans, stream = [], io.BytesIO(data)
    for _ in range(5):
        start = stream.tell()
        for _op in pickletools.genops(stream):
            pass
        spans.append((start, stream.tell()))
    return spans


@pytest.mark.parametrize("which", [0, 1, 2, 3, 4], ids=["magic", "protocol", "sys-info", "objects", "keys"])
def test_a_payload_in_any_pickle_of_a_legacy_file_is_bn101(cli, tmp_path: Path, which: int) -> None:
    def write(marker: Path) -> Path:
        path = tmp_path / f"{marker.name}.pt"
        torch.save(healthy_model_state(), path, _use_new_zipfile_serialization=False)
        data = path.read_bytes()
        _, end = legacy_pickle_spans(data)[which]
        path.write_bytes(data[: end - 1] + LEGACY_PAYLOAD.format(marker=marker).encode() + data[end - 1 :])
        return path

    state = torch.load(write(tmp_path / "armed"), weights_only=False)  # torch runs it and still loads the file
    assert (tmp_path / "armed").exists() and "1.running_var" in state
    result = cli("inspect", write(tmp_path / "marker"), "--json")
    assert not (tmp_path / "marker").exists()
    assert bn101_names(result) == ["posix.system"]
    assert len(result.json()["files"][0]["layers"]) == 2
    assert result.exit_code == 1


def test_a_plain_pickle_payload_that_torch_load_runs_is_bn101_not_unreadable(cli, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02" + LEGACY_PAYLOAD.format(marker=tmp_path / "marker").encode()[:-1] + b".")
    with pytest.raises(RuntimeError, match="magic number"):  # torch runs the payload, then finds no magic number
        torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()
    (tmp_path / "marker").unlink()
    result = cli("inspect", path, "--json")
    assert not (tmp_path / "marker").exists()
    (file,) = result.json()["files"]
    assert bn101_names(result) == ["posix.system"]
    assert any("magic number" in note for note in file["notes"])
    assert result.exit_code == 1


@pytest.mark.parametrize("protocol", [0, 1])
def test_a_protocol_0_or_1_pickle_payload_is_bn101_not_a_text_file(cli, tmp_path: Path, protocol: int) -> None:
    # no PROTO opcode: protocol 0 is printable text, yet torch.load runs it before looking for its magic number
    import pickle

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(Reduce(os.system, shell(tmp_path / "marker")), protocol=protocol))
    with pytest.raises(RuntimeError, match="magic number"):
        torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()
    (tmp_path / "marker").unlink()
    result = cli("inspect", path, "--json")
    assert not (tmp_path / "marker").exists()
    assert bn101_names(result) == ["posix.system"] and result.exit_code == 1


def test_a_payload_in_one_shard_is_bn101_for_the_index_and_the_directory(cli, tmp_path: Path) -> None:
    state = healthy_model_state()
    names = sorted(state)
    marker = tmp_path / "marker"
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save({k: state[k] for k in names[:3]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save(
        {**{k: state[k] for k in names[3:]}, "extra": Reduce(os.system, shell(marker))},
        folder / "pytorch_model-00002-of-00002.bin",
    )
    weight_map = {k: f"pytorch_model-0000{1 if k in names[:3] else 2}-of-00002.bin" for k in names}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for target in (folder / "pytorch_model.bin.index.json", folder):
        result = cli("inspect", target, "--json")
        assert bn101_names(result) == ["posix.system"]
        assert len(result.json()["files"][0]["layers"]) == 2
    assert not marker.exists()


def picklescan_flagged() -> list[str]:
    names = []
    for module, flagged in _unsafe_globals.items():
        for name in ["anything"] if flagged == "*" else [flagged] if isinstance(flagged, str) else sorted(flagged):
            names.append(f"{module}:{name}" if "." in name else f"{module}.{name}")
    return names


@pytest.mark.parametrize("name", picklescan_flagged())
def test_every_global_picklescan_flags_is_code_execution(name: str) -> None:
    assert grade_global(name) is Risk.CODE_EXECUTION


def _healthy_with(tmp_path: Path, extra: object) -> Path:
    path = tmp_path / "healthy.ckpt"
    torch.save({"state_dict": healthy_model_state(), "hyper_parameters": extra}, path)
    return path


class AttributeDict(dict):
    """Lightning's AttributeDict (a dict with attribute access), saved under Lightning's own module name."""


def trained(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model(torch.randn(8, 2))
    return model.eval()  # saved for inference: a module pickled in train mode is BN016


HARMLESS: dict[str, Callable[[], object]] = {
    "argparse.Namespace": lambda: argparse.Namespace(lr=0.1, data=pathlib.Path("/data")),
    "types.SimpleNamespace": lambda: types.SimpleNamespace(depth=3),
    "pathlib": lambda: [pathlib.Path("/runs/a"), pathlib.PurePosixPath("b"), pathlib.PureWindowsPath("c")],
    "platform.uname_result": platform.uname,
    "uuid.UUID": lambda: uuid.UUID(int=7),
    "numpy": lambda: {"rng": np.random.default_rng(0), "legacy": np.random.RandomState(0), "x": np.arange(3)},
    "torch.nn modules": lambda: trained(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))),
    "torch values": lambda: {"dtype": torch.float16, "size": torch.Size([2]), "version": torch.__version__},
}


@pytest.mark.parametrize("kind", sorted(HARMLESS))
def test_healthy_files_with_harmless_classes_get_no_finding(cli, tmp_path: Path, kind: str) -> None:
    result = cli("inspect", _healthy_with(tmp_path, HARMLESS[kind]()), "--json", "--fail-on", "info")
    (file,) = result.json()["files"]
    assert file["findings"] == [], file["findings"]
    assert result.exit_code == 0


def test_healthy_files_with_omegaconf_and_lightning_classes_get_no_finding(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    import omegaconf

    for package in ("lightning_fabric", "lightning_fabric.utilities", "lightning_fabric.utilities.data"):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    monkeypatch.setattr(AttributeDict, "__module__", "lightning_fabric.utilities.data")
    monkeypatch.setattr(sys.modules["lightning_fabric.utilities.data"], "AttributeDict", AttributeDict, raising=False)
    config = omegaconf.OmegaConf.create({"lr": 0.1, "layers": [1, 2], "optim": {"name": "adam", "eps": None}})
    path = _healthy_with(tmp_path, AttributeDict(config=config, lr=0.1))
    result = cli("inspect", path, "--json", "--fail-on", "info")
    (file,) = result.json()["files"]
    assert file["findings"] == [], file["findings"]
    assert any("omegaconf.dictconfig.DictConfig" in note for note in file["notes"])


def test_a_fully_pickled_user_model_is_bn102_naming_its_class(cli, tmp_path: Path) -> None:
    from conftest import BAD

    result = cli("inspect", BAD / "BN102-full-module-user-class.pt", "--json")
    (file,) = result.json()["files"]
    assert [(f["code"], f["severity"]) for f in file["findings"]] == [("BN102", "warning")]
    assert file["findings"][0]["message"].startswith("pickle names __main__.MLP; ")
    assert result.exit_code == 0  # a warning: the default fail level is error
