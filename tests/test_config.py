"""Settings: [tool.bncheck] in the nearest pyproject.toml or --config, rule selection with prefixes, flags over
the file, and one-line errors for bad settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import BAD, GOOD, run_in, run_process


def codes_of(result) -> list[str]:
    return [f["code"] for file in result.json()["files"] for f in file["findings"]]


def test_select_ignore_and_prefixes(cli) -> None:
    assert set(codes_of(cli("inspect", BAD, "--json", "--select", "BN00"))) == {f"BN00{i}" for i in range(1, 10)}
    assert set(codes_of(cli("inspect", BAD, "--json", "--select", "BN001,BN101"))) == {"BN001", "BN101"}
    ignored = set(codes_of(cli("inspect", BAD, "--json", "--ignore", "BN0")))
    assert ignored == {"BN101", "BN102"}
    # the more specific entry wins: select BN001 beats ignore BN00
    assert set(
        codes_of(cli("inspect", BAD, "--json", "--ignore", "BN00", "--extend-select", "BN001", "--select", "BN013"))
    ) == {"BN001", "BN013"}


def test_ignored_findings_do_not_fail_the_run(cli) -> None:
    nan = BAD / "BN001-diverged-nan.pt"
    assert cli("inspect", nan).exit_code == 1
    assert cli("inspect", nan, "--ignore", "BN001", "--ignore", "BN011").exit_code == 0


def test_unknown_code_is_a_usage_error() -> None:
    result = run_process("inspect", GOOD, "--select", "XX1")
    assert result.returncode == 2
    assert "--select: 'XX1' matches no rule" in result.stderr


def write_config(folder: Path, body: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text("[project]\nname = 'x'\n\n[tool.bncheck]\n" + body)
    return path


def test_config_from_the_nearest_pyproject(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "models" / "exports").mkdir(parents=True)
    shutil.copy(BAD / "BN008-constant-feature.pt", project / "models" / "constant.pt")
    shutil.copy(BAD / "BN001-diverged-nan.pt", project / "models" / "exports" / "nan.pt")
    write_config(project, 'fail-on = "warning"\nper-file-ignores = { "models/exports/*" = ["BN001", "BN011"] }\n')
    inner = project / "models"
    result = run_in(inner, "inspect", ".", "--json")  # the config is found two levels up
    codes = {Path(f["path"]).name: [g["code"] for g in f["findings"]] for f in json.loads(result.stdout)["files"]}
    assert codes == {"constant.pt": ["BN008"], "nan.pt": []}
    assert result.returncode == 1  # fail-on warning makes BN008 fail
    assert run_in(inner, "inspect", ".", "--fail-on", "error").returncode == 0  # the flag beats the config


def test_thresholds_from_config(tmp_path: Path) -> None:
    shutil.copy(BAD / "BN008-constant-feature.pt", tmp_path / "c.pt")
    write_config(tmp_path, "min-variance = 1e-20\n")
    assert json.loads(run_in(tmp_path, "inspect", "c.pt", "--json").stdout)["files"][0]["findings"] == []
    write_config(tmp_path, "count-spread-ratio = 100\ndrift-mean-shift-median = 0.5\nmax-channels-listed = 2\n")
    assert run_in(tmp_path, "inspect", "c.pt").returncode == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("colour = 'red'\n", "unknown key 'colour'"),
        ("fail-on = 'sometimes'\n", "fail-on must be one of error, warning, info"),
        ("select = 'BN001'\n", "select must be a list"),
        ("ignore = ['ZZ9']\n", "ignore: 'ZZ9' matches no rule"),
        ("min-variance = 'small'\n", "min-variance must be a number"),
        ("max-channels-listed = 1.5\n", "max-channels-listed must be a whole number"),
        ("eps = -1\n", "eps must not be negative"),
        ("select = [\n", "not valid TOML"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, body: str, message: str) -> None:
    write_config(tmp_path, body)
    shutil.copy(GOOD / "mlp-state-dict.pt", tmp_path / "m.pt")
    result = run_in(tmp_path, "inspect", "m.pt")
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_explicit_config_file(tmp_path: Path) -> None:
    settings = tmp_path / "bncheck.toml"
    settings.write_text('ignore = ["BN001", "BN011"]\n')
    assert run_process("inspect", BAD / "BN001-diverged-nan.pt", "--config", settings).returncode == 0


def test_exclude(cli) -> None:
    files = [Path(f["path"]).name for f in cli("inspect", BAD, "--json", "--exclude", "BN00*").json()["files"]]
    assert files and not any(name.startswith("BN00") for name in files)


def test_only_a_pyproject_that_names_bncheck_is_read(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(GOOD / "mlp-state-dict.pt", project / "model.pt")
    (project / "pyproject.toml").write_text("[project\nname = 'unrelated, and not valid TOML'\n")
    assert run_in(project, "inspect", "model.pt").returncode == 0  # someone else's file, never parsed
    (project / "pyproject.toml").write_text("[tool.bncheck\nfail-on = 'info'\n")
    result = run_in(project, "inspect", "model.pt")
    assert result.returncode == 2
    assert "is not valid TOML" in result.stderr
