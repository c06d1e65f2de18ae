"""The inspection pipeline, top to bottom: open -> discover -> read -> check -> report."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.checks import RULES, LayerData, LayerDrift, Thresholds, is_dangerous_global, read_layers, run_checks
from bncheck.config import RuleSelection
from bncheck.discover import StateDict, find_bn_layers, find_state_dicts
from bncheck.drift import measure_drift
from bncheck.errors import BncheckError, CorruptCheckpointError, UnsupportedDtypeError, UnsupportedFormatError
from bncheck.loaders import INDEX_SUFFIX, find_checkpoints, is_url, open_checkpoint
from bncheck.loaders.interface import Checkpoint
from bncheck.loaders.restricted_pickle import Placeholder
from bncheck.report import (
    FileError,
    FileReport,
    Finding,
    LayerDriftInfo,
    LayerInfo,
    RecomputeInfo,
    Report,
    RuleInfo,
    Severity,
    Summary,
)

if TYPE_CHECKING:  # recomputation, worker processes and torch are loaded only when asked for
    from bncheck.recompute import Estimator, Mode, RecomputeResult

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class RecomputeRequest:
    """What to run to recompute the statistics: a model spec, a data spec and how to batch them."""

    model: str
    data: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    max_samples: int | None = None
    mode: Mode = "train"
    estimator: Estimator = "exact"
    device: str = "cpu"
    source: str | None = None
    silence_layers: tuple[str, ...] = ()  # fnmatch patterns of layer names whose BN012 is silenced


@dataclass
class _Workload:
    """The model and batches of a RecomputeRequest, built once and shared by every checkpoint."""

    request: RecomputeRequest
    model: Any
    batches: list[Any]
    progress: Callable[[int], None] | None = None


def inspect(
    paths: PathLike | Sequence[PathLike],
    *,
    fail_on: Severity | str = Severity.ERROR,
    thresholds: Thresholds | None = None,
    selection: RuleSelection | None = None,
    exclude: Sequence[str] = (),
    jobs: int = 1,
    recompute: RecomputeRequest | None = None,
    progress: Callable[[int], None] | None = None,
    unsafe_load: bool = False,
) -> Report:
    """Inspect checkpoints (files, shard indexes, directories searched recursively) and return the report.

    Never raises for a bad file: an unreadable checkpoint is a FileReport whose ``error`` says why. ``selection``
    chooses which rule codes are reported (all by default), ``exclude`` drops files found in directories by glob,
    and ``jobs`` > 1 inspects files in that many processes (same order, same result). With ``recompute``, the model
    is run over the sample data for every checkpoint (BN012); a model or data spec that cannot be loaded raises
    ModelError / DataError, since no file could be checked with it. ``unsafe_load`` lets torch unpickle (running
    its code) the local files that bncheck's own reader cannot read or finds no BatchNorm layers in; never use it
    on files you do not trust.
    """
    from bncheck import __version__

    context = _Context(thresholds or Thresholds(), selection or RuleSelection(), unsafe_load)
    workload = _workload(recompute, progress) if recompute is not None else None
    path_list = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    units: list[Path | str | FileReport] = []
    for path in path_list:
        found = find_checkpoints(path, exclude=exclude)
        if not found:
            error = UnsupportedFormatError("directory holds no checkpoint files")
            units.append(FileReport(path=str(path), format=None, size_bytes=None, error=_error(error)))
        units.extend(found)
    todo = [unit for unit in units if not isinstance(unit, FileReport)]
    if jobs > 1 and workload is None and len(todo) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            done = iter(pool.map(_inspect_job, todo, [context] * len(todo), chunksize=max(1, len(todo) // (jobs * 4))))
    else:
        done = iter(_inspect_unit(unit, context, workload) for unit in todo)
    files = [unit if isinstance(unit, FileReport) else next(done) for unit in units]
    return Report(files=tuple(files), fail_on=Severity(fail_on), tool_version=__version__, rules=rule_infos())


def rule_infos() -> tuple[RuleInfo, ...]:
    """Every rule's description, in code order."""
    return tuple(rule.info for rule in RULES.values())


def inspect_file(
    path: PathLike, *, thresholds: Thresholds | None = None, selection: RuleSelection | None = None
) -> FileReport:
    """Inspect one checkpoint (a file or a shard index) without recomputation."""
    return _inspect_unit(Path(path), _Context(thresholds or Thresholds(), selection or RuleSelection()), None)


@dataclass(frozen=True)
class _Context:
    thresholds: Thresholds
    selection: RuleSelection
    unsafe_load: bool = False


def _inspect_job(path: Path | str, context: _Context) -> FileReport:
    """A worker process's unit of work (top level, so that it pickles)."""
    return _inspect_unit(path, context, None)


def _open(path: Path | str, unsafe_load: bool) -> Checkpoint:
    """bncheck's own reader; with ``unsafe_load``, torch's unpickler for what it cannot read."""
    try:
        checkpoint = open_checkpoint(path)
    except (CorruptCheckpointError, UnsupportedDtypeError):
        if not unsafe_load or is_url(path):
            raise
        return _open_with_torch(path)
    if unsafe_load and checkpoint.globals and not find_bn_layers(checkpoint.root) and not is_url(path):
        return _open_with_torch(path)
    return checkpoint


def _open_with_torch(path: Path | str) -> Checkpoint:
    from bncheck.loaders.unsafe import open_with_torch

    return open_with_torch(Path(path))


def _workload(request: RecomputeRequest, progress: Callable[[int], None] | None) -> _Workload:
    from bncheck.errors import ModelError
    from bncheck.model_data import load_batches, load_model

    batches = load_batches(request.data, batch_size=request.batch_size, max_samples=request.max_samples)
    model = load_model(request.model, kwargs=request.model_kwargs)
    try:
        model = model.to(request.device)
    except (RuntimeError, AssertionError, ValueError) as exc:  # no such device, or torch built without it
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot use device {request.device!r}: {reason}") from exc
    return _Workload(request, model, batches, progress)


def _inspect_unit(path: Path | str, context: _Context, workload: _Workload | None) -> FileReport:
    thresholds = context.thresholds
    try:
        checkpoint = _open(path, context.unsafe_load)
        layers = read_layers(find_bn_layers(checkpoint.root))
        recomputed = _recompute(checkpoint.root, layers, workload, thresholds) if workload else None
    except BncheckError as exc:
        return FileReport(path=str(path), format=None, size_bytes=_local_size(path), error=_error(exc))
    drifts, info = recomputed if recomputed else ((), None)
    findings = [
        finding
        for finding in run_checks(layers, checkpoint.globals, drifts=drifts, thresholds=thresholds)
        if context.selection.allows(finding.code, str(path))
    ]
    return FileReport(
        path=str(path),
        format=checkpoint.format,
        size_bytes=checkpoint.size_bytes,
        layers=tuple(_layer_info(data, findings) for data in layers),
        findings=tuple(findings),
        notes=checkpoint.notes
        + _object_notes(checkpoint.root, checkpoint.globals)
        + (() if layers else ("no BatchNorm layers",)),
        recompute=info,
    )


def _run_model(root: Any, workload: _Workload, mode: Mode) -> tuple[StateDict, str, RecomputeResult]:
    """Load the checkpoint's state dict that fits the model into it, then rerun the model on the sample data."""
    from bncheck.model_data import load_state_into
    from bncheck.recompute import recompute_statistics

    request = workload.request
    state, prefix = load_state_into(workload.model, find_state_dicts(root), source=request.source)
    result = recompute_statistics(
        workload.model, workload.batches, mode=mode, device=request.device, on_batch=workload.progress
    )
    return state, prefix, result


def _recompute(
    root: Any, layers: Sequence[LayerData], workload: _Workload, thresholds: Thresholds
) -> tuple[list[LayerDrift], RecomputeInfo]:
    """Load the checkpoint into the model, rerun it on the sample data, and measure each layer's drift."""
    from bncheck.recompute import VARIANCE_CONVENTIONS

    request = workload.request
    state, prefix, result = _run_model(root, workload, request.mode)
    by_name = {(data.layer.source, data.layer.name): data for data in layers}
    drifts: list[LayerDrift] = []
    rows: list[LayerDriftInfo] = []
    for module, stats in result.layers.items():
        data = by_name.get((state.source, prefix + module))
        stored_mean, stored_var = (data.floats("running_mean"), data.floats("running_var")) if data else (None, None)
        if data is None or stored_mean is None or stored_var is None or stored_mean.shape != stats.mean_pooled.shape:
            continue  # missing or malformed statistics are reported by the static rules
        new_mean, new_var = stats.for_estimator(request.estimator)
        other_var = stats.var_batch_average if request.estimator == "exact" else stats.var_pooled
        drift = measure_drift(
            stored_mean,
            stored_var,
            new_mean,
            new_var,
            samples=stats.samples,
            eps=thresholds.drift.eps,
            other_var=other_var,
        )
        silenced = any(fnmatch.fnmatchcase(data.layer.name, pattern) for pattern in request.silence_layers)
        drifts.append(LayerDrift(data.layer, module, drift, silenced))
        rows.append(
            LayerDriftInfo(
                name=data.layer.name,
                source=data.layer.source,
                module=module,
                samples=stats.samples,
                mean_shift_median=drift.mean_shift_median,
                mean_shift_worst=drift.mean_shift_worst,
                log_var_ratio_median=drift.log_var_ratio_median,
                log_var_ratio_worst=drift.log_var_ratio_worst,
                stale=bool(drift.reasons(thresholds.drift)),
                silenced=silenced,
            )
        )
    info = RecomputeInfo(
        model=request.model,
        data=request.data,
        mode=request.mode,
        estimator=request.estimator if result.pooled else "pytorch",
        variance_convention=VARIANCE_CONVENTIONS[request.estimator if result.pooled else "pytorch"]
        + ("" if result.pooled else " (a TorchScript model cannot be hooked, so only per-batch statistics exist)"),
        source=state.source,
        prefix=prefix,
        samples=result.samples,
        batches=result.batches_used,
        batches_skipped=result.batches_skipped,
        too_few_samples=any(d.drift.too_few_samples(thresholds.drift) for d in drifts),
        layers=tuple(rows),
    )
    return drifts, info


def _error(exc: BncheckError) -> FileError:
    # messages may quote bytes from the file; a report line must stay one line
    return FileError(code=exc.code, message=" ".join(str(exc).split()))


def _local_size(path: Path | str) -> int | None:
    if is_url(path):
        return None
    try:
        return Path(path).stat().st_size if Path(path).is_file() else None
    except OSError:
        return None


def _object_notes(root: Any, globals_named: Sequence[str]) -> tuple[str, ...]:
    """Say which pickled objects were recorded rather than built (not TorchScript's own classes)."""
    if isinstance(root, Placeholder) and not root.global_name.startswith("__torch__."):
        return (
            f"contains code objects of class {root.global_name} (a fully pickled model); its tensors were read "
            "without running it",
        )
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
    with np.errstate(over="ignore"):  # the mean of values near the float64 limit overflows to inf, as it should
        mean = float(finite.mean())
    return Summary(float(finite.min()), float(finite.max()), mean, nonfinite)


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


def recalibrate(
    checkpoint: PathLike,
    output: PathLike,
    request: RecomputeRequest,
    *,
    force: bool = False,
    thresholds: Thresholds | None = None,
    progress: Callable[[int], None] | None = None,
) -> FileReport:
    """Write ``output``: ``checkpoint`` with the running statistics recomputed in train mode on the sample data.

    Only the BatchNorm buffers of the state dict that fits the model change (``num_batches_tracked`` becomes the
    number of batches used); every other byte is kept. The copy is inspected before it is renamed into place.
    Returns the report of the written file; raises BncheckError when nothing could be written.
    """
    from bncheck.recalibrate import WriteError, patch_copy

    if is_url(checkpoint) or is_url(output):
        raise WriteError("recalibrate reads and writes local files; download the checkpoint first")
    source, target = Path(checkpoint), Path(output)
    if request.mode != "train":
        raise WriteError("recalibration writes train-mode statistics; --mode eval only measures")
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise WriteError("refusing to overwrite the input checkpoint; choose another output path")
    if target.exists() and not force:
        raise WriteError(f"{target} exists; pass --force to replace it")
    if source.is_dir() or source.name.endswith(INDEX_SUFFIX):
        raise WriteError("recalibrate writes single-file checkpoints; sharded checkpoints are not supported yet")
    t = thresholds or Thresholds()
    workload = _workload(request, progress)
    root = open_checkpoint(source).root
    state, prefix, result = _run_model(root, workload, "train")
    layers = {layer.name: layer for layer in find_bn_layers(root) if layer.source == state.source}
    patches = {}
    for module, stats in result.layers.items():
        layer = layers.get(prefix + module)
        if layer is None:
            continue
        mean, var = stats.for_estimator(request.estimator)
        new_values = {"running_mean": mean, "running_var": var, "num_batches_tracked": np.array(result.batches_used)}
        for name, values in new_values.items():
            if name in layer.tensors:
                patches[layer.tensors[name]] = values
    if not patches:
        raise WriteError("the model ran no BatchNorm layer that the checkpoint stores; nothing to recalibrate")

    context = _Context(t, RuleSelection())

    def verify(written: Path) -> None:
        report = _inspect_unit(written, context, None)
        if report.error is not None:
            raise WriteError(f"the recalibrated copy cannot be read back: {report.error.message}")
        errors = [f for f in report.findings if f.severity is Severity.ERROR and f.code != "BN101"]
        if errors:
            raise WriteError(f"the recalibrated copy fails inspection: {errors[0].code} {errors[0].message}")

    patch_copy(source, target, patches, verify=verify)
    return _inspect_unit(target, context, None)
