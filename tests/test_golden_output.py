"""The JSON, text and SARIF output of every fixture (and diff's JSON and text on a few pairs), byte for byte against
the goldens in tests/golden/.

Speed work must not change a byte of what users see: a rule, summary or renderer change that moves any output shows
here. When an output change is intended, rewrite the goldens with ``python tests/test_golden_output.py`` and review
the diff they make in the commit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
# relative to ROOT, so the outputs name the same paths on every machine
CHECKPOINTS = ("fixtures/good", "fixtures/bad", "fixtures/recompute")
DIFF_PAIRS = (
    ("fixtures/recompute/healthy.pt", "fixtures/recompute/averaged-two-runs.pt"),
    ("fixtures/good/mlp-state-dict.pt", "fixtures/good/mlp-fp16.pt"),
    ("fixtures/good/mlp-state-dict.pt", "fixtures/good/mlp-dataparallel.pt"),
    ("fixtures/good/conv1d.safetensors", "fixtures/good/conv1d-torchscript.pt"),
    ("fixtures/good/mlp-state-dict.pt", "fixtures/bad/BN001-diverged-nan.pt"),
)
OUTPUTS = {
    "inspect.json": ("inspect", *CHECKPOINTS, "--format", "json", "--fail-on", "info"),
    "inspect.txt": ("inspect", *CHECKPOINTS, "--format", "text", "--fail-on", "info"),
    "inspect.sarif": ("inspect", *CHECKPOINTS, "--format", "sarif", "--fail-on", "info"),
    **{
        f"diff-{i}.{ext}": ("diff", a, b, "--format", fmt)
        for i, (a, b) in enumerate(DIFF_PAIRS)
        for ext, fmt in (("json", "json"), ("txt", "text"))
    },
}


def render(args: tuple[str, ...]) -> str:
    """The CLI's stdout for ``args``, run in-process from the repository root at a fixed terminal width, with the
    version number replaced (a release must not rewrite the goldens)."""
    from bncheck import __version__
    from bncheck.cli import run

    out = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        run(list(args))
    return out.getvalue().replace(__version__, "<version>")


@pytest.fixture(autouse=True)
def _fixed_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.delenv("NO_COLOR", raising=False)


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_output_matches_golden(name: str) -> None:
    assert render(OUTPUTS[name]) == (GOLDEN / name).read_text(encoding="utf-8"), (
        f"{name} changed; if intended, run python tests/test_golden_output.py and review the goldens' diff"
    )


def test_goldens_hold_findings_of_every_static_rule() -> None:
    """The goldens are only a safety net if the fixtures behind them trigger the rules."""
    from bncheck.checks import RULES

    report = json.loads((GOLDEN / "inspect.json").read_text(encoding="utf-8"))
    found = {finding["code"] for file in report["files"] for finding in file["findings"]}
    assert found == {code for code, rule in RULES.items() if rule.scope != "recompute"}


if __name__ == "__main__":
    os.environ["COLUMNS"] = "120"
    sys.path.insert(0, str(ROOT))
    GOLDEN.mkdir(exist_ok=True)
    for name, args in OUTPUTS.items():
        (GOLDEN / name).write_text(render(args), encoding="utf-8")
