"""The command line: parse, run the library, print, return an exit code. The only module that prints or exits.

Built on click rather than typer: typer 0.29 made pydantic a dependency and builds a TypeAdapter for every parameter
of the command it runs, which cost about 75 ms of a 0.3 s inspection (half of bncheck's own work on a 1.7 GB
checkpoint). The library is imported inside the commands, so ``--version`` and ``--help`` load neither numpy nor
the readers.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from bncheck import __version__

if TYPE_CHECKING:
    from bncheck.recompute import RecomputeRequest
    from bncheck.report import Report

EXIT_OK = 0
EXIT_FINDINGS = 1  # findings at or above --fail-on
EXIT_NOT_CHECKED = 2  # a path could not be read, or the command line was wrong; wins over EXIT_FINDINGS
EXIT_INTERRUPTED = 130

_OUTPUT = "Output"
_RULES = "Rules and settings"
_PANEL = "Recompute statistics on sample data (BN012)"
_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_F = TypeVar("_F", bound=Callable[..., Any])


class _Option(click.Option):
    """An option listed under a heading of the command's help."""

    def __init__(self, *args: Any, panel: str = "Options", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.panel = panel


class _Command(click.Command):
    """Help that groups the options under headings."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Option) and (record := param.get_help_record(ctx)) is not None:
                sections.setdefault(getattr(param, "panel", "Options"), []).append(record)
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)


def _option(*names: str, **kwargs: Any) -> Callable[[_F], _F]:
    return click.option(*names, cls=_Option, **kwargs)


def _options(*decorators: Callable[[_F], _F]) -> Callable[[_F], _F]:
    """Several option decorators as one, so that commands share their declarations."""

    def apply(function: _F) -> _F:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def _recompute_options(*, required: bool) -> Callable[[_F], _F]:
    """The options that say how to rerun a model; required by recalibrate, optional for inspect."""
    needs = " Required." if required else " Needs --data and torch."
    return _options(
        _option(
            "--model",
            panel=_PANEL,
            help="Model to recompute statistics with: package.module:factory, path/to/file.py:factory, or a "
            "TorchScript archive." + needs,
        ),
        _option(
            "--data",
            panel=_PANEL,
            help="Sample inputs: a .safetensors/.pt/.npy/.npz tensor file (first dimension = samples; several named "
            "tensors become keyword arguments) or module:callable / file.py:callable returning batches."
            + (" Required." if required else ""),
        ),
        _option("--model-kwargs", panel=_PANEL, help="JSON object of keyword arguments for the factory."),
        _option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=64,
            show_default=True,
            panel=_PANEL,
            help="Samples per batch.",
        ),
        _option("--max-samples", type=click.IntRange(min=1), panel=_PANEL, help="Use at most this many samples."),
        _option(
            "--estimator",
            type=click.Choice(["exact", "pytorch"]),
            default="exact",
            show_default=True,
            panel=_PANEL,
            help="exact: variance pooled over all samples (independent of batching); pytorch: mean of per-batch "
            "unbiased variances, as update_bn.",
        ),
        _option("--device", default="cpu", show_default=True, panel=_PANEL, help="cpu or cuda."),
        _option(
            "--source",
            panel=_PANEL,
            help="Entry of the checkpoint to load into the model (e.g. state_dict_ema); default: the one that fits.",
        ),
    )


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=True,
    epilog="Run 'bncheck COMMAND --help' for a command's options.",
)
@click.version_option(__version__, "--version", message="bncheck %(version)s", help="Print the version and exit.")
@click.pass_context
def cli(ctx: click.Context) -> int:
    """Find NaN, negative, never-updated or overflowed BatchNorm statistics before a checkpoint ships.

    Exit codes: 0 nothing at or above --fail-on, 1 findings at or above it, 2 a path could not be checked.
    """
    if ctx.invoked_subcommand is None:
        sys.stdout.write(ctx.get_help() + "\n")
    return EXIT_OK


def exit_code(report: Report) -> int:
    if report.unreadable:
        return EXIT_NOT_CHECKED
    return EXIT_FINDINGS if report.failed else EXIT_OK


def _request(
    *,
    model: str | None,
    data: str | None,
    model_kwargs: str | None,
    batch_size: int,
    max_samples: int | None,
    estimator: str,
    device: str,
    source: str | None,
    mode: str = "train",
    skip_layer: Sequence[str] = (),
) -> RecomputeRequest | None:
    if model is None and data is None:
        return None
    if model is None or data is None:
        raise click.UsageError("--model and --data go together")
    from bncheck.model_data import parse_kwargs
    from bncheck.recompute import RecomputeRequest

    return RecomputeRequest(
        model=model,
        data=data,
        model_kwargs=parse_kwargs(model_kwargs),
        batch_size=batch_size,
        max_samples=max_samples,
        mode="eval" if mode == "eval" else "train",
        estimator="pytorch" if estimator == "pytorch" else "exact",
        device=device,
        source=source,
        silence_layers=tuple(skip_layer),
    )


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A samples counter on stderr while the model runs, only when a person is watching."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("running the model: {task.completed} samples"),
        TimeElapsedColumn(),
        console=_console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("recompute", total=None)
        yield lambda samples: bar.advance(task, samples)


def _console(*, stderr: bool = False) -> Any:
    """A rich console, imported only when something is printed for people (JSON and SARIF never load rich)."""
    from rich.console import Console

    return Console(stderr=stderr)


def _fail(message: str) -> int:
    sys.stderr.write(f"bncheck: error: {message}\n")
    return EXIT_NOT_CHECKED


def _pretty() -> bool:
    """JSON is indented for a person at a terminal, one line for a pipe or a file (`jq .` indents it)."""
    return sys.stdout.isatty()


def _split(values: Sequence[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@cli.command("inspect", cls=_Command)
@click.argument(
    "paths",
    nargs=-1,
    required=True,
    metavar="PATH...",
    help="Checkpoint files (.pt .pth .bin .ckpt .safetensors, any name: the format is read from the bytes), "
    "shard indexes (*.index.json), directories to search recursively, or URLs (https://, s3://, gs://; needs "
    "bncheck[remote]).",
)
@_option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json", "sarif", "github"]),
    default="text",
    show_default=True,
    panel=_OUTPUT,
    help="text: the report; json: one JSON document (schema_version 1); sarif: SARIF 2.1.0 for code scanning; "
    "github: workflow-command annotations.",
)
@_option("--json", "json_output", is_flag=True, panel=_OUTPUT, help="Shorthand for --format json.")
@_option(
    "--fail-on",
    type=click.Choice(["error", "warning", "info"], case_sensitive=False),
    panel=_RULES,
    help="Lowest severity that makes the exit code 1 (default: error, or fail-on in the config).",
)
@_option(
    "--select",
    multiple=True,
    panel=_RULES,
    help="Report only these codes or prefixes (replaces the config's select); repeatable or comma-separated.",
)
@_option("--extend-select", multiple=True, panel=_RULES, help="Add codes or prefixes to the selection.")
@_option(
    "--ignore",
    multiple=True,
    panel=_RULES,
    help="Do not report these codes or prefixes (added to the config's ignore).",
)
@_option(
    "--config",
    type=click.Path(path_type=Path),
    panel=_RULES,
    help="Settings file (a pyproject.toml with [tool.bncheck], or a TOML file of the same keys); default: the "
    "nearest pyproject.toml with [tool.bncheck].",
)
@_option(
    "--exclude", multiple=True, panel=_RULES, help="Skip files found in directories that match this glob (repeatable)."
)
@_option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Inspect files in this many processes (same output, same exit code).",
)
@_option(
    "--unsafe-load",
    is_flag=True,
    help="For trusted files only: let torch unpickle what bncheck's own reader cannot read (this RUNS the pickle's "
    "code). Never the default.",
)
@_recompute_options(required=False)
@_option(
    "--mode",
    type=click.Choice(["train", "eval"]),
    default="train",
    show_default=True,
    panel=_PANEL,
    help="train: re-estimate the statistics as training would (BatchNorm layers use batch statistics); eval: "
    "measure what each layer receives at inference.",
)
@_option(
    "--skip-layer",
    multiple=True,
    panel=_PANEL,
    help="Silence BN012 for layers matching this glob (repeatable), e.g. for a deliberate frozen-BN fine-tune.",
)
def inspect_command(
    paths: tuple[str, ...],
    output_format: str,
    json_output: bool,
    fail_on: str | None,
    select: tuple[str, ...],
    extend_select: tuple[str, ...],
    ignore: tuple[str, ...],
    config: Path | None,
    exclude: tuple[str, ...],
    jobs: int,
    unsafe_load: bool,
    mode: str,
    skip_layer: tuple[str, ...],
    **recompute: Any,
) -> int:
    """Check every BatchNorm layer's running_mean, running_var and num_batches_tracked.

    Reads only the BatchNorm tensors, needs no torch to do it, and never runs pickle code.

    With --model and --data it also reruns the model on sample data and flags stale statistics (BN012).

    Exit codes: 0 clean, 1 findings at or above --fail-on, 2 a path could not be checked (2 wins).
    """
    from bncheck.api import inspect as inspect_paths
    from bncheck.config import load_settings, with_overrides
    from bncheck.errors import BncheckError
    from bncheck.report import Severity

    fmt = "json" if json_output else output_format
    try:
        request = _request(**recompute, mode=mode, skip_layer=skip_layer)
        if unsafe_load:
            from bncheck.loaders.unsafe import WARNING

            sys.stderr.write(f"bncheck: warning: {WARNING}\n")
        settings = with_overrides(
            load_settings(config),
            select=_split(select) or None,
            extend_select=_split(extend_select),
            ignore=_split(ignore),
            fail_on=Severity(fail_on.lower()) if fail_on else None,
            exclude=exclude,
            jobs=jobs,
            unsafe_load=unsafe_load,
        )
        with _progress(request is not None and fmt == "text") as progress:
            report = inspect_paths(list(paths), options=settings, recompute=request, progress=progress)
    except BncheckError as exc:
        return _fail(str(exc))
    _print_report(report, fmt)
    return exit_code(report)


def _print_report(report: Report, fmt: str) -> None:
    if fmt == "text":
        from bncheck.render.text import render_text

        _console().print(render_text(report))
        return
    if fmt == "json":
        from bncheck.render.json import render_json

        text = render_json(report, pretty=_pretty())
    elif fmt == "sarif":
        from bncheck.render.sarif import render_sarif

        text = render_sarif(report, pretty=_pretty())
    else:
        from bncheck.render.github import render_github

        text = render_github(report)
    sys.stdout.write(text + "\n")
    if fmt != "github":  # github lines already carry the errors
        for file in report.files:
            if file.error is not None:
                sys.stderr.write(f"bncheck: {file.path}: {file.error.message}\n")


@cli.command("rules", cls=_Command)
def rules_command() -> int:
    """List every rule: code, severity and what it finds."""
    from rich.table import Table
    from rich.text import Text

    from bncheck.api import rule_infos

    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column()
    for rule in rule_infos():
        style = _SEVERITY_STYLE[rule.severity.value]
        grid.add_row(rule.code, Text(rule.severity.value, style=style), Text(rule.summary))
    _console().print(grid)
    return EXIT_OK


@cli.command("explain", cls=_Command)
@click.argument("code", metavar="CODE", help="A rule code, e.g. BN007.")
def explain_command(code: str) -> int:
    """Print a rule's full text: what it checks, the real causes, and the fix."""
    from rich.text import Text

    from bncheck.api import rule_infos

    wanted = code.strip().upper()
    rule = next((r for r in rule_infos() if r.code == wanted), None)
    if rule is None:
        return _fail(f"unknown rule {code!r}; bncheck rules lists them")
    console = _console()
    console.print(Text(f"{rule.code} ({rule.severity.value}): {rule.summary}", style="bold"))
    for paragraph in rule.paragraphs:
        console.print()
        console.print(Text(paragraph))
    return EXIT_OK


@cli.command("diff", cls=_Command)
@click.argument("a", type=click.Path(path_type=Path), help="The reference checkpoint (e.g. the base model).")
@click.argument("b", type=click.Path(path_type=Path), help="The checkpoint compared with it.")
@_option("--json", "json_output", is_flag=True, help="Print one JSON document instead.")
@_option("--source-a", help="Entry of A to compare (e.g. state_dict_ema); default: its raw weights.")
@_option("--source-b", help="Entry of B to compare.")
@_option("--config", type=click.Path(path_type=Path), help="Settings file for the drift thresholds.")
def diff_command(
    a: Path, b: Path, json_output: bool, source_a: str | None, source_b: str | None, config: Path | None
) -> int:
    """Compare the BatchNorm statistics of two checkpoints layer by layer, across formats and prefixes.

    Reports layers only in one side, channel-count changes and each shared layer's drift (mean shift in std, log
    variance ratio). Exit codes: 0 the same, 1 beyond the drift thresholds, 2 a file could not be read.
    """
    from bncheck.config import load_settings
    from bncheck.diff import diff_checkpoints
    from bncheck.errors import BncheckError

    try:
        thresholds = load_settings(config).thresholds
    except BncheckError as exc:
        return _fail(str(exc))
    diff = diff_checkpoints(a, b, source_a=source_a, source_b=source_b, thresholds=thresholds)
    if json_output:
        from bncheck.render.json import render_diff_json

        sys.stdout.write(render_diff_json(diff, pretty=_pretty()) + "\n")
    else:
        from bncheck.render.text import render_diff_text

        _console().print(render_diff_text(diff))
    if diff.error is not None:
        sys.stderr.write(f"bncheck: {diff.error.message}\n")
        return EXIT_NOT_CHECKED
    return EXIT_FINDINGS if diff.differs else EXIT_OK


@cli.command("recalibrate", cls=_Command)
@click.argument(
    "checkpoint", type=click.Path(path_type=Path), metavar="CHECKPOINT", help="The checkpoint to recalibrate (a file)."
)
@_option(
    "-o", "--output", type=click.Path(path_type=Path), help="Where to write the recalibrated checkpoint. Required."
)
@_option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@_recompute_options(required=True)
def recalibrate_command(checkpoint: Path, output: Path | None, force: bool, **recompute: Any) -> int:
    """Write a copy of CHECKPOINT whose running statistics are recomputed on sample data; nothing else changes.

    Use it for weights trained or edited under batch statistics (track_running_stats flipped off, weight
    averaging, pruning). Do not use it on a fine-tune whose BatchNorm was frozen on purpose: its weights fit the
    stored statistics.

    The copy keeps the input's format and every other entry byte for byte, is written beside OUTPUT, checked,
    and only then renamed into place.
    """
    from rich.text import Text

    from bncheck.errors import BncheckError
    from bncheck.recalibrate import recalibrate as recalibrate_path
    from bncheck.render.text import render_text
    from bncheck.report import Report

    if recompute["model"] is None or recompute["data"] is None or output is None:
        raise click.UsageError("recalibrate needs --model, --data and -o/--output")
    try:
        request = _request(**recompute)
        assert request is not None
        with _progress(True) as progress:
            report = recalibrate_path(checkpoint, output, request, force=force, progress=progress)
    except BncheckError as exc:
        return _fail(str(exc))
    _console(stderr=True).print(Text(f"wrote {output}"))
    _console().print(render_text(Report(files=(report,), tool_version=__version__)))
    return exit_code(Report(files=(report,)))


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code. A usage error or an unexpected exception is one line on
    stderr and exit 2, never a traceback."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="bncheck", standalone_mode=False)
    except click.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return _fail(f"{exc.format_message().rstrip('.')}{where}")
    except click.ClickException as exc:
        return _fail(exc.format_message())
    except (KeyboardInterrupt, click.Abort):
        sys.stderr.write("bncheck: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # the last resort: a bug must not look like exit 1 ("findings")
        sys.stderr.write(f"bncheck: internal error: {type(exc).__name__}: {exc}\n")
        return EXIT_NOT_CHECKED
    return code if isinstance(code, int) else EXIT_OK


def main() -> NoReturn:
    """Console-script entry point.

    Once the output is flushed, the process ends without the interpreter's teardown (freeing every module and
    object one by one costs about 20 ms after numpy, a tenth of an inspection); nothing is left to clean up, since
    every file and worker pool was closed by its ``with`` block.
    """
    code = run()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # e.g. the reader of a pipe has gone: let the normal exit report it
        sys.exit(code)
    os._exit(code)
