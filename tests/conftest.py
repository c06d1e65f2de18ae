from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bncheck.cli import run

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
GOOD = FIXTURES / "good"
BAD = FIXTURES / "bad"


def good_checkpoints() -> list[Path]:
    from bncheck.loaders import find_checkpoints

    return find_checkpoints(GOOD)


def bad_checkpoints() -> list[Path]:
    """Every checkpoint under fixtures/bad; a fixture may be a folder (a Hugging Face model beside its config.json),
    named after its code like a file."""
    from bncheck.loaders import find_checkpoints

    return find_checkpoints(BAD)


class CliResult:
    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr

    def json(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture
def cli():
    """Run the CLI in-process (fast); stdout and stderr kept apart."""

    def invoke(*args: str | Path) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run([str(a) for a in args])
        return CliResult(code, out.getvalue(), err.getvalue())

    return invoke


def run_process(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bncheck`` as a real process: real exit codes, real imports."""
    return subprocess.run(
        [sys.executable, "-m", "bncheck", *map(str, args)], capture_output=True, text=True, env=env, check=False
    )


def run_in(cwd: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bncheck`` in another working directory (where the upward config search starts)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "bncheck", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
