"""Malicious pickles: the payload never runs, BN101 names it, and the real layers are still checked."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_process
from test_hostile_corpus import Reduce
from torch import nn


class Payload:
    """Unpickling calls ``func(*args)``; each payload used here creates the marker file."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
    }


def healthy_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model(torch.randn(16, 4))
    return model.state_dict()


@pytest.mark.parametrize("kind", ["os.system", "subprocess.call", "builtins.exec", "builtins.eval"])
def test_payload_in_a_zip_checkpoint_never_runs(cli, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "hostile.pt"
    torch.save({"state_dict": healthy_state(), "extra": payloads(tmp_path / "armed")[kind]}, path)
    # the payload is live: torch.load(weights_only=False) runs it
    torch.load(path, weights_only=False)
    assert (tmp_path / "armed").exists()
    # the marker bncheck must never create
    marker = tmp_path / "marker"
    torch.save({"state_dict": healthy_state(), "extra": payloads(marker)[kind]}, path)
    result = cli("inspect", path, "--json")
    assert not marker.exists()
    (file,) = result.json()["files"]
    (finding,) = [f for f in file["findings"] if f["code"] == "BN101"]
    # os.system is posix.system on this platform; protocol 2's Python 2 names are reported by their Python 3 names
    expected = {"os.system": "posix.system"}.get(kind, kind)
    assert f"pickle names {expected};" in finding["message"]
    assert [layer["name"] for layer in file["layers"]] == ["1"]
    assert result.exit_code == 1


def inst_pickle(marker: Path) -> bytes:
    """Protocol 0 INST: ``os.system('touch marker')``."""
    return f"(S'touch {marker}'\nios\nsystem\n.".encode()


def obj_pickle(marker: Path) -> bytes:
    """Protocol 2 OBJ: ``subprocess.call(['touch', marker])``."""
    path = str(marker).encode()
    return (
        b"\x80\x02(csubprocess\ncall\n]q\x00(X\x05\x00\x00\x00touchX" + len(path).to_bytes(4, "little") + path + b"eo."
    )


@pytest.mark.parametrize("make", [inst_pickle, obj_pickle])
def test_inst_and_obj_opcodes_are_recorded_not_run(cli, tmp_path: Path, make) -> None:
    pickle.loads(make(tmp_path / "armed"))  # the raw pickle is live
    assert (tmp_path / "armed").exists()
    marker = tmp_path / "marker"
    source = tmp_path / "healthy.pt"
    torch.save(healthy_state(), source)
    target = tmp_path / "hostile.pt"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, make(marker) if info.filename.endswith("data.pkl") else src.read(info))
    result = cli("inspect", target, "--json")
    assert not marker.exists()
    (file,) = result.json()["files"]
    assert file["error"] is None
    assert any(f["code"] == "BN101" for f in file["findings"])
    assert result.exit_code == 1


def test_the_shipped_hostile_fixture_is_flagged_and_checked(cli) -> None:
    from conftest import BAD

    result = cli("inspect", BAD / "BN101-os-system-payload.pt", "--json")
    (file,) = result.json()["files"]
    assert [f["code"] for f in file["findings"]] == ["BN101"]
    assert "posix.system" in file["findings"][0]["message"]
    assert len(file["layers"]) == 2


def test_payload_in_a_legacy_file_is_flagged_not_run(cli, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "legacy.pt"
    torch.save(
        {"state_dict": healthy_state(), "extra": payloads(marker)["os.system"]},
        path,
        _use_new_zipfile_serialization=False,
    )
    result = cli("inspect", path, "--json")
    assert not marker.exists()
    (file,) = result.json()["files"]
    assert file["format"] == "torch legacy"
    assert [f["code"] for f in file["findings"]] == ["BN101"]
    assert "posix.system" in file["findings"][0]["message"]
    assert [layer["name"] for layer in file["layers"]] == ["1"]


def test_unsafe_load_is_opt_in_and_warns(tmp_path: Path) -> None:
    import numpy as np

    # running statistics stored as numpy arrays: bncheck's reader records them as objects, torch rebuilds them
    path = tmp_path / "numpy-stats.pt"
    torch.save({"bn.running_mean": np.zeros(3, np.float32), "bn.running_var": -np.ones(3, np.float32)}, path)
    safe = run_process("inspect", path, "--json")
    assert safe.returncode == 0
    assert json.loads(safe.stdout)["files"][0]["layers"] == []
    assert "warning" not in safe.stderr
    unsafe = run_process("inspect", path, "--json", "--unsafe-load")
    assert unsafe.stderr.startswith("bncheck: warning: --unsafe-load runs the code inside the checkpoint's pickle")
    file = json.loads(unsafe.stdout)["files"][0]
    assert file["format"] == "torch (unsafe load)"
    assert [f["code"] for f in file["findings"]] == ["BN002", "BN010"]
    assert unsafe.returncode == 1


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_string_with_an_invalid_escape_is_refused_as_corrupt(cli, tmp_path: Path, container: str) -> None:
    # Python decodes S'\G' with a DeprecationWarning (an error in some later version); torch never writes STRING
    bad_string = b"S'\\G'\n."
    path = tmp_path / "escape.pt"
    if container == "zip":
        source = tmp_path / "healthy.pt"
        torch.save(healthy_state(), source)
        with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                dst.writestr(info.filename, bad_string if info.filename.endswith("data.pkl") else src.read(info))
    else:
        path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + bad_string)
    result = cli("inspect", path, "--json")
    (file,) = result.json()["files"]
    assert file["error"]["code"] == "corrupt", file["error"]
    assert "invalid escape" in file["error"]["message"]
    assert result.exit_code == 2


def test_unsafe_load_never_hands_a_file_with_a_bn101_global_to_torch(tmp_path: Path) -> None:
    import numpy as np

    # statistics only torch would rebuild (so --unsafe-load would otherwise use it), beside a live payload
    marker = tmp_path / "marker"
    path = tmp_path / "numpy-stats-and-payload.pt"
    torch.save(
        {
            "bn.running_mean": np.zeros(3, np.float32),
            "bn.running_var": -np.ones(3, np.float32),
            "extra": payloads(marker)["os.system"],
        },
        path,
    )
    result = run_process("inspect", path, "--json", "--unsafe-load")
    assert not marker.exists()
    file = json.loads(result.stdout)["files"][0]
    assert file["format"] == "torch zip"  # bncheck's own reader, not "torch (unsafe load)"
    assert [f["code"] for f in file["findings"]] == ["BN101"]
    assert (
        "--unsafe-load did not hand this file to torch: its pickle names posix.system (BN101), which torch would run"
        in file["notes"]
    )
    assert result.returncode == 1


class _Storage:
    """Stands for a storage in a pickle written with torch's persistent ids."""


class _BadTensor:
    """Pickles as torch._utils._rebuild_tensor_v2 with a malformed size: bncheck's reader refuses the record."""

    def __reduce__(self) -> tuple:
        import torch._utils

        return (torch._utils._rebuild_tensor_v2, (_Storage(), 0, "not a size", (1,), False, {}))


def with_bad_crc(path: Path, name: str) -> None:
    """The member's CRC-32 made wrong in its local header and the central directory: zipfile refuses to read the
    member, torch's reader does not check."""
    import struct

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
        directory = archive.start_dir
    wrong = struct.pack("<I", info.CRC ^ 0xFFFFFFFF)
    data[info.header_offset + 14 : info.header_offset + 18] = wrong
    entry = data.index(b"PK\x01\x02", directory)
    while not data[entry + 46 :].startswith(name.encode()):
        entry = data.index(b"PK\x01\x02", entry + 4)
    data[entry + 16 : entry + 20] = wrong
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("bad_crc", [False, True], ids=["crc-ok", "crc-wrong"])
def test_unsafe_load_never_hands_torch_a_refused_file_whose_pickle_runs_code(tmp_path: Path, bad_crc: bool) -> None:
    import io

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", torch.FloatStorage, "0", "cpu", 1) if isinstance(obj, _Storage) else None

    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    payload = Reduce(os.system, f"touch {marker}")
    Pickler(buffer, protocol=2).dump({"a": payload, "b": _BadTensor()})
    path = tmp_path / "broken.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("broken/data.pkl", buffer.getvalue())
        archive.writestr("broken/data/0", bytes(4))
        archive.writestr("broken/byteorder", "little")
        archive.writestr("broken/version", "3\n")
    if bad_crc:
        with_bad_crc(path, "broken/data.pkl")
    with pytest.raises(Exception):  # noqa: B017 torch runs the payload, then fails on the malformed record
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    result = run_process("inspect", path, "--json", "--unsafe-load")
    assert not marker.exists()
    assert result.returncode == 2
    error = json.loads(result.stdout)["files"][0]["error"]
    assert "did not hand it to torch" in error["message"] and "posix.system" in error["message"]


def test_unsafe_load_never_hands_torch_a_broken_legacy_pickle_that_runs_code(tmp_path: Path) -> None:
    # the payload's REDUCE, then an opcode no unpickler knows: torch runs the payload before it fails
    marker = tmp_path / "marker"
    path = tmp_path / "broken-legacy.pt"
    path.write_bytes(pickle.dumps(Reduce(os.system, f"touch {marker}"), protocol=2)[:-1] + b"\xff")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    result = run_process("inspect", path, "--json", "--unsafe-load")
    assert not marker.exists() and result.returncode == 2
    error = json.loads(result.stdout)["files"][0]["error"]
    assert "did not hand it to torch" in error["message"] and "posix.system" in error["message"]


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_the_static_scan_names_globals_up_to_where_a_pickle_breaks(protocol: int) -> None:
    import io

    from bncheck.loaders.restricted_pickle import scan_globals

    data = pickle.dumps([Reduce(os.system, "true"), Reduce(os.getcwd), Reduce(os.system, "x")], protocol=protocol)
    assert scan_globals(io.BytesIO(data)) == ("posix.system", "posix.getcwd")
    cut = data[: data.index(b"getcwd") + 8]  # broken right after the second global
    assert "posix.system" in scan_globals(io.BytesIO(cut))
