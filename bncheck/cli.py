"""The command line: parse, run the library, print, exit. The only module that prints or exits."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from bncheck import __version__
from bncheck.api import RecomputeRequest, rule_infos
from bncheck.api import inspect as inspect_paths
from bncheck.api import recalibrate as recalibrate_path
from bncheck.config import load_settings, with_overrides
from bncheck.diff import diff_checkpoints
from bncheck.errors import BncheckError
from bncheck.render.github import render_github
from bncheck.render.json import render_diff_json, render_json
from bncheck.render.sarif import render_sarif
from bncheck.report import Report, Severity

EXIT_OK = 0
EXIT_FINDINGS = 1  # findings at or above --fail-on
EXIT_NOT_CHECKED = 2  # a path could not be read, or the command line was wrong; wins over EXIT_FINDINGS

app = typer.Typer(
    name="bncheck",
    help="Inspect and validate the BatchNorm running statistics stored in PyTorch and safetensors checkpoints.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bncheck {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Find NaN, negative, never-updated or overflowed BatchNorm statistics before a checkpoint ships.

    Exit codes: 0 nothing at or above --fail-on, 1 findings at or above it, 2 a path could not be checked.
    """


def exit_code(report: Report) -> int:
    if report.unreadable:
        return EXIT_NOT_CHECKED
    return EXIT_FINDINGS if report.failed else EXIT_OK


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model to recompute statistics with: package.module:factory, path/to/file.py:factory, or a "
        "TorchScript archive. Needs --data and torch.",
        rich_help_panel="Recompute statistics on sample data (BN012)",
    ),
]
DataOption = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Sample inputs: a .safetensors/.pt/.npy/.npz tensor file (first dimension = samples; several named "
        "tensors become keyword arguments) or module:callable / file.py:callable returning batches.",
        rich_help_panel="Recompute statistics on sample data (BN012)",
    ),
]
_PANEL = "Recompute statistics on sample data (BN012)"
ModelKwargsOption = Annotated[
    str | None,
    typer.Option("--model-kwargs", help="JSON object of keyword arguments for the factory.", rich_help_panel=_PANEL),
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Samples per batch.", rich_help_panel=_PANEL)]
MaxSamplesOption = Annotated[
    int | None, typer.Option("--max-samples", min=1, help="Use at most this many samples.", rich_help_panel=_PANEL)
]


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"
    SARIF = "sarif"
    GITHUB = "github"


RENDERERS = {OutputFormat.JSON: render_json, OutputFormat.SARIF: render_sarif, OutputFormat.GITHUB: render_github}
_OUTPUT = "Output"
_RULES = "Rules and settings"
_SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


class EstimatorChoice(StrEnum):
    EXACT = "exact"
    PYTORCH = "pytorch"


class ModeChoice(StrEnum):
    TRAIN = "train"
    EVAL = "eval"


EstimatorOption = Annotated[
    EstimatorChoice,
    typer.Option(
        "--estimator",
        help="exact: variance pooled over all samples (independent of batching); pytorch: mean of per-batch "
        "unbiased variances, as update_bn.",
        rich_help_panel=_PANEL,
    ),
]
DeviceOption = Annotated[str, typer.Option("--device", help="cpu or cuda.", rich_help_panel=_PANEL)]
SourceOption = Annotated[
    str | None,
    typer.Option(
        "--source",
        help="Entry of the checkpoint to load into the model (e.g. state_dict_ema); default: the one that fits.",
        rich_help_panel=_PANEL,
    ),
]


def _request(
    model: str | None,
    data: str | None,
    model_kwargs: str | None,
    batch_size: int,
    max_samples: int | None,
    mode: ModeChoice,
    estimator: EstimatorChoice,
    device: str,
    source: str | None,
    skip_layer: list[str] | None,
) -> RecomputeRequest | None:
    if model is None and data is None:
        return None
    if model is None or data is None:
        raise typer.BadParameter("--model and --data go together")
    from bncheck.model_data import parse_kwargs

    return RecomputeRequest(
        model=model,
        data=data,
        model_kwargs=parse_kwargs(model_kwargs),
        batch_size=batch_size,
        max_samples=max_samples,
        mode="eval" if mode is ModeChoice.EVAL else "train",
        estimator="pytorch" if estimator is EstimatorChoice.PYTORCH else "exact",
        device=device,
        source=source,
        silence_layers=tuple(skip_layer or ()),
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


def _fail(message: str) -> typer.Exit:
    sys.stderr.write(f"bncheck: error: {message}\n")
    return typer.Exit(EXIT_NOT_CHECKED)


@app.command("inspect")
def inspect_command(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Checkpoint files (.pt .pth .bin .ckpt .safetensors, any name: the format is read from the bytes), "
            "shard indexes (*.index.json), directories to search recursively, or URLs (https://, s3://, gs://; "
            "needs bncheck\\[remote]).",
            show_default=False,
            metavar="PATH",
        ),
    ],
    output_format: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            help="text: the report; json: one JSON document (schema_version 1); sarif: SARIF 2.1.0 for code "
            "scanning; github: workflow-command annotations.",
            rich_help_panel=_OUTPUT,
        ),
    ] = OutputFormat.TEXT,
    json_output: Annotated[
        bool, typer.Option("--json", help="Shorthand for --format json.", rich_help_panel=_OUTPUT)
    ] = False,
    fail_on: Annotated[
        Severity | None,
        typer.Option(
            "--fail-on",
            case_sensitive=False,
            help="Lowest severity that makes the exit code 1 (default: error, or fail-on in the config).",
            show_default=False,
            rich_help_panel=_RULES,
        ),
    ] = None,
    select: Annotated[
        list[str] | None,
        typer.Option(
            "--select",
            help="Report only these codes or prefixes (replaces the config's select); repeatable or comma-separated.",
            rich_help_panel=_RULES,
        ),
    ] = None,
    extend_select: Annotated[
        list[str] | None,
        typer.Option("--extend-select", help="Add codes or prefixes to the selection.", rich_help_panel=_RULES),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore",
            help="Do not report these codes or prefixes (added to the config's ignore).",
            rich_help_panel=_RULES,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Settings file (a pyproject.toml with \\[tool.bncheck], or a TOML file of the "
            "same keys); default: the nearest pyproject.toml with \\[tool.bncheck].",
            show_default=False,
            rich_help_panel=_RULES,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            help="Skip files found in directories that match this glob (repeatable).",
            rich_help_panel=_RULES,
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option("-j", "--jobs", min=1, help="Inspect files in this many processes (same output, same exit code)."),
    ] = 1,
    unsafe_load: Annotated[
        bool,
        typer.Option(
            "--unsafe-load",
            help="For trusted files only: let torch unpickle what bncheck's own reader cannot read (this RUNS the "
            "pickle's code). Never the default.",
        ),
    ] = False,
    model: ModelOption = None,
    data: DataOption = None,
    model_kwargs: ModelKwargsOption = None,
    batch_size: BatchSizeOption = 64,
    max_samples: MaxSamplesOption = None,
    mode: Annotated[
        ModeChoice,
        typer.Option(
            "--mode",
            help="train: re-estimate the statistics as training would (BatchNorm layers use batch statistics); "
            "eval: measure what each layer receives at inference.",
            rich_help_panel=_PANEL,
        ),
    ] = ModeChoice.TRAIN,
    estimator: EstimatorOption = EstimatorChoice.EXACT,
    device: DeviceOption = "cpu",
    source: SourceOption = None,
    skip_layer: Annotated[
        list[str] | None,
        typer.Option(
            "--skip-layer",
            help="Silence BN012 for layers matching this glob (repeatable), e.g. for a deliberate frozen-BN fine-tune.",
            rich_help_panel=_PANEL,
        ),
    ] = None,
) -> None:
    """Check every BatchNorm layer's running_mean, running_var and num_batches_tracked.

    Reads only the BatchNorm tensors, needs no torch to do it, and never runs pickle code.

    With --model and --data it also reruns the model on sample data and flags stale statistics (BN012).

    Exit codes: 0 clean, 1 findings at or above --fail-on, 2 a path could not be checked (2 wins).
    """
    request = _request(model, data, model_kwargs, batch_size, max_samples, mode, estimator, device, source, skip_layer)
    fmt = OutputFormat.JSON if json_output else output_format
    if unsafe_load:
        from bncheck.loaders.unsafe import WARNING

        sys.stderr.write(f"bncheck: warning: {WARNING}\n")
    try:
        settings = with_overrides(
            load_settings(config),
            select=_split(select) or None,
            extend_select=_split(extend_select),
            ignore=_split(ignore),
            fail_on=fail_on,
            exclude=exclude or (),
        )
        with _progress(request is not None and fmt is OutputFormat.TEXT) as progress:
            report = inspect_paths(
                paths,
                fail_on=settings.fail_on,
                thresholds=settings.thresholds,
                selection=settings.selection,
                exclude=settings.exclude,
                jobs=jobs,
                recompute=request,
                progress=progress,
                unsafe_load=unsafe_load,
            )
    except BncheckError as exc:
        raise _fail(str(exc)) from None
    if fmt is OutputFormat.TEXT:
        from bncheck.render.text import render_text

        _console().print(render_text(report))
    else:
        renderer = {
            OutputFormat.JSON: render_json,
            OutputFormat.SARIF: render_sarif,
            OutputFormat.GITHUB: render_github,
        }
        sys.stdout.write(renderer[fmt](report) + "\n")
        if fmt is not OutputFormat.GITHUB:  # github lines already carry the errors
            for file in report.files:
                if file.error is not None:
                    sys.stderr.write(f"bncheck: {file.path}: {file.error.message}\n")
    raise typer.Exit(exit_code(report))


def _split(values: list[str] | None) -> list[str]:
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


@app.command("rules")
def rules_command() -> None:
    """List every rule: code, severity and what it finds."""
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column()
    for rule in rule_infos():
        grid.add_row(rule.code, Text(rule.severity.value, style=_SEVERITY_STYLE[rule.severity]), Text(rule.summary))
    _console().print(grid)


@app.command("explain")
def explain_command(
    code: Annotated[str, typer.Argument(help="A rule code, e.g. BN007.", show_default=False)],
) -> None:
    """Print a rule's full text: what it checks, the real causes, and the fix."""
    wanted = code.strip().upper()
    rule = next((r for r in rule_infos() if r.code == wanted), None)
    if rule is None:
        raise _fail(f"unknown rule {code!r}; bncheck rules lists them")
    from rich.text import Text

    console = _console()
    console.print(Text(f"{rule.code} ({rule.severity.value}): {rule.summary}", style="bold"))
    for paragraph in rule.paragraphs:
        console.print()
        console.print(Text(paragraph))


@app.command("diff")
def diff_command(
    a: Annotated[
        Path, typer.Argument(help="The reference checkpoint (e.g. the base model).", show_default=False, metavar="A")
    ],
    b: Annotated[Path, typer.Argument(help="The checkpoint compared with it.", show_default=False, metavar="B")],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead.")] = False,
    source_a: Annotated[
        str | None,
        typer.Option("--source-a", help="Entry of A to compare (e.g. state_dict_ema); default: its raw weights."),
    ] = None,
    source_b: Annotated[str | None, typer.Option("--source-b", help="Entry of B to compare.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Settings file for the drift thresholds.")] = None,
) -> None:
    """Compare the BatchNorm statistics of two checkpoints layer by layer, across formats and prefixes.

    Reports layers only in one side, channel-count changes and each shared layer's drift (mean shift in std,
    log variance ratio). Exit codes: 0 the same, 1 beyond the drift thresholds, 2 a file could not be read.
    """
    try:
        thresholds = load_settings(config).thresholds
    except BncheckError as exc:
        raise _fail(str(exc)) from None
    diff = diff_checkpoints(a, b, source_a=source_a, source_b=source_b, thresholds=thresholds)
    if json_output:
        sys.stdout.write(render_diff_json(diff) + "\n")
    else:
        from bncheck.render.text import render_diff_text

        _console().print(render_diff_text(diff))
    if diff.error is not None:
        sys.stderr.write(f"bncheck: {diff.error.message}\n")
        raise typer.Exit(EXIT_NOT_CHECKED)
    raise typer.Exit(EXIT_FINDINGS if diff.differs else EXIT_OK)


@app.command("recalibrate")
def recalibrate_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="The checkpoint to recalibrate (a single file).", show_default=False, metavar="CHECKPOINT"),
    ],
    model: ModelOption = None,
    data: DataOption = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Where to write the recalibrated checkpoint.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    model_kwargs: ModelKwargsOption = None,
    batch_size: BatchSizeOption = 64,
    max_samples: MaxSamplesOption = None,
    estimator: EstimatorOption = EstimatorChoice.EXACT,
    device: DeviceOption = "cpu",
    source: SourceOption = None,
) -> None:
    """Write a copy of CHECKPOINT whose running statistics are recomputed on sample data; nothing else changes.

    Use it for weights trained or edited under batch statistics (track_running_stats flipped off, weight
    averaging, pruning). Do not use it on a fine-tune whose BatchNorm was frozen on purpose: its weights fit the
    stored statistics.

    The copy keeps the input's format and every other entry byte for byte, is written beside OUTPUT, checked,
    and only then renamed into place.
    """
    if model is None or data is None or output is None:
        raise typer.BadParameter("recalibrate needs --model, --data and -o/--output")
    request = _request(
        model, data, model_kwargs, batch_size, max_samples, ModeChoice.TRAIN, estimator, device, source, None
    )
    assert request is not None
    try:
        with _progress(True) as progress:
            report = recalibrate_path(checkpoint, output, request, force=force, progress=progress)
    except BncheckError as exc:
        raise _fail(str(exc)) from None
    from rich.text import Text

    from bncheck.render.text import render_text

    _console(stderr=True).print(Text(f"wrote {output}"))
    _console().print(render_text(Report(files=(report,), tool_version=__version__)))
    raise typer.Exit(exit_code(Report(files=(report,))))


def main() -> None:
    """Console-script entry point: any unexpected exception is one line on stderr and exit 2, never a traceback."""
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("bncheck: interrupted\n")
        sys.exit(130)
    except Exception as exc:  # the last resort: a bug must not look like exit 1 ("findings")
        sys.stderr.write(f"bncheck: internal error: {type(exc).__name__}: {exc}\n")
        sys.exit(EXIT_NOT_CHECKED)
