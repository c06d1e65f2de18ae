"""The inspection pipeline, top to bottom: open -> discover -> read -> check -> report."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bncheck.checks import LayerData, Thresholds, is_dangerous_global, read_layer, run_checks
from bncheck.discover import find_bn_layers
from bncheck.errors import BncheckError, UnsupportedFormatError
from bncheck.loaders import INDEX_SUFFIX, find_checkpoints, open_checkpoint, shards_named_by
from bncheck.report import FileError, FileReport, Finding, LayerInfo, Report, Severity, Summary

PathLike = str | os.PathLike[str]


def inspect(
    paths: PathLike | Sequence[PathLike],
    *,
    fail_on: Severity | str = Severity.ERROR,
    thresholds: Thresholds | None = None,
) -> Report:
    """Inspect checkpoints (files, shard indexes, directories searched recursively) and return the report.

    Never raises for a bad file: an unreadable checkpoint is a FileReport whose ``error`` says why.
    """
    from bncheck import __version__

    path_list = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    files: list[FileReport] = []
    for path in path_list:
        units = find_checkpoints(path)
        if not units:
            error = UnsupportedFormatError("directory holds no checkpoint files")
            files.append(FileReport(path=str(path), format=None, size_bytes=None, error=_error(error)))
        files.extend(inspect_file(unit, thresholds=thresholds) for unit in units)
    return Report(files=tuple(files), fail_on=Severity(fail_on), tool_version=__version__)


def inspect_file(path: PathLike, *, thresholds: Thresholds | None = None) -> FileReport:
    """Inspect one checkpoint (a file or a shard index)."""
    path = Path(path)
    size = _size(path)
    try:
        checkpoint = open_checkpoint(path)
        layers = [read_layer(layer) for layer in find_bn_layers(checkpoint.root)]
    except BncheckError as exc:
        return FileReport(path=str(path), format=None, size_bytes=size, error=_error(exc))
    findings = run_checks(layers, checkpoint.globals, thresholds=thresholds)
    return FileReport(
        path=str(path),
        format=checkpoint.format,
        size_bytes=size,
        layers=tuple(_layer_info(data, findings) for data in layers),
        findings=tuple(findings),
        notes=checkpoint.notes + _object_notes(checkpoint.globals) + (() if layers else ("no BatchNorm layers",)),
    )


def _error(exc: BncheckError) -> FileError:
    return FileError(code=exc.code, message=str(exc))


def _size(path: Path) -> int | None:
    try:
        if path.name.endswith(INDEX_SUFFIX):
            return sum(shard.stat().st_size for shard in shards_named_by(path) if shard.is_file())
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _object_notes(globals_named: Sequence[str]) -> tuple[str, ...]:
    """Say which pickled objects were recorded rather than built (not TorchScript's own classes)."""
    objects = [g for g in globals_named if not g.startswith("__torch__.") and not is_dangerous_global(g)]
    if not objects:
        return ()
    shown = ", ".join(objects[:4]) + (f" and {len(objects) - 4} more" if len(objects) > 4 else "")
    return (f"holds pickled objects of {shown}: read without running them",)


def _summary(values: np.ndarray | None) -> Summary | None:
    if values is None:
        return None
    finite = values[np.isfinite(values)]
    nonfinite = int(values.size - finite.size)
    if finite.size == 0:
        return Summary(None, None, None, nonfinite)
    return Summary(float(finite.min()), float(finite.max()), float(finite.mean()), nonfinite)


def _layer_info(data: LayerData, findings: Sequence[Finding]) -> LayerInfo:
    layer = data.layer
    codes = sorted({f.code for f in findings if f.layer == layer.name and f.source == layer.source})
    return LayerInfo(
        name=layer.name,
        source=layer.source,
        averaged=layer.averaged,
        kind=layer.kind,
        kind_inferred=layer.kind_inferred,
        num_features=layer.num_features,
        dtype=data.dtype("running_var") or data.dtype("running_mean"),
        num_batches_tracked=data.count(),
        running_mean=_summary(data.floats("running_mean")),
        running_var=_summary(data.floats("running_var")),
        codes=tuple(codes),
    )
