"""The command line: parse, run the library, print, return an exit code. The only module that prints or exits.

Built on typer. The library is imported inside the commands, so ``--version`` and ``--help`` load neither numpy,
nor rich, nor the readers. Help is plain text (typer's markup mode ``None``): rich markup would silently delete
bracketed words such as ``bncheck[remote]``, and rendering help with rich would load it for every ``--help``. The
options are still grouped under the headings given by their ``rich_help_panel``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, get_args, get_origin

import typer
from typer._click.exceptions import BadParameter, ClickException, UsageError
from typer._coercion import RuntimeParam
from typer._param_types import choice_coercion_annotation, coerce_cli_choice
from typer.core import TyperCommand, TyperGroup
from typer.main import get_command

from bncheck import __version__
from bncheck.loaders import INDEX_SUFFIX, checkpoint_suffixes
from bncheck.render import DIFF_FORMATS, REPORT_FORMATS, Renderer, describe, escape_controls

if TYPE_CHECKING:
    from typer._click import Context, HelpFormatter

    from bncheck.recompute import RecomputeRequest
    from bncheck.report import Report

EXIT_OK = 0
EXIT_FINDINGS = 1  # findings at or above --fail-on
EXIT_NOT_CHECKED = 2  # a path could not be read, or the command line was wrong; wins over EXIT_FINDINGS
EXIT_INTERRUPTED = 130

# the registry's file suffixes, for the help of PATH (the registry module loads no reader, numpy or torch)
_FILE_SUFFIXES = " ".join(suffix for suffix in checkpoint_suffixes() if suffix != INDEX_SUFFIX)

_OUTPUT = "Output"
_RULES = "Rules and settings"
_OPTIONS = "Options"
_PANEL = "Recompute statistics on sample data (BN012)"
_VALIDATE_PANEL = "Validate before writing"

# --format's choices are the registry's keys. mypy sees plain strings; typer sees an Enum it can complete.
if TYPE_CHECKING:
    ReportFormat = str
    DiffFormat = str
else:
    ReportFormat = StrEnum("ReportFormat", {name: name for name in REPORT_FORMATS})
    DiffFormat = StrEnum("DiffFormat", {name: name for name in DIFF_FORMATS})


class _PlainParams:
    """Parameters converted without pydantic.

    typer 0.29 converts every parameter of the command it runs (help and completion flags included) through a
    pydantic TypeAdapter: importing pydantic and building ~20 adapters costs about 115 ms, 40% of inspecting a
    1.7 GB checkpoint. bncheck's parameters are strings, paths, bounded integers, choices, flags and lists of
    those, which :class:`_PlainCoercion` converts with typer's own choice matching. This sets typer's lazily built
    per-parameter converter (``_runtime_param``) before typer would build it; tests/test_cli.py checks that a
    whole inspection never imports pydantic and that bad values still give typer's one-line usage errors.
    """

    def get_params(self, ctx: Context) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            descriptor: Any = getattr(param, "type_descriptor", None)
            if getattr(param, "_runtime_param", True) is None and descriptor.file_annotation is None:
                param._runtime_param = _PlainCoercion(
                    parameter_info=descriptor.parameter_info, annotation=descriptor.annotation
                )
        return params


class _Group(_PlainParams, TyperGroup):
    """The top-level command, whose own parameters (--version, completion, help) skip pydantic too."""


class _Command(_PlainParams, TyperCommand):
    """Plain help, like click's, with the options grouped under the headings of their ``rich_help_panel``."""

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [_argument_name(param) for param in self.get_params(ctx) if _is_argument(param)]

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        arguments = [
            (_argument_name(p), getattr(p, "help", None) or "") for p in self.get_params(ctx) if _is_argument(p)
        ]
        if arguments:
            with formatter.section("Positional arguments"):
                formatter.write_dl(arguments)
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if not _is_argument(param) and (record := param.get_help_record(ctx)) is not None:
                sections.setdefault(getattr(param, "rich_help_panel", None) or _OPTIONS, []).append(record)
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)


@dataclass(frozen=True)
class _PlainCoercion(RuntimeParam):
    """A command-line value as the parameter's annotation asks: str, Path, int within min/max, a choice (Enum or
    Literal, matched as typer matches them), or a list of those."""

    def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
        annotation: Any = self.annotation
        if get_origin(annotation) is list:
            (item,) = get_args(annotation)
            return [self._one(item, element, param, ctx) for element in value]
        return self._one(annotation, value, param, ctx)

    def _one(self, annotation: Any, value: Any, param: Any, ctx: Any) -> Any:
        info = self.parameter_info
        choices = choice_coercion_annotation(annotation, info)
        if choices is not None:
            try:
                return coerce_cli_choice(value, choices=choices[0], case_sensitive=choices[1], ctx=ctx)
            except ValueError as exc:
                raise BadParameter(str(exc).rstrip("."), ctx=ctx, param=param) from None
        if annotation is int:
            try:
                number = int(value)
            except (TypeError, ValueError):
                raise BadParameter(f"{value!r} is not a valid integer", ctx=ctx, param=param) from None
            if (info.min is not None and number < info.min) or (info.max is not None and number > info.max):
                bounds = " and ".join(
                    text
                    for text in (
                        f"at least {info.min}" if info.min is not None else "",
                        f"at most {info.max}" if info.max is not None else "",
                    )
                    if text
                )
                raise BadParameter(f"{number} is not {bounds}", ctx=ctx, param=param)
            return number
        if annotation is bool:
            return bool(value)
        if annotation is Path:
            return Path(value)
        if annotation is str:
            return str(value)
        raise TypeError(f"no plain conversion for a parameter of type {annotation!r}")


def _is_argument(param: Any) -> bool:
    return getattr(param, "param_type_name", None) == "argument"


def _argument_name(param: Any) -> str:
    """As click shows it (PATH...), not as typer does ({PATH...}... <list[str]>)."""
    return str(param.metavar or param.name.upper())


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"bncheck {__version__}\n")
        raise typer.Exit(EXIT_OK)


app = typer.Typer(
    name="bncheck",
    cls=_Group,
    rich_markup_mode=None,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Run 'bncheck COMMAND --help' for a command's options.",
    pretty_exceptions_enable=False,
)


@app.callback(invoke_without_command=True)
def cli(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Find NaN, negative, never-updated or overflowed BatchNorm statistics before a checkpoint ships.

    Exit codes: 0 nothing at or above --fail-on, 1 findings at or above it, 2 a path could not be checked.
    """
    if ctx.invoked_subcommand is None:
        sys.stdout.write(ctx.get_help() + "\n")


def exit_code(report: Report) -> int:
    if report.unreadable:
        return EXIT_NOT_CHECKED
    return EXIT_FINDINGS if report.failed else EXIT_OK


# The options that say how to rerun a model, shared by inspect (optional) and recalibrate (required).
_MODEL_HELP = (
    "Model to recompute statistics with: package.module:factory, path/to/file.py:factory, or a TorchScript archive."
)
_DATA_HELP = (
    "Sample inputs: a .safetensors/.pt/.npy/.npz tensor file (first dimension = samples; several named tensors "
    "become keyword arguments) or module:callable / file.py:callable returning batches."
)
_Model = Annotated[str | None, typer.Option(help=_MODEL_HELP + " Needs --data and torch.", rich_help_panel=_PANEL)]
_RequiredModel = Annotated[str | None, typer.Option(help=_MODEL_HELP + " Required.", rich_help_panel=_PANEL)]
_Data = Annotated[str | None, typer.Option(help=_DATA_HELP, rich_help_panel=_PANEL)]
_RequiredData = Annotated[str | None, typer.Option(help=_DATA_HELP + " Required.", rich_help_panel=_PANEL)]
_ModelKwargs = Annotated[
    str | None, typer.Option(help="JSON object of keyword arguments for the factory.", rich_help_panel=_PANEL)
]
_BatchSize = Annotated[
    int,
    typer.Option(
        min=1,
        help="Samples per batch of a tensor file (a callable's loader sets its own). In train mode each BatchNorm "
        "normalises with its batch's statistics: below 16 deeper layers drift, and 1 cannot be used.",
        rich_help_panel=_PANEL,
    ),
]
# recompute.DEFAULT_MAX_SAMPLES (a test keeps them equal): --help must not import the recompute stack
_DEFAULT_MAX_SAMPLES = "4096"
_MaxSamples = Annotated[
    str,
    typer.Option(
        metavar="N|all",
        help="Use at most N samples, reading one batch at a time; 'all' reads the whole loader (an endless one "
        "never ends).",
        rich_help_panel=_PANEL,
    ),
]
_Inputs = Annotated[
    str | None,
    typer.Option(
        metavar="KEYS",
        help="Which elements of each tuple or dict batch are the model's inputs: indexes or keys, comma-separated "
        "(e.g. 0, or image, or input_ids,attention_mask). Default: the whole batch, or its first element when the "
        "model takes one input.",
        rich_help_panel=_PANEL,
    ),
]
_Estimator = Annotated[
    Literal["exact", "pytorch"],
    typer.Option(
        help="exact: variance pooled over all samples (independent of batching); pytorch: mean of per-batch "
        "unbiased variances, as update_bn.",
        rich_help_panel=_PANEL,
    ),
]
_Device = Annotated[str, typer.Option(help="cpu or cuda.", rich_help_panel=_PANEL)]
_Source = Annotated[
    str | None,
    typer.Option(
        help="Entry of the checkpoint to load into the model (e.g. state_dict_ema); default: the one that fits.",
        rich_help_panel=_PANEL,
    ),
]
_Backend = Annotated[
    str | None,
    typer.Option(
        metavar="gloo|nccl",
        help="Under torchrun (torchrun --nproc-per-node N -m bncheck ...): the process group's backend; default "
        "gloo on CPU, nccl on CUDA. Each rank runs its share of DATA (a tensor file is split by batches; a "
        "callable runs in every rank and can shard itself with a DistributedSampler), the ranks' moments are "
        "merged exactly, and rank 0 prints the report and writes the output.",
        rich_help_panel=_PANEL,
    ),
]


def _request(
    *,
    model: str | None,
    data: str | None,
    model_kwargs: str | None,
    batch_size: int,
    max_samples: str,
    inputs: str | None,
    estimator: str,
    device: str,
    source: str | None,
    mode: str = "train",
    skip_layer: Sequence[str] = (),
    backend: str | None = None,
) -> RecomputeRequest | None:
    if model is None and data is None:
        if backend is not None:
            raise UsageError("--backend needs --model and --data")
        return None
    if model is None or data is None:
        raise UsageError("--model and --data go together")
    from bncheck.distributed import from_environment
    from bncheck.model_data import parse_kwargs
    from bncheck.recompute import RecomputeRequest

    return RecomputeRequest(
        model=model,
        data=data,
        model_kwargs=parse_kwargs(model_kwargs),
        batch_size=batch_size,
        max_samples=_sample_budget(max_samples),
        inputs=tuple(key.strip() for key in (inputs or "").split(",") if key.strip()),
        mode="eval" if mode == "eval" else "train",
        estimator="pytorch" if estimator == "pytorch" else "exact",
        device=device,
        source=source,
        silence_layers=tuple(skip_layer),
        ranks=from_environment(backend=backend),
    )


def _quiet(request: RecomputeRequest | None) -> bool:
    """Under torchrun every rank but 0 prints nothing: rank 0 speaks for all (every rank has the same result)."""
    return request is not None and request.ranks is not None and not request.ranks.leader


def _sample_budget(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"--max-samples takes a positive number or 'all', not {text!r}")
    return value


class _ProgressBar:
    """The recompute progress on stderr: what is loading before the first batch, then samples against the total
    (with an estimate of the time left) when the data says how many there are."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.task = bar.add_task("loading the model and data", total=None)

    def start(self, total_samples: int | None) -> None:
        self.bar.reset(self.task, total=total_samples, description="loading the first batch")

    def advance(self, samples: int) -> None:
        self.bar.update(self.task, advance=samples, description="running the model")


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[_ProgressBar | None]:
    """A progress bar on stderr while the model runs, only when a person is watching."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import Progress

    with Progress(*progress_columns(), console=_console(stderr=True), transient=True) as bar:
        yield _ProgressBar(bar)


def progress_columns() -> tuple[Any, ...]:
    """What the progress bar shows: a spinner, the stage, the bar, samples done of the total, time, time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("samples"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def _console(*, stderr: bool = False) -> Any:
    """A rich console, imported only when something is printed for people (JSON and SARIF never load rich)."""
    from rich.console import Console

    return Console(stderr=stderr)


# trailing blanks, possibly followed by the codes that end a style when colour is forced
_TRAILING_BLANKS = re.compile(r"[ \t]+((?:\x1b\[[0-9;]*m)*)$", re.MULTILINE)


def _show(renderable: Any) -> None:
    """Print a rich renderable on stdout. Rich pads each line it lays out to the console's width (80 columns on a
    pipe or a file); at a terminal that is invisible, but in a log or a diff it is noise, so off a terminal the lines
    are written without their trailing blanks."""
    console = _console()
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    sys.stdout.write(_TRAILING_BLANKS.sub(r"\1", captured.get()))


def _say(line: str) -> None:
    """One line on stderr, its control characters escaped: it may quote a path or the bytes of a file."""
    sys.stderr.write(f"bncheck: {escape_controls(line)}\n")


def _fail(message: str) -> int:
    _say(f"error: {message}")
    return EXIT_NOT_CHECKED


def _pretty() -> bool:
    """JSON is indented for a person at a terminal, one line for a pipe or a file (`jq .` indents it)."""
    return sys.stdout.isatty()


def _split(values: Sequence[str] | None) -> list[str]:
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def _emit(renderer: Renderer, subject: Any) -> None:
    """Print ``subject`` in one format: a string as it is (JSON never goes through rich), a renderable on a console."""
    output = renderer.render(subject, pretty=_pretty())
    if renderer.rich:
        _show(output)
    else:
        sys.stdout.write(output + "\n")


@app.command("inspect", cls=_Command)
def inspect_command(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="PATH...",
            help=f"Checkpoint files ({_FILE_SUFFIXES}, any name: the format is read from the bytes), "
            f"shard indexes (*{INDEX_SUFFIX}), directories to search recursively, or URLs (https://, s3://, gs://; "
            "needs bncheck[remote]); an object-store URL ending in / is a prefix to search the same way.",
        ),
    ],
    output_format: Annotated[
        ReportFormat, typer.Option("--format", help=describe(REPORT_FORMATS), rich_help_panel=_OUTPUT)
    ] = "text",
    json_output: Annotated[
        bool, typer.Option("--json", help="Shorthand for --format json.", rich_help_panel=_OUTPUT)
    ] = False,
    fail_on: Annotated[
        Literal["error", "warning", "info"] | None,
        typer.Option(
            case_sensitive=False,
            help="Lowest severity that makes the exit code 1 (default: error, or fail-on in the config).",
            rich_help_panel=_RULES,
        ),
    ] = None,
    select: Annotated[
        list[str] | None,
        typer.Option(
            metavar="CODES",
            help="Report only these codes or prefixes (replaces the config's select); repeatable or comma-separated.",
            rich_help_panel=_RULES,
        ),
    ] = None,
    extend_select: Annotated[
        list[str] | None,
        typer.Option(metavar="CODES", help="Add codes or prefixes to the selection.", rich_help_panel=_RULES),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            metavar="CODES",
            help="Do not report these codes or prefixes (added to the config's ignore).",
            rich_help_panel=_RULES,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            metavar="PATH",
            help="Settings file (a pyproject.toml with [tool.bncheck], or a TOML file of the same keys); default: "
            "the nearest pyproject.toml with [tool.bncheck].",
            rich_help_panel=_RULES,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            metavar="GLOB",
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
    model: _Model = None,
    data: _Data = None,
    model_kwargs: _ModelKwargs = None,
    batch_size: _BatchSize = 64,
    max_samples: _MaxSamples = _DEFAULT_MAX_SAMPLES,
    inputs: _Inputs = None,
    estimator: _Estimator = "exact",
    device: _Device = "cpu",
    source: _Source = None,
    backend: _Backend = None,
    mode: Annotated[
        Literal["train", "eval"],
        typer.Option(
            help="train: re-estimate the statistics as training would (BatchNorm layers use batch statistics); "
            "eval: measure what each layer receives at inference.",
            rich_help_panel=_PANEL,
        ),
    ] = "train",
    skip_layer: Annotated[
        list[str] | None,
        typer.Option(
            metavar="GLOB",
            help="Silence BN012 for layers matching this glob (repeatable), e.g. for a deliberate frozen-BN fine-tune.",
            rich_help_panel=_PANEL,
        ),
    ] = None,
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

    renderer = REPORT_FORMATS["json" if json_output else str(output_format)]
    if any(not path for path in paths):  # an empty path would mean the working directory, silently
        raise UsageError("PATH must not be empty")
    request = None
    try:
        renderer.load()  # a format's missing extra (bncheck[html]) fails before the work, not after it
        request = _request(
            model=model,
            data=data,
            model_kwargs=model_kwargs,
            batch_size=batch_size,
            max_samples=max_samples,
            inputs=inputs,
            estimator=estimator,
            device=device,
            source=source,
            mode=mode,
            skip_layer=skip_layer or (),
            backend=backend,
        )
        if unsafe_load:
            from bncheck.loaders.unsafe import WARNING

            _say(f"warning: {WARNING}")
        settings = with_overrides(
            load_settings(config),
            select=_split(select) or None,
            extend_select=_split(extend_select),
            ignore=_split(ignore),
            fail_on=Severity(fail_on.lower()) if fail_on else None,
            exclude=exclude or (),
            jobs=jobs,
            unsafe_load=unsafe_load,
        )
        settings = replace(settings, channel_values=renderer.per_channel)
        # a bar on stderr for the formats people read (the HTML page goes to a file, so the bar is seen)
        shown = renderer.rich or renderer.per_channel
        with _progress(request is not None and shown and not _quiet(request)) as progress:
            report = inspect_paths(list(paths), options=settings, recompute=request, progress=progress)
    except BncheckError as exc:
        return EXIT_NOT_CHECKED if _quiet(request) else _fail(str(exc))
    if _quiet(request):
        return exit_code(report)
    _emit(renderer, report)
    if not renderer.names_unreadable:
        for file in report.files:
            for error in file.errors:
                _say(f"{file.path}: {error.message}")
    return exit_code(report)


@app.command("rules", cls=_Command)
def rules_command() -> int:
    """List every rule: code, severity and what it finds."""
    from bncheck.api import rule_infos
    from bncheck.render.text import render_rules

    _show(render_rules(rule_infos()))
    return EXIT_OK


@app.command("explain", cls=_Command)
def explain_command(code: Annotated[str, typer.Argument(metavar="CODE", help="A rule code, e.g. BN007.")]) -> int:
    """Print a rule's full text: what it checks, the real causes, and the fix."""
    from bncheck.api import rule_infos
    from bncheck.render.text import render_explain

    wanted = code.strip().upper()
    rule = next((r for r in rule_infos() if r.code == wanted), None)
    if rule is None:
        return _fail(f"unknown rule {code!r}; bncheck rules lists them")
    _show(render_explain(rule))
    return EXIT_OK


@app.command("diff", cls=_Command)
def diff_command(
    a: Annotated[Path, typer.Argument(metavar="A", help="The reference checkpoint (e.g. the base model).")],
    b: Annotated[Path, typer.Argument(metavar="B", help="The checkpoint compared with it.")],
    output_format: Annotated[DiffFormat, typer.Option("--format", help=describe(DIFF_FORMATS))] = "text",
    json_output: Annotated[bool, typer.Option("--json", help="Shorthand for --format json.")] = False,
    source_a: Annotated[
        str | None, typer.Option(help="Entry of A to compare (e.g. state_dict_ema); default: its raw weights.")
    ] = None,
    source_b: Annotated[str | None, typer.Option(help="Entry of B to compare.")] = None,
    config: Annotated[Path | None, typer.Option(metavar="PATH", help="Settings file for the drift thresholds.")] = None,
) -> int:
    """Compare the BatchNorm statistics of two checkpoints layer by layer, across formats and prefixes.

    Reports layers only in one side, channel-count changes and each shared layer's drift (mean shift in std, log
    variance ratio). Exit codes: 0 the same, 1 beyond the drift thresholds, 2 a file could not be read.
    """
    from bncheck.config import load_settings
    from bncheck.diff import diff_checkpoints
    from bncheck.errors import BncheckError

    renderer = DIFF_FORMATS["json" if json_output else str(output_format)]
    try:
        renderer.load()
        thresholds = load_settings(config).thresholds
    except BncheckError as exc:
        return _fail(str(exc))
    diff = diff_checkpoints(
        a, b, source_a=source_a, source_b=source_b, thresholds=thresholds, channel_values=renderer.per_channel
    )
    _emit(renderer, diff)
    if diff.error is not None:
        _say(diff.error.message)
        return EXIT_NOT_CHECKED
    return EXIT_FINDINGS if diff.differs else EXIT_OK


@app.command("recalibrate", cls=_Command)
def recalibrate_command(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="The checkpoint to recalibrate (a file).")],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", metavar="PATH", help="Where to write the recalibrated checkpoint. Required."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace OUTPUT if it exists (never a directory). It does not override a worse validation score: "
            "that is --allow-worse.",
        ),
    ] = False,
    model: _RequiredModel = None,
    data: _RequiredData = None,
    model_kwargs: _ModelKwargs = None,
    batch_size: _BatchSize = 64,
    max_samples: _MaxSamples = _DEFAULT_MAX_SAMPLES,
    inputs: _Inputs = None,
    estimator: _Estimator = "exact",
    device: _Device = "cpu",
    source: _Source = None,
    backend: _Backend = None,
    validate: Annotated[
        str | None,
        typer.Option(
            metavar="VDATA",
            help="Labelled data to score the model on with the stored and with the recomputed statistics (eval mode, "
            "same batches); nothing is written when recalibration scores worse. A tensor file of inputs and targets "
            "(.npz/.safetensors/.pt) or module:callable / file.py:callable returning (inputs, targets) tuples or "
            "dicts. --batch-size, --max-samples and --inputs apply to it too.",
            rich_help_panel=_VALIDATE_PANEL,
        ),
    ] = None,
    validate_target: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="The target in VDATA: a tensor name or dict key, or a tuple index. Default: the tensor or key "
            "named labels, label, targets, target or y; a tuple's last element.",
            rich_help_panel=_VALIDATE_PANEL,
        ),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            metavar="METRIC",
            help="accuracy (argmax of the output on axis 1 against class labels; higher is better), mse (mean "
            "squared error; lower is better), or module:fn / file.py:fn called once with all outputs and all "
            "targets, returning a number. Default: accuracy for integer targets, mse for floating ones.",
            rich_help_panel=_VALIDATE_PANEL,
        ),
    ] = None,
    metric_mode: Annotated[
        Literal["max", "min"] | None,
        typer.Option(
            help="Whether a metric callable's higher (max, the default) or lower (min) values are better.",
            rich_help_panel=_VALIDATE_PANEL,
        ),
    ] = None,
    allow_worse: Annotated[
        bool,
        typer.Option(
            "--allow-worse",
            help="Write the copy even when it scores worse than the stored statistics on VDATA.",
            rich_help_panel=_VALIDATE_PANEL,
        ),
    ] = False,
) -> int:
    """Write a copy of CHECKPOINT whose running statistics are recomputed on sample data; nothing else changes.

    Use it for weights trained or edited under batch statistics (track_running_stats flipped off, weight
    averaging, pruning). Do not use it on a fine-tune whose BatchNorm was frozen on purpose: its weights fit the
    stored statistics.

    When unsure, give --validate with labelled held-out data: the model is scored with both statistics and the
    copy is written only if recalibration does not make it worse.

    The copy keeps the input's format and every other entry byte for byte, is written beside OUTPUT, checked,
    and only then renamed into place.
    """
    from rich.text import Text

    from bncheck.errors import BncheckError
    from bncheck.recalibrate import recalibrate_validated
    from bncheck.report import Report

    if model is None or data is None or output is None:
        raise UsageError("recalibrate needs --model, --data and -o/--output")
    if validate is None:
        given = {
            "--validate-target": validate_target,
            "--metric": metric,
            "--metric-mode": metric_mode,
            "--allow-worse": allow_worse or None,
        }
        needless = [name for name, value in given.items() if value is not None]
        if needless:
            raise UsageError(f"{needless[0]} needs --validate")
    request = None
    try:
        request = _request(
            model=model,
            data=data,
            model_kwargs=model_kwargs,
            batch_size=batch_size,
            max_samples=max_samples,
            inputs=inputs,
            estimator=estimator,
            device=device,
            source=source,
            backend=backend,
        )
        assert request is not None
        validation_request = None
        if validate is not None:
            from bncheck.validate import ValidationRequest

            validation_request = ValidationRequest(
                data=validate, target=validate_target, metric=metric, mode=metric_mode
            )
        with _progress(not _quiet(request)) as progress:
            report, validation = recalibrate_validated(
                checkpoint,
                output,
                request,
                force=force,
                validate=validation_request,
                allow_worse=allow_worse,
                progress=progress,
            )
    except BncheckError as exc:
        return EXIT_NOT_CHECKED if _quiet(request) else _fail(str(exc))
    written = Report(files=(report,), tool_version=__version__)
    if _quiet(request):
        return exit_code(written)
    if validation is not None:
        _say(validation.summary())
    _console(stderr=True).print(Text(f"wrote {escape_controls(str(output))}"))
    _emit(REPORT_FORMATS["text"], written)
    return exit_code(written)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code. A usage error or an unexpected exception is one line on
    stderr and exit 2, never a traceback."""
    try:
        command = get_command(app)
        code = command.main(args=list(argv) if argv is not None else None, prog_name="bncheck", standalone_mode=False)
    except UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return _fail(f"{exc.format_message().rstrip('.')}{where}")
    except ClickException as exc:
        return _fail(exc.format_message())
    except (KeyboardInterrupt, typer.Abort):
        code = EXIT_INTERRUPTED
    except Exception as exc:  # the last resort: a bug must not look like exit 1 ("findings")
        _say(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_NOT_CHECKED
    if code == EXIT_INTERRUPTED:  # typer turns a KeyboardInterrupt inside a command into this exit code
        _say("interrupted")
    elif "bncheck.distributed" in sys.modules:  # the command ran under torchrun: wait for the other ranks
        from bncheck.distributed import leave

        sys.stdout.flush()
        sys.stderr.flush()
        leave()
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
