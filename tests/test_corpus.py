"""The CLI over every shipped fixture: good ones pass clean, each bad one reports the code in its name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import BAD, GOOD, bad_checkpoints, good_checkpoints


@pytest.mark.parametrize("path", good_checkpoints(), ids=lambda p: p.relative_to(GOOD).as_posix())
def test_good_fixture_passes_with_no_finding(cli, path: Path) -> None:
    result = cli("inspect", path, "--json", "--fail-on", "info")
    assert result.exit_code == 0, result.stdout
    (file,) = result.json()["files"]
    assert file["error"] is None
    assert file["findings"] == []
    assert len(file["layers"]) >= 2


@pytest.mark.parametrize("path", bad_checkpoints(), ids=lambda p: p.relative_to(BAD).as_posix())
def test_bad_fixture_reports_its_code(cli, path: Path) -> None:
    code = re.match(r"(BN\d{3})-", path.relative_to(BAD).parts[0]).group(1)
    result = cli("inspect", path, "--json", "--fail-on", "info")
    assert result.exit_code == 1
    (file,) = result.json()["files"]
    assert file["error"] is None
    assert code in {f["code"] for f in file["findings"]}
    # with the default fail level only errors fail the run
    has_error = any(f["severity"] == "error" for f in file["findings"])
    assert cli("inspect", path).exit_code == (1 if has_error else 0)


def test_every_static_rule_has_a_bad_fixture() -> None:
    from bncheck.checks import RULES

    covered = {p.name.split("-")[0] for p in BAD.iterdir()}
    assert covered == {code for code, rule in RULES.items() if rule.scope != "recompute"}


def test_whole_corpus_in_one_call_keeps_order_and_fails(cli) -> None:
    result = cli("inspect", GOOD, BAD, "--json")
    paths = [Path(f["path"]) for f in result.json()["files"]]
    assert paths == good_checkpoints() + bad_checkpoints()
    assert result.exit_code == 1
