"""What a file's report says besides its findings: its notes and one summary row per layer, built in one place."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bncheck.discover import common_prefix
from bncheck.errors import BncheckError
from bncheck.loaders import is_url
from bncheck.loaders.interface import Checkpoint
from bncheck.loaders.restricted_pickle import Placeholder
from bncheck.pickle_globals import Risk, grade_global
from bncheck.read import LayerData, LayerStack, stack_layers
from bncheck.report import (
    ChannelValues,
    FileError,
    FileReport,
    Finding,
    LayerInfo,
    ModelConfig,
    RecomputeInfo,
    Summary,
)


def file_report(
    path: os.PathLike[str] | str,
    checkpoint: Checkpoint,
    layers: Sequence[LayerData],
    findings: Sequence[Finding],
    recompute: RecomputeInfo | None = None,
    recompute_error: FileError | None = None,
    *,
    model_configs: Sequence[ModelConfig] = (),
    channel_values: bool = False,
    stack: LayerStack | None = None,
) -> FileReport:
    """The report of a file that could be read; with ``channel_values``, each layer keeps its statistics channel by
    channel. ``stack`` is ``stack_layers(layers)`` when the caller has it already."""
    stack = stack if stack is not None else stack_layers(layers)
    codes: dict[tuple[str | None, str | None], set[str]] = {}
    for finding in findings:
        codes.setdefault((finding.layer, finding.source), set()).add(finding.code)
    means, variances = summaries(layers, stack, "running_mean"), summaries(layers, stack, "running_var")
    return FileReport(
        path=str(path),
        format=checkpoint.format,
        size_bytes=checkpoint.size_bytes,
        layers=tuple(
            layer_info(
                data,
                tuple(sorted(codes.get((data.layer.name, data.layer.source), ()))),
                mean,
                var,
                count,
                channel_values=channel_values,
            )
            for data, mean, var, count in zip(layers, means, variances, stack.counts, strict=True)
        ),
        findings=tuple(findings),
        notes=checkpoint.notes
        + _object_notes(checkpoint)
        + _frozen_note(layers)
        + (() if layers else ("no BatchNorm layers",)),
        recompute=recompute,
        recompute_error=recompute_error,
        model_configs=tuple(model_configs),
    )


def file_error(exc: BncheckError) -> FileError:
    """A failure as the report carries it: its code and why, in one line (it may quote bytes of the file)."""
    return FileError(code=exc.code, message=_one_line(str(exc)))


def unreadable_report(path: os.PathLike[str] | str, exc: BncheckError) -> FileReport:
    """The report of a path that could not be checked: why, in one line (messages may quote bytes of the file)."""
    return FileReport(
        path=str(path),
        format=None,
        size_bytes=_local_size(path),
        error=file_error(exc),
    )


# A reason is a sentence; a longer one quotes too much of the file (a tensor name can be megabytes long).
MAX_MESSAGE_CHARS = 500


def _one_line(text: str) -> str:
    line = " ".join(text[: MAX_MESSAGE_CHARS * 2].split())
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 3] + "..."


def layer_info(
    data: LayerData,
    codes: tuple[str, ...],
    mean_summary: Summary | None,
    var_summary: Summary | None,
    count: int | None,
    *,
    channel_values: bool = False,
) -> LayerInfo:
    """A layer's summary row, given the codes reported for it, its statistics' summaries and its
    num_batches_tracked (:meth:`LayerData.count`)."""
    layer = data.layer
    return LayerInfo(
        name=layer.name,
        source=layer.source,
        averaged=layer.averaged,
        kind=layer.kind,
        kind_inferred=layer.kind_inferred,
        num_features=layer.num_features,
        dtype=data.dtype("running_var") or data.dtype("running_mean"),
        num_batches_tracked=count,
        running_mean=mean_summary,
        running_var=var_summary,
        codes=codes,
        configuration=data.config,
        mean_by_channel=packed(data.floats("running_mean")) if channel_values else None,
        var_by_channel=packed(data.floats("running_var")) if channel_values else None,
    )


def packed(values: np.ndarray | None) -> ChannelValues | None:
    """Values (of any shape: a malformed statistic is drawn as it is stored, flattened) as the report keeps them."""
    return None if values is None else ChannelValues(np.ascontiguousarray(values, dtype=np.float64).tobytes())


def summaries(layers: Sequence[LayerData], stack: LayerStack, name: str) -> list[Summary | None]:
    """Each layer's summary of its floating tensor ``name`` (None where it has none), reduced along the rows of the
    stacked matrices; a layer whose values are not all finite, or are malformed, is summarised on its own."""
    result: list[Summary | None] = [None] * len(layers)
    stacked = stack.tensors[name]
    alone = stacked.irregular.tolist()
    for rows, values in stacked.groups:
        if not values.shape[1]:  # no channels: nothing to reduce
            alone += rows.tolist()
            continue
        finite = np.isfinite(values).all(axis=1)
        alone += rows[~finite].tolist()
        whole = values if finite.all() else values[finite]  # copied only when some layer is set aside
        with np.errstate(over="ignore"):  # as _summary: a mean near the float64 limit overflows to inf
            means = whole.mean(axis=1)
        for i, low, high, mean in zip(
            rows[finite].tolist(), whole.min(axis=1).tolist(), whole.max(axis=1).tolist(), means.tolist(), strict=True
        ):
            result[i] = Summary(min=low, max=high, mean=mean, nonfinite=0)
    for i in alone:
        result[i] = _summary(layers[i].floats(name))
    return result


def _summary(values: np.ndarray | None) -> Summary | None:
    if values is None:
        return None
    finite = values[np.isfinite(values)]
    nonfinite = int(values.size - finite.size)
    if finite.size == 0:
        return Summary(min=None, max=None, mean=None, nonfinite=nonfinite)
    with np.errstate(over="ignore"):  # the mean of values near the float64 limit overflows to inf, as it should
        mean = float(finite.mean())
    return Summary(min=float(finite.min()), max=float(finite.max()), mean=mean, nonfinite=nonfinite)


def _object_notes(checkpoint: Checkpoint) -> tuple[str, ...]:
    """Say which pickled objects were recorded rather than built (not TorchScript's own classes)."""
    root = checkpoint.root
    if isinstance(root, Placeholder) and not root.global_name.startswith("__torch__."):
        return (
            f"contains code objects of class {root.global_name} (a fully pickled model); its tensors were read "
            "without running it",
        )
    # Unknown and code-executing globals are findings (BN102, BN101); the note names the known-harmless ones.
    objects = [g for g in checkpoint.globals if not g.startswith("__torch__.") and grade_global(g) is Risk.SAFE]
    if not objects:
        return ()
    shown = ", ".join(objects[:4]) + (f" and {len(objects) - 4} more" if len(objects) > 4 else "")
    return (f"holds pickled objects of {shown} (known to be harmless): read without running them",)


def _frozen_note(layers: Sequence[LayerData]) -> tuple[str, ...]:
    """One note for every layer taken for a FrozenBatchNorm2d by its buffers (not by its class), instead of one
    BN010 per layer: where they are, why they were, and what it means if they were not."""
    groups: dict[str, list[str]] = {}
    evidence = ""
    for data in layers:
        if data.layer.frozen not in (None, "class"):
            groups.setdefault(data.layer.source, []).append(data.layer.name)
            evidence = str(data.layer.frozen)
    if not groups:
        return ()
    where = ", ".join(
        f"{len(names)} under {common_prefix(names) or '(root)'}" + (f" of {source!r}" if source else "")
        for source, names in groups.items()
    )
    why = (
        "while other BatchNorm layers of the file carry the counter"
        if evidence == "counters elsewhere"
        else "and are every BatchNorm layer of a branch that is not the whole model (a frozen backbone)"
    )
    return (
        f"BatchNorm layers without num_batches_tracked ({where}) hold exactly FrozenBatchNorm2d's buffers (weight, "
        f"bias, running_mean, running_var) {why}: taken for FrozenBatchNorm2d (torchvision, detectron2), which "
        "keeps no counter by design, so BN010 is not reported for them; if they are trainable BatchNorm2d layers, "
        "their counters were stripped",
    )


def _local_size(path: os.PathLike[str] | str) -> int | None:
    if is_url(path):
        return None
    try:
        return Path(path).stat().st_size if Path(path).is_file() else None
    except OSError:
        return None
