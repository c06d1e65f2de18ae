"""The human report: a rich renderable that reads in an 80-column terminal and as plain text in a log.

Every value from a checkpoint goes in as ``Text`` (never as markup), so names like ``[nan]`` or ``[bfloat16]``
survive.
"""

from __future__ import annotations

import math

from rich import box
from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from bncheck.report import FileReport, Finding, LayerInfo, Report, Severity, Summary

STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
CHANNELS_SHOWN = 6


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}"


def _range(summary: Summary | None) -> Text:
    if summary is None:
        return Text("-", style="dim")
    text = Text("" if summary.min is None else f"{_num(summary.min)}..{_num(summary.max)}")
    if summary.nonfinite:
        text.append(f"{' ' if text else ''}{summary.nonfinite} nan/inf", style="bold red")
    return text


def _size(size: int | None) -> str:
    if size is None:
        return "size unknown"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _verdict(file: FileReport, fail_on: Severity) -> Text:
    if file.error is not None:
        return Text("NOT CHECKED", style="bold red")
    counts = [_plural(file.count(s), s.value) for s in Severity if file.count(s)]
    detail = f" ({', '.join(counts)})" if counts else ""
    if file.fails(fail_on):
        return Text(f"FAIL{detail}", style="bold red")
    return Text(f"PASS{detail}", style="bold green")


def _layer_table(layers: list[LayerInfo], *, show_dtype: bool) -> Table:
    # Ranges are printed min..max without spaces and dtype only when it varies, to fit 80 columns.
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    table.add_column("layer", overflow="fold", min_width=min(12, max(len(layer.name) for layer in layers)))
    table.add_column("kind", no_wrap=True)
    table.add_column("ch", justify="right", no_wrap=True)
    if show_dtype:
        table.add_column("dtype", no_wrap=True)
    table.add_column("batches", justify="right", no_wrap=True)
    table.add_column("mean min..max", overflow="fold")
    table.add_column("var min..max", overflow="fold")
    for layer in layers:
        name = Text(layer.name or "(root)", style="bold" if layer.codes else "")
        row = [
            name,
            Text(layer.kind + ("*" if layer.kind_inferred else "")),
            Text("-" if layer.num_features is None else str(layer.num_features)),
        ]
        if show_dtype:
            row.append(Text(layer.dtype or "-"))
        row += [
            Text("-" if layer.num_batches_tracked is None else str(layer.num_batches_tracked)),
            _range(layer.running_mean),
            _range(layer.running_var),
        ]
        table.add_row(*row)
    return table


def _channels(finding: Finding) -> str:
    shown = ", ".join(str(c) for c in finding.channels[:CHANNELS_SHOWN])
    more = ", ..." if finding.channel_count > CHANNELS_SHOWN else ""
    return f"channels {shown}{more} ({finding.channel_count} in all)"


def _findings_table(findings: tuple[Finding, ...]) -> Table:
    # A grid keeps wrapped messages aligned in their own column instead of flowing back to the margin.
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for finding in findings:
        body = Text()
        if finding.layer is not None:
            body.append(f"{finding.source}: " if finding.source else "")
            body.append(finding.layer or "(root)", style="bold")
            body.append("  ")
        body.append(finding.message)
        if finding.channel_count:
            body.append("\n" + _channels(finding))
        body.append("\nfix: " + finding.hint, style="dim")
        style = STYLE[finding.severity]
        grid.add_row(Text(finding.code, style=style), Text(finding.severity.value, style=style), body)
    return grid


def _file(file: FileReport, fail_on: Severity) -> RenderableType:
    parts: list[RenderableType] = [Text(file.path, style="bold")]
    meta = Text("  ")
    if file.error is not None:
        meta.append_text(_verdict(file, fail_on))
        meta.append(f"  {file.error.message}")
        return Group(*parts, meta, Text())
    dtypes = {layer.dtype for layer in file.layers}
    common_dtype = f"{dtypes.pop()} · " if len(dtypes) == 1 else ""
    meta.append(f"{file.format} · {_size(file.size_bytes)} · {_plural(len(file.layers), 'BatchNorm layer')} · ")
    meta.append(common_dtype)
    meta.append_text(_verdict(file, fail_on))
    parts.append(meta)
    parts.extend(Padding(Text(f"note: {note}", style="dim"), (0, 0, 0, 2), expand=False) for note in file.notes)
    sources = list(dict.fromkeys(layer.source for layer in file.layers))
    for source in sources:
        layers = [layer for layer in file.layers if layer.source == source]
        if len(sources) > 1 or source:
            averaged = " (averaged weights)" if layers[0].averaged else ""
            parts.append(Text(f"  in {source or '(root)'}{averaged}", style="bold"))
        parts.append(Padding(_layer_table(layers, show_dtype=not common_dtype), (1, 0, 0, 2), expand=False))
    if any(layer.kind_inferred for layer in file.layers):
        parts.append(Text("  * kind inferred from the layer that feeds it", style="dim"))
    if file.findings:
        parts.append(Padding(_findings_table(file.findings), (1, 0, 0, 2), expand=False))
    parts.append(Text())
    return Group(*parts)


def render_text(report: Report) -> RenderableType:
    """The whole report: one section per file, then a summary line."""
    summary = Text()
    counts = ", ".join(_plural(report.count(s), s.value) for s in Severity)
    unreadable = sum(1 for f in report.files if f.error is not None)
    summary.append(f"{_plural(len(report.files), 'file')}, {_plural(report.layer_count, 'layer')}: {counts}")
    if unreadable:
        summary.append(f", {unreadable} not checked")
    summary.append(" -> ")
    if report.ok:
        summary.append("PASS", style="bold green")
    else:
        summary.append("FAIL", style="bold red")
    if report.fail_on is not Severity.ERROR:
        summary.append(f" (fail on {report.fail_on.value})", style="dim")
    return Group(*(_file(f, report.fail_on) for f in report.files), summary)
