"""Every input ends in bounded time and memory: a report or a one-line error, never a hang, a traceback or an
"internal error"."""

from __future__ import annotations

import io
import json
import resource
import struct
import time
from pathlib import Path

import pytest
import torch
from conftest import GOOD
from torch import nn

from bncheck.diff import diff_checkpoints
from bncheck.errors import CorruptCheckpointError
from bncheck.loaders.files import LocalSource
from bncheck.loaders.safetensors import tensors_of


def error_of(path: Path, cli) -> dict:
    result = cli("inspect", path, "--json")
    assert result.exit_code == 2, result.stdout + result.stderr
    error = result.json()["files"][0]["error"]
    assert error is not None and "\n" not in error["message"] and "internal error" not in result.stderr
    return error


def test_a_module_tree_that_reuses_one_child_at_every_level(cli, tmp_path: Path) -> None:
    # 2 ** 40 paths through 41 module objects: torch.save stores each object once
    module: nn.Module = nn.BatchNorm1d(4)
    for _ in range(40):
        module = nn.Sequential(module, module)
    torch.save(module, tmp_path / "shared.pt")
    start = time.perf_counter()
    result = cli("inspect", tmp_path / "shared.pt", "--json")
    assert time.perf_counter() - start < 10
    layers = result.json()["files"][0]["layers"]
    assert [layer["name"] for layer in layers] == [".".join(["0"] * 40)]  # the shared layer, once, by its first name


def refused_by_both_parsers(path: Path, cli) -> None:
    """The reference parser refuses a local file first; bncheck's own parser, which reads URLs, refuses it too."""
    error_of(path, cli)
    with pytest.raises(CorruptCheckpointError) as info:
        tensors_of(LocalSource(path))
    assert "\n" not in str(info.value) and len(str(info.value)) <= 300


def test_deeply_nested_json_in_a_safetensors_header(cli, tmp_path: Path) -> None:
    header = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    path = tmp_path / "nested.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    refused_by_both_parsers(path, cli)


def test_a_5000_digit_integer_in_a_safetensors_header(cli, tmp_path: Path) -> None:
    header = ('{"bn.running_var": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}').encode()
    path = tmp_path / "digits.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    refused_by_both_parsers(path, cli)


def test_nested_json_and_huge_integers_in_a_shard_index(cli, tmp_path: Path) -> None:
    (tmp_path / "deep.index.json").write_text('{"weight_map":' + "[" * 100_000 + "]" * 100_000 + "}")
    (tmp_path / "int.index.json").write_text('{"weight_map": {"a": ' + "7" * 5000 + "}}")
    for name in ("deep.index.json", "int.index.json"):
        error_of(tmp_path / name, cli)


def test_a_shape_with_a_float_or_an_astronomic_dimension(cli, tmp_path: Path) -> None:
    for shape in ("[0, 1e30]", "[0, " + str(2**80) + "]", "[-1]"):
        header = ('{"bn.running_var": {"dtype": "F32", "shape": ' + shape + ', "data_offsets": [0, 0]}}').encode()
        path = tmp_path / "shape.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header)
        refused_by_both_parsers(path, cli)


def test_a_huge_config_file_is_refused_without_parsing_it(tmp_path: Path) -> None:
    from conftest import run_in

    (tmp_path / "pyproject.toml").write_text("[tool.bncheck]\n" + "# padding\n" * 2_000_000)
    start = time.perf_counter()
    result = run_in(tmp_path, "inspect", GOOD / "mlp-state-dict.pt")
    assert time.perf_counter() - start < 10
    assert result.returncode == 2 and "too large" in result.stderr and len(result.stderr.splitlines()) == 1


def test_diff_of_ten_thousand_layers_is_not_quadratic(tmp_path: Path) -> None:
    state = {}
    for i in range(10_000):
        state[f"blocks.{i}.bn.running_mean"] = torch.zeros(2)
        state[f"blocks.{i}.bn.running_var"] = torch.ones(2)
        state[f"blocks.{i}.bn.num_batches_tracked"] = torch.tensor(3)
    torch.save(state, tmp_path / "a.pt")
    torch.save({"module." + key: value for key, value in state.items()}, tmp_path / "b.pt")
    start = time.perf_counter()
    diff = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt")
    elapsed = time.perf_counter() - start
    assert diff.error is None and len(diff.layers) == 10_000 and not diff.differs
    assert elapsed < 10, elapsed


def test_a_shared_structure_in_a_malformed_record_is_not_expanded_into_the_message(cli, tmp_path: Path) -> None:
    import pickle
    import zipfile

    shared: list = [1]
    for _ in range(60):
        shared = [shared, shared]  # its full repr would be 2 ** 60 characters

    class TorchLikePickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, _Storage) else None

    buffer = io.BytesIO()
    TorchLikePickler(buffer, protocol=2).dump({"bn.running_var": _Rebuild(shared)})
    payload = buffer.getvalue()
    path = tmp_path / "shared.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("shared/data.pkl", payload)
        archive.writestr("shared/data/0", bytes(16))
        archive.writestr("shared/byteorder", "little")
    start = time.perf_counter()
    message = error_of(path, cli)["message"]
    assert time.perf_counter() - start < 10
    assert "malformed tensor record" in message and len(message) <= 500


def test_a_megabyte_tensor_name_is_cut_in_the_reason(cli, tmp_path: Path) -> None:
    name = "n" * 2_000_000
    header = ('{"' + name + '": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": 1}').encode()
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    assert len(error_of(path, cli)["message"]) <= 500


class _Rebuild:
    """Pickles as torch._utils._rebuild_tensor_v2 with a malformed size: the shape of a torch.save tensor record."""

    def __init__(self, size: object) -> None:
        self.size = size

    def __reduce__(self) -> tuple:
        import torch._utils

        storage = _Storage()
        return (torch._utils._rebuild_tensor_v2, (storage, 0, self.size, (1,), False, {}))


class _Storage:
    """Pickles as torch's persistent storage record would be, but as a plain tuple (the reader resolves it)."""


def test_a_stride_0_statistic_does_not_expand_a_small_file_into_gigabytes(cli, tmp_path: Path) -> None:
    expanded = torch.ones(1).expand(2**28)  # 2 ** 28 elements that all read one stored float
    torch.save({"bn.running_mean": torch.zeros(4), "bn.running_var": expanded}, tmp_path / "expanded.pt")
    assert (tmp_path / "expanded.pt").stat().st_size < 4096
    start = time.perf_counter()
    message = error_of(tmp_path / "expanded.pt", cli)["message"]
    assert time.perf_counter() - start < 10
    assert "repeats 1 stored element(s)" in message


def test_a_small_expanded_statistic_is_still_read(cli, tmp_path: Path) -> None:
    state = {"bn.running_mean": torch.zeros(1).expand(8), "bn.running_var": torch.ones(8)}
    state["bn.num_batches_tracked"] = torch.tensor(5)
    torch.save(state, tmp_path / "small.pt")
    result = cli("inspect", tmp_path / "small.pt", "--json")
    assert result.exit_code == 0 and result.json()["files"][0]["layers"][0]["running_mean"]["max"] == 0.0


def test_a_deflated_pickle_that_would_expand_a_thousandfold(cli, tmp_path: Path) -> None:
    import pickle
    import zipfile

    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("bomb/data.pkl", pickle.dumps({"blob": bytes(200 * 2**20)}, protocol=2))
        archive.writestr("bomb/byteorder", "little")
    assert path.stat().st_size < 2**20  # 200 MiB of pickle in a file of a few hundred KiB
    start = time.perf_counter()
    message = error_of(path, cli)["message"]
    assert time.perf_counter() - start < 10
    assert "would expand" in message


def test_a_safetensors_header_just_under_the_100_mb_limit(cli, tmp_path: Path) -> None:
    tensors = {
        "bn.running_mean": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "bn.running_var": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    filler = 90 * 2**20  # the reference parser refuses headers over 100,000,000 bytes
    header = ('{"__metadata__": {"pad": "' + "x" * filler + '"}, ' + json.dumps(tensors)[1:]).encode()
    path = tmp_path / "big-header.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<4f", 0.0, 0.0, 1.0, 1.0))
    start = time.perf_counter()
    result = cli("inspect", path, "--json")
    assert time.perf_counter() - start < 10
    assert result.exit_code == 0 and [f["code"] for f in result.json()["files"][0]["findings"]] == ["BN007", "BN010"]


def test_one_bad_file_never_aborts_a_run(cli, tmp_path: Path) -> None:
    import shutil

    from conftest import BAD

    shutil.copy(BAD / "BN101-os-system-payload.pt", tmp_path / "a-payload.pt")
    (tmp_path / "b-truncated.pt").write_bytes((GOOD / "mlp-state-dict.pt").read_bytes()[:3000])
    (tmp_path / "c-nested.safetensors").write_bytes(struct.pack("<Q", 200_001) + b"[" * 100_000 + b"]" * 100_001)
    shutil.copy(GOOD / "mlp-state-dict.pt", tmp_path / "d-good.pt")
    for jobs in ("1", "2"):
        result = cli("inspect", tmp_path, "--json", "-j", jobs)
        files = {Path(f["path"]).name: f for f in result.json()["files"]}
        assert list(files) == ["a-payload.pt", "b-truncated.pt", "c-nested.safetensors", "d-good.pt"]
        assert "BN101" in [f["code"] for f in files["a-payload.pt"]["findings"]]
        assert files["b-truncated.pt"]["error"] and files["c-nested.safetensors"]["error"]
        assert files["d-good.pt"]["error"] is None and len(files["d-good.pt"]["layers"]) == 2
        assert result.exit_code == 2


def zip64_sizes(data: bytes, member_suffix: str, size: int) -> bytes:
    """The archive with one central-directory entry's sizes declared through a zip64 extra field as ``size``."""
    import zipfile

    cd_start = zipfile.ZipFile(io.BytesIO(data)).start_dir
    eocd = data.rindex(b"PK\x05\x06")
    directory = bytearray()
    position = cd_start
    while data[position : position + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[position + 28 : position + 34])
        end = position + 46 + name_len + extra_len + comment_len
        entry = bytearray(data[position:end])
        if bytes(entry[46 : 46 + name_len]).decode().endswith(member_suffix):
            entry[20:28] = struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF)
            extra = struct.pack("<HHQQ", 1, 16, size, size)
            entry[30:32] = struct.pack("<H", extra_len + len(extra))
            entry[46 + name_len + extra_len : 46 + name_len + extra_len] = extra
        directory += entry
        position = end
    tail = bytearray(data[eocd:])
    tail[12:16] = struct.pack("<I", len(directory))
    return data[:cd_start] + bytes(directory) + bytes(tail)


def test_zip_sizes_declared_at_the_zip64_limit(cli, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    state = {
        "bn.running_var": torch.ones(4),
        "bn.running_mean": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    torch.save(state, buffer)
    for member in ("data.pkl", "data/0"):
        path = tmp_path / "huge.pt"
        path.write_bytes(zip64_sizes(buffer.getvalue(), member, 2**64 - 1))
        start = time.perf_counter()
        assert "declares" in error_of(path, cli)["message"]
        assert time.perf_counter() - start < 10


def test_peak_memory_of_this_test_process_stays_bounded() -> None:
    # a guard on the tests above (so it stays the last test of the file): none may have grown this process past
    # 1 GiB; the suite's other tests run before or after in the same process, so this bounds them too
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_kib < 1024 * 1024, peak_kib
