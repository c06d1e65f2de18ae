"""The command-line contract: exit codes, JSON shape, text report, help, and no traceback ever."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BAD, GOOD, ROOT, run_process

from bncheck import __version__
from bncheck.checks import RULES

NAN_FILE = BAD / "BN001-diverged-nan.pt"
WARN_FILE = BAD / "BN008-constant-feature.pt"
CLEAN_FILE = GOOD / "mlp-state-dict.pt"


def test_exit_0_when_clean(cli) -> None:
    assert cli("inspect", CLEAN_FILE).exit_code == 0


def test_exit_1_on_errors_and_fail_on_controls_the_level(cli) -> None:
    assert cli("inspect", NAN_FILE).exit_code == 1
    assert cli("inspect", WARN_FILE).exit_code == 0
    assert cli("inspect", WARN_FILE, "--fail-on", "warning").exit_code == 1
    assert cli("inspect", WARN_FILE, "--fail-on", "WARNING").exit_code == 1
    assert cli("inspect", BAD / "BN013-frozen-backbone.pt", "--fail-on", "warning").exit_code == 0
    assert cli("inspect", BAD / "BN013-frozen-backbone.pt", "--fail-on", "info").exit_code == 1


def test_exit_2_when_a_path_cannot_be_read_and_every_path_is_still_checked(cli, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    result = cli("inspect", missing, NAN_FILE, CLEAN_FILE, "--json")
    assert result.exit_code == 2  # 2 wins over the findings of NAN_FILE
    files = result.json()["files"]
    assert [f["path"] for f in files] == [str(missing), str(NAN_FILE), str(CLEAN_FILE)]
    assert files[0]["error"] == {"code": "not-found", "message": "no such file or directory"}
    assert files[1]["findings"] and files[2]["error"] is None
    assert result.stderr.strip() == f"bncheck: {missing}: no such file or directory"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["inspect"], "Missing argument 'PATH...'"),
        (["inspect", str(CLEAN_FILE), "--fail-on", "sometimes"], "'sometimes' is not one of 'error', 'warning'"),
        (["inspect", str(CLEAN_FILE), "-j", "0"], "0 is not at least 1"),
        (["inspect", str(CLEAN_FILE), "--frobnicate"], "--frobnicate"),
        (["frobnicate"], "'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], fragment: str) -> None:
    result = run_process(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bncheck: error: "), result.stderr
    assert fragment in result.stderr and "--help" in result.stderr


def test_json_document_shape(cli) -> None:
    document = cli("inspect", NAN_FILE, CLEAN_FILE, "--json").json()
    assert list(document) == ["schema_version", "tool", "ok", "fail_on", "config", "files", "summary"]
    assert document["config"] is None  # no settings file: the key is there, null
    assert document["schema_version"] == 1
    assert document["tool"] == {"name": "bncheck", "version": __version__}
    assert document["ok"] is False
    nan_file = document["files"][0]
    assert list(nan_file) == [
        "path",
        "format",
        "size_bytes",
        "error",
        "notes",
        "layers",
        "findings",
        "recompute",
        "recompute_error",
        "model_configs",
    ]
    assert nan_file["recompute"] is None
    assert nan_file["model_configs"] == []  # no config.json beside it: the key is there, empty
    assert nan_file["format"] == "torch zip"
    assert nan_file["size_bytes"] == NAN_FILE.stat().st_size
    layer = nan_file["layers"][1]
    assert list(layer) == [
        "name",
        "source",
        "averaged",
        "kind",
        "kind_inferred",
        "num_features",
        "dtype",
        "num_batches_tracked",
        "running_mean",
        "running_var",
        "codes",
        "configuration",
    ]
    assert layer["running_var"] == {"min": None, "max": None, "mean": None, "nonfinite": 16}
    # a state dict records no configuration: every key is there, null
    assert layer["configuration"] == dict.fromkeys(["momentum", "eps", "training", "track_running_stats", "affine"])
    finding = nan_file["findings"][0]
    assert list(finding) == [
        "code",
        "severity",
        "layer",
        "source",
        "tensor",
        "channels",
        "channel_count",
        "message",
        "hint",
    ]
    summary = document["summary"]
    assert summary == {
        "files": 2,
        "unreadable": 0,
        "recompute_failed": 0,
        "layers": 4,
        "errors": 8,
        "warnings": 0,
        "infos": 0,
    }


def test_nonfinite_numbers_are_strings_in_json(cli) -> None:
    document = cli("inspect", BAD / "BN001-fp16-overflow.safetensors", "--json").json()
    raw = json.dumps(document)
    assert "NaN" not in raw and "Infinity" not in raw
    layer = next(layer for layer in document["files"][0]["layers"] if layer["name"] == "input_norm")
    assert layer["running_var"]["nonfinite"] == 2
    assert layer["dtype"] == "float16"


def test_json_is_identical_between_runs(cli) -> None:
    assert cli("inspect", BAD, "--json").stdout == cli("inspect", BAD, "--json").stdout


def test_text_report_fits_80_columns_and_keeps_bracketed_values(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    result = run_process("inspect", NAN_FILE, WARN_FILE, BAD / "BN009-bf16-year-column.safetensors", env=env)
    lines = result.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert "\x1b[" not in result.stdout  # no colour codes when not a terminal
    text = result.stdout
    assert "FAIL (8 errors)" in text
    assert "BN001" in text and "channels 0, 1, 2, 4, 5, 7, ... (25 in all)" in text
    assert "BN008" in text and "channels 30 (1 in all)" in text
    assert "bfloat16" in text
    assert "3 files, 6 layers: 8 errors, 2 warnings, 0 infos -> FAIL" in text


def test_version_and_help() -> None:
    assert run_process("--version").stdout.strip() == f"bncheck {__version__}"
    help_text = run_process("inspect", "--help").stdout
    for word in ("--json", "--fail-on", "Exit codes", "index.json"):
        assert word in help_text
    assert "inspect" in run_process("--help").stdout


def test_unexpected_exception_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from bncheck import cli as cli_module

    def explode(*_args, **_kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr("bncheck.api.inspect", explode)
    assert cli_module.run(["inspect", str(CLEAN_FILE)]) == 2
    assert capsys.readouterr().err == "bncheck: internal error: RuntimeError: simulated bug\n"


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04broken", b"\x00" * 64])
def test_bad_input_never_gives_a_traceback(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "input.pt"
    path.write_bytes(content)
    result = run_process("inspect", path)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert "NOT CHECKED" in result.stdout


def test_directory_without_checkpoints_is_not_checked(cli, tmp_path: Path) -> None:
    result = cli("inspect", tmp_path, "--json")
    assert result.exit_code == 2
    assert result.json()["files"][0]["error"]["code"] == "unsupported-format"


def test_inputs_are_never_modified(cli, tmp_path: Path) -> None:
    files = sorted(p for p in BAD.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    cli("inspect", BAD, "--json")
    cli("inspect", BAD)
    assert before == {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def test_help_texts_lose_no_bracketed_words() -> None:
    """Help must never go through rich markup, where an unescaped [word] silently disappears."""
    env = {**os.environ, "COLUMNS": "200"}
    text = " ".join(run_process("inspect", "--help", env=env).stdout.split())
    assert "bncheck[remote]" in text
    assert "pyproject.toml with [tool.bncheck]" in text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_is_one_line_for_pipes_and_indented_at_a_terminal() -> None:
    from bncheck.cli import run

    documents = {}
    for name, stream in (("pipe", io.StringIO()), ("terminal", _Terminal())):
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(io.StringIO()):
            assert run(["inspect", str(NAN_FILE), "--json"]) == 1
        documents[name] = stream.getvalue()
    assert documents["pipe"].count("\n") == 1  # the document, then its newline
    assert documents["terminal"].startswith('{\n  "schema_version": 1,')
    assert json.loads(documents["pipe"]) == json.loads(documents["terminal"])


def test_interrupt_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from bncheck import cli as cli_module

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bncheck.api.inspect", interrupted)
    assert cli_module.run(["inspect", str(CLEAN_FILE)]) == 130
    assert capsys.readouterr().err == "bncheck: interrupted\n"


def test_exits_raised_inside_the_cli_keep_their_code(cli) -> None:
    """typer.Exit is a RuntimeError: the last-resort handler must not turn --version into an internal error."""
    result = cli("--version")
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"bncheck {__version__}\n", "")


def test_no_command_prints_help_and_both_help_flags_work() -> None:
    bare = run_process()
    assert bare.returncode == 0 and "Commands:" in bare.stdout and "inspect" in bare.stdout
    for command in ("inspect", "rules", "explain", "diff", "recalibrate"):
        short, long = run_process(command, "-h"), run_process(command, "--help")
        assert short.returncode == long.returncode == 0
        assert short.stdout == long.stdout and f"Usage: bncheck {command}" in short.stdout


def test_help_groups_the_options_under_their_headings() -> None:
    env = {**os.environ, "COLUMNS": "200"}
    text = run_process("inspect", "--help", env=env).stdout
    headings = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings == [
        "Positional arguments:",
        "Output:",
        "Rules and settings:",
        "Options:",
        "Recompute statistics on sample data (BN012):",
    ]
    assert "Usage: bncheck inspect [OPTIONS] PATH..." in text


def test_rules_and_explain_print_what_the_registry_says(cli) -> None:
    from bncheck.checks import RULES

    listing = cli("rules")
    assert listing.exit_code == 0
    assert [line.split()[0] for line in listing.stdout.splitlines() if line.startswith("BN")] == list(RULES)
    explained = cli("explain", "bn007")
    assert explained.exit_code == 0 and explained.stdout.startswith("BN007 (warning): ")
    unknown = cli("explain", "BN999")
    assert unknown.exit_code == 2
    assert unknown.stderr == "bncheck: error: unknown rule 'BN999'; bncheck rules lists them\n"


def test_rules_lists_every_rule() -> None:
    out = run_process("rules", env={**os.environ, "COLUMNS": "200"}).stdout
    for code, rule in RULES.items():
        assert f"{code}  {rule.severity.value}" in out and rule.summary in out


@pytest.mark.parametrize("code", list(RULES))
def test_explain_prints_what_why_fix(code: str) -> None:
    result = run_process("explain", code.lower(), env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0
    for part in ("What:", "Why:", "Fix:"):
        assert part in result.stdout


def test_explain_unknown_code() -> None:
    result = run_process("explain", "BN999")
    assert result.returncode == 2 and "unknown rule 'BN999'" in result.stderr


def test_pre_commit_hook_blocks_a_checkpoint_with_nan_statistics(tmp_path: Path) -> None:
    if shutil.which("pre-commit") is None:
        pytest.fail("pre-commit is a test dependency: pip install -e '.[test]'")
    repo = tmp_path / "scratch"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    shutil.copy(GOOD / "conv1d.safetensors", repo / "good.safetensors")
    subprocess.run([*git, "add", "good.safetensors"], cwd=repo, check=True)
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "cache")}
    good = subprocess.run(
        ["pre-commit", "try-repo", str(ROOT), "bncheck"], cwd=repo, capture_output=True, text=True, env=env, check=False
    )
    assert good.returncode == 0, good.stdout + good.stderr
    shutil.copy(BAD / "BN001-diverged-nan.pt", repo / "diverged.pt")
    subprocess.run([*git, "add", "diverged.pt"], cwd=repo, check=True)
    bad = subprocess.run(
        ["pre-commit", "try-repo", str(ROOT), "bncheck"], cwd=repo, capture_output=True, text=True, env=env, check=False
    )
    assert bad.returncode == 1
    assert "BN001" in bad.stdout and "diverged.pt" in bad.stdout


PYDANTIC_PROBE = """
import contextlib, io, sys
from bncheck.cli import run
with contextlib.redirect_stdout(io.StringIO()):
    codes = [run(args) for args in {runs!r}]
print(codes, "pydantic" in sys.modules)
"""


def test_no_command_imports_pydantic_and_every_value_type_converts(tmp_path: Path) -> None:
    # typer would build a pydantic TypeAdapter per parameter (~115 ms a run); bncheck converts them itself
    config = tmp_path / "bncheck.toml"
    config.write_text('ignore = ["BN010"]\n')
    runs = [
        [
            "inspect",
            str(CLEAN_FILE),
            str(WARN_FILE),
            "--format",
            "json",
            "--fail-on",
            "Warning",
            "-j",
            "2",
            "--select",
            "BN0,BN1",
            "--extend-select",
            "BN013",
            "--ignore",
            "BN009",
            "--exclude",
            "*.bin",
            "--config",
            str(config),
            "--batch-size",
            "8",
            "--max-samples",
            "16",
            "--estimator",
            "pytorch",
            "--mode",
            "eval",
            "--skip-layer",
            "x.*",
            "--device",
            "cpu",
        ],
        ["diff", str(CLEAN_FILE), str(WARN_FILE), "--format", "json", "--source-a", "", "--config", str(config)],
        ["rules"],
        ["explain", "bn008"],
        ["--version"],
    ]
    result = subprocess.run(
        [sys.executable, "-c", PYDANTIC_PROBE.format(runs=runs)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[1,", "1,", "0,", "0,", "0]", "False"], result.stdout + result.stderr


def test_an_empty_path_is_a_usage_error_not_the_working_directory(tmp_path: Path) -> None:
    shutil.copy(NAN_FILE, tmp_path / "nan.pt")  # what a scan of the working directory would find
    result = subprocess.run(
        [sys.executable, "-m", "bncheck", "inspect", ""],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "bncheck: error: PATH must not be empty (see 'bncheck inspect --help')\n"


def test_the_library_does_not_read_an_empty_path_as_the_working_directory() -> None:
    import bncheck

    (file,) = bncheck.inspect("").files
    assert file.error is not None and file.error.code == "not-found" and file.error.message == "empty path"
