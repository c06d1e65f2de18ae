"""The human report: a rich renderable that reads in an 80-column terminal and as plain text in a log.

Every value from a checkpoint goes in as ``Text`` (never as markup), so names like ``[nan]`` or ``[bfloat16]``
survive, and through ``escape_controls`` (as ``_shown``), so a name cannot drive the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from bncheck.render import escape_controls as _shown
from bncheck.render import file_verdict, folded_sentence, format_size, summary_counts
from bncheck.render import format_number as _num
from bncheck.render import plural as _plural
from bncheck.report import (
    ConfigInfo,
    DiffReport,
    FileReport,
    Finding,
    LayerConfig,
    LayerInfo,
    ModelConfig,
    RecomputeInfo,
    Report,
    RuleInfo,
    Severity,
    Summary,
)

STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
CHANNELS_SHOWN = 6
CONFIGURATIONS_SHOWN = 4
LAYERS_SHOWN = 4  # of a finding repeated across layers
RENAMED = " ~ "  # between a layer's names in A and in B (diff)


def _range(summary: Summary | None) -> list[Text]:
    """A statistic's finite range and its count of non-finite values, as separate pieces for narrow layouts."""
    if summary is None:
        return [Text("-", style="dim")]
    pieces = []
    if summary.min is not None:
        pieces.append(Text(f"{_num(summary.min)}..{_num(summary.max)}"))
    if summary.nonfinite:
        pieces.append(Text(f"{summary.nonfinite} nan/inf", style="bold red"))
    return pieces


def _verdict(file: FileReport, fail_on: Severity) -> Text:
    verdict = file_verdict(file, fail_on)
    if not verdict.startswith("PASS"):
        return Text(verdict, style="bold red")
    return Text(verdict, style="bold yellow" if file.findings else "bold green")


class LayerTable:
    """A table with one row per layer, laid out for the width it is given.

    A rich Table would fold a long dotted name (``resnet.encoder.stages.0.layers.0.shortcut.normalization``) into
    an unreadable column; here a name that does not fit goes on its own line with its numbers on the next, and when
    even the numbers are too wide the pieces of a cell (a range, a count of NaN) are stacked. ``columns`` gives each
    column after the name its header and whether it is right-aligned; each cell of ``rows`` is a list of pieces.
    """

    MIN_NAME = 12

    def __init__(self, names: list[Text], columns: list[tuple[str, bool]], rows: list[list[list[Text]]]) -> None:
        self.names, self.columns, self.rows = names, columns, rows

    @staticmethod
    def _joined(pieces: list[Text]) -> Text:
        return Text(" ").join(pieces)

    def _widths(self, stacked: bool) -> list[int]:
        def width(pieces: list[Text]) -> int:
            return max(p.cell_len for p in pieces) if stacked else self._joined(pieces).cell_len

        return [max(len(header), *(width(row[i]) for row in self.rows)) for i, (header, _) in enumerate(self.columns)]

    def _line(self, name: Text, name_width: int, cells: list[Text], widths: list[int], gap: int) -> Text:
        line = Text()
        line.append_text(name)
        line.append(" " * (name_width - name.cell_len))
        for (_, right), cell, width in zip(self.columns, cells, widths, strict=True):
            line.append(" " * gap)
            pad = " " * (width - cell.cell_len)
            if right:
                line.append(pad)
            line.append_text(cell)
            if not right:
                line.append(pad)
        line.rstrip()
        return line

    def _layout(self, max_width: int) -> tuple[list[int], int, bool]:
        """Column widths, gap and whether cells are stacked: the roomiest layout that fits ``max_width``."""
        name_room = min(self.MIN_NAME, max(name.cell_len for name in self.names))
        for stacked, gap in ((False, 3), (True, 3), (False, 2), (True, 2)):
            widths = self._widths(stacked)
            if sum(widths) + gap * len(widths) + name_room <= max_width:
                break
        return widths, gap, stacked

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        widths, gap, stacked = self._layout(options.max_width)
        fixed = sum(widths) + gap * len(widths)
        longest = max(name.cell_len for name in self.names)
        name_width = max(min(longest, options.max_width - fixed), len("layer"))
        headers = [Text(header, style="bold") for header, _ in self.columns]
        yield self._line(Text("layer", style="bold"), name_width, headers, widths, gap)
        yield Text("─" * min(name_width + fixed, options.max_width), style="dim")
        for name, row in zip(self.names, self.rows, strict=True):
            if name.cell_len > name_width:
                yield Pieces(list(name.split(RENAMED)), RENAMED)
                name = Text()
            depth = max(len(cell) for cell in row) if stacked else 1
            for level in range(depth):
                if stacked:
                    cells = [cell[level] if level < len(cell) else Text() for cell in row]
                else:
                    cells = [self._joined(cell) for cell in row]
                yield self._line(name if level == 0 else Text(), name_width, cells, widths, gap)


class Pieces:
    """Pieces of text joined by a separator and wrapped only between pieces (a line that breaks ends with the
    separator), so that a file's header never breaks inside "2 warnings" and a renamed layer "a ~ b" inside a name."""

    def __init__(self, pieces: list[Text], separator: str = " · ") -> None:
        self.pieces, self.separator = pieces, separator

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        line = Text()
        for piece in self.pieces:
            if line and line.cell_len + len(self.separator) + piece.cell_len > options.max_width:
                line.append(self.separator.rstrip())
                yield line
                line = Text()
            if line:
                line.append(self.separator)
            line.append_text(piece)
        yield line


def _layers_table(layers: list[LayerInfo], *, show_dtype: bool) -> LayerTable:
    names = [Text(_shown(layer.name or "(root)"), style="bold" if layer.codes else "") for layer in layers]
    columns: list[tuple[str, bool]] = [("kind", False), ("ch", True)]
    if show_dtype:
        columns.append(("dtype", False))
    columns += [("batches", True), ("mean min..max", False), ("var min..max", False)]
    rows = []
    for layer in layers:
        row = [
            [Text(_shown(layer.kind) + ("*" if layer.kind_inferred else ""))],
            [Text("-" if layer.num_features is None else str(layer.num_features))],
        ]
        if show_dtype:
            row.append([Text(_shown(layer.dtype or "-"))])
        row += [
            [Text("-" if layer.num_batches_tracked is None else str(layer.num_batches_tracked))],
            _range(layer.running_mean),
            _range(layer.running_var),
        ]
        rows.append(row)
    return LayerTable(names, columns, rows)


def _described(config: LayerConfig) -> str:
    """A layer's configuration in a few words, with where it was read."""
    words = []
    if config.momentum is not None:
        value = config.momentum.value
        words.append("momentum None (cumulative)" if value is None else f"momentum {_num(float(value))}")
    if config.eps is not None and config.eps.value is not None:
        words.append(f"eps {_num(float(config.eps.value))}")
    if config.training is not None:
        words.append("train mode" if config.training.value else "eval mode")
    if config.track_running_stats is not None:
        words.append("tracking on" if config.track_running_stats.value else "tracking off")
    settings = (config.momentum, config.eps, config.training, config.track_running_stats, config.affine)
    sources = ", ".join(dict.fromkeys(setting.source for setting in settings if setting is not None))
    return f"{' · '.join(words)} ({sources})"


def _configuration_lines(layers: tuple[LayerInfo, ...], model_configs: tuple[ModelConfig, ...]) -> list[Text]:
    """One line per distinct layer configuration the file records (with how many layers have it), and one per set
    of model-wide settings from a config file; nothing for a state dict."""
    counts: dict[str, int] = {}
    for layer in layers:
        if layer.configuration.known:
            described = _described(layer.configuration)
            counts[described] = counts.get(described, 0) + 1
    lines = [
        Text(f"  configuration: {_shown(described)} in {_plural(n, 'layer')}", style="dim")
        for described, n in list(counts.items())[:CONFIGURATIONS_SHOWN]
    ]
    if len(counts) > CONFIGURATIONS_SHOWN:
        lines.append(Text(f"  configuration: {len(counts) - CONFIGURATIONS_SHOWN} more kinds (see --json)", "dim"))
    for config in model_configs:
        kind = f" (model_type {config.model_type})" if config.model_type else ""
        keys = [
            f"{setting.source.removeprefix(config.file).strip()} {_num(float(setting.value))}"
            for setting in (config.settings.momentum, config.settings.eps)
            if setting is not None and setting.value is not None
        ]
        line = f"  {config.file}{kind}, for the model as a whole: {', '.join(keys)}"
        lines.append(Text(_shown(line), style="dim"))
    return lines


def _channels(finding: Finding) -> str:
    shown = ", ".join(str(c) for c in finding.channels[:CHANNELS_SHOWN])
    more = ", ..." if finding.channel_count > CHANNELS_SHOWN else ""
    return f"channels {shown}{more} ({finding.channel_count} in all)"


def _layer_name(finding: Finding) -> str:
    return (f"{finding.source}: " if finding.source else "") + (finding.layer or "(root)")


def _grouped(findings: tuple[Finding, ...]) -> list[list[Finding]]:
    """The findings that say the same thing (code, severity, message, fix, channels) about several layers, one
    group each, in the order of their first appearance; a finding about the whole file stands alone."""
    groups: dict[tuple[object, ...], list[Finding]] = {}
    for index, f in enumerate(findings):
        alone = index if f.layer is None else None
        key = (f.code, f.severity, f.message, f.hint, f.channels, f.channel_count, alone)
        groups.setdefault(key, []).append(f)
    return list(groups.values())


def _findings_table(findings: tuple[Finding, ...]) -> Table:
    """One row per finding; a finding repeated across layers is one row that lists them (the first
    ``LAYERS_SHOWN`` and how many more): a backbone whose 34 layers lack their counter gets one BN010 row. JSON and
    SARIF keep one entry per layer."""
    # A grid keeps wrapped messages aligned in their own column instead of flowing back to the margin.
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for group in _grouped(findings):
        finding = group[0]
        body = Text()
        if len(group) > 1:
            names = ", ".join(_shown(_layer_name(f)) for f in group[:LAYERS_SHOWN])
            more = f" and {len(group) - LAYERS_SHOWN} more" if len(group) > LAYERS_SHOWN else ""
            body.append(f"{len(group)} layers: ")
            body.append(names + more, style="bold")
            body.append("\n")
        elif finding.layer is not None:
            body.append(f"{_shown(finding.source)}: " if finding.source else "")
            body.append(_shown(finding.layer or "(root)"), style="bold")
            body.append("  ")
        body.append(_shown(finding.message))
        if finding.channel_count:
            body.append("\n" + _channels(finding))
        body.append("\nfix: " + _shown(finding.hint), style="dim")
        style = STYLE[finding.severity]
        grid.add_row(Text(_shown(finding.code), style=style), Text(finding.severity.value, style=style), body)
    return grid


DRIFT_COLUMNS = [("mean shift (std)", False), ("|log var ratio|", False), ("verdict", False)]
DRIFT_LEGEND = "each as median / worst channel"


def _drift_cells(median_shift: float, worst_shift: float, median_ratio: float, worst_ratio: float) -> list[list[Text]]:
    return [
        [Text(f"{_num(median_shift)} / {_num(worst_shift)}")],
        [Text(f"{_num(median_ratio)} / {_num(worst_ratio)}")],
    ]


def _drift_table(info: RecomputeInfo) -> RenderableType:
    head = Text(
        f"recomputed in {info.mode} mode on {_plural(info.samples, 'sample')} "
        f"({_plural(info.batches, 'batch', 'batches')}"
        + (f", {info.batches_skipped} skipped" if info.batches_skipped else "")
        + f") with {_shown(info.model)}; variance: {_shown(info.variance_convention)}"
    )
    parts: list[RenderableType] = [head]
    parts.extend(Text(f"note: {_shown(note)}", style="dim") for note in info.notes)
    if info.too_few_samples:
        parts.append(Text(f"too few samples to judge small drift ({info.samples}); use more with --data", "yellow"))
    rows = []
    for row in info.layers:
        verdict = (
            Text("stale (silenced)", "dim")
            if row.stale and row.silenced
            else Text("STALE", "bold red")
            if row.stale
            else Text("ok", "green")
        )
        cells = _drift_cells(
            row.mean_shift_median, row.mean_shift_worst, row.log_var_ratio_median, row.log_var_ratio_worst
        )
        rows.append([*cells, [verdict]])
    names = [Text(_shown(row.name or "(root)")) for row in info.layers]
    table = Group(
        LayerTable(names, DRIFT_COLUMNS, rows),
        Text(
            "mean shift: |stored - recomputed mean| in recomputed standard deviations; |log var ratio|: "
            f"|ln(stored / recomputed variance)|; {DRIFT_LEGEND}; STALE: beyond the practical limit and the sampling "
            "noise",
            style="dim",
        ),
    )
    parts.append(table)
    parts.extend(
        Text(f"not measured: {_shown(layer.name or '(root)')}: {_shown(layer.reason)}", "yellow")
        for layer in info.unmeasured
    )
    return Group(*parts)


def _file(file: FileReport, fail_on: Severity) -> RenderableType:
    parts: list[RenderableType] = [Text(_shown(file.path), style="bold")]
    meta = Text()
    if file.error is not None:
        meta.append_text(_verdict(file, fail_on))
        meta.append(f"  {_shown(file.error.message)}")
        return Group(*parts, Padding(meta, (0, 0, 0, 2), expand=False), Text())
    dtypes = {layer.dtype for layer in file.layers}
    common_dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    size = "size unknown" if file.size_bytes is None else format_size(file.size_bytes)
    pieces = [Text(_shown(file.format or "?")), Text(size)]
    pieces.append(Text(_plural(len(file.layers), "BatchNorm layer")))
    if common_dtype is not None:
        pieces.append(Text(_shown(common_dtype)))
    parts.append(Padding(Pieces([*pieces, _verdict(file, fail_on)]), (0, 0, 0, 2), expand=False))
    parts.extend(Padding(Text(f"note: {_shown(note)}", style="dim"), (0, 0, 0, 2), expand=False) for note in file.notes)
    sources = list(dict.fromkeys(layer.source for layer in file.layers))
    for source in sources:
        layers = [layer for layer in file.layers if layer.source == source]
        if len(sources) > 1 or source:
            averaged = " (averaged weights)" if layers[0].averaged else ""
            parts.append(Text(f"  in {_shown(source or '(root)')}{averaged}", style="bold"))
        parts.append(Padding(_layers_table(layers, show_dtype=len(dtypes) > 1), (1, 0, 0, 2), expand=False))
    if any(layer.kind_inferred for layer in file.layers):
        parts.append(Text("  * kind inferred from the layer that feeds it", style="dim"))
    parts.extend(_configuration_lines(file.layers, file.model_configs))
    if file.recompute is not None:
        parts.append(Padding(_drift_table(file.recompute), (1, 0, 0, 2), expand=False))
    if file.recompute_error is not None:
        failed = Text(f"recompute failed: {_shown(file.recompute_error.message)}", "bold red")
        parts.append(Padding(failed, (1, 0, 0, 2), expand=False))
    if file.findings:
        parts.append(Padding(_findings_table(file.findings), (1, 0, 0, 2), expand=False))
    parts.append(Text())
    return Group(*parts)


def render_text(report: Report) -> RenderableType:
    """The whole report: one section per file, then a summary line."""
    summary = Text(summary_counts(report))
    if not report.ok:
        summary.append("FAIL", style="bold red")
    else:
        found = any(file.findings for file in report.files)
        summary.append("PASS", style="bold yellow" if found else "bold green")
    if report.fail_on is not Severity.ERROR:
        summary.append(f" (fail on {report.fail_on.value})", style="dim")
    return Group(*(_file(f, report.fail_on) for f in report.files), *_config_notes(report.config), summary)


def _config_notes(config: ConfigInfo | None) -> list[Text]:
    """What a discovered settings file changed or tried to drop, before the summary line that it may have moved."""
    if config is None:
        return []
    lines = [Text(f"note: {_shown(note)}", style="dim") for note in config.notes]
    lines += [Text(f"note: {_shown(note)}", style="yellow") for note in config.overruled]
    return [*lines, Text()] if lines else []


def render_diff_text(diff: DiffReport) -> RenderableType:
    """``bncheck diff``: what only one side has, channel-count changes, then every shared layer's drift."""
    head = Text()
    head.append(f"A {_shown(diff.path_a)}", style="bold")
    head.append(_shown(f"  ({diff.format_a or '?'}{', ' + diff.source_a if diff.source_a else ''})") + "\n")
    head.append(f"B {_shown(diff.path_b)}", style="bold")
    head.append(_shown(f"  ({diff.format_b or '?'}{', ' + diff.source_b if diff.source_b else ''})"))
    if diff.error is not None:
        return Group(head, Text(f"NOT COMPARED  {_shown(diff.error.message)}", style="bold red"))
    parts: list[RenderableType] = [head, Text()]
    for label, names in (("only in A", diff.only_in_a), ("only in B", diff.only_in_b)):
        if names:
            parts.append(Text(_shown(f"{label}: {', '.join(names)}"), style="yellow"))
    for name, ca, cb in diff.channel_changes:
        parts.append(Text(f"{_shown(name)}: {ca} channels in A, {cb} in B", style="yellow"))
    for folded in diff.folded:
        parts.append(Text(_shown(folded_sentence(folded)), style="green" if folded.faithful else "yellow"))
    parts += [Text(f"note: {_shown(note)}", style="dim") for note in diff.notes]
    rows = []
    renamed = False
    for row in diff.layers:
        cells = _drift_cells(
            row.mean_shift_median, row.mean_shift_worst, row.log_var_ratio_median, row.log_var_ratio_worst
        )
        rows.append(
            [[Text(str(row.channels))], *cells, [Text("DRIFTED", "bold red") if row.drifted else Text("same", "green")]]
        )
        renamed = renamed or row.name_a != row.name_b
    layer_names = [
        Text(_shown(r.name_a if r.name_a == r.name_b else f"{r.name_a}{RENAMED}{r.name_b}")) for r in diff.layers
    ]
    legend = (
        "mean shift: |mean in A - mean in B| in B's standard deviations; |log var ratio|: |ln(variance in A / "
        f"variance in B)|; {DRIFT_LEGEND}; DRIFTED: beyond the thresholds"
    )
    if renamed:
        legend += "; a ~ b: the layer is named a in A and b in B"
    if rows:  # an export that folded every layer shares none with its source
        parts.append(Group(LayerTable(layer_names, [("ch", True), *DRIFT_COLUMNS], rows), Text(legend, style="dim")))
    drifted = sum(1 for row in diff.layers if row.drifted)
    summary = Text(
        f"{_plural(len(diff.layers), 'shared layer')}, {drifted} drifted, "
        f"{len(diff.only_in_a) + len(diff.only_in_b)} on one side only, {len(diff.channel_changes)} resized"
        f"{f', {len(diff.folded)} folded' if diff.folded else ''} -> "
    )
    summary.append("DIFFERENT" if diff.differs else "SAME", style="bold red" if diff.differs else "bold green")
    parts.append(summary)
    return Group(*parts)


def render_rules(rules: Sequence[RuleInfo]) -> RenderableType:
    """``bncheck rules``: one line per rule, its code, severity and what it finds."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column()
    for rule in rules:
        grid.add_row(Text(rule.code), Text(rule.severity.value, style=STYLE[rule.severity]), Text(rule.summary))
    return grid


def render_explain(rule: RuleInfo) -> RenderableType:
    """``bncheck explain``: a rule's summary, then its What / Why / Fix paragraphs, each after a blank line."""
    parts: list[RenderableType] = [Text(f"{rule.code} ({rule.severity.value}): {rule.summary}", style="bold")]
    for paragraph in rule.paragraphs:
        parts += [Text(), Text(paragraph)]
    return Group(*parts)
