"""Compare the BatchNorm statistics of two checkpoints layer by layer (a fine-tune against its base, an fp16 export
against its fp32 source, EMA against raw weights), across formats and wrapper prefixes."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from bncheck.checks import Thresholds
from bncheck.drift import measure_drift
from bncheck.errors import BncheckError, NoSuchEntryError
from bncheck.read import LayerData, fewer_collections, read_checkpoint
from bncheck.report import DiffReport, FileError, LayerDiff
from bncheck.summary import packed

PathLike = str | os.PathLike[str]


def _layers(path: Path, source: str | None) -> tuple[str, str, dict[str, LayerData]]:
    checkpoint, layers = read_checkpoint(path)
    sources = list(dict.fromkeys(data.layer.source for data in layers))
    if source is None:
        raw = [s for s in sources if not any(data.layer.averaged for data in layers if data.layer.source == s)]
        source = (raw or sources or [""])[0]
    elif source not in sources:
        raise NoSuchEntryError(f"{path}: no BatchNorm layers under entry {source!r} (entries: {', '.join(sources)})")
    return checkpoint.format, source, {data.layer.name: data for data in layers if data.layer.source == source}


def _prefixes(a: list[str], b: list[str]) -> tuple[str, str]:
    """The wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``...) that make most layer names agree.

    Every dotted tail of every name is indexed once, so matching costs the number of name parts, not len(a) * len(b)
    (a 10,000-layer pair of checkpoints).
    """
    votes: Counter[tuple[str, str]] = Counter()
    b_set = set(b)
    tails_of_b = _tails(b)
    for name in a:
        if name in b_set:
            votes["", ""] += 1
        for prefix in tails_of_b.get(name, ()):
            votes["", prefix] += 1
    for tail, prefixes in _tails(a).items():
        if tail in b_set:
            for prefix in prefixes:
                votes[prefix, ""] += 1
    return votes.most_common(1)[0][0] if votes else ("", "")


def _tails(names: list[str]) -> dict[str, list[str]]:
    """Each proper dotted tail of each name -> the prefixes (ending in a dot) that precede it."""
    tails: dict[str, list[str]] = {}
    for name in names:
        at = name.find(".")
        while at != -1:
            tails.setdefault(name[at + 1 :], []).append(name[: at + 1])
            at = name.find(".", at + 1)
    return tails


@fewer_collections()
def diff_checkpoints(
    a: PathLike,
    b: PathLike,
    *,
    source_a: str | None = None,
    source_b: str | None = None,
    thresholds: Thresholds | None = None,
    channel_values: bool = False,
) -> DiffReport:
    """Match the layers of A and B and measure B's drift from A. Never raises for an unreadable file. With
    ``channel_values``, each drifted layer keeps both sides' statistics channel by channel."""
    from bncheck import __version__

    t = thresholds or Thresholds()
    path_a, path_b = Path(a), Path(b)
    try:
        format_a, src_a, layers_a = _layers(path_a, source_a)
        format_b, src_b, layers_b = _layers(path_b, source_b)
    except BncheckError as exc:
        return DiffReport(
            path_a=str(a), path_b=str(b), error=FileError(code=exc.code, message=str(exc)), tool_version=__version__
        )
    prefix_a, prefix_b = _prefixes(list(layers_a), list(layers_b))
    key_a = {name.removeprefix(prefix_a): name for name in layers_a}
    key_b = {name.removeprefix(prefix_b): name for name in layers_b}
    diffs: list[LayerDiff] = []
    changes: list[tuple[str, int | None, int | None]] = []
    for key, name_a in key_a.items():
        name_b = key_b.get(key)
        if name_b is None:
            continue
        da, db = layers_a[name_a], layers_b[name_b]
        mean_a, var_a = da.floats("running_mean"), da.floats("running_var")
        mean_b, var_b = db.floats("running_mean"), db.floats("running_var")
        if da.layer.num_features != db.layer.num_features:
            changes.append((name_a, da.layer.num_features, db.layer.num_features))
            continue
        if mean_a is None or var_a is None or mean_b is None or var_b is None or mean_a.shape != mean_b.shape:
            continue  # missing or malformed statistics: inspect reports them
        drift = measure_drift(mean_a, var_a, mean_b, var_b, samples=None, eps=t.drift.eps)
        reasons = tuple(drift.reasons(t.drift))
        kept = channel_values and bool(reasons)
        diffs.append(
            LayerDiff(
                name_a=name_a,
                name_b=name_b,
                channels=int(mean_a.size),
                mean_shift_median=drift.mean_shift_median,
                mean_shift_worst=drift.mean_shift_worst,
                log_var_ratio_median=drift.log_var_ratio_median,
                log_var_ratio_worst=drift.log_var_ratio_worst,
                drifted=bool(reasons),
                reasons=reasons,
                mean_a=packed(mean_a) if kept else None,
                var_a=packed(var_a) if kept else None,
                mean_b=packed(mean_b) if kept else None,
                var_b=packed(var_b) if kept else None,
            )
        )
    return DiffReport(
        path_a=str(a),
        path_b=str(b),
        source_a=src_a,
        source_b=src_b,
        format_a=format_a,
        format_b=format_b,
        only_in_a=tuple(name for key, name in key_a.items() if key not in key_b),
        only_in_b=tuple(name for key, name in key_b.items() if key not in key_a),
        channel_changes=tuple(changes),
        layers=tuple(diffs),
        tool_version=__version__,
    )
