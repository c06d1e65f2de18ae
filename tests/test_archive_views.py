"""One view of an archive, the same as torch's: every way a zip or tar could be read two ways is either read as
torch 2.13 reads it or refused, and a pickle hidden in the difference is reported (BN101, or named in the error).

Each hostile file holds a live payload: a pickle that creates a marker file when torch.load(weights_only=False)
or plain unpickling reads it. bncheck must never create it."""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from torch import nn

from bncheck.loaders import open_checkpoint

sys.path.insert(0, str(ROOT / "fuzz"))
from mutations import save_tar


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker), protocol=2)


def healthy_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model(torch.randn(16, 4))
    return model.state_dict()


def members() -> list[tuple[str, bytes]]:
    buffer = io.BytesIO()
    torch.save(healthy_state(), buffer)
    with zipfile.ZipFile(buffer) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def zip_of(entries: list[tuple[str, bytes]], prefix: bytes = b"") -> bytes:
    """A zip of ``entries`` whose offsets count from the start of ``prefix`` + the archive (absolute)."""
    buffer = io.BytesIO(b"\0" * len(prefix))
    with zipfile.ZipFile(buffer, "a") as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return prefix + buffer.getvalue()[len(prefix) :]


def with_evil_pickle(marker: Path, name: str = "archive/data.pkl") -> list[tuple[str, bytes]]:
    return [(name, evil(marker)) if n.endswith("data.pkl") else (n, d) for n, d in members()]


def assert_live(path: Path, tmp_path: Path, build) -> None:
    """The same construction with another marker really runs under torch.load(weights_only=False)."""
    armed = tmp_path / "armed"
    path.write_bytes(build(armed))
    torch.load(path, weights_only=False)
    assert armed.exists()


def inspect(cli, path: Path) -> tuple[dict, int]:
    result = cli("inspect", path, "--json")
    (file,) = result.json()["files"]
    return file, result.exit_code


def bn101(file: dict) -> str:
    (finding,) = [f for f in file["findings"] if f["code"] == "BN101"]
    return finding["message"]


def test_names_that_differ_only_in_case_are_refused_naming_the_hidden_pickle(cli, tmp_path: Path) -> None:
    # torch 2.13 reads archive/DATA.PKL or archive/data.pkl depending on where miniz's sort puts it
    def build(marker: Path) -> bytes:
        entries = members()
        return zip_of([("archive/DATA.PKL", evil(marker)), *entries[1:], entries[0]])

    path = tmp_path / "case.pt"
    assert_live(path, tmp_path, build)
    marker = tmp_path / "marker"
    path.write_bytes(build(marker))
    file, code = inspect(cli, path)
    assert not marker.exists()
    assert "case-insensitive" in file["error"]["message"]
    assert "hidden pickle archive/DATA.PKL names posix.system" in file["error"]["message"]
    assert code == 2


def test_a_hidden_pickle_that_breaks_after_its_payload_is_still_named(cli, tmp_path: Path) -> None:
    # the payload's REDUCE comes first; what follows it no unpickler can read, yet torch would have run the payload
    broken = evil(tmp_path / "marker")[:-1] + b"\xff\xff"
    entries = members()
    path = tmp_path / "case.pt"
    path.write_bytes(zip_of([("archive/DATA.PKL", broken), *entries[1:], entries[0]]))
    file, code = inspect(cli, path)
    assert "hidden pickle archive/DATA.PKL names posix.system" in file["error"]["message"]
    assert code == 2


def test_an_upper_case_data_pickle_alone_is_the_one_torch_reads(cli, tmp_path: Path) -> None:
    path = tmp_path / "upper.pt"
    assert_live(path, tmp_path, lambda marker: zip_of(with_evil_pickle(marker, "archive/DATA.PKL")))
    marker = tmp_path / "marker"
    path.write_bytes(zip_of(with_evil_pickle(marker, "archive/DATA.PKL")))
    file, code = inspect(cli, path)
    assert not marker.exists()
    assert "posix.system" in bn101(file)
    assert code == 1


def crc_broken(data: bytes) -> bytes:
    raw = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo("archive/data.pkl")
        directory = archive.start_dir
    struct.pack_into("<I", raw, info.header_offset + 14, info.CRC ^ 0xFFFF)
    entry = raw.index(b"PK\x01\x02archive/data.pkl"[:4], directory)
    while raw[entry + 46 : entry + 62] != b"archive/data.pkl":
        entry = raw.index(b"PK\x01\x02", entry + 1)
    struct.pack_into("<I", raw, entry + 16, info.CRC ^ 0xFFFF)
    return bytes(raw)


def local_name_changed(data: bytes) -> bytes:
    raw = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        offset = archive.getinfo("archive/data.pkl").header_offset
    raw[offset + 30 : offset + 46] = b"archive/xxxx.pkl"
    return bytes(raw)


@pytest.mark.parametrize(
    ("edit", "note"),
    [(crc_broken, "fails its CRC-32 check"), (local_name_changed, "local header names it 'archive/xxxx.pkl'")],
    ids=["bad-crc", "local-name"],
)
def test_what_zipfile_refuses_and_torch_reads_is_read_as_torch_reads_it(cli, tmp_path: Path, edit, note) -> None:
    path = tmp_path / "edited.pt"
    assert_live(path, tmp_path, lambda marker: edit(zip_of(with_evil_pickle(marker))))
    marker = tmp_path / "marker"
    path.write_bytes(edit(zip_of(with_evil_pickle(marker))))
    file, code = inspect(cli, path)
    assert not marker.exists()
    assert "posix.system" in bn101(file)
    assert any(note in n for n in file["notes"]), file["notes"]
    assert code == 1


def test_an_archive_appended_with_relative_offsets_is_refused_naming_its_pickle(cli, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "appended.pt"
    path.write_bytes(zip_of(members()) + zip_of(with_evil_pickle(marker)))
    with pytest.raises(RuntimeError, match="PytorchStreamReader failed"):
        torch.load(path, weights_only=False)  # torch cannot read it; Python's zipfile reads the second archive
    pickle.loads(zipfile.ZipFile(path).read("archive/data.pkl"))  # which is live
    assert marker.exists()
    marker.unlink()
    file, code = inspect(cli, path)
    assert not marker.exists()
    assert "appended to" in file["error"]["message"]
    assert "hidden pickle archive/data.pkl names posix.system" in file["error"]["message"]
    assert code == 2


def test_a_second_archive_with_absolute_offsets_is_read_as_torch_reads_it(cli, tmp_path: Path) -> None:
    path = tmp_path / "second.pt"
    assert_live(path, tmp_path, lambda marker: zip_of(with_evil_pickle(marker), prefix=zip_of(members())))
    marker = tmp_path / "marker"
    path.write_bytes(zip_of(with_evil_pickle(marker), prefix=zip_of(members())))
    file, code = inspect(cli, path)
    assert not marker.exists()
    assert "posix.system" in bn101(file)
    assert code == 1


def test_a_pickle_in_an_earlier_archive_torch_never_reads_is_still_scanned(cli, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "earlier.pt"
    first = zip_of(with_evil_pickle(marker))
    path.write_bytes(zip_of(members(), prefix=first))
    assert torch.load(path, weights_only=True).keys() == healthy_state().keys()  # torch reads the healthy one
    pickle.loads(zipfile.ZipFile(io.BytesIO(first)).read("archive/data.pkl"))  # the hidden one is live
    assert marker.exists()
    marker.unlink()
    file, code = inspect(cli, path)
    assert not marker.exists()
    assert "posix.system" in bn101(file)
    assert any("hidden pickle archive/data.pkl at byte 0" in n for n in file["notes"])
    assert [layer["name"] for layer in file["layers"]] == ["1"]
    assert code == 1


def test_a_member_outside_the_first_members_folder_is_refused_as_torch_refuses_it(cli, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "outside.pt"
    path.write_bytes(zip_of([*members(), ("other/data.pkl", evil(marker))]))
    with pytest.raises(RuntimeError, match="not in a subdirectory"):
        torch.load(path, weights_only=False)
    file, code = inspect(cli, path)
    assert not marker.exists()
    assert "outside the folder 'archive/'" in file["error"]["message"]
    assert "hidden pickle other/data.pkl names posix.system" in file["error"]["message"]
    assert code == 2


def test_a_tar_checkpoint_reads_as_torch_load_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    state = healthy_state()
    save_tar(state, path)
    with pytest.raises(RuntimeError, match=r"legacy \.tar format"):
        torch.load(path)  # weights_only=True refuses the format
    loaded = torch.load(path, weights_only=False)
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == "torch tar"
    assert set(checkpoint.root) == set(loaded)
    for name, tensor in loaded.items():
        ref = checkpoint.root[name]
        assert ref.dtype == str(tensor.dtype).removeprefix("torch.")
        assert ref.shape == tuple(tensor.shape)
        assert (ref.read() == tensor.numpy()).all()


def test_a_view_of_a_tar_storage_reads_as_torch_reads_it(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32)
    state = {"bn.running_mean": base[2:5], "bn.running_var": base.view(3, 4).t()[1]}
    path = tmp_path / "views.pt"
    save_tar(state, path)
    loaded = torch.load(path, weights_only=False)
    checkpoint = open_checkpoint(path)
    for name, tensor in loaded.items():
        assert (checkpoint.root[name].read() == tensor.numpy()).all()


@pytest.mark.parametrize("where", ["pickle", "sys_info", "duplicate"])
def test_a_payload_in_a_tar_checkpoint_is_flagged_not_run(cli, tmp_path: Path, where: str) -> None:
    def build(path: Path, marker: Path) -> None:
        if where == "pickle":
            save_tar({"state": healthy_state(), "extra": Payload(marker)}, path)
        elif where == "sys_info":
            save_tar(healthy_state(), path, sys_info=evil(marker))
        else:  # an earlier copy of "pickle" torch skips, and the one it reads
            save_tar(healthy_state(), path, extra=[("pickle", evil(marker))], extra_first=True)

    path = tmp_path / "tar.pt"
    armed = tmp_path / "armed"
    build(path, armed)
    if where == "pickle":
        torch.load(path, weights_only=False)
    else:  # torch never reads these members; plainly unpickled, they are live
        import tarfile

        with tarfile.open(path) as archive:
            pickle.loads(archive.extractfile(archive.getmembers()[0]).read())
    assert armed.exists()
    marker = tmp_path / "marker"
    build(path, marker)
    file, code = inspect(cli, path)
    assert not marker.exists()
    assert file["format"] == "torch tar"
    assert "posix.system" in bn101(file)
    assert code == 1


def test_a_tar_that_starts_with_the_legacy_magic_is_read_as_the_tar_torch_reads(cli, tmp_path: Path) -> None:
    # torch tries tarfile first: the legacy magic in the first member's name does not make it a legacy file
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    marker = tmp_path / "marker"
    path = tmp_path / "polyglot.pt"
    save_tar({"extra": Payload(marker)}, path, first_name=magic.decode("latin-1"))
    assert path.read_bytes().startswith(magic)
    file, code = inspect(cli, path)
    assert not marker.exists()
    assert file["format"] == "torch tar"
    assert "posix.system" in bn101(file)
    assert code == 1
    torch.load(path, weights_only=False)
    assert marker.exists()  # and torch indeed ran the tar's pickle
