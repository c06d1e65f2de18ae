"""Inspecting safetensors, zip checkpoints and torch.export archives must not import torch (it costs seconds and is
optional), and --version / --help load nothing heavy."""

from __future__ import annotations

import subprocess
import sys

from conftest import BAD, GOOD

PROBE = """
import sys
from bncheck.cli import run
code = run(sys.argv[1:])
assert "torch" not in sys.modules, "torch was imported"
print("exit", code, *sorted(name for name in ("numpy", "rich", "bncheck.api") if name in sys.modules))
"""


def run_probe(*args: str) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_inspect_safetensors_zip_torchscript_and_export_without_torch() -> None:
    files = [
        GOOD / "conv1d.safetensors",
        GOOD / "mlp-state-dict.pt",
        GOOD / "conv1d-torchscript.pt",
        GOOD / "conv1d-sharded",
        BAD / "BN102-full-module-user-class.pt",
        BAD / "BN101-os-system-payload.pt",
        GOOD / "conv1d-export.pt2",
        BAD / "BN019-exported-in-train-mode.pt2",
    ]
    assert run_probe("inspect", "--json", *map(str, files)) == "exit 1 bncheck.api numpy"


def test_version_and_help_load_neither_torch_nor_the_library() -> None:
    assert run_probe("--version") == "exit 0"
    assert run_probe("--help") == "exit 0"
    assert run_probe("inspect", "--help") == "exit 0"
