"""GitHub Actions workflow commands: one ``::error`` / ``::warning`` / ``::notice`` line per finding, which the
runner turns into annotations on the checkpoint file."""

from __future__ import annotations

from bncheck.render import escape_controls, summary_counts
from bncheck.report import Report, Severity

COMMAND = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def _data(text: str) -> str:
    return escape_controls(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _property(text: str) -> str:
    return _data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(report: Report) -> str:
    lines = []
    for file in report.files:
        for error in file.errors:
            lines.append(f"::error file={_property(file.path)},title=bncheck::{_data(error.message)}")
        for finding in file.findings:
            where = f" {finding.layer or '(root)'}" if finding.layer is not None else ""
            title = _property(f"{finding.code}{where}")
            message = _data(f"{finding.message}. Fix: {finding.hint}")
            lines.append(f"::{COMMAND[finding.severity]} file={_property(file.path)},title={title}::{message}")
    if report.config is not None:
        lines += [f"::notice title=bncheck settings::{_data(note)}" for note in report.config.notes]
        lines += [f"::warning title=bncheck settings::{_data(note)}" for note in report.config.overruled]
    lines.append(f"bncheck: {summary_counts(report)}{'PASS' if report.ok else 'FAIL'}")
    return "\n".join(lines)
