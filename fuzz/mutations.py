"""Mutations of valid checkpoints for fuzzing the loaders, discovery and checks (used by tests/test_fuzz.py and
fuzz/run.py): bit flips, truncation, safetensors header edits, zip central-directory edits, edits of the pickle
inside an archive (re-zipped with a valid CRC so that the unpickler, not the CRC check, meets them), archives
appended to archives, names that differ only in case, the same for torch's tar format, values of odd types
anywhere in a .pt2 archive's program and configurations, and edits of an ONNX model's messages (nodes, attributes,
tensors, external-data entries) re-serialised so that they meet the reader intact."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from bncheck.api import inspect_file
from bncheck.render.json import render_json
from bncheck.report import Report

KNOWN_ERROR_CODES = {"not-found", "unreadable", "unsupported-format", "corrupt", "unsupported-dtype"}


def seed_files(folder: Path) -> dict[str, bytes]:
    """Small valid checkpoints of each format, made with torch once per run."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    model(torch.randn(8, 3))
    state = model.state_dict()
    save_file(state, str(folder / "seed.safetensors"))
    torch.save({"model": state, "epoch": 1}, folder / "seed.pt")
    torch.save(state, folder / "seed-legacy.pt", _use_new_zipfile_serialization=False)
    save_tar(state, folder / "seed-tar.pt")
    # a fully pickled module tree that reuses one child at every level: 2 ** 12 paths through 13 objects
    shared: nn.Module = model[1]
    for _ in range(12):
        shared = nn.Sequential(shared, shared)
    torch.save(shared, folder / "seed-shared.pt")
    torch.export.save(torch.export.export(model.eval(), (torch.randn(2, 3),)), folder / "seed.pt2")
    onnx_seeds(model, folder)
    return {
        "safetensors": (folder / "seed.safetensors").read_bytes(),
        "zip": (folder / "seed.pt").read_bytes(),
        "legacy": (folder / "seed-legacy.pt").read_bytes(),
        "tar": (folder / "seed-tar.pt").read_bytes(),
        "shared": (folder / "seed-shared.pt").read_bytes(),
        "pt2": (folder / "seed.pt2").read_bytes(),
        "onnx": (folder / "seed.onnx").read_bytes(),
        # its tensors in seed-external.onnx.data, beside the fuzzed copy (which is written to the same folder)
        "onnx-external": (folder / "seed-external.onnx").read_bytes(),
    }


def onnx_seeds(model: Any, folder: Path) -> None:
    """The seed model exported to ONNX for inference (the TorchScript-based exporter keeps a BatchNormalization
    after a Linear), and the same with every tensor in an external data file."""
    import contextlib

    import onnx
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(8, 3),), str(folder / "seed.onnx"), dynamo=False)
    exported = onnx.load(str(folder / "seed.onnx"))
    onnx.save_model(
        exported,
        str(folder / "seed-external.onnx"),
        save_as_external_data=True,
        location="seed-external.onnx.data",
        size_threshold=0,
    )


def target_name(fmt: str) -> str:
    """The file name a fuzzed input of this seed is written to: ONNX is recognised by its name."""
    return f"input-{fmt}.onnx" if fmt.startswith("onnx") else f"input-{fmt}.bin"


def save_tar(
    obj: object,
    path: Path,
    *,
    sys_info: bytes | None = None,
    extra: list[tuple[str, bytes]] = (),  # type: ignore[assignment]
    extra_first: bool = False,
    first_name: str | None = None,
) -> None:
    """Write ``obj`` as torch's first serializer (``_save`` with tarfile, PyTorch 0.1) did: tensors are persistent
    ids ``str(key)`` into the ``tensors`` member, whose records point into the ``storages`` member. ``extra``
    members go last (or first), and ``first_name`` names a first, empty member (raw latin-1 bytes)."""
    import torch

    tensors: dict[int, torch.Tensor] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, value: object) -> str | None:
            if isinstance(value, torch.Tensor):
                tensors[id(value)] = value
                return str(id(value))
            return None

    main = io.BytesIO()
    Pickler(main, protocol=2).dump(obj)
    storage_types = {
        torch.float32: torch.FloatStorage,
        torch.int64: torch.LongStorage,
        torch.float16: torch.HalfStorage,
    }
    roots: dict[int, torch.Tensor] = {}
    records = io.BytesIO()
    pickle.dump(len(tensors), records, protocol=2)
    for key, tensor in tensors.items():
        root = id(tensor.untyped_storage())
        roots.setdefault(root, tensor)
        pickle.dump((key, root, torch.FloatTensor), records, protocol=2)
        records.write(struct.pack("<i4x", tensor.dim()))
        records.write(
            struct.pack(f"<{2 * tensor.dim() + 1}q", *tensor.shape, *tensor.stride(), tensor.storage_offset())
        )
    storages = io.BytesIO()
    pickle.dump(len(roots), storages, protocol=2)
    for root, tensor in roots.items():
        pickle.dump((root, "cpu", storage_types[tensor.dtype]), storages, protocol=2)
        raw = bytes(tensor.untyped_storage())
        storages.write(struct.pack("<q", len(raw) // tensor.element_size()) + raw)
    pickle.dump([], storages, protocol=2)
    info = sys_info if sys_info is not None else pickle.dumps({"protocol_version": 1000, "little_endian": True})
    entries = [("sys_info", info), ("pickle", main.getvalue()), ("tensors", records.getvalue())]
    entries += [("storages", storages.getvalue())]
    entries = [*extra, *entries] if extra_first else [*entries, *extra]
    if first_name is not None:
        entries.insert(0, (first_name, b""))
    options = {"format": tarfile.USTAR_FORMAT, "encoding": "latin-1"} if first_name else {"format": tarfile.PAX_FORMAT}
    with tarfile.open(path, "w:", **options) as archive:  # type: ignore[call-overload]
        for name, data in entries:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


@st.composite
def bit_flips(draw: st.DrawFn, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(buffer) - 1))
        buffer[position] ^= 1 << draw(st.integers(0, 7))
    return bytes(buffer)


@st.composite
def truncations(draw: st.DrawFn, data: bytes) -> bytes:
    return data[: draw(st.integers(0, len(data) - 1))]


@st.composite
def byte_overwrites(draw: st.DrawFn, data: bytes, start: int = 0, end: int | None = None) -> bytes:
    end = len(data) if end is None else end
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(start, max(start, end - 1)))
        chunk = draw(st.binary(min_size=1, max_size=8))
        buffer[position : position + len(chunk)] = chunk
    return bytes(buffer)


@st.composite
def safetensors_header_edits(draw: st.DrawFn, data: bytes) -> bytes:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = draw(st.sampled_from(sorted(header)))
    value = draw(
        st.one_of(
            st.integers(-(2**70), 2**70), st.text(max_size=5), st.none(), st.lists(st.integers(-5, 2**40), max_size=4)
        )
    )
    if name == "__metadata__":
        header[name] = {"format": value} if draw(st.booleans()) else value
    else:
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = value
    raw = json.dumps(header).encode()
    length_field = len(raw) if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))
    return length_field.to_bytes(8, "little") + raw + data[8 + length :]


@st.composite
def zip_directory_edits(draw: st.DrawFn, data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        start = archive.start_dir
    return draw(byte_overwrites(data, start, len(data)))


@st.composite
def pickle_edits(draw: st.DrawFn, data: bytes) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    name = next(n for n in source.namelist() if n.endswith("data.pkl"))
    pickled = source.read(name)
    mutated = draw(st.one_of(byte_overwrites(pickled), bit_flips(pickled), truncations(pickled)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, mutated if info.filename == name else source.read(info))
    return out.getvalue()


@st.composite
def appended_archives(draw: st.DrawFn, data: bytes) -> bytes:
    """Two archives in one file: the seed after (or before) a copy of itself with a mutated pickle, its offsets
    relative (plain concatenation) or absolute (as if written after the first archive)."""
    other = draw(pickle_edits(data)) if draw(st.booleans()) else data
    first, second = (other, data) if draw(st.booleans()) else (data, other)
    if draw(st.booleans()):
        return first + second
    buffer = io.BytesIO(b"\0" * len(first))
    with zipfile.ZipFile(io.BytesIO(second)) as source, zipfile.ZipFile(buffer, "a") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    return first + buffer.getvalue()[len(first) :]


@st.composite
def case_variants(draw: st.DrawFn, data: bytes) -> bytes:
    """A member renamed (or copied) with its letters' case changed: torch's lookup ignores case, zipfile's not."""
    source = zipfile.ZipFile(io.BytesIO(data))
    infos = source.infolist()
    chosen = draw(st.sampled_from(infos)).filename
    variant = "".join(c.upper() if draw(st.booleans()) else c for c in chosen)
    keep = draw(st.booleans())
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as target:
        warnings.simplefilter("ignore", UserWarning)  # an unchanged copy is a duplicate name: fuzzed too
        for info in infos:
            if info.filename != chosen or keep:
                target.writestr(info.filename, source.read(info))
            if info.filename == chosen:
                target.writestr(variant, source.read(info))
    return out.getvalue()


@st.composite
def tar_member_edits(draw: st.DrawFn, data: bytes) -> bytes:
    """One member of a tar checkpoint mutated, the tar rebuilt around it (valid headers, so the member's records
    and pickles meet the reader), or a member duplicated so that a name occurs twice."""
    with tarfile.open(fileobj=io.BytesIO(data)) as source:
        entries = [(m.name, source.extractfile(m).read()) for m in source.getmembers()]  # type: ignore[union-attr]
    index = draw(st.integers(0, len(entries) - 1))
    name, content = entries[index]
    if draw(st.booleans()):
        entries[index] = (name, draw(st.one_of(byte_overwrites(content), bit_flips(content), truncations(content))))
    else:
        entries.insert(draw(st.integers(0, len(entries))), (name, draw(byte_overwrites(content))))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as target:
        for member_name, member_data in entries:
            member = tarfile.TarInfo(member_name)
            member.size = len(member_data)
            target.addfile(member, io.BytesIO(member_data))
    return out.getvalue()


def rezip(data: bytes, name: str, content: bytes) -> bytes:
    """The archive with one member's bytes replaced, written again with valid CRCs and sizes."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, content if info.filename == name else source.read(info))
    return out.getvalue()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def json_member_edits(draw: st.DrawFn, data: bytes) -> bytes:
    """A value somewhere inside one JSON member (a .pt2 program or weights configuration) replaced: the walk goes
    down a random path of keys and indexes and replaces what it stops at, so every field meets odd types."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        name = draw(st.sampled_from(sorted(n for n in archive.namelist() if n.endswith(".json"))))
        document = json.loads(archive.read(name))
    parent: object = None
    key: object = None
    node = document
    while isinstance(node, dict | list) and node and draw(st.integers(0, 9)) > 0:
        parent, key = node, draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        node = node[key]  # type: ignore[index]
    value = draw(JSON_VALUES)
    if parent is None:
        document = value
    else:
        parent[key] = value  # type: ignore[index]
    return rezip(data, name, json.dumps(document).encode())


@st.composite
def member_byte_edits(draw: st.DrawFn, data: bytes) -> bytes:
    """One member's bytes changed (a weight record, the nested sample-input archive, a text record)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        name = draw(st.sampled_from(archive.namelist()))
        content = archive.read(name)
    edited = draw(st.one_of(byte_overwrites(content), bit_flips(content), truncations(content))) if content else b"x"
    return rezip(data, name, edited)


def legacy_header_spans(data: bytes) -> list[tuple[int, int]]:
    """Where the magic-number, protocol and system-info pickles of a legacy file lie: torch.load runs each."""
    spans, position = [], 0
    for _ in range(3):
        stream = io.BytesIO(data)
        stream.seek(position)
        for _op in pickletools.genops(stream):
            pass
        spans.append((position, stream.tell()))
        position = stream.tell()
    return spans


@st.composite
def legacy_header_edits(draw: st.DrawFn, data: bytes) -> bytes:
    """One of the header pickles that precede a legacy file's objects overwritten in place."""
    start, end = draw(st.sampled_from(legacy_header_spans(data)))
    return draw(byte_overwrites(data, start, end))


ONNX_NAMES = st.sampled_from(["", "X", "0.weight", "1.running_mean", "1.running_var", "3.weight", "4.bias", "x\x00y"])
ONNX_LOCATIONS = st.sampled_from(
    [
        "seed-external.onnx.data",
        "../seed-external.onnx.data",
        "/etc/hostname",
        "",
        "*/_ORT_MEM_ADDR_/*",
        "a/../b",
        ".",
        "x" * 5000,
        "seed-external.onnx",
    ]
)
ONNX_NUMBERS = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, 3, 4, 5, 2**31, 2**62]))
ONNX_FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def onnx_message_edits(draw: st.DrawFn, data: bytes) -> bytes:
    """One edit of the model's messages through onnx's own classes, then serialised: a node's op type, inputs,
    outputs or attributes, an initializer's dims, type, bytes or external location, the opset, or a duplicate."""
    import onnx

    model = onnx.ModelProto.FromString(data)
    graph = model.graph
    target = draw(st.sampled_from(["node", "attribute", "tensor", "external", "opset", "duplicate"]))
    if target == "node":
        node = draw(st.sampled_from(list(graph.node)))
        part = draw(st.sampled_from(["op_type", "input", "output", "name", "domain"]))
        if part == "op_type":
            node.op_type = draw(st.sampled_from(["BatchNormalization", "Identity", "Constant", "If", "Relu", ""]))
        elif part in ("input", "output"):
            names = getattr(node, part)
            del names[:]
            names.extend(draw(st.lists(ONNX_NAMES, max_size=7)))
        elif part == "name":
            node.name = draw(st.text(max_size=8))
        else:
            node.domain = draw(st.sampled_from(["", "ai.onnx", "com.microsoft"]))
    elif target == "attribute":
        node = draw(st.sampled_from(list(graph.node)))
        attribute = node.attribute.add()
        attribute.name = draw(st.sampled_from(["epsilon", "momentum", "training_mode", "is_test", "value"]))
        attribute.type = draw(st.integers(0, 14))
        attribute.f = draw(ONNX_FLOATS)
        attribute.i = draw(ONNX_NUMBERS)
        if draw(st.booleans()):
            attribute.floats.extend(draw(st.lists(ONNX_FLOATS, max_size=5)))
        if draw(st.booleans()):
            attribute.t.CopyFrom(draw(st.sampled_from(list(graph.initializer))))
    elif target in ("tensor", "external"):
        tensor = draw(st.sampled_from(list(graph.initializer)))
        if target == "tensor":
            part = draw(st.sampled_from(["dims", "data_type", "raw_data", "float_data", "name"]))
            if part == "dims":
                del tensor.dims[:]
                tensor.dims.extend(draw(st.lists(ONNX_NUMBERS, max_size=5)))
            elif part == "data_type":
                tensor.data_type = draw(st.integers(0, 28))
            elif part == "raw_data":
                tensor.raw_data = draw(st.binary(max_size=64))
            elif part == "float_data":
                tensor.ClearField("raw_data")
                tensor.float_data.extend(draw(st.lists(ONNX_FLOATS, max_size=40)))
            else:
                tensor.name = draw(ONNX_NAMES)
        else:
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key in draw(st.lists(st.sampled_from(["location", "offset", "length", "checksum"]), max_size=4)):
                entry = tensor.external_data.add()
                entry.key = key
                entry.value = draw(ONNX_LOCATIONS) if key == "location" else str(draw(ONNX_NUMBERS))
    elif target == "opset":
        for opset in model.opset_import:
            opset.version = draw(st.sampled_from([1, 6, 7, 9, 12, 14, 15, 20, -1, 2**40]))
    else:
        graph.node.append(draw(st.sampled_from(list(graph.node))))
        graph.initializer.append(draw(st.sampled_from(list(graph.initializer))))
    return model.SerializeToString()


def mutations(fmt: str, data: bytes) -> st.SearchStrategy[bytes]:
    common = [bit_flips(data), truncations(data), byte_overwrites(data)]
    if fmt == "safetensors":
        return st.one_of(*common, safetensors_header_edits(data))
    if fmt == "legacy":
        return st.one_of(*common, legacy_header_edits(data))
    if fmt in ("zip", "shared"):
        return st.one_of(
            *common, zip_directory_edits(data), pickle_edits(data), appended_archives(data), case_variants(data)
        )
    if fmt == "tar":
        return st.one_of(*common, tar_member_edits(data))
    if fmt == "pt2":
        return st.one_of(
            *common, zip_directory_edits(data), case_variants(data), json_member_edits(data), member_byte_edits(data)
        )
    if fmt.startswith("onnx"):
        return st.one_of(*common, onnx_message_edits(data))
    return st.one_of(*common)


def check_one(path: Path, data: bytes) -> None:
    """The property: any input ends in a report or a clean load error, and every report renders."""
    path.write_bytes(data)
    report = inspect_file(path)
    if report.error is not None:
        assert report.error.code in KNOWN_ERROR_CODES, report.error
        assert "\n" not in report.error.message
    render_json(Report(files=(report,)))
