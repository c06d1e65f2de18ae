"""Mutations of valid checkpoints for fuzzing the loaders, discovery and checks (used by tests/test_fuzz.py and
fuzz/run.py): bit flips, truncation, safetensors header edits, zip central-directory edits, and edits of the
pickle inside an archive (re-zipped with a valid CRC so that the unpickler, not the CRC check, meets them)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

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
    return {
        "safetensors": (folder / "seed.safetensors").read_bytes(),
        "zip": (folder / "seed.pt").read_bytes(),
        "legacy": (folder / "seed-legacy.pt").read_bytes(),
    }


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


def mutations(fmt: str, data: bytes) -> st.SearchStrategy[bytes]:
    common = [bit_flips(data), truncations(data), byte_overwrites(data)]
    if fmt == "safetensors":
        return st.one_of(*common, safetensors_header_edits(data))
    if fmt == "zip":
        return st.one_of(*common, zip_directory_edits(data), pickle_edits(data))
    return st.one_of(*common)


def check_one(path: Path, data: bytes) -> None:
    """The property: any input ends in a report or a clean load error, and every report renders."""
    path.write_bytes(data)
    report = inspect_file(path)
    if report.error is not None:
        assert report.error.code in KNOWN_ERROR_CODES, report.error
        assert "\n" not in report.error.message
    render_json(Report(files=(report,)))
