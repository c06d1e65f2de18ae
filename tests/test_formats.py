"""One registry of output formats: --format offers exactly its keys, every renderer renders a report built in
memory, and the README and the pre-commit hook still describe the formats there are."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shlex
import shutil
from pathlib import Path

import jsonschema
import pytest
from conftest import BAD, FIXTURES, GOOD, ROOT, run_process
from rich.console import Console

from bncheck.checks import RULES
from bncheck.cli import app
from bncheck.render import DIFF_FORMATS, REPORT_FORMATS, Renderer
from bncheck.report import (
    ConfigInfo,
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


def layer(name: str, source: str, kind: str, dtype: str, batches: int | None, stats: Summary) -> LayerInfo:
    return LayerInfo(
        name=name,
        source=source,
        averaged=bool(source),
        kind=kind,
        kind_inferred=not source,
        num_features=8,
        dtype=dtype,
        num_batches_tracked=batches,
        running_mean=stats,
        running_var=stats,
    )


def sample_report() -> Report:
    stats = Summary(min=-0.5, max=2.0, mean=0.1)
    broken = Summary(min=math.nan, max=math.inf, mean=None, nonfinite=3)
    layers = (
        layer("net.1", "", "BatchNorm1d", "float32", 60, stats),
        layer("[nan].bn", "state_dict_ema", "BatchNorm2d", "bfloat16", None, broken),
    )
    finding = Finding(
        code="BN001",
        severity=Severity.ERROR,
        message="running_var has 3 non-finite value(s): 3 NaN [nan]",
        hint="restore an earlier checkpoint",
        layer="[nan].bn",
        source="state_dict_ema",
        tensor="running_var",
        channels=(0, 1, 2),
        channel_count=3,
    )
    return Report(
        files=(
            FileReport(
                path="model.safetensors",
                format="safetensors",
                size_bytes=4096,
                layers=layers,
                findings=(finding,),
                notes=("a note",),
            ),
            FileReport(
                path="broken.pt",
                format=None,
                size_bytes=None,
                error=FileError(code="corrupt", message="broken zip archive"),
            ),
        ),
        fail_on=Severity.WARNING,
        tool_version="0.0.0",
        rules=(
            RuleInfo(
                code="BN001",
                name="nonfinite",
                severity=Severity.ERROR,
                summary="NaN or infinite statistics",
                doc="What.\n\nFix.",
            ),
        ),
    )


def sample_diff() -> DiffReport:
    row = LayerDiff(
        name_a="net.1",
        name_b="module.net.1",
        channels=8,
        mean_shift_median=0.1,
        mean_shift_worst=0.9,
        log_var_ratio_median=0.05,
        log_var_ratio_worst=math.inf,
        drifted=True,
        reasons=("worst variance ratio",),
    )
    return DiffReport(
        path_a="a.pt",
        path_b="b.safetensors",
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
        "DIFF_FORMATS['json'].render(DiffReport(path_a='a', path_b='b'))\n"
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
        ["inspect", str(GOOD / "mlp-state-dict.pt"), "--format", "xml"],
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


# ------------------------------------------------------------------------------------------- through the CLI

SCHEMA = json.loads((ROOT / "bncheck" / "schema" / "report-v1.schema.json").read_text())
SARIF_SCHEMA = json.loads((ROOT / "tests" / "data" / "sarif-2.1.0.json").read_text())
FORMATS = list(REPORT_FORMATS)


@pytest.mark.parametrize(
    "paths",
    [[GOOD], [BAD], [GOOD / "mlp-state-dict.pt", BAD / "BN008-constant-feature.pt"]],
    ids=["no-findings", "findings", "mixed"],
)
def test_every_format_gives_the_same_exit_code(cli, paths: list[Path]) -> None:
    codes = {fmt: cli("inspect", *paths, "--format", fmt).exit_code for fmt in FORMATS}
    assert len(set(codes.values())) == 1, codes
    assert cli("inspect", *paths, "--json").exit_code == codes["json"]


@pytest.mark.parametrize(
    "paths",
    [[GOOD], [BAD], [BAD / "BN001-diverged-nan.pt", Path("missing.pt")]],
    ids=["no-findings", "findings", "unreadable"],
)
def test_json_output_matches_the_shipped_schema(cli, paths: list[Path]) -> None:
    document = cli("inspect", *paths, "--json").json()
    jsonschema.Draft202012Validator(SCHEMA).validate(document)


def test_json_with_recomputation_matches_the_schema(cli) -> None:
    r = FIXTURES / "recompute"
    document = cli(
        "inspect",
        r / "averaged-two-runs.pt",
        "--model",
        f"{r / 'models.py'}:tabular_mlp",
        "--data",
        r / "sample-original.npy",
        "--json",
    ).json()
    jsonschema.Draft202012Validator(SCHEMA).validate(document)
    assert document["files"][0]["recompute"]["layers"]


def test_schema_rejects_what_the_report_never_writes() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    assert not validator.is_valid({"schema_version": 2})
    document = {
        "schema_version": 1,
        "tool": {"name": "bncheck", "version": "0"},
        "ok": True,
        "fail_on": "error",
        "config": None,
        "files": [],
        "summary": {
            "files": 0,
            "unreadable": 0,
            "recompute_failed": 0,
            "layers": 0,
            "errors": 0,
            "warnings": 0,
            "infos": 0,
        },
    }
    assert validator.is_valid(document)
    assert not validator.is_valid({**document, "timestamp": "2026-01-01"})


@pytest.mark.parametrize(
    "paths",
    [[GOOD], [BAD], [BAD / "BN001-diverged-nan.pt", Path("missing.pt")]],
    ids=["no-findings", "findings", "unreadable"],
)
def test_sarif_is_valid_sarif_2_1_0(cli, paths: list[Path]) -> None:
    result = cli("inspect", *paths, "--format", "sarif")
    document = json.loads(result.stdout)
    jsonschema.Draft202012Validator(SARIF_SCHEMA).validate(document)
    (run,) = document["runs"]
    assert [rule["id"] for rule in run["tool"]["driver"]["rules"]] == list(RULES)
    assert all(rule["help"]["text"].startswith("What:") for rule in run["tool"]["driver"]["rules"])
    json_findings = [
        (f["path"], g["code"]) for f in cli("inspect", *paths, "--json").json()["files"] for g in f["findings"]
    ]
    assert [
        (r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"], r["ruleId"]) for r in run["results"]
    ] == json_findings
    assert run["invocations"][0]["executionSuccessful"] is (result.exit_code != 2)


def test_sarif_result_carries_the_layer_as_logical_location(cli) -> None:
    document = json.loads(cli("inspect", BAD / "BN002-negative-var.safetensors", "--format", "sarif").stdout)
    (result,) = document["runs"][0]["results"]
    assert result["level"] == "error"
    assert result["locations"][0]["logicalLocations"][0]["name"] == "net.1"
    assert result["ruleIndex"] == list(RULES).index("BN002")


def test_github_annotations(cli, tmp_path: Path) -> None:
    odd = tmp_path / "a,b:c.pt"
    shutil.copy(BAD / "BN008-constant-feature.pt", odd)
    lines = cli("inspect", BAD / "BN001-diverged-nan.pt", odd, tmp_path / "gone.pt", "--format", "github").stdout
    lines = lines.splitlines()
    assert lines[0].startswith(f"::error file={BAD / 'BN001-diverged-nan.pt'},title=BN001 net.1::running_mean has 25")
    assert any(line.startswith("::warning file=") and "a%2Cb%3Ac.pt,title=BN008 input_norm::" in line for line in lines)
    assert any(line.startswith("::error file=") and "gone.pt,title=bncheck::no such file" in line for line in lines)
    assert lines[-1].endswith("-> FAIL")


@pytest.mark.parametrize("fmt", FORMATS)
def test_parallel_run_equals_serial_run(fmt: str) -> None:
    serial = run_process("inspect", GOOD, BAD, "--format", fmt, "-j", "1", env={**os.environ, "COLUMNS": "100"})
    parallel = run_process("inspect", GOOD, BAD, "--format", fmt, "-j", "4", env={**os.environ, "COLUMNS": "100"})
    assert (parallel.returncode, parallel.stdout) == (serial.returncode, serial.stdout)
    assert serial.returncode == 1


# ------------------------------------------------------------------ control characters never reach a terminal

PWNED = "\x1b]0;pwned\x07\x1b[2J\r\b\x9b31m\u202e\x00"
RAW_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def poisoned(value: object) -> object:
    """``value`` with PWNED inside every string of every dataclass field (rule codes and texts aside: they come from
    bncheck's registry, and SARIF indexes its rules by code)."""
    if isinstance(value, Severity):
        return value
    if isinstance(value, str):
        return f"a{PWNED}b"
    if isinstance(value, tuple):
        return tuple(poisoned(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type | RuleInfo):
        return dataclasses.replace(
            value,
            **{f.name: poisoned(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "code"},
        )
    return value


def poisoned_report() -> Report:
    config = ConfigInfo(path="p", discovered=True, settings=(("ignore", "x"),), notes=("n",), overruled=("o",))
    report = dataclasses.replace(sample_report(), config=config)
    return dataclasses.replace(report, files=poisoned(report.files), config=poisoned(report.config))


@pytest.mark.parametrize("name", ["text", "github"])
def test_human_formats_show_control_characters_escaped(name: str) -> None:
    text = rendered(REPORT_FORMATS[name], poisoned_report())
    assert RAW_CONTROLS.search(text) is None, repr(RAW_CONTROLS.search(text))
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in text and "\\u202e" in text
    assert "\r" not in text


def test_diff_text_shows_control_characters_escaped() -> None:
    text = rendered(DIFF_FORMATS["text"], poisoned(sample_diff()))
    assert RAW_CONTROLS.search(text) is None and "\\x1b]0;pwned" in text


def strings(document: object) -> list[str]:
    if isinstance(document, str):
        return [document]
    if isinstance(document, dict):
        return [s for key, value in document.items() for s in (*strings(key), *strings(value))]
    if isinstance(document, list):
        return [s for value in document for s in strings(value)]
    return []


@pytest.mark.parametrize("name", ["json", "sarif"])
def test_json_formats_escape_control_characters_by_json_encoding(name: str) -> None:
    report = poisoned_report()
    text = rendered(REPORT_FORMATS[name], report)
    assert RAW_CONTROLS.search(text) is None and "\\u001b]0;pwned\\u0007\\u001b[2J" in text
    # and decoding gives back the exact names: nothing is lost for a program
    assert any(f"a{PWNED}b" in value for value in strings(json.loads(text)))
    if name == "json":
        assert json.loads(text)["files"][0]["layers"][1]["name"] == f"a{PWNED}b"


def test_a_hostile_layer_name_and_path_are_escaped_through_the_cli(cli, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    layer_name = "evil\x1b]0;pwned\x07\x1b[2J"
    path = tmp_path / "model\r\u202e.safetensors"
    save_file(
        {f"{layer_name}.running_mean": np.zeros(3, np.float32), f"{layer_name}.running_var": -np.ones(3, np.float32)},
        str(path),
    )
    missing = tmp_path / "gone\x1b[2J\r.pt"
    outputs = {}
    for fmt in FORMATS:
        result = cli("inspect", path, missing, "--format", fmt)
        assert result.exit_code == 2
        for stream in (result.stdout, result.stderr):
            assert RAW_CONTROLS.search(stream) is None, (fmt, stream)
        outputs[fmt] = result
    unwrapped = outputs["text"].stdout.replace("\n", "")  # rich folds a long path at the terminal's width
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J" in unwrapped and "model\\x0d\\u202e.safetensors" in unwrapped
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J" in outputs["github"].stdout
    # JSON and SARIF name the unreadable file on stderr, escaped; the document keeps the exact names
    assert outputs["json"].stderr == f"bncheck: {tmp_path}/gone\\x1b[2J\\x0d.pt: no such file or directory\n"
    document = json.loads(outputs["json"].stdout)
    assert document["files"][0]["path"] == str(path)
    assert [layer["name"] for layer in document["files"][0]["layers"]] == [layer_name]


def test_a_usage_error_quoting_a_control_character_is_escaped() -> None:
    result = run_process("inspect", GOOD / "mlp-state-dict.pt", "--select", "BN\x1b[2J")
    assert result.returncode == 2 and "\x1b" not in result.stderr and "\\x1b[2J" in result.stderr
