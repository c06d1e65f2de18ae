"""Inputs are never modified by any command, and a recalibration killed at any moment leaves either no output
or a complete, valid one."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import BAD, FIXTURES, GOOD, run_process

R = FIXTURES / "recompute"
MODEL = f"{R / 'models.py'}:tabular_mlp"


def digests(paths: list[Path]) -> dict[Path, tuple[str, int]]:
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


def test_no_command_modifies_its_inputs(tmp_path: Path) -> None:
    inputs = sorted(p for folder in (GOOD, BAD, R) for p in folder.rglob("*") if p.is_file())
    before = digests(inputs)
    run_process("inspect", GOOD, BAD, "--json")
    run_process("inspect", GOOD, BAD, "--format", "sarif", "-j", "2")
    run_process("inspect", R / "averaged-two-runs.pt", "--model", MODEL, "--data", R / "sample-original.npy")
    run_process("diff", GOOD / "mlp-state-dict.pt", GOOD / "mlp-fp16.pt")
    run_process(
        "recalibrate",
        R / "stale-untracked-finetune.safetensors",
        "--model",
        MODEL,
        "--data",
        R / "sample-shifted.npy",
        "-o",
        tmp_path / "out.safetensors",
    )
    assert digests(inputs) == before


def test_a_killed_recalibration_never_leaves_a_partial_output(tmp_path: Path) -> None:
    source = R / "pruned-after-stats.pth"
    out = tmp_path / "out.pth"
    command = [
        sys.executable,
        "-m",
        "bncheck",
        "recalibrate",
        str(source),
        "--model",
        MODEL,
        "--data",
        str(R / "sample-original.npy"),
        "-o",
        str(out),
        "--force",
    ]
    # how long an uninterrupted run takes, to spread the kills across it
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    full = time.perf_counter() - start
    expected = out.read_bytes()
    rng = random.Random(0)
    outcomes = {"absent": 0, "complete": 0}
    for _ in range(25):
        out.unlink(missing_ok=True)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, full * 1.1))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if out.exists():
            assert out.read_bytes() == expected  # never a partial file
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
    assert outcomes["absent"] > 0  # the kills really landed before the end
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out.pth"]
    assert all(name.endswith(".bncheck-tmp") for name in leftovers)  # only named temporaries, never OUT itself
    assert os.environ.get("BNCHECK_NEVER_SET") is None
