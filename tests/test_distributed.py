"""Recomputation under torchrun: two CPU processes (gloo on loopback), started as users start them, give the result
of one process over the same samples, print one report, and fail together with one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from safetensors.numpy import load_file

from bncheck.distributed import from_environment
from bncheck.model_data import SampleData, model_batches

RECOMPUTE = FIXTURES / "recompute"
CHECKPOINT = RECOMPUTE / "stale-untracked-finetune.safetensors"
MODEL = f"{RECOMPUTE / 'models.py'}:tabular_mlp"
SAMPLES = RECOMPUTE / "sample-shifted.npy"
TORCHRUN = Path(sys.executable).parent / "torchrun"

LOADER = '''
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def batches():
    """A rank-aware loader, as a training script shards its data: each rank gets every other sample."""
    x = torch.from_numpy(np.load({samples!r})).float()
    data = TensorDataset(x, torch.zeros(len(x)))
    sampler = DistributedSampler(data, shuffle=False) if dist.is_initialized() else None
    return DataLoader(data, batch_size=50, sampler=sampler)


def failing():
    if dist.is_initialized() and dist.get_rank() == 1:
        raise RuntimeError("disk on fire")
    return batches()
'''


def torchrun(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed beside this Python")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "bncheck", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300, check=False)


def single(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bncheck", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300, check=False)


@pytest.fixture
def loader(tmp_path: Path) -> str:
    path = tmp_path / "loader.py"
    path.write_text(LOADER.format(samples=str(SAMPLES)))
    return str(path)


def statistics(path: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items() if "running" in k or "batches" in k}


def test_recalibrate_under_torchrun_writes_what_one_process_writes(tmp_path: Path) -> None:
    common = [CHECKPOINT, "--model", MODEL, "--data", SAMPLES, "--batch-size", "32"]
    one = single("recalibrate", *common, "-o", tmp_path / "one.safetensors", cwd=tmp_path)
    two = torchrun("recalibrate", *common, "-o", tmp_path / "two.safetensors", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-2000:]
    expected, got = statistics(tmp_path / "one.safetensors"), statistics(tmp_path / "two.safetensors")
    assert expected.keys() == got.keys() and len(expected) == 6
    for name, values in expected.items():
        # the ranks ran exactly the batches one process runs (batch i on rank i mod 2): every layer agrees, not
        # only the first
        assert np.max(np.abs(got[name] - values) / np.maximum(np.abs(values), 1e-3)) < 1e-6, name
    assert got["1.num_batches_tracked"] == np.ceil(1000 / 32)
    # one report, from rank 0; the other rank printed nothing
    assert two.stdout.count("1 file, 2 layers") == 1 and "wrote" in two.stderr
    assert not list(tmp_path.glob("*.tmp*"))


def drift(document: dict) -> dict[str, tuple[float, float]]:
    layers = document["files"][0]["recompute"]["layers"]
    return {row["name"]: (row["mean_shift_worst"], row["log_var_ratio_worst"]) for row in layers}


def test_inspect_under_torchrun_with_a_rank_aware_loader(tmp_path: Path, loader: str) -> None:
    """Each rank's DistributedSampler gives it half of the samples; the merged first layer, whose inputs do not
    depend on how samples are batched, equals one process over all of them."""
    common = ["inspect", CHECKPOINT, "--model", MODEL, "--data", f"{loader}:batches", "--json"]
    one, two = single(*common, cwd=tmp_path), torchrun(*common, cwd=tmp_path)
    assert one.returncode == 1 and two.returncode != 0  # BN012: the fixture's statistics are stale
    assert two.stdout.count('"schema_version"') == 1  # one JSON document, from rank 0
    single_run, ranks_run = json.loads(one.stdout), json.loads(two.stdout)
    assert ranks_run["files"][0]["recompute"]["samples"] == single_run["files"][0]["recompute"]["samples"] == 1000
    assert ranks_run["files"][0]["recompute"]["batches"] == 20  # 2 ranks x 500 samples in batches of 50
    expected, got = drift(single_run)["1"], drift(ranks_run)["1"]
    assert got == pytest.approx(expected, rel=1e-6)
    codes = {(f["code"], f["layer"]) for f in ranks_run["files"][0]["findings"]}
    assert ("BN012", "1") in codes


def test_a_rank_that_fails_ends_every_rank_with_one_line(tmp_path: Path, loader: str) -> None:
    output = tmp_path / "fixed.safetensors"
    common = [CHECKPOINT, "--model", MODEL, "--data", f"{loader}:failing", "-o", output]
    result = torchrun("recalibrate", *common, cwd=tmp_path)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("bncheck: ")]
    assert said == [f"bncheck: error: rank 1: data callable {loader}:failing raised RuntimeError: disk on fire"]
    # torchrun prints its own summary of the failed ranks; no frame of bncheck's code is in it
    assert not re.search(r'File ".*[/\\]bncheck[/\\]', result.stderr)
    assert not output.exists() and result.stdout == ""


def test_the_environment_torchrun_sets_is_read() -> None:
    environ = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    ranks = from_environment(environ)
    assert ranks is not None and (ranks.rank, ranks.world_size, ranks.local_rank) == (1, 2, 1)
    assert not ranks.leader and ranks.device("cuda") == "cuda:1" and ranks.device("cpu") == "cpu"
    assert from_environment({}) is None
    from bncheck.errors import ConfigError

    with pytest.raises(ConfigError, match="--backend applies under torchrun"):
        from_environment({}, backend="gloo")
    with pytest.raises(ConfigError, match="--backend must be one of gloo, nccl"):
        from_environment(environ, backend="mpi")
    with pytest.raises(ConfigError, match="RANK 2 is not below WORLD_SIZE 2"):
        from_environment({**environ, "RANK": "2"})


def test_a_tensor_file_is_split_by_batches_in_turn(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.arange(23 * 2, dtype=np.float32).reshape(23, 2))
    data = SampleData(spec=str(path), batch_size=5, max_samples=21)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))

    def firsts(part: SampleData) -> list[float]:
        return [float(batch.args[0][0, 0]) for batch in model_batches(part, model, [])]

    whole = firsts(data)
    shares = [firsts(data.shard(rank, 2)) for rank in range(2)]
    assert whole == [0, 10, 20, 30, 40]  # the budget cuts the last batch to 1 sample
    assert shares == [[0, 20, 40], [10, 30]]
    assert [data.shard(rank, 2).total_samples() for rank in range(2)] == [11, 10]
    loader = SampleData(spec="loader.py:batches", max_samples=21)
    assert [loader.shard(rank, 2).budget for rank in range(2)] == [11, 10]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_each_rank_runs_on_its_own_gpu(tmp_path: Path) -> None:
    result = torchrun("inspect", CHECKPOINT, "--model", MODEL, "--data", SAMPLES, "--device", "cuda", cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    assert result.stdout.count("1 file, 2 layers") == 1
