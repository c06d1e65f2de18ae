"""What people read in a terminal or a CI log: no trailing blanks off a terminal, repeated findings grouped, the
concise format, headers that wrap between their pieces, diff names kept whole, a pass with warnings not green."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import BAD, GOOD, run_process
from rich.console import Console
from torch import nn

from bncheck.render.text import render_diff_text, render_text
from bncheck.report import DiffReport, FileReport, Finding, LayerDiff, Report, Severity

BLOCKS = 36


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conv net of 36 BatchNorm layers saved straight after construction, as a training script that crashed
    before its first step saves it: every layer's statistics are still mean 0, variance 1 (BN007)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(BLOCKS)]
    path = tmp_path_factory.mktemp("untrained") / "untrained.pt"
    torch.save(nn.Sequential(*blocks).state_dict(), path)
    return path


def test_no_line_ends_with_blanks_on_a_pipe(cli, untrained: Path) -> None:
    outputs = {
        "inspect": cli("inspect", GOOD / "mlp-state-dict.pt", BAD / "BN001-fp16-overflow.safetensors", untrained),
        "diff": cli("diff", GOOD / "mlp-state-dict.pt", GOOD / "mlp-dataparallel.pt"),
        "rules": cli("rules"),
        "explain": cli("explain", "BN007"),
    }
    for command, result in outputs.items():
        lines = result.stdout.splitlines()
        assert len(lines) > 3, command
        assert [line for line in lines if line != line.rstrip()] == [], command


def test_a_real_process_writing_to_a_pipe_has_no_trailing_blanks() -> None:
    result = run_process("inspect", BAD / "BN010-no-counter.pt")
    assert result.returncode == 0 and "BN010" in result.stdout
    assert not re.search(r"[ \t]$", result.stdout, re.MULTILINE)


def test_a_finding_repeated_across_layers_is_shown_once_with_its_layers(cli, untrained: Path) -> None:
    text = cli("inspect", untrained).stdout
    assert text.count("BN007") == 1
    assert f"BN007 warning {BLOCKS} layers: 0.1, 1.1, 2.1, 3.1 and {BLOCKS - 4} more" in " ".join(text.split())
    document = cli("inspect", untrained, "--json").json()
    assert [f["layer"] for f in document["files"][0]["findings"]] == [f"{i}.1" for i in range(BLOCKS)]


def test_findings_that_differ_are_not_grouped() -> None:
    def finding(layer: str, message: str) -> Finding:
        return Finding(code="BN008", severity=Severity.WARNING, message=message, hint="h", layer=layer)

    file = FileReport(
        path="m.pt",
        format="torch zip",
        size_bytes=1,
        findings=(finding("a", "3 channels"), finding("b", "5 channels"), finding("c", "3 channels")),
    )
    text = " ".join(render(render_text(Report(files=(file,))), 80).split())
    assert "BN008 warning 2 layers: a, c 3 channels" in text
    assert "BN008 warning b 5 channels" in text


def test_concise_prints_one_line_per_finding_and_the_summary(cli, untrained: Path) -> None:
    missing = untrained.parent / "missing.pt"
    result = cli("inspect", untrained, BAD / "BN002-negative-var.safetensors", missing, "--format", "concise")
    lines = result.stdout.splitlines()
    never_updated = "running_mean all 0, running_var all 1 and num_batches_tracked 0: the values at construction"
    assert lines[:BLOCKS] == [f"{untrained}:{i}.1: BN007 warning {never_updated}" for i in range(BLOCKS)]
    assert re.fullmatch(
        r".*BN002-negative-var\.safetensors:net\.1: BN002 error running_var is negative.*", lines[BLOCKS]
    )
    assert lines[BLOCKS + 1] == f"{missing}: not checked: no such file or directory"
    assert lines[-1] == f"3 files, {BLOCKS + 2} layers: 1 error, {BLOCKS} warnings, 0 infos, 1 not checked -> FAIL"
    assert len(lines) == BLOCKS + 3 and result.exit_code == 2


def render(renderable: object, width: int, *, color: bool = False) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=color, color_system="standard" if color else None)
    console.print(renderable)
    return buffer.getvalue()


@pytest.mark.parametrize("width", [40, 50, 60, 80])
def test_the_file_header_wraps_between_pieces_only(width: int) -> None:
    findings = tuple(
        Finding(code="BN008", severity=s, message="m", hint="h", layer=str(i))
        for i, s in enumerate([Severity.ERROR, Severity.ERROR, Severity.WARNING, Severity.WARNING])
    )
    file = FileReport(path="m.safetensors", format="safetensors", size_bytes=123_456_789, findings=findings)
    lines = render(render_text(Report(files=(file,))), width).splitlines()
    header = lines[1 : lines.index("", 1)]
    pieces = ["safetensors", "117.7 MiB", "0 BatchNorm layers", "FAIL (2 errors, 2 warnings)"]
    for piece in pieces:
        assert any(piece in line for line in header), (piece, header)


def test_diff_keeps_long_layer_names_whole_and_explains_its_markers() -> None:
    long_a = "backbone.encoder.stages.3.blocks.11.attention_projection.normalization"
    row = LayerDiff(
        name_a=long_a,
        name_b="module." + long_a,
        channels=64,
        mean_shift_median=0.0,
        mean_shift_worst=0.0,
        log_var_ratio_median=0.0,
        log_var_ratio_worst=0.0,
        drifted=False,
    )
    text = render(render_diff_text(DiffReport(path_a="a.pt", path_b="b.pt", layers=(row,))), 80)
    lines = [line.strip() for line in text.splitlines()]
    assert f"{long_a} ~" in lines and f"module.{long_a}" in lines  # each name whole on its line
    flat = " ".join(text.split())
    assert "a ~ b: the layer is named a in A and b in B" in flat and "median / worst channel" in flat


def test_a_pass_with_warnings_is_not_shown_in_the_colour_of_a_clean_pass() -> None:
    warning = Finding(code="BN010", severity=Severity.WARNING, message="m", hint="h", layer="x")
    warned = Report(files=(FileReport(path="w.pt", format="torch zip", size_bytes=1, findings=(warning,)),))
    clean = Report(files=(FileReport(path="c.pt", format="torch zip", size_bytes=1),))
    green, yellow = "\x1b[1;32m", "\x1b[1;33m"
    shown_warned = render(render_text(warned), 80, color=True)
    shown_clean = render(render_text(clean), 80, color=True)
    assert f"{yellow}PASS (1 warning)" in shown_warned and f"{yellow}PASS" in shown_warned.splitlines()[-1]
    assert green not in shown_warned
    assert f"{green}PASS" in shown_clean


def test_json_stays_one_entry_per_layer_and_sarif_too(cli, untrained: Path) -> None:
    sarif = json.loads(cli("inspect", untrained, "--format", "sarif").stdout)
    assert len(sarif["runs"][0]["results"]) == BLOCKS
