"""The inspection pipeline, top to bottom: open -> discover -> read -> check -> (recompute) -> report."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bncheck.checks import RULES, LayerDrift, run_checks
from bncheck.config import Options
from bncheck.errors import BncheckError, CheckpointNotFoundError, UnsupportedFormatError
from bncheck.layer_config import model_configs
from bncheck.loaders import is_url, search_checkpoints
from bncheck.read import LayerData, fewer_collections, read_checkpoint, stack_layers
from bncheck.report import (
    CONFIG_FIELDS,
    ConfigInfo,
    FileError,
    FileReport,
    LayerConfig,
    RecomputeInfo,
    Report,
    RuleInfo,
)
from bncheck.summary import file_error, file_report, unreadable_report

if TYPE_CHECKING:  # recomputation, worker processes and torch are loaded only when asked for
    from bncheck.recompute import Progress, RecomputeRequest, Workload

PathLike = str | os.PathLike[str]


def inspect(
    paths: PathLike | Sequence[PathLike],
    *,
    options: Options | None = None,
    recompute: RecomputeRequest | None = None,
    progress: Progress | None = None,
) -> Report:
    """Inspect checkpoints (files, shard indexes, directories searched recursively, URLs) and return the report.

    Never raises for a bad file: an unreadable checkpoint is a FileReport whose ``error`` says why. ``options``
    holds the thresholds, the rule selection, the fail level, the exclude globs and the number of worker processes.
    With ``recompute``, the model is run over the sample data for every checkpoint (BN012), and ``progress`` hears
    how far each pass is; a model or data spec that cannot be loaded raises ModelError / DataError, since no file
    could be checked with it. A file the model does not fit keeps its static findings beside ``recompute_error``.
    """
    from bncheck import __version__

    options = options or Options()
    workload = _prepare(recompute, progress) if recompute is not None else None
    path_list = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    # files excluded only by a discovered config are still searched, for security findings alone
    searched = options.trusted.exclude if options.trusted is not None else options.exclude
    units: list[tuple[Path | str, bool] | FileReport] = []
    for path in path_list:
        if not os.fspath(path):  # Path("") is the working directory: never scan it by accident
            units.append(unreadable_report(path, CheckpointNotFoundError("empty path")))
            continue
        try:  # a remote folder that cannot be listed is one report, as a file that cannot be read
            found = search_checkpoints(path, exclude=searched, mark=options.exclude)
        except BncheckError as exc:
            units.append(unreadable_report(path, exc))
            continue
        if not found:
            where = "no checkpoint files under this prefix" if is_url(path) else "directory holds no checkpoint files"
            units.append(unreadable_report(path, UnsupportedFormatError(where)))
        units.extend(found)
    todo = [unit for unit in units if not isinstance(unit, FileReport)]
    if options.jobs > 1 and workload is None and len(todo) > 1:
        from concurrent.futures import ProcessPoolExecutor

        chunks = max(1, len(todo) // (options.jobs * 4))
        with ProcessPoolExecutor(max_workers=options.jobs) as pool:
            done = iter(pool.map(_inspect_job, todo, [options] * len(todo), chunksize=chunks))
    else:
        done = iter(_inspect_one(path, options, workload, excluded=excluded) for path, excluded in todo)
    files = [unit if isinstance(unit, FileReport) else next(done) for unit in units]
    return Report(
        files=tuple(file for file in files if file is not None),
        fail_on=options.fail_on,
        tool_version=__version__,
        rules=rule_infos(),
        config=config_info(options),
    )


def inspect_file(path: PathLike, *, options: Options | None = None) -> FileReport:
    """Inspect one checkpoint (a file or a shard index) without recomputation."""
    report = _inspect_one(path, options or Options(), None)
    assert report is not None  # only an excluded file is left out
    return report


def config_info(options: Options) -> ConfigInfo | None:
    """What the report says about the settings file: where it is, what it set, and what a discovered one changed
    or tried to drop."""
    if options.config is None:
        return None
    notes, overruled = options.config_notes(list(RULES))
    return ConfigInfo(
        path=str(options.config.path),
        discovered=options.config.discovered,
        settings=options.config.settings,
        notes=notes,
        overruled=overruled,
    )


def rule_infos() -> tuple[RuleInfo, ...]:
    """Every rule's description, in code order."""
    return tuple(rule.info for rule in RULES.values())


def _with_model_config(data: LayerData, config: LayerConfig | None) -> LayerData:
    """A layer whose file records no configuration (a state dict) takes the one of the --model module it was loaded
    into; what the file records wins, setting by setting."""
    if config is None:
        return data
    merged = {name: getattr(data.config, name) or getattr(config, name) for name in CONFIG_FIELDS}
    return dataclasses.replace(data, config=LayerConfig(**merged))


def _inspect_job(unit: tuple[Path | str, bool], options: Options) -> FileReport | None:
    """A worker process's unit of work (top level, so that it pickles)."""
    path, excluded = unit
    return _inspect_one(path, options, None, excluded=excluded)


def _prepare(request: RecomputeRequest, progress: Progress | None) -> Workload:
    from bncheck.recompute import prepare

    return prepare(request, progress)


@fewer_collections()
def _inspect_one(
    path: PathLike, options: Options, workload: Workload | None, *, excluded: bool = False
) -> FileReport | None:
    """One checkpoint's report. ``excluded``: only a discovered config's exclude globs matched it, so only its
    security findings count, and it is left out (None) when it has none."""
    try:
        checkpoint, layers = read_checkpoint(path, unsafe_load=options.unsafe_load)
    except BncheckError as exc:
        return None if excluded else unreadable_report(path, exc)
    drifts: list[LayerDrift] = []
    recomputed: RecomputeInfo | None = None
    recompute_error: FileError | None = None
    if workload is not None:
        from bncheck.recompute import measure_checkpoint

        try:
            drifts, recomputed, from_model = measure_checkpoint(
                checkpoint.root, layers, workload, options.thresholds, channel_values=options.channel_values
            )
            layers = [_with_model_config(data, from_model.get((data.layer.source, data.layer.name))) for data in layers]
        except BncheckError as exc:  # the model does not fit this file: its static findings still stand
            recompute_error = file_error(exc)
    # a Hugging Face config.json beside the weights: model-wide momentum and eps (a bad one is a note)
    configs, config_notes = ((), ()) if is_url(path) else model_configs(path)
    findings, notes = [], list(config_notes)
    stack = stack_layers(layers)
    checked = run_checks(
        layers, checkpoint.globals, drifts=drifts, model_configs=configs, thresholds=options.thresholds, stack=stack
    )
    for finding in checked:
        reported, note = options.verdict(finding.code, str(path), excluded=excluded)
        if reported:
            findings.append(finding)
        if note is not None and note not in notes:
            notes.append(note)
    if excluded and not findings:
        return None
    report = file_report(
        path,
        checkpoint,
        layers,
        findings,
        recomputed,
        recompute_error,
        model_configs=configs,
        channel_values=options.channel_values,
        stack=stack,
    )
    return dataclasses.replace(report, notes=report.notes + tuple(notes)) if notes else report
