"""One registry of output formats: --format offers exactly its keys, every renderer renders a report built in
memory, and the README and the pre-commit hook still describe the formats there are."""

from __future__ import annotations

import io
import json
import math
import re
import shlex

import pytest
from conftest import BAD, GOOD, ROOT, run_process
from rich.console import Console

from bncheck.cli import app
from bncheck.render import DIFF_FORMATS, REPORT_FORMATS, Renderer
from bncheck.report import (
    DiffReport,
    FileError,
    FileReport,
    Finding,
    LayerDiff,
    LayerInfo,
    Report,
    RuleInfo,
    Severity,
    Summary,
)

README = (ROOT / "README.md").read_text(encoding="utf-8")


def format_choices(command: str) -> list[str]:
    from typer.main import get_command

    group = get_command(app)
    (param,) = [p for p in group.commands[command].params if p.name == "output_format"]
    return [str(choice.value) for choice in param.type_descriptor.choices]


@pytest.mark.parametrize(("command", "registry"), [("inspect", REPORT_FORMATS), ("diff", DIFF_FORMATS)])
def test_format_choices_are_the_registry_keys(command: str, registry: dict[str, Renderer]) -> None:
    assert format_choices(command) == list(registry)
    help_text = " ".join(run_process(command, "--help").stdout.split())
    assert f"--format <{'|'.join(registry)}>" in help_text
    for renderer in registry.values():
        assert f"{renderer.name}: {renderer.description}" in help_text


def sample_report() -> Report:
    stats = Summary(-0.5, 2.0, 0.1, 0)
    broken = Summary(math.nan, math.inf, None, 3)
    layers = (
        LayerInfo("net.1", "", False, "BatchNorm1d", True, 8, "float32", 60, stats, stats, ()),
        LayerInfo("[nan].bn", "state_dict_ema", True, "BatchNorm2d", False, 8, "bfloat16", None, broken, broken, ()),
    )
    finding = Finding(
        "BN001",
        Severity.ERROR,
        "running_var has 3 non-finite value(s): 3 NaN [nan]",
        "restore an earlier checkpoint",
        "[nan].bn",
        "state_dict_ema",
        "running_var",
        (0, 1, 2),
        3,
    )
    return Report(
        files=(
            FileReport("model.safetensors", "safetensors", 4096, layers, (finding,), notes=("a note",)),
            FileReport("broken.pt", None, None, error=FileError("corrupt", "broken zip archive")),
        ),
        fail_on=Severity.WARNING,
        tool_version="0.0.0",
        rules=(RuleInfo("BN001", "nonfinite", Severity.ERROR, "NaN or infinite statistics", "What.\n\nFix."),),
    )


def sample_diff() -> DiffReport:
    row = LayerDiff("net.1", "module.net.1", 8, 0.1, 0.9, 0.05, math.inf, True, ("worst variance ratio",))
    return DiffReport(
        "a.pt",
        "b.safetensors",
        format_a="torch zip",
        format_b="safetensors",
        only_in_a=("head.bn",),
        channel_changes=(("net.4", 16, 32),),
        layers=(row,),
        tool_version="0.0.0",
    )


def rendered(renderer: Renderer, subject: object, *, pretty: bool = False) -> str:
    output = renderer.render(subject, pretty=pretty)
    if not renderer.rich:
        assert isinstance(output, str)
        return output
    buffer = io.StringIO()
    Console(file=buffer, width=80, no_color=True).print(output)
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(REPORT_FORMATS))
@pytest.mark.parametrize("pretty", [False, True])
def test_every_report_format_renders_an_in_memory_report(name: str, pretty: bool) -> None:
    text = rendered(REPORT_FORMATS[name], sample_report(), pretty=pretty)
    assert "model.safetensors" in text and "broken.pt" in text and "BN001" in text
    if name in ("json", "sarif"):
        json.loads(text)  # a valid document, non-finite numbers included


@pytest.mark.parametrize("name", list(DIFF_FORMATS))
def test_every_diff_format_renders_an_in_memory_diff(name: str) -> None:
    text = rendered(DIFF_FORMATS[name], sample_diff())
    assert "net.1" in text and "head.bn" in text
    if name == "json":
        assert json.loads(text)["differs"] is True


def test_machine_formats_do_not_load_rich() -> None:
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from bncheck.render import REPORT_FORMATS, DIFF_FORMATS\n"
        "from bncheck.report import Report, DiffReport\n"
        "for name in ('json', 'sarif', 'github'):\n"
        "    REPORT_FORMATS[name].render(Report(files=()))\n"
        "DIFF_FORMATS['json'].render(DiffReport('a', 'b'))\n"
        "assert 'rich' not in sys.modules, 'rich was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_diff_format_json_is_the_same_document_as_diff_json(cli) -> None:
    a, b = GOOD / "mlp-state-dict.pt", BAD / "BN008-constant-feature.pt"
    shorthand = cli("diff", a, b, "--json")
    long_form = cli("diff", a, b, "--format", "json")
    assert shorthand.exit_code == long_form.exit_code
    assert shorthand.stdout == long_form.stdout
    assert json.loads(long_form.stdout)["kind"] == "diff"
    assert cli("diff", a, b, "--format", "text").stdout == cli("diff", a, b).stdout


@pytest.mark.parametrize(
    "args",
    [
        ["diff", str(GOOD / "mlp-state-dict.pt"), str(GOOD / "conv1d.safetensors"), "--format", "sarif"],
        ["inspect", str(GOOD / "mlp-state-dict.pt"), "--format", "html"],
    ],
)
def test_an_unregistered_format_is_a_one_line_usage_error(args: list[str]) -> None:
    result = run_process(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bncheck: error: "), result.stderr
    assert "is not one of 'text', 'json'" in result.stderr and "Value error" not in result.stderr


def test_shell_completion_is_offered() -> None:
    help_text = run_process("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text


def test_readme_names_the_registered_formats() -> None:
    line = next(line for line in README.splitlines() if "--format sarif" in line and "also:" in line)
    also = re.search(r"also: (.*)$", line).group(1)
    mentioned = {"sarif", *(word.split()[0] for word in also.split(", "))}
    assert mentioned == set(REPORT_FORMATS)
    for name in re.findall(r"--format (\w+)", README):
        assert name in REPORT_FORMATS
    assert "bncheck diff" in README and "--format json" in README


def test_the_pre_commit_hook_still_runs_the_default_text_format(tmp_path) -> None:
    import yaml

    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    command = shlex.split(hook["entry"])
    assert command[:2] == ["bncheck", "inspect"] and not any(arg.startswith("--format") for arg in command)
    result = run_process(*command[1:], GOOD / "mlp-state-dict.pt")
    assert result.returncode == 0
    assert "1 file, 2 layers" in result.stdout and "-> PASS" in result.stdout  # the text report, not JSON
