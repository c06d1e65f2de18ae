"""One line per finding, as linters print them (``path:layer: CODE severity message``), then the summary line:
for CI logs and ``grep``. A file that could not be checked is one line too."""

from __future__ import annotations

from bncheck.render import escape_controls, summary_counts
from bncheck.report import Finding, Report


def _where(path: str, finding: Finding) -> str:
    if finding.layer is None:  # a finding about the file as a whole (its pickle globals, its config.json)
        return path
    layer = finding.layer or "(root)"
    return f"{path}:{finding.source}/{layer}" if finding.source else f"{path}:{layer}"


def render_concise(report: Report) -> str:
    lines = []
    for file in report.files:
        if file.error is not None:
            lines.append(f"{file.path}: not checked: {file.error.message}")
        for finding in file.findings:
            lines.append(f"{_where(file.path, finding)}: {finding.code} {finding.severity.value} {finding.message}")
        if file.recompute_error is not None:
            lines.append(f"{file.path}: not recomputed: {file.recompute_error.message}")
    if report.config is not None:
        lines += [f"note: {note}" for note in (*report.config.notes, *report.config.overruled)]
    lines.append(f"{summary_counts(report)}{'PASS' if report.ok else 'FAIL'}")
    return "\n".join(escape_controls(line) for line in lines)
