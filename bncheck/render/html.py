"""The HTML report: one self-contained page with a summary, each file's findings and layer table, and a picture per
layer drawn by matplotlib as inline SVG.

The page loads nothing: no script, no font, no image, no style sheet from anywhere (its Content-Security-Policy
forbids it, so a browser would refuse even a slip), and it opens offline. matplotlib comes with the
``bncheck[html]`` extra and only this module imports it. It draws on figures of its own, never through pyplot, and
inside ``rc_context``, so the caller's matplotlib settings and backend are left as they were.
"""

from __future__ import annotations

import html
import io
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from bncheck.errors import MissingDependencyError
from bncheck.render import escape_controls, file_verdict, folded_sentence, format_size
from bncheck.render import format_number as _num
from bncheck.render import plural as _plural
from bncheck.report import (
    ChannelValues,
    DiffReport,
    FileReport,
    Finding,
    LayerDiff,
    LayerDriftInfo,
    LayerInfo,
    RecomputeInfo,
    Report,
    Severity,
    Summary,
)

try:
    import matplotlib
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogFormatter, MaxNLocator, NullFormatter
except ImportError as exc:
    raise MissingDependencyError("the HTML report draws with matplotlib: pip install 'bncheck[html]'") from exc

# A browser enforces this: anything the page tried to fetch (a script, a font, an image, a style sheet) is refused.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

# SVG text is left as text (the browser's own sans-serif draws it: smaller than glyph outlines), nothing is
# rasterised, and a line of many channels keeps only the vertices that change what a screen shows.
_RC: dict[Any, Any] = {
    "svg.fonttype": "none",
    "text.parse_math": False,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 7.5,
    "axes.titlesize": 8.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "ytick.minor.size": 1.5,
    "path.simplify": True,
    "path.simplify_threshold": 1.0,
    "legend.fontsize": 7.0,
    "legend.frameon": False,
}
_NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}

FIGURE_WIDTH = 7.6  # inches: 730 CSS pixels, two panels and a legend
BLUE, ORANGE, RED, DARK_RED, PURPLE, GOLD = "#1f77b4", "#ff7f0e", "#d62728", "#8c1010", "#7b3294", "#e6ab02"
SERIES_STYLES = ((BLUE, "-"), (ORANGE, "--"))
# Below this many channels each one gets a dot, so that one channel of a short layer is seen.
DOTTED_UP_TO = 64
SEVERITY_ORDER = (Severity.ERROR, Severity.WARNING, Severity.INFO)


# ------------------------------------------------------------------------------------------------- the pages


def render_html(report: Report) -> str:
    """``bncheck inspect --format html``: the summary, then per file its findings, its recomputation (with the drift
    of every layer across the model), its layer table and a picture per layer."""
    verdict = "PASS" if report.ok else "FAIL"
    counts = ", ".join(_plural(report.count(s), s.value) for s in SEVERITY_ORDER)
    parts = [
        f'<header><h1>bncheck report <span class="verdict {_verdict_class(verdict)}">{verdict}</span></h1>',
        f"<p>{_plural(len(report.files), 'file')}, {_plural(report.layer_count, 'layer')}: {counts} · fails on "
        f"{_t(report.fail_on.value)} · bncheck {_t(report.tool_version)}</p>",
    ]
    if report.config is not None:
        parts.append(f"<p>settings: {_t(report.config.path)}</p>")
        parts += [f'<p class="note">{_t(note)}</p>' for note in report.config.notes]
        parts += [f'<p class="warning">{_t(note)}</p>' for note in report.config.overruled]
    parts.append("</header>")
    parts.append(_summary(report))
    with _drawing():
        canvas = ChannelCanvas()
        parts += [_file_section(number, file, report, canvas) for number, file in enumerate(report.files, 1)]
    return _page(f"bncheck report: {verdict}", parts)


def render_diff_html(diff: DiffReport) -> str:
    """``bncheck diff --format html``: the two files, each layer's drift across the model, the comparison table and,
    for every layer beyond the thresholds, its statistics in A and in B channel by channel."""
    verdict = "NOT CHECKED" if diff.error is not None else ("DIFFERS" if diff.differs else "SAME")
    parts = [
        f'<header><h1>bncheck diff <span class="verdict {_verdict_class(verdict)}">{verdict}</span></h1>',
        f"<p>A {_t(diff.path_a)} ({_t(diff.format_a or 'unread')}{_entry(diff.source_a)})</p>",
        f"<p>B {_t(diff.path_b)} ({_t(diff.format_b or 'unread')}{_entry(diff.source_b)})</p>",
        f"<p>bncheck {_t(diff.tool_version)}</p></header>",
    ]
    if diff.error is not None:
        parts.append(f'<p class="error">{_t(diff.error.message)} ({_t(diff.error.code)})</p>')
        return _page(f"bncheck diff: {verdict}", parts)
    drifted = [(number, row) for number, row in enumerate(diff.layers, 1) if row.drifted]
    parts.append("<section><h2>Summary</h2><ul>")
    parts.append(f"<li>{_plural(len(diff.layers), 'shared layer')}, {len(drifted)} beyond the drift thresholds</li>")
    for label, names in (("only in A", diff.only_in_a), ("only in B", diff.only_in_b)):
        if names:
            parts.append(f"<li>{len(names)} {label}: {', '.join(_t(name) for name in names)}</li>")
    for name, channels_a, channels_b in diff.channel_changes:
        parts.append(f"<li>{_t(name)}: {_t(channels_a)} channels in A, {_t(channels_b)} in B</li>")
    for folded in diff.folded:
        parts.append(f"<li>{_t(folded_sentence(folded))}</li>")
    parts += [f"<li>note: {_t(note)}</li>" for note in diff.notes]
    parts.append("</ul></section>")
    with _drawing():
        if diff.layers:
            picture = drift_picture(
                range(1, len(diff.layers) + 1),
                ([row.mean_shift_median for row in diff.layers], [row.mean_shift_worst for row in diff.layers]),
                ([row.log_var_ratio_median for row in diff.layers], [row.log_var_ratio_worst for row in diff.layers]),
                [row.drifted for row in diff.layers],
                flagged_label="beyond the thresholds",
                salt="d-drift",
            )
            parts.append(
                '<section><h2>Drift across the model</h2><figure class="drift">'
                "<figcaption>B's drift from A in each shared layer (numbered as in the table): the mean shift in "
                "standard deviations and the |log variance ratio|, in the median and the worst channel.</figcaption>"
                f"{picture}</figure></section>"
            )
        parts.append(_diff_table(diff.layers))
        if drifted:
            canvas = ChannelCanvas()
            parts.append("<section><h2>Layers beyond the thresholds, channel by channel</h2>")
            parts += [_diff_figure(number, row, canvas) for number, row in drifted]
            parts.append("</section>")
    return _page(f"bncheck diff: {verdict}", parts)


# ------------------------------------------------------------------------------------------------ the sections


def _summary(report: Report) -> str:
    rows = []
    for number, file in enumerate(report.files, 1):
        verdict = file_verdict(file, report.fail_on)
        rows.append(
            f'<tr><td><a href="#f{number}">{_t(file.path)}</a></td><td>{_t(file.format or "-")}</td>'
            f'<td class="n">{len(file.layers)}</td><td class="{_verdict_class(verdict)}">'
            f"{_t(verdict)}</td>" + "".join(f'<td class="n">{file.count(s)}</td>' for s in SEVERITY_ORDER) + "</tr>"
        )
    parts = [
        "<section><h2>Summary</h2><table><thead><tr><th>file</th><th>format</th><th>layers</th><th>verdict</th>"
        "<th>errors</th><th>warnings</th><th>infos</th></tr></thead><tbody>",
        *rows,
        "</tbody></table>",
    ]
    findings = [(number, finding) for number, file in enumerate(report.files, 1) for finding in file.findings]
    if findings:
        rules = {rule.code: rule.summary for rule in report.rules}
        by_code = Counter(finding.code for _, finding in findings)
        parts.append(
            "<h3>Findings by code</h3><table><thead><tr><th>code</th><th>severity</th><th>findings</th>"
            "<th>files</th><th>rule</th></tr></thead><tbody>"
        )
        for code in sorted(by_code):
            severities = {finding.severity for _, finding in findings if finding.code == code}
            files = {number for number, finding in findings if finding.code == code}
            shown = ", ".join(s.value for s in SEVERITY_ORDER if s in severities)
            parts.append(
                f'<tr><td class="code">{_t(code)}</td><td class="{max(severities).value}">{shown}</td>'
                f'<td class="n">{by_code[code]}</td><td class="n">{len(files)}</td><td>{_t(rules.get(code, ""))}</td>'
                "</tr>"
            )
        parts.append("</tbody></table>")
    parts.append("</section>")
    return "".join(parts)


def _file_section(number: int, file: FileReport, report: Report, canvas: ChannelCanvas) -> str:
    anchor = f"f{number}"
    verdict = file_verdict(file, report.fail_on)
    parts = [
        f'<section class="file" id="{anchor}"><h2>{_t(file.path)} <span class="verdict '
        f'{_verdict_class(verdict)}">{_t(verdict)}</span></h2>'
    ]
    if file.error is None:
        dtypes = ", ".join(dict.fromkeys(layer.dtype for layer in file.layers if layer.dtype))
        facts = [file.format or "", _size(file.size_bytes), _plural(len(file.layers), "BatchNorm layer"), dtypes]
        parts.append(f'<p class="meta">{" · ".join(_t(fact) for fact in facts if fact)}</p>')
    for error in file.errors:
        parts.append(f'<p class="error">{_t(error.message)} ({_t(error.code)})</p>')
    if file.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_t(note)}</li>" for note in file.notes) + "</ul>")
    numbers = {(layer.source, layer.name): n for n, layer in enumerate(file.layers, 1)}
    anchored = [(f"{anchor}-finding-{k}", finding) for k, finding in enumerate(file.findings, 1)]
    by_layer: dict[tuple[str, str], list[tuple[str, Finding]]] = {}
    for element_id, finding in anchored:
        if finding.layer is not None:
            by_layer.setdefault((finding.source or "", finding.layer), []).append((element_id, finding))
    if anchored:
        parts.append('<h3>Findings</h3><ol class="findings">')
        parts += [_finding(finding, element_id, anchor, numbers) for element_id, finding in anchored]
        parts.append("</ol>")
    drift = {(row.source, row.name): row for row in file.recompute.layers} if file.recompute else {}
    if file.recompute is not None:
        parts.append(_recompute_section(file.recompute, anchor, numbers))
    if file.layers:
        parts.append(_layer_table(file.layers, anchor, by_layer))
        parts.append("<h3>Layers channel by channel</h3>")
        for n, layer in enumerate(file.layers, 1):
            key = (layer.source, layer.name)
            parts.append(_layer_figure(n, layer, by_layer.get(key, []), anchor, drift.get(key), canvas))
    parts.append("</section>")
    return "".join(parts)


def _finding(finding: Finding, element_id: str, anchor: str, numbers: dict[tuple[str, str], int]) -> str:
    where = ""
    if finding.layer is not None:
        number = numbers.get((finding.source or "", finding.layer))
        name = _t(finding.layer or "(root)") + _entry(finding.source or "")
        where = f'<a href="#{anchor}-layer-{number}">{name}</a> ' if number is not None else f"{name} "
    channels = ""
    if finding.channels:
        listed = ", ".join(str(c) for c in finding.channels)
        more = f" ({finding.channel_count} in all)" if finding.channel_count > len(finding.channels) else ""
        channels = f'<div class="channels">channels {listed}{more}</div>'
    return (
        f'<li id="{element_id}" class="{finding.severity.value}"><span class="code">{_t(finding.code)}</span> '
        f'<span class="{finding.severity.value}">{finding.severity.value}</span> {where}{_t(finding.message)}'
        f'{channels}<div class="fix">fix: {_t(finding.hint)}</div></li>'
    )


def _recompute_section(info: RecomputeInfo, anchor: str, numbers: dict[tuple[str, str], int]) -> str:
    parts = [
        "<h3>Recomputed on sample data</h3>",
        f"<p>{_t(info.mode)} mode, {_plural(info.samples, 'sample')} in {_plural(info.batches, 'batch', 'batches')}"
        f" with {_t(info.model)} on {_t(info.data)}; variance: {_t(info.variance_convention)}</p>",
    ]
    if info.too_few_samples:
        parts.append('<p class="warning">too few samples: smaller drift than the sampling noise goes unseen</p>')
    notes = [*info.notes, *(f"{u.name}: not measured, {u.reason}" for u in info.unmeasured)]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_t(note)}</li>" for note in notes) + "</ul>")
    rows = [(numbers[row.source, row.name], row) for row in info.layers if (row.source, row.name) in numbers]
    if rows:
        picture = drift_picture(
            [number for number, _ in rows],
            ([row.mean_shift_median for _, row in rows], [row.mean_shift_worst for _, row in rows]),
            ([row.log_var_ratio_median for _, row in rows], [row.log_var_ratio_worst for _, row in rows]),
            [row.stale and not row.silenced for _, row in rows],
            flagged_label="stale",
            salt=f"{anchor}-drift",
        )
        parts.append(
            '<figure class="drift"><figcaption>Drift of the stored statistics from the recomputed ones in each '
            "measured layer (numbered as in the table): the mean shift in standard deviations and the |log variance "
            f"ratio|, in the median and the worst channel.</figcaption>{picture}</figure>"
        )
    return "".join(parts)


def _layer_table(
    layers: Sequence[LayerInfo], anchor: str, by_layer: dict[tuple[str, str], list[tuple[str, Finding]]]
) -> str:
    rows = []
    for n, layer in enumerate(layers, 1):
        links = _finding_links(by_layer.get((layer.source, layer.name), []))
        rows.append(
            f'<tr><td class="n">{n}</td><td><a href="#{anchor}-layer-{n}">{_t(layer.name or "(root)")}</a>'
            f"{_entry(layer.source)}{' (averaged)' if layer.averaged else ''}</td>"
            f"<td>{_t(layer.kind)}{'*' if layer.kind_inferred else ''}</td>"
            f'<td class="n">{_t(_or_dash(layer.num_features))}</td><td>{_t(layer.dtype or "-")}</td>'
            f'<td class="n">{_t(_or_dash(layer.num_batches_tracked))}</td>'
            f"<td>{_range(layer.running_mean)}</td><td>{_range(layer.running_var)}</td><td>{links}</td></tr>"
        )
    inferred = any(layer.kind_inferred for layer in layers)
    return (
        "<h3>Layers</h3><table><thead><tr><th>#</th><th>layer</th><th>kind</th><th>ch</th><th>dtype</th>"
        "<th>batches</th><th>mean min..max</th><th>var min..max</th><th>findings</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + ('<p class="meta">* kind inferred from the layer that feeds it</p>' if inferred else "")
    )


def _finding_links(findings: Sequence[tuple[str, Finding]]) -> str:
    return " ".join(
        f'<a class="code {finding.severity.value}" href="#{element_id}">{_t(finding.code)}</a>'
        for element_id, finding in findings
    )


def _layer_figure(
    n: int,
    layer: LayerInfo,
    findings: Sequence[tuple[str, Finding]],
    anchor: str,
    drift: LayerDriftInfo | None,
    canvas: ChannelCanvas,
) -> str:
    """One layer's picture: its stored statistics (and the recomputed ones), with the channels its findings name
    on running_mean or running_var (or on the layer as a whole) highlighted."""
    series = [Series("stored", _array(layer.mean_by_channel), _array(layer.var_by_channel))]
    if drift is not None and (drift.recomputed_mean is not None or drift.recomputed_var is not None):
        series.append(Series("recomputed", _array(drift.recomputed_mean), _array(drift.recomputed_var)))
    drawn = [f for _, f in findings if f.channels and f.tensor in ("running_mean", "running_var", None)]
    named_mean = sorted({c for f in drawn if f.tensor != "running_var" for c in f.channels})
    named_var = sorted({c for f in drawn if f.tensor != "running_mean" for c in f.channels})
    codes = ", ".join(sorted({f.code for f in drawn}))
    picture = canvas.draw(series, named_mean, named_var, named_label=f"named by {codes}", salt=f"{anchor}-{n}")
    links = _finding_links(findings)
    facts = [layer.kind + ("*" if layer.kind_inferred else ""), _plural_or_dash(layer.num_features, "channel")]
    caption = (
        f'<span class="n">{n}</span> <b>{_t(layer.name or "(root)")}</b>{_entry(layer.source)} '
        f"{' · '.join(_t(fact) for fact in facts)} {links}"
    )
    return f'<figure class="layer" id="{anchor}-layer-{n}"><figcaption>{caption}</figcaption>{picture}</figure>'


def _diff_table(rows: Sequence[LayerDiff]) -> str:
    body = []
    for n, row in enumerate(rows, 1):
        name_b = "" if row.name_b == row.name_a else f" → {_t(row.name_b)}"
        name = f'<a href="#d-layer-{n}">{_t(row.name_a)}</a>' if row.drifted else _t(row.name_a)
        verdict = "drifted" if row.drifted else "same"
        body.append(
            f'<tr><td class="n">{n}</td><td>{name}{name_b}</td><td class="n">{row.channels}</td>'
            f"<td>{_num(row.mean_shift_median)} / {_num(row.mean_shift_worst)}</td>"
            f"<td>{_num(row.log_var_ratio_median)} / {_num(row.log_var_ratio_worst)}</td>"
            f'<td class="{"error" if row.drifted else "pass"}">{verdict}</td>'
            f"<td>{'; '.join(_t(reason) for reason in row.reasons)}</td></tr>"
        )
    return (
        "<section><h2>Shared layers</h2><table><thead><tr><th>#</th><th>layer</th><th>ch</th>"
        "<th>mean shift (std)</th><th>|log var ratio|</th><th>verdict</th><th>why</th></tr></thead><tbody>"
        + "".join(body)
        + '</tbody></table><p class="meta">drift of B from A as median / worst channel</p></section>'
    )


def _diff_figure(n: int, row: LayerDiff, canvas: ChannelCanvas) -> str:
    series = [Series("A", _array(row.mean_a), _array(row.var_a)), Series("B", _array(row.mean_b), _array(row.var_b))]
    picture = canvas.draw(series, [], [], named_label="", salt=f"d-{n}")
    caption = f'<span class="n">{n}</span> <b>{_t(row.name_a)}</b> · {_plural(row.channels, "channel")}: ' + "; ".join(
        _t(reason) for reason in row.reasons
    )
    return f'<figure class="layer" id="d-layer-{n}"><figcaption>{caption}</figcaption>{picture}</figure>'


# ------------------------------------------------------------------------------------------------ the pictures


@dataclass(frozen=True)
class Series:
    """One set of statistics drawn in a picture (stored, recomputed, A, B); None where it has no values."""

    label: str
    mean: np.ndarray | None
    var: np.ndarray | None


@contextmanager
def _drawing() -> Iterator[None]:
    """matplotlib's settings for the pictures, restored afterwards (the caller may use matplotlib too)."""
    with matplotlib.rc_context(_RC):
        yield


class ChannelCanvas:
    """The figure every per-channel picture is drawn on: running_mean, and running_var on a log scale.

    It is built once and redrawn for each layer (new data, then the marks of that layer added and removed again):
    building a matplotlib figure costs about four times drawing one, and a model has hundreds of layers.
    """

    def __init__(self) -> None:
        self.figure = Figure(figsize=(FIGURE_WIDTH, 1.75))
        FigureCanvasSVG(self.figure)
        self.figure.subplots_adjust(left=0.075, right=0.8, bottom=0.16, top=0.86, wspace=0.3)
        mean_axes, var_axes = self.figure.subplots(1, 2)
        var_axes.set_yscale("log")
        self.panels: list[tuple[Axes, bool, list[Line2D]]] = []
        for axes, log, title in ((mean_axes, False, "running_mean"), (var_axes, True, "running_var (log scale)")):
            _static_labels(axes, title)
            axes.xaxis.set_major_locator(MaxNLocator(6, integer=True))
            if log:  # labels minor ticks too when the range is less than a decade; never mathtext (slow to lay out)
                axes.yaxis.set_major_formatter(_LogLabels(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
                axes.yaxis.set_minor_formatter(_LogLabels(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
            else:
                axes.yaxis.set_major_formatter(_plain())
                axes.yaxis.set_major_locator(MaxNLocator(4))
            lines = [
                axes.plot([], [], color=color, linestyle=style, linewidth=0.8)[0] for color, style in SERIES_STYLES
            ]
            self.panels.append((axes, log, lines))

    def draw(
        self,
        series: Sequence[Series],
        named_mean: Sequence[int],
        named_var: Sequence[int],
        *,
        named_label: str,
        salt: str,
    ) -> str:
        """The picture of one layer as inline SVG: each series per channel, the channels findings name highlighted,
        and each non-finite value (and each variance <= 0, which a log scale cannot show) marked at the edge."""
        added: list[Any] = []
        legend: dict[str, Any] = {}
        if len(series) > 1:
            legend.update({s.label: line for s, line in zip(series, self.panels[0][2], strict=False)})
        for (axes, log, lines), named in zip(self.panels, (named_mean, named_var), strict=True):
            values = [s.var if log else s.mean for s in series]
            for line, data in zip(lines, [*values, None][: len(lines)], strict=False):
                _set_line(line, data, log)
            if named:
                band = _rug(axes, named, 0.0, 1.0, color=GOLD, alpha=0.3, linewidth=_band_width(axes, values))
                band.set_zorder(0.5)
                added.append(band)
                legend[named_label] = band
            for s, data in zip(series, values, strict=True):
                if data is not None:
                    for label, line in _edge_marks(axes, data, log, prefix=f"{s.label}: " if len(series) > 1 else ""):
                        added.append(line)
                        legend[label] = line
            added += _limits(axes, [v for v in values if v is not None], log)
        if legend:
            added.append(self.figure.legend(list(legend.values()), list(legend), **_LEGEND))
        try:
            return _svg(self.figure, salt)
        finally:
            for artist in added:
                artist.remove()


def drift_picture(
    x: Sequence[int],
    mean_shift: tuple[Sequence[float], Sequence[float]],
    log_var_ratio: tuple[Sequence[float], Sequence[float]],
    flagged: Sequence[bool],
    *,
    flagged_label: str,
    salt: str,
) -> str:
    """Every layer's drift across the model, in its median and its worst channel (``(median, worst)`` per measure),
    with the layers beyond the thresholds marked; a value past 10 turns the scale logarithmic above 1."""
    figure = Figure(figsize=(FIGURE_WIDTH, 1.9))
    FigureCanvasSVG(figure)
    figure.subplots_adjust(left=0.075, right=0.8, bottom=0.16, top=0.86, wspace=0.3)
    positions = np.asarray(x, dtype=np.float64)
    beyond = np.asarray(flagged, dtype=bool)
    legend: dict[str, Any] = {}
    for axes, title, (median, worst) in zip(
        figure.subplots(1, 2), ("mean shift (std)", "|log var ratio|"), (mean_shift, log_var_ratio), strict=True
    ):
        _static_labels(axes, title)
        medians, worsts = np.asarray(median, dtype=np.float64), np.asarray(worst, dtype=np.float64)
        dotted = "." if positions.size <= DOTTED_UP_TO else "None"
        (worst_line,) = axes.plot(positions, _finite(worsts), color=BLUE, linewidth=0.8, marker=dotted, markersize=3)
        (median_line,) = axes.plot(positions, _finite(medians), color=BLUE, linewidth=0.8, linestyle=":")
        legend["worst channel"], legend["median channel"] = worst_line, median_line
        shown = beyond & np.isfinite(worsts)
        if shown.any():
            legend[flagged_label] = axes.plot(
                positions[shown], worsts[shown], linestyle="None", marker="o", markersize=3.5, color=RED
            )[0]
        nonfinite = positions[~np.isfinite(worsts)]
        if nonfinite.size:
            legend[f"NaN or inf ({nonfinite.size})"] = _rug(axes, nonfinite, 0.88, 1.0, color=RED, linewidth=1.2)
        axes.set_xlim(positions.min() - 0.5, positions.max() + 0.5)
        axes.xaxis.set_major_locator(MaxNLocator(6, integer=True))
        finite = np.concatenate([medians[np.isfinite(medians)], worsts[np.isfinite(worsts)]])
        top = float(finite.max()) if finite.size else 0.0
        if top > 10:
            axes.set_yscale("symlog", linthresh=1.0)
            axes.yaxis.set_minor_formatter(NullFormatter())
        axes.set_ylim(0.0, top * 1.08 if top > 0 else 1.0)
        axes.yaxis.set_major_formatter(_plain())
    figure.legend(list(legend.values()), list(legend), **_LEGEND)
    return _svg(figure, salt)


# ------------------------------------------------------------------------------------------------ drawing helpers


def _plain() -> FuncFormatter:
    """Tick labels as plain numbers (a formatter belongs to one axis, so each gets its own)."""
    return FuncFormatter(lambda value, _: f"{value:g}")


# in the margin right of the panels, which every picture keeps so that all of them line up
_LEGEND: dict[str, Any] = {"loc": "center left", "bbox_to_anchor": (0.805, 0.5)}


class _LogLabels(LogFormatter):
    """matplotlib's choice of which ticks of a log scale to label, written as plain numbers (0.6, not 6e-01)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _static_labels(axes: Axes, title: str) -> None:
    """A panel's title as plain text above it, and its axis labels (empty) fixed in place: matplotlib otherwise
    measures every tick label on each draw to place them, a third of the time of a picture."""
    axes.text(0.0, 1.07, title, transform=axes.transAxes, fontsize=matplotlib.rcParams["axes.titlesize"])
    axes.xaxis.set_label_coords(0.5, -0.1)
    axes.yaxis.set_label_coords(-0.1, 0.5)


def _finite(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def _array(values: ChannelValues | None) -> np.ndarray | None:
    return None if values is None else np.frombuffer(values.packed, dtype=np.float64)


def _set_line(line: Line2D, data: np.ndarray | None, log: bool) -> None:
    if data is None:
        line.set_visible(False)
        return
    drawn = np.isfinite(data) & ((data > 0) if log else True)
    line.set_data(np.arange(data.size), np.where(drawn, data, np.nan))
    # a stretch of values between gaps too short to see as a line gets dots, as every value of a short layer does
    panel = line.axes.get_position().width * FIGURE_WIDTH * 72 if line.axes is not None else 1.0
    dotted = np.ones(data.size, dtype=bool) if data.size <= DOTTED_UP_TO else _short_runs(drawn, 2 * data.size / panel)
    line.set_marker("." if dotted.any() else "None")
    line.set_markevery(dotted.tolist())
    line.set_markersize(3)
    line.set_visible(True)


def _short_runs(drawn: np.ndarray, shortest: float) -> np.ndarray:
    """Where ``drawn`` is True in runs of fewer than ``shortest`` values."""
    edges = np.diff(np.concatenate(([0], drawn.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    short = (ends - starts) < shortest
    marks = np.zeros(drawn.size + 1, dtype=np.int64)
    np.add.at(marks, starts[short], 1)
    np.add.at(marks, ends[short], -1)
    return np.cumsum(marks[:-1]) > 0


def _rug(axes: Axes, channels: Sequence[int] | np.ndarray, low: float, high: float, **style: Any) -> Line2D:
    """Vertical ticks at ``channels`` from ``low`` to ``high`` (in axes fractions) as one path: a marker per channel
    would cost a hundred bytes each, and a diverged model has every channel NaN."""
    x = np.repeat(np.asarray(channels, dtype=np.float64), 3)
    x[2::3] = np.nan
    y = np.tile([low, high, np.nan], len(channels))
    (line,) = axes.plot(x, y, transform=axes.get_xaxis_transform(), clip_on=False, scalex=False, scaley=False, **style)
    return line


def _band_width(axes: Axes, values: Sequence[np.ndarray | None]) -> float:
    """A highlight most of a channel wide (in points), so that neighbours stay apart, and never a mere hairline."""
    channels = max((v.size for v in values if v is not None), default=1)
    width = axes.get_position().width * FIGURE_WIDTH * 72
    return max(1.5, 0.7 * width / max(channels, 1))


def _edge_marks(axes: Axes, data: np.ndarray, log: bool, *, prefix: str) -> Iterator[tuple[str, Line2D]]:
    """What a line cannot show, as ticks at the edge of the panel: NaN and +inf at the top, -inf (and a variance
    <= 0 on the log scale) at the bottom, each with its panel and count for the legend ("NaN in var (25)")."""
    kinds = [
        ("NaN", np.isnan(data), 0.88, 1.0, RED),
        ("+inf", np.isposinf(data), 0.88, 1.0, DARK_RED),
        ("-inf", np.isneginf(data), 0.0, 0.12, DARK_RED),
    ]
    if log:
        kinds.append(("≤ 0", np.isfinite(data) & (data <= 0), 0.0, 0.12, PURPLE))
    for label, mask, low, high, color in kinds:
        channels = np.flatnonzero(mask)
        if channels.size:
            where = "var" if log else "mean"
            line = _rug(axes, channels, low, high, color=color, linewidth=1.2)
            yield f"{prefix}{label} in {where} ({channels.size})", line


def _limits(axes: Axes, values: Sequence[np.ndarray], log: bool) -> list[Any]:
    """Limits around the finite values (positive ones on a log scale), and a word in the panel when there are none.
    Returns what it added to the panel."""
    channels = max((v.size for v in values), default=1)
    axes.set_xlim(-0.5, max(channels, 1) - 0.5)
    finite = [v[np.isfinite(v) & ((v > 0) if log else True)] for v in values]
    shown = np.concatenate(finite) if finite else np.empty(0)
    if shown.size == 0:
        axes.set_ylim((0.1, 10.0) if log else (-1.0, 1.0))
        word = "no values" if not values else ("no positive finite values" if log else "no finite values")
        return [axes.text(0.5, 0.5, word, transform=axes.transAxes, ha="center", va="center", color="#666666")]
    low, high = float(shown.min()), float(shown.max())
    if log:
        low_exp, high_exp = math.log10(low), math.log10(high)
        pad = (high_exp - low_exp) * 0.06 or 0.5
        axes.set_ylim(10 ** (low_exp - pad), 10 ** (high_exp + pad))
        return []
    with np.errstate(over="ignore"):
        pad = (high - low) * 0.06 or max(abs(low) * 0.06, 1e-3)
        limits = (low - pad, high + pad)
    axes.set_ylim(limits if all(math.isfinite(v) for v in limits) else (low, high))
    return []


def _svg(figure: Figure, salt: str) -> str:
    """The figure as an ``<svg>`` element to put in the page.

    The ids matplotlib gives clip paths and markers are hashes salted per picture, so that they never collide across
    the pictures of one page and the same report always gives the same bytes. Its XML prolog, namespace
    declarations (not needed inline) and per-group ids (one set per picture, so they would repeat) are dropped.
    """
    matplotlib.rcParams["svg.hashsalt"] = salt
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata=_NO_METADATA)
    svg = buffer.getvalue()
    start = svg.index("<svg")
    end = svg.index(">", start) + 1
    svg = _NAMESPACES.sub("", svg[start:end]) + svg[end:]
    svg = _GROUP_IDS.sub("<g", svg)
    return _GEOMETRY.sub(_shortened, svg)


_NAMESPACES = re.compile(r' xmlns(?::\w+)?="[^"]*"')
_GROUP_IDS = re.compile(r'<g id="[\w.]+_\d+"')
# the attributes that hold coordinates (never text): path data, positions, transforms
_GEOMETRY = re.compile(r'(?<= (?:d|x|y)=")[^"]*|(?<= transform=")[^"]*')
# matplotlib writes six decimals; a tenth of a point is below a pixel at any usual zoom and saves a quarter of the
# bytes of a picture
_MORE_DECIMALS = re.compile(r"(?<=\.\d)\d+")


# a coordinate pair after another one repeats the command before it: "M 1 2 L 3 4 L 5 6" is "M 1 2 3 4 5 6" (only
# in paths of straight lines: in a curve, bare pairs would be read as more control points)
_REPEATED_LINE = re.compile(r"(?<=\d) L (?=-?\d)")
_CURVES = re.compile("[CcQqSsTtAa]")


def _shortened(match: re.Match[str]) -> str:
    value = _MORE_DECIMALS.sub("", match.group(0)).replace(" \n", " ")
    return value if _CURVES.search(value) else _REPEATED_LINE.sub(" ", value)


# ------------------------------------------------------------------------------------------------ text helpers


def _t(value: object) -> str:
    """Text from a report (a path, a layer name, a message quoting a file's bytes) for the page: its control
    characters escaped as on a terminal (a bidi override must not reverse a name), then HTML-escaped."""
    return html.escape(escape_controls(str(value)))


def _entry(source: str) -> str:
    return f' <span class="entry">[{_t(source)}]</span>' if source else ""


def _range(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    text = f"{_num(summary.min)}..{_num(summary.max)}" if summary.min is not None else ""
    if summary.nonfinite:
        text += f' <span class="error">{summary.nonfinite} nan/inf</span>'
    return text.strip() or "-"


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _plural_or_dash(n: int | None, word: str) -> str:
    return f"? {word}s" if n is None else _plural(n, word)


def _size(size: int | None) -> str:
    return "" if size is None else format_size(size)


def _verdict_class(verdict: str) -> str:
    """Green only for a clean pass: a pass with findings below the fail level, or a diff that differs, is amber."""
    if verdict.startswith(("FAIL", "NOT")):
        return "fail"
    return "warn" if verdict == "DIFFERS" or "(" in verdict else "pass"


def _page(title: str, parts: Sequence[str]) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_t(title)}</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>"
    )


STYLE = (
    "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;color:#1b1b1b;"
    "max-width:1100px;margin:0 auto;padding:0 16px 48px}"
    "h1{font-size:22px;margin:20px 0 4px}h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid #ddd;"
    "word-break:break-all}h3{font-size:15px;margin:18px 0 6px}p{margin:4px 0}"
    "table{border-collapse:collapse;margin:6px 0;font-size:13px}th,td{padding:2px 8px;text-align:left;"
    "border-bottom:1px solid #eee;vertical-align:top}th{background:#f4f4f4}td.n{text-align:right}"
    "td{word-break:break-word}"
    ".verdict{font-size:.8em;padding:1px 8px;border-radius:4px;color:#fff;white-space:nowrap}"
    ".verdict.pass{background:#2e7d32}.verdict.warn{background:#b26a00}.verdict.fail{background:#c62828}"
    "td.pass{color:#2e7d32}td.warn{color:#b26a00}td.fail{color:#c62828}"
    ".error{color:#c62828}.warning{color:#b26a00}.info{color:#00838f}.meta,.note,.entry{color:#555}"
    ".code{font-family:ui-monospace,'DejaVu Sans Mono',monospace;font-weight:600}"
    "a.code{margin-right:4px}a{color:#1558b0}"
    "ol.findings{padding-left:22px}ol.findings li{margin:6px 0}ol.findings li span.code{margin-right:4px}"
    ".channels,.fix{color:#444;font-size:13px}"
    "figure{margin:10px 0;padding:4px 0;border-top:1px solid #f0f0f0}figcaption{font-size:13px}"
    "figcaption .n{color:#777;margin-right:4px}"
    "svg{display:block;max-width:100%;height:auto}"
    ":target{background:#fff7d6}"
)
