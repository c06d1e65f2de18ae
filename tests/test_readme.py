"""The README tells the truth: its commands, its rules table and its sample report match the code."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_process

from bncheck.checks import RULES

README = (ROOT / "README.md").read_text(encoding="utf-8")


def sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", README, flags=re.DOTALL)


def test_first_screen_has_the_two_commands_and_ci_runs_the_test_command() -> None:
    try_it, test_command = sh_blocks()[:2]
    assert try_it.startswith("pip install . && bncheck inspect fixtures/")
    assert test_command.startswith("pip install torch==2.13.0 ") and "'.[test]'" in test_command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
    assert README.index(test_command) < 1800  # on the first screen


def test_the_try_it_command_exits_0_on_the_shipped_fixtures() -> None:
    try_it = sh_blocks()[0]
    args = shlex.split(try_it.split("&& bncheck ", 1)[1])
    result = run_process(*args)
    assert result.returncode == 0, result.stdout
    assert "BN008" in result.stdout


def test_rules_table_matches_the_registry() -> None:
    rows = re.findall(r"^\| (BN\d{3}) \| (\w+) \| (.+) \|$", README, flags=re.MULTILINE)
    assert rows == [(r.code, r.severity.value, r.summary) for r in RULES.values()]


def test_sample_report_is_the_real_output() -> None:
    command = re.search(r"real output of\n`bncheck (inspect [^`]+)`", README).group(1)
    shown = re.search(r"```text\n(.*?)\n```", README, flags=re.DOTALL).group(1)
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    result = run_process(*shlex.split(command), env=env)
    actual = "\n".join(line.rstrip() for line in result.stdout.strip().splitlines())
    assert actual == shown


def test_the_config_example_is_valid() -> None:
    import tomllib

    from bncheck.config import parse_table

    (block,) = re.findall(r"```toml\n(.*?)\n```", README, flags=re.DOTALL)
    settings = parse_table(tomllib.loads(block)["tool"]["bncheck"])
    assert settings.fail_on.value == "warning"
    assert settings.thresholds.min_variance == 1e-10
    assert not settings.selection.allows("BN010")
    assert not settings.selection.allows("BN007", "caffe-imports/resnet.pt")
    assert settings.selection.allows("BN007", "models/resnet.pt")


def training_loop_examples() -> list[str]:
    section = README.split("## In the training loop", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)\n```", section, flags=re.DOTALL)


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging interval")
@pytest.mark.parametrize("index", range(4))
def test_the_training_loop_examples_run(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = training_loop_examples()
    assert len(examples) == 4
    monkeypatch.chdir(tmp_path)  # the examples write their runs in the working directory
    torch.manual_seed(0)
    exec(compile(examples[index], f"README example {index + 1}", "exec"), {"__name__": "readme_example"})
    if "TrainingArguments" in examples[index]:
        assert sorted(p.name for p in (tmp_path / "hf-run").glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
