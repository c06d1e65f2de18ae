"""The command line: parse, run the library, print, exit. The only module that prints or exits."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bncheck import __version__
from bncheck.api import inspect as inspect_paths
from bncheck.render import render_json, render_text
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


@app.command("inspect")
def inspect_command(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoint files (.pt .pth .bin .ckpt .safetensors, any name: the format is read from the bytes), "
            "shard indexes (*.index.json), or directories to search recursively.",
            show_default=False,
            metavar="PATH",
        ),
    ],
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON document (schema_version 1) on stdout instead of the report."),
    ] = False,
    fail_on: Annotated[
        Severity,
        typer.Option(
            "--fail-on",
            case_sensitive=False,
            help="Lowest severity that makes the exit code 1.",
        ),
    ] = Severity.ERROR,
) -> None:
    """Check every BatchNorm layer's running_mean, running_var and num_batches_tracked.

    Reads only the BatchNorm tensors, never imports torch for zip or safetensors files, never runs pickle code.

    Exit codes: 0 clean, 1 findings at or above --fail-on, 2 a path could not be checked (2 wins).

    Examples:

      bncheck inspect model.pt

      bncheck inspect checkpoints/ --fail-on warning

      bncheck inspect model.safetensors.index.json --json > report.json
    """
    report = inspect_paths(paths, fail_on=fail_on)
    if json_output:
        sys.stdout.write(render_json(report) + "\n")
        for file in report.files:
            if file.error is not None:
                sys.stderr.write(f"bncheck: {file.path}: {file.error.message}\n")
    else:
        Console().print(render_text(report))
    raise typer.Exit(exit_code(report))


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
