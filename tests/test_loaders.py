"""Every loader against torch.load / safetensors on the same file: same names, dtypes, shapes and values."""

from __future__ import annotations

import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BAD, GOOD
from safetensors.torch import load_file, save_file

from bncheck.errors import BncheckError
from bncheck.loaders import find_checkpoints, open_checkpoint
from bncheck.loaders.interface import TensorRef
from bncheck.loaders.restricted_pickle import Placeholder

ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


def torch_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def expected_array(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def assert_same_tensor(ref: object, tensor: torch.Tensor, where: str) -> None:
    assert isinstance(ref, TensorRef), f"{where}: expected a tensor, got {type(ref).__name__}"
    if isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin):  # torch knows no shape for it either
        assert (ref.shape, ref.no_data) == ((0,), f"uninitialised lazy {type(tensor).__name__[13:].lower()}"), where
        return
    assert ref.dtype == torch_name(tensor.dtype), where
    assert ref.shape == tuple(tensor.shape), where
    if tensor.is_meta:  # dtype and shape, no values: nothing to compare
        assert ref.no_data == "meta-device tensor", where
        return
    assert ref.no_data is None, where
    array = ref.read()
    expected = expected_array(tensor)
    assert array.dtype == expected.dtype, where
    np.testing.assert_array_equal(array, expected, err_msg=where)


def assert_same_tree(ours: object, theirs: object, where: str = "root") -> int:
    """Walk what bncheck read and what torch read in parallel; return the number of tensors compared."""
    if isinstance(theirs, torch.Tensor):
        assert_same_tensor(ours, theirs, where)
        return 1
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), where
        assert list(ours) == list(theirs), where
        return sum(assert_same_tree(ours[k], theirs[k], f"{where}.{k}") for k in theirs)
    if isinstance(theirs, list | tuple):
        assert isinstance(ours, list | tuple) and len(ours) == len(theirs), where
        return sum(assert_same_tree(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(ours, theirs, strict=True)))
    if isinstance(theirs, int | float | str | bool | type(None)):
        assert ours == theirs or (ours != ours and theirs != theirs), where
    return 0


def flat_state(obj: object, prefix: str = "") -> dict[str, TensorRef]:
    out: dict[str, TensorRef] = {}
    if isinstance(obj, TensorRef):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flat_state(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _torch_loadable(path: Path) -> bool:
    """Whether torch.load gives a tree of tensors to compare: not TorchScript (torch.jit.load's), not a torch.export
    archive (torch.export.load's: tests/test_torch_export.py), not a fully pickled model (a module object, whose class
    may even have lived in the generator's __main__)."""
    checkpoint = open_checkpoint(path)
    return checkpoint.format not in ("torchscript", "torch export") and not isinstance(checkpoint.root, Placeholder)


TORCH_FILES = [
    p for p in sorted(GOOD.glob("*.p*")) + sorted(BAD.glob("*.pt")) if "BN101" not in p.name and _torch_loadable(p)
]


@pytest.mark.parametrize("path", TORCH_FILES, ids=lambda p: p.name)
def test_torch_files_read_like_torch_load(path: Path) -> None:
    theirs = torch.load(path, map_location="cpu", weights_only=False)
    compared = assert_same_tree(open_checkpoint(path).root, theirs)
    assert compared >= 10


@pytest.mark.parametrize(
    "path", sorted(GOOD.glob("*.safetensors")) + sorted(BAD.glob("*.safetensors")), ids=lambda p: p.name
)
def test_safetensors_read_like_safetensors(path: Path) -> None:
    theirs = load_file(path)
    ours = open_checkpoint(path).root
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert_same_tensor(ours[name], tensor, name)


def test_sharded_safetensors_is_the_union_of_its_shards() -> None:
    folder = GOOD / "conv1d-sharded"
    theirs = {}
    for shard in sorted(folder.glob("*.safetensors")):
        theirs.update(load_file(shard))
    for given in (folder, folder / "model.safetensors.index.json"):
        checkpoint = open_checkpoint(given)
        assert checkpoint.format == "safetensors, 2 shards"
        assert set(checkpoint.root) == set(theirs)
        for name, tensor in theirs.items():
            assert_same_tensor(checkpoint.root[name], tensor, name)


def test_torchscript_archive_yields_the_module_tensors() -> None:
    path = GOOD / "conv1d-torchscript.pt"
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == "torchscript"
    from bncheck.discover import find_bn_layers

    layers = find_bn_layers(checkpoint.root)
    state = torch.jit.load(path).state_dict()
    assert [layer.name for layer in layers] == ["features.1", "features.4"]
    for layer in layers:
        for leaf, ref in layer.tensors.items():
            assert_same_tensor(ref, state[f"{layer.name}.{leaf}"], f"{layer.name}.{leaf}")


def test_full_pickled_module_is_read_without_its_class(monkeypatch: pytest.MonkeyPatch) -> None:
    path = BAD / "BN102-full-module-user-class.pt"
    checkpoint = open_checkpoint(path)
    assert isinstance(checkpoint.root, Placeholder)
    assert checkpoint.root.global_name == "__main__.MLP"
    # torch itself needs the class; give it the one the fixture script defined
    sys.path.insert(0, str(GOOD.parent))
    import make_fixtures

    monkeypatch.setattr(sys.modules["__main__"], "MLP", make_fixtures.MLP, raising=False)
    state = torch.load(path, weights_only=False).state_dict()
    from bncheck.discover import find_bn_layers

    found = {
        f"{layer.name}.{leaf}": ref for layer in find_bn_layers(checkpoint.root) for leaf, ref in layer.tensors.items()
    }
    assert len(found) == 10
    for name, ref in found.items():
        assert_same_tensor(ref, state[name], name)


def every_dtype_and_view() -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for dtype in ALL_DTYPES:
        base = (torch.arange(60) % 7 - 3).to(dtype).reshape(6, 10)
        name = torch_name(dtype)
        tensors[f"{name}.whole"] = base
        tensors[f"{name}.offset_block"] = base[2:5, 1:7]
        tensors[f"{name}.transposed"] = base.t()
        tensors[f"{name}.column"] = base[:, 3]
        tensors[f"{name}.every_other_row"] = base[::2]
        tensors[f"{name}.scalar"] = base[1, 1]
        tensors[f"{name}.empty"] = base[:0]
    tensors["float32.special"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    tensors["bfloat16.special"] = torch.tensor([float("nan"), float("inf"), 3.0e38, 1e-40]).bfloat16()
    tensors["float16.special"] = torch.tensor([float("nan"), 65504.0, 6e-8]).half()
    return tensors


def test_zip_reader_matches_torch_for_every_dtype_and_strided_view(tmp_path: Path) -> None:
    tensors = every_dtype_and_view()
    path = tmp_path / "views.pt"
    torch.save(tensors, path)
    assert assert_same_tree(open_checkpoint(path).root, torch.load(path, weights_only=True)) == len(tensors)


def test_safetensors_reader_matches_for_every_dtype(tmp_path: Path) -> None:
    unsupported = ("complex128", "uint16", "uint32", "uint64")  # not safetensors dtypes
    tensors = {k: v.contiguous().clone() for k, v in every_dtype_and_view().items() if not k.startswith(unsupported)}
    path = tmp_path / "all.safetensors"
    save_file(tensors, path)
    ours = open_checkpoint(path).root
    for name, tensor in load_file(path).items():
        assert_same_tensor(ours[name], tensor, name)


def _rewrite_zip(
    source: Path, target: Path, *, compress: int = zipfile.ZIP_STORED, edit: dict[str, bytes] | None = None
) -> None:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compression=compress) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, (edit or {}).get(info.filename, src.read(info)))


def test_big_endian_archive_is_byteswapped(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.linspace(-2, 2, 7),
        "i64": torch.arange(5) * 1000,
        "bf16": torch.rand(4).bfloat16(),
        "f64": torch.rand(3, dtype=torch.float64)[1:],
    }
    little = tmp_path / "little.pt"
    torch.save(tensors, little)
    edit: dict[str, bytes] = {}
    with zipfile.ZipFile(little) as archive:
        prefix = archive.namelist()[0].split("/")[0]
        edit[f"{prefix}/byteorder"] = b"big"
        for key, name in enumerate(tensors):  # storages are numbered in pickling order
            raw = archive.read(f"{prefix}/data/{key}")
            itemsize = tensors[name].element_size()
            edit[f"{prefix}/data/{key}"] = np.frombuffer(raw, dtype=f"u{itemsize}").byteswap().tobytes()
    big = tmp_path / "big.pt"
    _rewrite_zip(little, big, edit=edit)
    ours = open_checkpoint(big).root
    for name, tensor in tensors.items():
        assert_same_tensor(ours[name], tensor, name)
    assert assert_same_tree(ours, torch.load(big, weights_only=True)) == len(tensors)


@pytest.mark.parametrize("padding", [0, 60, 5000], ids=["no-padding", "torch-like", "longer-than-one-read"])
def test_members_are_read_after_local_headers_of_any_padding(tmp_path: Path, padding: int) -> None:
    # bncheck reads a stored member's local header and the tensor after it in one read when the header's extra field
    # (torch's alignment padding) is short, in two when it is longer: both must find the bytes torch finds
    source = GOOD / "mlp-state-dict.pt"
    target = tmp_path / "padded.pt"
    extra = struct.pack("<HH", 0xB0CC, padding - 4) + bytes(padding - 4) if padding else b""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            padded = zipfile.ZipInfo(info.filename, info.date_time)
            padded.extra = extra
            dst.writestr(padded, src.read(info))
    with zipfile.ZipFile(target) as archive:
        assert {len(info.extra) for info in archive.infolist()} == {padding}
    assert assert_same_tree(open_checkpoint(target).root, torch.load(target, weights_only=True)) == 14


def test_a_local_header_that_runs_past_the_end_of_the_file_is_a_corrupt_file(cli, tmp_path: Path) -> None:
    # every storage's central-directory entry points 10 bytes before the end: no room for a 30-byte local header
    data = bytearray((GOOD / "mlp-state-dict.pt").read_bytes())
    with zipfile.ZipFile(GOOD / "mlp-state-dict.pt") as archive:
        storages = [info.filename.encode() for info in archive.infolist() if "/data/" in info.filename]
    for name in storages:
        entry = data.rindex(name) - 46  # the central directory's copy of the name comes last
        assert data[entry : entry + 4] == b"PK\x01\x02"
        data[entry + 42 : entry + 46] = struct.pack("<I", len(data) - 10)
    path = tmp_path / "short-header.pt"
    path.write_bytes(data)
    result = cli("inspect", path, "--json")
    assert result.exit_code == 2
    error = result.json()["files"][0]["error"]
    assert error["code"] == "corrupt" and "local header runs past the end of the file" in error["message"]


def test_recompressed_archive_is_still_read(tmp_path: Path) -> None:
    source = GOOD / "mlp-state-dict.pt"
    target = tmp_path / "deflated.pt"
    _rewrite_zip(source, target, compress=zipfile.ZIP_DEFLATED)
    assert assert_same_tree(open_checkpoint(target).root, torch.load(source, weights_only=True)) == 14


def test_format_comes_from_the_bytes_and_a_mismatch_is_noted(tmp_path: Path) -> None:
    fake_ckpt = tmp_path / "weights.ckpt"
    shutil.copy(GOOD / "conv1d.safetensors", fake_ckpt)
    fake_st = tmp_path / "weights.safetensors"
    shutil.copy(GOOD / "mlp-state-dict.pt", fake_st)
    as_ckpt, as_st = open_checkpoint(fake_ckpt), open_checkpoint(fake_st)
    assert as_ckpt.format == "safetensors"
    assert as_ckpt.notes == ("named .ckpt but its bytes are a safetensors file; read as what the bytes say",)
    assert as_st.format == "torch zip"
    assert "named .safetensors but its bytes are a torch.save file" in as_st.notes[0]
    assert open_checkpoint(GOOD / "conv1d.safetensors").notes == ()


def test_legacy_files_are_read_without_torch(tmp_path: Path) -> None:
    base = torch.arange(20.0).reshape(4, 5)
    tensors = {
        "view": base[1:3],
        "transposed": base.t(),
        "count": torch.tensor(3),
        "half": torch.rand(3).half(),
        "bf16": torch.rand(4).bfloat16(),
        "bn": torch.nn.BatchNorm1d(3).state_dict(),
    }
    path = tmp_path / "legacy.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    expected = torch.load(path, weights_only=True)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from bncheck.loaders import open_checkpoint\n"
        f"root = open_checkpoint({str(path)!r}).root\n"
        "print(root['view'].read().tolist(), root['bn']['running_var'].read().tolist())"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{expected['view'].tolist()} {expected['bn']['running_var'].tolist()}"
    assert assert_same_tree(open_checkpoint(path).root, expected) == 10
    assert open_checkpoint(GOOD / "conv1d-legacy.pt").format == "torch legacy"


BROKEN_INPUTS = {
    "empty.pt": (b"", "unsupported-format", "file is empty"),
    "notes.pt": (b"just some text\n", "unsupported-format", "a text file"),
    "random.bin": (bytes(range(200, 256)) * 3, "unsupported-format", "unknown format"),
    "plain.pkl.pt": (b"\x80\x04]\x94.", "unsupported-format", "plain pickle"),
    "header-too-long.safetensors": ((10**9).to_bytes(8, "little") + b'{"a": 1}', "corrupt", "header too large"),
    "bad-json.safetensors": ((8).to_bytes(8, "little") + b"{not jso", "corrupt", "invalid JSON in header"),
    "index.json": (b'{"metadata": {}}', "corrupt", "weight_map"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_INPUTS))
def test_broken_inputs_are_one_line_errors(tmp_path: Path, name: str) -> None:
    content, code, fragment = BROKEN_INPUTS[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BncheckError) as info:
        open_checkpoint(path)
    assert info.value.code == code
    assert "\n" not in str(info.value)
    if fragment:
        assert fragment in str(info.value)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_zip_is_corrupt_not_a_crash(tmp_path: Path, fraction: float) -> None:
    data = (GOOD / "mlp-state-dict.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(BncheckError) as info:
        checkpoint = open_checkpoint(path)
        for ref in flat_state(checkpoint.root).values():
            ref.read()
    assert info.value.code in ("corrupt", "unsupported-format")


@pytest.mark.parametrize("cut", [9, 100, -200, -1])
def test_truncated_safetensors_is_corrupt(tmp_path: Path, cut: int) -> None:
    data = (GOOD / "conv1d.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    with pytest.raises(BncheckError) as info:
        open_checkpoint(path)
    assert info.value.code in ("corrupt", "unsupported-format")


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    shutil.copytree(GOOD / "conv1d-sharded", folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        BncheckError, match=re.escape("shard model-00002-of-00002.safetensors listed in the index is missing")
    ):
        open_checkpoint(folder)


def test_directories_expand_to_checkpoints_with_shards_grouped() -> None:
    found = [p.relative_to(GOOD).as_posix() for p in find_checkpoints(GOOD)]
    assert "conv1d-sharded/model.safetensors.index.json" in found
    assert not any(name.startswith("conv1d-sharded/model-0") for name in found)
    assert "mlp-state-dict.pt" in found and "conv1d.safetensors" in found
