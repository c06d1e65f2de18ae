"""The report's data types: severity order, keyword-only frozen results."""

from __future__ import annotations

import dataclasses

import pytest

from bncheck.report import FileReport, Finding, Report, Severity, Summary


def test_severity_orders_by_rank_not_by_spelling() -> None:
    assert max([Severity.INFO, Severity.ERROR, Severity.WARNING]) is Severity.ERROR
    assert min([Severity.ERROR, Severity.WARNING]) is Severity.WARNING
    assert sorted([Severity.ERROR, Severity.INFO, Severity.WARNING]) == [
        Severity.INFO,
        Severity.WARNING,
        Severity.ERROR,
    ]
    assert Severity.WARNING < Severity.ERROR and not Severity.WARNING > Severity.ERROR
    assert Severity.INFO <= Severity.INFO and Severity.ERROR >= Severity.WARNING
    assert Severity.ERROR > "warning"  # a plain string is read as the severity it names
    assert Severity.ERROR == "error"  # still a string for JSON and config values


def test_comparing_with_a_string_that_is_no_severity_is_an_error() -> None:
    with pytest.raises(ValueError):
        _ = Severity.ERROR < "critical"


def test_results_are_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        Summary(1.0, 2.0, 1.5, 0)  # type: ignore[misc]
    summary = Summary(min=1.0, max=2.0, mean=1.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.min = 0.0  # type: ignore[misc]


def test_worst_severity_decides_the_report() -> None:
    def finding(severity: Severity) -> Finding:
        return Finding(code="BN000", severity=severity, message="m", hint="h")

    file = FileReport(path="x.pt", format="torch zip", size_bytes=1, findings=(finding(Severity.WARNING),))
    assert Report(files=(file,), fail_on=Severity.WARNING).failed
    assert not Report(files=(file,), fail_on=Severity.ERROR).failed
    assert max(f.severity for f in file.findings) is Severity.WARNING
