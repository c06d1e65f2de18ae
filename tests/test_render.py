"""The text report fits the terminal it is given and never loses data to markup."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from bncheck.render.text import render_text
from bncheck.report import FileError, FileReport, Finding, LayerInfo, Report, Severity, Summary


def layer(name: str, *, nonfinite: int = 0, kind: str = "BatchNorm2d") -> LayerInfo:
    stats = Summary(min=-1234.5678, max=98765.4321, mean=1.0, nonfinite=nonfinite)
    return LayerInfo(
        name=name,
        source="",
        averaged=False,
        kind=kind,
        kind_inferred=True,
        num_features=64,
        dtype="float32",
        num_batches_tracked=1200,
        running_mean=stats,
        running_var=stats,
    )


def render(report: Report, width: int) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=width, no_color=True, force_terminal=False).print(render_text(report))
    return buffer.getvalue()


LONG = "resnet.encoder.stages.3.layers.2.shortcut.normalization"


@pytest.mark.parametrize("width", [60, 80, 120])
def test_long_names_and_wide_ranges_fit_and_stay_whole(width: int) -> None:
    file = FileReport(
        path="model.safetensors",
        format="safetensors",
        size_bytes=123456,
        layers=(layer("bn1"), layer(LONG, nonfinite=3), layer("[nan].[bfloat16]")),
        findings=(
            Finding(
                code="BN001",
                severity=Severity.ERROR,
                message="running_var has 3 non-finite value(s): 3 NaN [nan]",
                hint="hint [bold]x",
                layer=LONG,
                source="",
                tensor="running_var",
                channels=tuple(range(10)),
                channel_count=10,
            ),
        ),
    )
    text = render(Report(files=(file,)), width)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width
    assert LONG in text  # never folded mid-name
    assert "[nan].[bfloat16]" in text  # not eaten as markup
    words = " ".join(text.split())  # the grid may wrap a message anywhere
    assert "3 NaN [nan]" in words and "hint [bold]x" in words
    assert "3 nan/inf" in text
    assert "channels 0, 1, 2, 3, 4, 5, ... (10 in all)" in text


def test_unreadable_file_shows_its_reason_and_the_run_fails() -> None:
    report = Report(
        files=(
            FileReport(
                path="x.pt",
                format=None,
                size_bytes=None,
                error=FileError(code="corrupt", message="broken zip archive"),
            ),
        )
    )
    text = render(report, 80)
    assert "NOT CHECKED  broken zip archive" in text
    assert text.rstrip().endswith("-> FAIL")
