"""Crafted and broken files end in one clean error with bounded memory and time, never a crash."""

from __future__ import annotations

import json
import struct
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import BAD
from safetensors import safe_open
from torch import nn

from bncheck.errors import BncheckError
from bncheck.loaders import open_checkpoint
from bncheck.loaders.files import LocalSource
from bncheck.loaders.safetensors import tensors_of


def error_of(path: Path, cli) -> dict:
    result = cli("inspect", path, "--json")
    assert result.exit_code == 2, result.stdout
    error = result.json()["files"][0]["error"]
    assert error is not None and "\n" not in error["message"]
    return error


def refused_twice(path: Path, cli, reference: str, own: str) -> None:
    """A local file is refused by the reference parser, with its reason; bncheck's own parser, which reads
    remote files, refuses the same bytes with its own."""
    message = error_of(path, cli)["message"]
    assert "reference parser refuses" in message and reference in message, message
    with pytest.raises(BncheckError) as info:
        tensors_of(LocalSource(path))
    assert own in str(info.value) and "\n" not in str(info.value)


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def bn_header(dtype: str = "F32", offsets: tuple[int, int] = (0, 12), var_offsets: tuple[int, int] = (12, 24)) -> dict:
    return {
        "bn.running_mean": {"dtype": dtype, "shape": [3], "data_offsets": list(offsets)},
        "bn.running_var": {"dtype": "F32", "shape": [3], "data_offsets": list(var_offsets)},
    }


def test_safetensors_header_longer_than_the_file(cli, tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    refused_twice(path, cli, "invalid header length", "header claims")


def test_safetensors_header_over_100_mb_is_refused_without_reading_it(cli, tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", 200 * 2**20) + b"{")
        handle.truncate(300 * 2**20)  # sparse: costs no disk
    start = time.perf_counter()
    refused_twice(path, cli, "header too large", "header claims")
    assert time.perf_counter() - start < 5


def test_safetensors_offsets_that_overlap_or_run_past_the_end(cli, tmp_path: Path) -> None:
    data = bytes(24)
    overlap = tmp_path / "overlap.safetensors"
    overlap.write_bytes(safetensors_bytes(bn_header(offsets=(0, 12), var_offsets=(8, 20)), data))
    refused_twice(overlap, cli, "invalid offset", "overlap")
    past = tmp_path / "past.safetensors"
    past.write_bytes(safetensors_bytes(bn_header(offsets=(0, 12), var_offsets=(12, 4000)), data))
    refused_twice(past, cli, "invalid shape, data type, or offset", "outside")


def test_unknown_dtype_of_a_batchnorm_tensor(cli, tmp_path: Path) -> None:
    path = tmp_path / "dtype.safetensors"
    path.write_bytes(safetensors_bytes(bn_header(dtype="Q42"), bytes(24)))
    assert "unknown variant `Q42`" in error_of(path, cli)["message"]
    # bncheck's own parser lets the header through and refuses the tensor when it is read
    with pytest.raises(BncheckError) as info:
        tensors_of(LocalSource(path))[0]["bn.running_mean"].read()
    assert info.value.code == "unsupported-dtype"


def test_a_dtype_the_reference_knows_but_numpy_cannot_hold(cli, tmp_path: Path) -> None:
    path = tmp_path / "fp8.safetensors"
    header = bn_header(dtype="F8_E4M3", offsets=(0, 3), var_offsets=(3, 15))
    path.write_bytes(safetensors_bytes(header, bytes(15)))
    assert error_of(path, cli)["code"] == "unsupported-dtype"


def test_element_count_that_overflows(cli, tmp_path: Path) -> None:
    path = tmp_path / "overflow.safetensors"
    header = bn_header()
    header["bn.running_mean"]["shape"] = [2**40, 2**40]
    path.write_bytes(safetensors_bytes(header, bytes(24)))
    refused_twice(path, cli, "overflow", "needs")


def torch_zip(tmp_path: Path) -> Path:
    path = tmp_path / "clean.pt"
    torch.save(nn.BatchNorm1d(4).state_dict(), path)
    return path


def rewrite(source: Path, target: Path, edit) -> Path:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            edit(dst, info, src.read(info))
    return target


def test_zip_member_smaller_than_declared(cli, tmp_path: Path) -> None:
    data = bytearray(torch_zip(tmp_path).read_bytes())
    with zipfile.ZipFile(tmp_path / "clean.pt") as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/3"))
        cd_start = archive.start_dir
    # find this member's central-directory entry and inflate its declared size
    name = info.filename.encode()
    entry = data.index(b"PK\x01\x02" + data[cd_start + 4 : cd_start + 4], cd_start)
    while data[entry + 46 : entry + 46 + len(name)] != name:
        entry = data.index(b"PK\x01\x02", entry + 1)
    struct.pack_into("<II", data, entry + 20, 10**6, 10**6)
    path = tmp_path / "declared.pt"
    path.write_bytes(bytes(data))
    error = error_of(path, cli)
    assert error["code"] == "corrupt"


def test_zip_bomb_member_is_refused(cli, tmp_path: Path) -> None:
    def bomb(dst: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes) -> None:
        if info.filename.endswith("data/0"):  # a storage re-zipped as 8 MB of zeros that deflate to almost nothing
            dst.writestr(info.filename, data + bytes(8 * 2**20), compress_type=zipfile.ZIP_DEFLATED)
        else:
            dst.writestr(info, data)

    path = rewrite(torch_zip(tmp_path), tmp_path / "bomb.pt", bomb)
    assert "would expand" in error_of(path, cli)["message"]


def test_duplicate_member_names(cli, tmp_path: Path) -> None:
    def duplicate(dst: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes) -> None:
        dst.writestr(info, data)
        if info.filename.endswith("data.pkl"):
            with pytest.warns(UserWarning):
                dst.writestr(info, data)

    path = rewrite(torch_zip(tmp_path), tmp_path / "dup.pt", duplicate)
    assert "duplicate member names" in error_of(path, cli)["message"]


def replace_pickle(tmp_path: Path, pickle_bytes: bytes) -> Path:
    def edit(dst: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes) -> None:
        dst.writestr(info.filename, pickle_bytes if info.filename.endswith("data.pkl") else data)

    return rewrite(torch_zip(tmp_path), tmp_path / "crafted.pt", edit)


def test_absurd_memo_index_is_refused_quickly(cli, tmp_path: Path) -> None:
    crafted = b"\x80\x02}r\xf0\xff\xff\x0f."  # EMPTY_DICT, LONG_BINPUT 268 million, STOP
    start = time.perf_counter()
    assert "LONG_BINPUT of 268435440 exceeds the pickle" in error_of(replace_pickle(tmp_path, crafted), cli)["message"]
    assert time.perf_counter() - start < 5


def test_deeply_nested_pickle_is_a_report_not_a_crash(cli, tmp_path: Path) -> None:
    deep = b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b"."  # 200k nested lists
    result = cli("inspect", replace_pickle(tmp_path, deep), "--json")
    assert result.exit_code == 0
    assert result.json()["files"][0]["notes"] == ["no BatchNorm layers"]


def test_tensor_reaching_past_its_storage(cli, tmp_path: Path) -> None:
    state = nn.BatchNorm1d(4).state_dict()
    path = tmp_path / "view.pt"
    torch.save(state, path)
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    # the weight's record is (storage, offset 0, size (4,), ...): give it offset 3 in its 4-element storage
    crafted = pickled.replace(b"K\x00K\x04\x85q", b"K\x03K\x04\x85q", 1)
    assert crafted != pickled
    assert "reaches past" in error_of(replace_pickle(tmp_path, crafted), cli)["message"]


def test_open_checkpoint_raises_only_bncheck_errors_on_truncations(tmp_path: Path) -> None:
    data = (BAD / "BN102-full-module-user-class.pt").read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 200)):
        path = tmp_path / "cut.pt"
        path.write_bytes(data[:cut])
        try:
            checkpoint = open_checkpoint(path)
        except BncheckError:
            continue
        assert checkpoint.format


@pytest.mark.parametrize(
    "crafted",
    [
        b"\x80\x05\x96" + (2**60).to_bytes(8, "little") + b".",  # BYTEARRAY8 of an exabyte
        b"\x80\x04\x95" + (2**62).to_bytes(8, "little") + b"N.",  # FRAME larger than the pickle
        b"\x80\x02B" + (2**31).to_bytes(4, "little") + b".",  # BINBYTES of 2 GiB
    ],
    ids=["bytearray8", "frame", "binbytes"],
)
def test_lengths_beyond_the_pickle_are_refused_before_allocation(cli, tmp_path: Path, crafted: bytes) -> None:
    start = time.perf_counter()
    assert error_of(replace_pickle(tmp_path, crafted), cli)["code"] == "corrupt"
    assert time.perf_counter() - start < 5


def test_bytes_the_header_does_not_cover_are_refused_as_the_reference_loader_refuses_them(cli, tmp_path: Path) -> None:
    # bncheck's own parser reads these tensors fine; safetensors.safe_open (and so load_file) refuses the file
    path = tmp_path / "trailing.safetensors"
    path.write_bytes(safetensors_bytes(bn_header(), bytes(24) + b"extra bytes"))
    assert tensors_of(LocalSource(path))[0]["bn.running_var"].read().shape == (3,)
    assert "file not fully covered" in error_of(path, cli)["message"]


@pytest.mark.parametrize(
    "shape",
    [[0, 2**64 - 1], [0, 2**62], [1] * 64 + [4]],
    ids=["a-dimension-of-2**64", "zero-elements-of-2**62", "65-dimensions"],
)
def test_a_shape_numpy_cannot_build_is_a_corrupt_file(cli, tmp_path: Path, shape: list[int]) -> None:
    # the safetensors package accepts these headers (no element, or 16 bytes); numpy cannot make such an array
    count = 0 if 0 in shape else 4
    header = bn_header()
    header["bn.running_var"] = {"dtype": "F32", "shape": shape, "data_offsets": [12, 12 + 4 * count]}
    path = tmp_path / "shape.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(12 + 4 * count)))
    with safe_open(path, framework="numpy"):
        pass
    error = error_of(path, cli)
    assert error["code"] == "corrupt" and "cannot be read" in error["message"]
