"""bncheck as a CI gate: config, rule selection, every output format, rules/explain, diff, -j, pre-commit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import BAD, FIXTURES, GOOD, ROOT, run_process

from bncheck.checks import RULES

SCHEMA = json.loads((ROOT / "bncheck" / "schema" / "report-v1.schema.json").read_text())
SARIF_SCHEMA = json.loads((ROOT / "tests" / "data" / "sarif-2.1.0.json").read_text())
FORMATS = ["text", "json", "sarif", "github"]


def run_in(cwd: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "bncheck", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


# ------------------------------------------------------------------------------------------- formats


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
        "files": [],
        "summary": {"files": 0, "unreadable": 0, "layers": 0, "errors": 0, "warnings": 0, "infos": 0},
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
    assert lines[0].startswith(f"::error file={BAD / 'BN001-diverged-nan.pt'},title=BN001 net.1::running_mean has 28")
    assert any(line.startswith("::warning file=") and "a%2Cb%3Ac.pt,title=BN008 input_norm::" in line for line in lines)
    assert any(line.startswith("::error file=") and "gone.pt,title=bncheck::no such file" in line for line in lines)
    assert lines[-1].endswith("-> FAIL")


# ------------------------------------------------------------------------------------------- selection and config


def codes_of(result) -> list[str]:
    return [f["code"] for file in result.json()["files"] for f in file["findings"]]


def test_select_ignore_and_prefixes(cli) -> None:
    assert set(codes_of(cli("inspect", BAD, "--json", "--select", "BN00"))) == {f"BN00{i}" for i in range(1, 10)}
    assert set(codes_of(cli("inspect", BAD, "--json", "--select", "BN001,BN101"))) == {"BN001", "BN101"}
    ignored = set(codes_of(cli("inspect", BAD, "--json", "--ignore", "BN0")))
    assert ignored == {"BN101"}
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


# ------------------------------------------------------------------------------------------- -j


@pytest.mark.parametrize("fmt", FORMATS)
def test_parallel_run_equals_serial_run(fmt: str) -> None:
    serial = run_process("inspect", GOOD, BAD, "--format", fmt, "-j", "1", env={**os.environ, "COLUMNS": "100"})
    parallel = run_process("inspect", GOOD, BAD, "--format", fmt, "-j", "4", env={**os.environ, "COLUMNS": "100"})
    assert (parallel.returncode, parallel.stdout) == (serial.returncode, serial.stdout)
    assert serial.returncode == 1


# ------------------------------------------------------------------------------------------- rules / explain


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


# ------------------------------------------------------------------------------------------- diff


def test_diff_finds_the_layers_a_finetune_moved(cli, tmp_path: Path) -> None:
    sys.path.insert(0, str(FIXTURES / "recompute"))
    import numpy as np
    from models import tabular_mlp

    base = tabular_mlp()
    base.load_state_dict(torch.load(FIXTURES / "recompute" / "healthy.pt", weights_only=True))
    x = torch.from_numpy(np.load(FIXTURES / "recompute" / "sample-shifted.npy"))
    y = torch.from_numpy(np.load(FIXTURES / "recompute" / "labels.npy"))
    optimizer = torch.optim.Adam(base.parameters(), lr=3e-3)
    base.train()
    for step in range(100):  # an ordinary fine-tune on shifted data: the statistics follow the data
        batch = slice((step * 64) % 960, (step * 64) % 960 + 64)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(base(x[batch]), y[batch]).backward()
        optimizer.step()
    tuned = tmp_path / "tuned.pt"
    torch.save({"model": base.state_dict()}, tuned)
    result = cli("diff", FIXTURES / "recompute" / "healthy.pt", tuned, "--json")
    document = json.loads(result.stdout)
    assert result.exit_code == 1
    assert [row["name_a"] for row in document["layers"] if row["drifted"]] == ["1"]
    assert document["b"]["source"] == "model"


def test_diff_across_formats_and_prefixes_finds_nothing(cli, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    converted = tmp_path / "converted.safetensors"
    save_file(torch.load(GOOD / "mlp-state-dict.pt", weights_only=True), converted)
    result = cli("diff", GOOD / "mlp-state-dict.pt", converted, "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["differs"] is False and len(document["layers"]) == 2
    assert all(row["mean_shift_worst"] == 0 and row["log_var_ratio_worst"] == 0 for row in document["layers"])
    # module.-prefixed DataParallel save and an fp16 export of the same model
    assert cli("diff", GOOD / "mlp-state-dict.pt", GOOD / "mlp-dataparallel.pt").exit_code == 0
    assert cli("diff", GOOD / "mlp-state-dict.pt", GOOD / "mlp-fp16.pt").exit_code == 0


def test_diff_ema_against_raw_weights_in_one_file(cli) -> None:
    result = cli(
        "diff",
        GOOD / "mlp-ema-timm-style.pth",
        GOOD / "mlp-ema-timm-style.pth",
        "--source-b",
        "state_dict_ema",
        "--json",
    )
    document = json.loads(result.stdout)
    assert (document["a"]["source"], document["b"]["source"]) == ("state_dict", "state_dict_ema")
    assert len(document["layers"]) == 2


def test_diff_reports_one_sided_and_resized_layers(cli, tmp_path: Path) -> None:
    state = torch.load(GOOD / "mlp-state-dict.pt", weights_only=True)
    narrower = dict(state)
    for key in ("weight", "bias", "running_mean", "running_var"):
        narrower[f"net.4.{key}"] = state[f"net.4.{key}"][:8]
    narrower["extra.running_mean"], narrower["extra.running_var"] = torch.zeros(3), torch.ones(3)
    path = tmp_path / "changed.pt"
    torch.save(narrower, path)
    document = json.loads(cli("diff", GOOD / "mlp-state-dict.pt", path, "--json").stdout)
    assert document["only_in_b"] == ["extra"]
    assert document["channel_changes"] == [{"layer": "net.4", "a": 16, "b": 8}]


def test_diff_of_an_unreadable_file_exits_2(cli, tmp_path: Path) -> None:
    result = cli("diff", GOOD / "mlp-state-dict.pt", tmp_path / "none.pt")
    assert result.exit_code == 2


# ------------------------------------------------------------------------------------------- pre-commit


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
