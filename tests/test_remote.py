"""Checkpoints behind URLs: only the needed byte ranges travel, and every network failure is one clean line."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import BAD, GOOD, ROOT, run_process
from range_server import RangeServer

sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="session")
def big_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's 1.7 GB checkpoint as .pt and .safetensors (written once per test session)."""
    from checkpoints import big_checkpoints

    folder = tmp_path_factory.mktemp("big")
    big_checkpoints(folder, formats=("pt", "safetensors"))
    return folder


@pytest.mark.parametrize("name", ["big.pt", "big.safetensors"])
def test_a_remote_1_7_gb_checkpoint_costs_under_1_percent_of_its_bytes(cli, big_folder: Path, name: str) -> None:
    size = (big_folder / name).stat().st_size
    assert size > 1.6e9
    with RangeServer(big_folder) as server:
        result = cli("inspect", f"{server.url}/{name}", "--json")
        served, requests = server.bytes_served, server.requests
    assert result.exit_code == 0, result.stdout + result.stderr
    (file,) = result.json()["files"]
    assert (len(file["layers"]), file["size_bytes"]) == (400, size)
    assert served < 0.01 * size, f"read {served} of {size} bytes ({served / size:.2%})"
    # the 2,000 BatchNorm tensors arrive in about one prefetched block per layer, not one request per tensor
    assert requests < 450, requests


def test_remote_results_equal_local_ones(cli, tmp_path: Path) -> None:
    for path in [*sorted(GOOD.glob("*.p*")), *sorted(p for p in BAD.iterdir() if p.is_file())]:
        shutil.copy(path, tmp_path / path.name)
    shutil.copytree(GOOD / "conv1d-sharded", tmp_path / "conv1d-sharded")
    names = [p.name for p in sorted(tmp_path.iterdir()) if p.is_file() and "legacy" not in p.name]
    names.append("conv1d-sharded/model.safetensors.index.json")
    with RangeServer(tmp_path) as server:
        for name in names:
            remote = cli("inspect", f"{server.url}/{name}", "--json").json()["files"][0]
            local = cli("inspect", tmp_path / name, "--json").json()["files"][0]
            for key in ("format", "size_bytes", "error", "layers", "findings"):
                assert remote[key] == local[key], (name, key)


def test_a_server_that_ignores_range_is_refused(tmp_path: Path) -> None:
    shutil.copy(GOOD / "mlp-state-dict.pt", tmp_path / "m.pt")
    with RangeServer(tmp_path, honour_range=False) as server:
        result = run_process("inspect", f"{server.url}/m.pt")
        served = server.bytes_served
    assert result.returncode == 2
    assert "ignores HTTP Range requests" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert served <= 2 * (GOOD / "mlp-state-dict.pt").stat().st_size


def test_a_dropped_connection_and_a_404_are_one_line_errors(tmp_path: Path) -> None:
    shutil.copy(GOOD / "conv1d.safetensors", tmp_path / "c.safetensors")
    with RangeServer(tmp_path, drop_after_requests=1) as server:
        dropped = run_process("inspect", f"{server.url}/c.safetensors", "--json")
    with RangeServer(tmp_path) as server:
        missing = run_process("inspect", f"{server.url}/nothing.pt", "--json")
    for result in (dropped, missing):
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert "not found" in missing.stderr
    assert "cannot read" in dropped.stderr


def test_urls_need_the_remote_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from bncheck.errors import MissingDependencyError
    from bncheck.loaders import open_checkpoint

    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'bncheck\[remote\]'"):
        open_checkpoint("https://example.invalid/model.safetensors")


def test_merge_ranges_joins_nearby_ranges_and_caps_blocks() -> None:
    from bncheck.loaders.files import merge_ranges

    ranges = [(100, 10), (0, 10), (15, 5), (5, 20), (1000, 0), (5000, 100)]
    assert merge_ranges(ranges, max_gap=0, max_block=1 << 20) == [(0, 25), (100, 110), (5000, 5100)]
    assert merge_ranges(ranges, max_gap=100, max_block=1 << 20) == [(0, 110), (5000, 5100)]
    assert merge_ranges(ranges, max_gap=10_000, max_block=50) == [(0, 25), (100, 110), (5000, 5100)]


def test_reads_outside_the_prefetched_blocks_still_reach_the_server(tmp_path: Path) -> None:
    from bncheck.loaders.files import open_source

    shutil.copy(GOOD / "conv1d.safetensors", tmp_path / "c.safetensors")
    data = (tmp_path / "c.safetensors").read_bytes()
    with RangeServer(tmp_path) as server:
        source = open_source(f"{server.url}/c.safetensors")
        source.prefetch([(8, 16), (40, 8)])
        before = server.requests
        assert source.read(10, 10) == data[10:20]  # inside the first block: no request
        assert server.requests == before
        assert source.read(30, 20) == data[30:50]  # reaches past the block: one request
        assert server.requests == before + 1


@pytest.mark.parametrize("name", ["conv1d.safetensors", "mlp-state-dict.pt"])
def test_a_connection_dropped_during_the_prefetch_is_one_line(
    cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    from bncheck.loaders.files import RemoteSource

    shutil.copy(GOOD / name, tmp_path / name)
    with RangeServer(tmp_path) as server:
        assert cli("inspect", f"{server.url}/{name}", "--json").exit_code == 0
        requests = server.requests
    prefetched = []
    real_prefetch = RemoteSource.prefetch

    def prefetch_then_note(self: RemoteSource, ranges: list[tuple[int, int]]) -> None:
        prefetched.append(len(ranges))
        real_prefetch(self, ranges)

    monkeypatch.setattr(RemoteSource, "prefetch", prefetch_then_note)
    with RangeServer(tmp_path, drop_after_requests=requests - 1) as server:  # the last request is the prefetch
        result = cli("inspect", f"{server.url}/{name}", "--json")
    assert prefetched, "the failure came before the prefetch"
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_a_remote_legacy_file_is_not_read_an_opcode_at_a_time(tmp_path: Path) -> None:
    import bncheck

    shutil.copy(GOOD / "conv1d-legacy.pt", tmp_path / "m.pt")
    with RangeServer(tmp_path) as server:
        (file,) = bncheck.inspect(f"{server.url}/m.pt").files
        requests = server.requests
    assert file.error is None and len(file.layers) == 2
    # its five pickles cost a request per 64 KiB (1,180 requests when each opcode was one); each storage still costs
    # one for its length and each BatchNorm tensor one
    assert requests < 40, requests


def test_read_ahead_serves_small_reads_from_one_block_and_never_asks_past_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from bncheck.loaders.files import LocalSource, ReadAheadFile

    data = bytes(range(256)) * 40
    (tmp_path / "f").write_bytes(data)
    source = LocalSource(tmp_path / "f")
    reads: list[tuple[int, int]] = []
    real_read = source._read
    monkeypatch.setattr(
        source, "_read", lambda offset, length: reads.append((offset, length)) or real_read(offset, length)
    )
    stream = ReadAheadFile(source, block=4096)
    stream.seek(100)
    assert [stream.read(3) for _ in range(4)] == [data[100 + 3 * i : 103 + 3 * i] for i in range(4)]
    assert reads == [(100, 4096)]
    stream.seek(10_000)
    assert stream.read(2**62) == data[10_000:]  # a crafted length gets what the file holds, and allocates no more
    assert reads[-1] == (10_000, len(data) - 10_000)
