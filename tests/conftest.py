from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bncheck.cli import app

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
GOOD = FIXTURES / "good"
BAD = FIXTURES / "bad"


def good_checkpoints() -> list[Path]:
    from bncheck.loaders import find_checkpoints

    return find_checkpoints(GOOD)


def bad_checkpoints() -> list[Path]:
    return sorted(BAD.iterdir())


class CliResult:
    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr

    def json(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture
def cli():
    """Run the CLI in-process (fast); stdout and stderr kept apart."""
    runner = CliRunner()

    def run(*args: str | Path) -> CliResult:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


def run_process(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bncheck`` as a real process: real exit codes, real imports."""
    return subprocess.run(
        [sys.executable, "-m", "bncheck", *map(str, args)], capture_output=True, text=True, env=env, check=False
    )
