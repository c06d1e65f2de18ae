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


# ------------------------------------------------- a discovered config may not switch the security codes off

HOSTILE = BAD / "BN101-os-system-payload.pt"
SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "bncheck" / "schema" / "report-v1.schema.json").read_text()
)


def hostile_repository(tmp_path: Path, body: str) -> Path:
    """A cloned model repository whose own pyproject.toml tries to hide its hostile checkpoint."""
    repo = tmp_path / "cloned-model"
    (repo / "weights").mkdir(parents=True)
    shutil.copy(HOSTILE, repo / "weights" / "model.pt")
    shutil.copy(BAD / "BN008-constant-feature.pt", repo / "weights" / "constant.pt")
    write_config(repo, body)
    return repo


def inspect_json(repo: Path, *args: object) -> tuple[int, dict]:
    result = run_in(repo, "inspect", "weights", "--json", *args)
    document = json.loads(result.stdout)
    import jsonschema

    jsonschema.Draft202012Validator(SCHEMA).validate(document)
    return result.returncode, document


def files_by_name(document: dict) -> dict[str, dict]:
    return {Path(f["path"]).name: f for f in document["files"]}


@pytest.mark.parametrize(
    ("body", "tried"),
    [
        ('ignore = ["BN101"]\n', "tried to ignore BN101"),
        ('ignore = ["BN1"]\n', "tried to ignore BN101"),
        ('select = ["BN0"]\n', "tried to deselect BN101"),
        ('per-file-ignores = { "weights/*" = ["BN101"] }\n', "tried to ignore BN101 for this file"),
        ('exclude = ["model.pt"]\n', "tried to exclude this file"),
    ],
    ids=["ignore", "ignore-prefix", "deselect", "per-file-ignores", "exclude"],
)
def test_a_discovered_config_cannot_drop_a_security_finding(tmp_path: Path, body: str, tried: str) -> None:
    repo = hostile_repository(tmp_path, body)
    code, document = inspect_json(repo)
    model = files_by_name(document)["model.pt"]
    assert [f["code"] for f in model["findings"]] == ["BN101"]
    assert code == 1
    expected = f"pyproject.toml at {repo} {tried}; security codes are only ignored from the command line or --config"
    assert expected in model["notes"]
    assert document["config"]["discovered"] is True
    assert document["config"]["path"] == str(repo / "pyproject.toml")
    assert document["config"]["overruled"], "the report-level list says what the file tried"
    # the same file given with --config is the person's own choice: it may drop anything
    code, document = inspect_json(repo, "--config", repo / "pyproject.toml")
    assert "model.pt" not in files_by_name(document) or files_by_name(document)["model.pt"]["findings"] == []
    assert code == 0
    assert document["config"]["discovered"] is False and document["config"]["overruled"] == []


def test_the_command_line_may_drop_a_security_code_even_beside_a_discovered_config(tmp_path: Path) -> None:
    repo = hostile_repository(tmp_path, 'ignore = ["BN101"]\n')
    code, document = inspect_json(repo, "--ignore", "BN101")
    assert files_by_name(document)["model.pt"]["findings"] == []
    assert code == 0
    code, document = inspect_json(repo, "--select", "BN00")
    assert files_by_name(document)["model.pt"]["findings"] == [] and code == 0


def test_a_discovered_exclude_still_narrows_everything_else(tmp_path: Path) -> None:
    repo = hostile_repository(tmp_path, 'exclude = ["*.pt"]\nfail-on = "warning"\n')
    code, document = inspect_json(repo)
    # constant.pt's BN008 is excluded as asked; model.pt stays, with its security finding only
    assert list(files_by_name(document)) == ["model.pt"]
    assert code == 1
    (overruled,) = document["config"]["overruled"]
    assert "tried to exclude '*.pt'" in overruled and "still searched for security findings" in overruled
    parallel = run_in(repo, "inspect", "weights", "--json", "-j", "2")
    assert json.loads(parallel.stdout) == document


def test_the_report_says_what_a_discovered_config_changed(tmp_path: Path) -> None:
    repo = hostile_repository(tmp_path, 'ignore = ["BN008"]\nmin-variance = 1e-20\n')
    code, document = inspect_json(repo)
    assert code == 1  # model.pt still fails on BN101
    assert files_by_name(document)["constant.pt"]["findings"] == []
    assert document["config"]["settings"] == {"ignore": '["BN008"]', "min-variance": "1e-20"}
    assert document["config"]["notes"] == [
        f'pyproject.toml at {repo} changed the settings: ignore = ["BN008"]; min-variance = 1e-20'
    ]
    assert document["config"]["overruled"] == []
    text = run_in(repo, "inspect", "weights").stdout
    assert " ".join(text.split()).count(f"note: pyproject.toml at {repo} changed the settings: ignore") == 1
    github = run_in(repo, "inspect", "weights", "--format", "github").stdout
    assert f"::notice title=bncheck settings::pyproject.toml at {repo} changed" in github


def test_text_sarif_and_github_say_what_a_discovered_config_tried(tmp_path: Path) -> None:
    repo = hostile_repository(tmp_path, 'ignore = ["BN101"]\n')
    tried = f"pyproject.toml at {repo} tried to ignore BN101"
    text = " ".join(run_in(repo, "inspect", "weights").stdout.split())
    assert f"note: {tried}; security codes are only ignored from the command line or --config" in text
    sarif = json.loads(run_in(repo, "inspect", "weights", "--format", "sarif").stdout)
    (invocation,) = sarif["runs"][0]["invocations"]
    assert any(
        n["level"] == "warning" and n["message"]["text"].startswith(tried)
        for n in invocation["toolConfigurationNotifications"]
    )
    github = run_in(repo, "inspect", "weights", "--format", "github").stdout
    assert f"::warning title=bncheck settings::{tried}" in github


def test_no_config_is_null_in_json(cli) -> None:
    assert cli("inspect", GOOD / "mlp-state-dict.pt", "--json").json()["config"] is None


def test_every_bn1_code_is_a_security_code() -> None:
    """BN102 and later BN1xx codes get the same protection as BN101, without a list to keep in step."""
    from bncheck.config import Options, RuleSelection, SettingsFile, is_security_code

    assert is_security_code("BN101") and is_security_code("BN102") and not is_security_code("BN010")
    discovered = Options(
        selection=RuleSelection(ignore=("BN1", "BN010")),
        config=SettingsFile(path=Path("/repo/pyproject.toml"), discovered=True),
        trusted=Options(),
    )
    assert discovered.verdict("BN102", "m.pt")[0] is True
    assert discovered.verdict("BN010", "m.pt") == (False, None)
    # the library caller's own Options are explicit: they may ignore anything
    assert Options(selection=RuleSelection(ignore=("BN1",))).verdict("BN101", "m.pt") == (False, None)


def test_the_library_api_may_ignore_a_security_code() -> None:
    import bncheck
    from bncheck import Options, RuleSelection

    report = bncheck.inspect(HOSTILE, options=Options(selection=RuleSelection(ignore=("BN101",))))
    assert report.files[0].findings == () and report.ok and report.config is None
