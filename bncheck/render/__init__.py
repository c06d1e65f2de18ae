"""Output formats, one module each, every one a pure function of a report; none re-runs a check.

This module is the one registry of formats: ``REPORT_FORMATS`` for ``bncheck inspect`` and ``DIFF_FORMATS`` for
``bncheck diff``. The command line takes its ``--format`` choices and their help from here. A format is imported
from its module the first time it is used, so that JSON and SARIF never load rich; this module imports nothing
but the standard library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bncheck.report import FileReport, FoldedLayer, Report, Severity


@dataclass(frozen=True)
class Renderer:
    """One output format.

    ``rich`` says whether the function returns a rich renderable (for a console) or a ``str`` (written as is).
    ``indents`` says whether it takes ``pretty=`` (indented for a person, one line for a pipe or a file).
    ``names_unreadable`` says whether its output tells a person why a file could not be checked; when it does
    not (JSON, SARIF) or goes to a file rather than a terminal (HTML), the command line repeats each reason on
    stderr. ``per_channel`` says whether it draws statistics channel by channel, which the report then keeps.
    """

    name: str
    description: str
    target: str  # "module:function"
    rich: bool = False
    indents: bool = False
    names_unreadable: bool = True
    per_channel: bool = False

    def load(self) -> Callable[..., Any]:
        """The rendering function, imported on first use."""
        module, _, function = self.target.partition(":")
        rendered: Callable[..., Any] = getattr(importlib.import_module(module), function)
        return rendered

    def render(self, subject: Any, *, pretty: bool = False) -> Any:
        """``subject`` (a ``Report`` or a ``DiffReport``) in this format: a ``str`` or a rich renderable."""
        function = self.load()
        return function(subject, pretty=pretty) if self.indents else function(subject)


# C0 controls (ESC, BEL, \r, \b, \n...), DEL, C1 controls (0x9b is a one-byte CSI) and the Unicode controls that
# reorder or break what a terminal shows (bidi embeddings, overrides and isolates; line and paragraph separators)
_CONTROLS = [
    *range(0x00, 0x20),
    *range(0x7F, 0xA0),
    0x061C,
    0x200E,
    0x200F,
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]
_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _CONTROLS}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\u202e``), for a terminal or a log.

    A layer name, a path or a message quoting a file's bytes may hold escape sequences that retitle, clear or
    rewrite a terminal, or bidi overrides that make a name read backwards. Every line bncheck prints for people
    (the text report, GitHub annotations, stderr) goes through here; JSON and SARIF escape them by JSON encoding.
    """
    return text.translate(_ESCAPES)


def format_number(value: float | None) -> str:
    """A statistic as people read it: three significant digits; nan, inf, -inf spelled out; "-" for none."""
    import math

    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}"


def plural(n: int, word: str, plural_form: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural_form or word + 's'}"


def format_size(size: int) -> str:
    """A file size in B, KiB, MiB or GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def file_verdict(file: FileReport, fail_on: Severity) -> str:
    """A file's verdict as the human formats head it: NOT CHECKED, NOT RECOMPUTED, FAIL or PASS, with its counts
    of findings ("FAIL (1 error, 2 warnings)")."""
    from bncheck.report import Severity

    if file.error is not None:
        return "NOT CHECKED"
    counts = [plural(file.count(s), s.value) for s in Severity if file.count(s)]
    detail = f" ({', '.join(counts)})" if counts else ""
    if file.recompute_error is not None:
        return f"NOT RECOMPUTED{detail}"
    return f"{'FAIL' if file.fails(fail_on) else 'PASS'}{detail}"


def folded_sentence(layer: FoldedLayer) -> str:
    """What diff says of a layer that B folded into the layer feeding it (text and HTML reports)."""
    if layer.faithful:
        return (
            f"{layer.name_a}: folded in B into {layer.weight_b} and {layer.bias_b} (A's {layer.feeder_a} with"
            f" {layer.name_a}'s statistics applied)"
        )
    return (
        f"{layer.name_a}: B's {layer.weight_b} is A's {layer.feeder_a} scaled by {layer.name_a}'s variance, but no"
        " tensor of B is the folded bias: B folded a running_mean or bias other than A's"
    )


def summary_counts(report: Report) -> str:
    """The last line of every plain-text format, without its verdict: "2 files, 4 layers: 0 errors, ... -> "."""
    from bncheck.report import Severity

    counts = ", ".join(plural(report.count(s), s.value) for s in Severity)
    unreadable = sum(1 for f in report.files if f.error is not None)
    not_recomputed = sum(1 for f in report.files if f.recompute_error is not None)
    return (
        f"{plural(len(report.files), 'file')}, {plural(report.layer_count, 'layer')}: {counts}"
        + (f", {unreadable} not checked" if unreadable else "")
        + (f", {not_recomputed} not recomputed" if not_recomputed else "")
        + " -> "
    )


def _registry(*renderers: Renderer) -> dict[str, Renderer]:
    return {renderer.name: renderer for renderer in renderers}


REPORT_FORMATS: dict[str, Renderer] = _registry(
    Renderer("text", "the report", "bncheck.render.text:render_text", rich=True),
    Renderer(
        "json",
        "one JSON document (schema_version 1)",
        "bncheck.render.json:render_json",
        indents=True,
        names_unreadable=False,
    ),
    Renderer(
        "sarif",
        "SARIF 2.1.0 for code scanning",
        "bncheck.render.sarif:render_sarif",
        indents=True,
        names_unreadable=False,
    ),
    Renderer("github", "workflow-command annotations", "bncheck.render.github:render_github"),
    Renderer(
        "concise",
        "one line per finding (path:layer: CODE severity message) and the summary, as linters print",
        "bncheck.render.concise:render_concise",
    ),
    Renderer(
        "html",
        "one standalone HTML page (no network needed) with a picture per layer (needs bncheck[html])",
        "bncheck.render.html:render_html",
        names_unreadable=False,
        per_channel=True,
    ),
)

DIFF_FORMATS: dict[str, Renderer] = _registry(
    Renderer("text", "the layer-by-layer comparison", "bncheck.render.text:render_diff_text", rich=True),
    Renderer(
        "json",
        "one JSON document (schema_version 1, kind diff)",
        "bncheck.render.json:render_diff_json",
        indents=True,
        names_unreadable=False,
    ),
    Renderer(
        "html",
        "one standalone HTML page (no network needed) with the drift pictures (needs bncheck[html])",
        "bncheck.render.html:render_diff_html",
        names_unreadable=False,
        per_channel=True,
    ),
)


def describe(formats: dict[str, Renderer]) -> str:
    """One line for ``--format``'s help: every format and what it gives."""
    return "; ".join(f"{renderer.name}: {renderer.description}" for renderer in formats.values()) + "."
