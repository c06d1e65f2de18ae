"""Compare the BatchNorm statistics of two checkpoints layer by layer (a fine-tune against its base, an fp16 export
against its fp32 source, EMA against raw weights), across formats and wrapper prefixes."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from bncheck.checks import Thresholds
from bncheck.discover import feeding_layer, find_state_dicts
from bncheck.drift import Drift, measure_drift, measure_stored_drifts
from bncheck.errors import BncheckError, NoSuchEntryError
from bncheck.loaders.dtypes import FLOATING, ITEMSIZE
from bncheck.loaders.interface import TensorRef
from bncheck.read import LayerData, fewer_collections, read_checkpoint
from bncheck.report import DiffReport, FileError, FoldedLayer, LayerDiff
from bncheck.summary import packed

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class _Side:
    """One checkpoint of the comparison: its format, the entry compared, its BatchNorm layers there, and its object
    tree (where the tensors of a folded layer are looked for)."""

    format: str
    source: str
    layers: dict[str, LayerData]
    root: Any
    size: int  # bytes, with shards and external data

    @cached_property
    def tensors(self) -> Mapping[str, TensorRef]:
        """Every tensor of the compared entry, by its state_dict name; found only when a layer is missing from the
        other side (flattening a 4,000-layer file again costs a tenth of reading it)."""
        containers = [c for c in find_state_dicts(self.root) if c.source == self.source]
        return containers[0].tensors if containers else {}


def _side(path: Path, source: str | None) -> _Side:
    checkpoint, layers = read_checkpoint(path)
    sources = list(dict.fromkeys(data.layer.source for data in layers))
    if source is None:
        raw = [s for s in sources if not any(data.layer.averaged for data in layers if data.layer.source == s)]
        source = (raw or sources or [""])[0]
    elif source not in sources:
        raise NoSuchEntryError(f"{path}: no BatchNorm layers under entry {source!r} (entries: {', '.join(sources)})")
    return _Side(
        checkpoint.format,
        source,
        {data.layer.name: data for data in layers if data.layer.source == source},
        checkpoint.root,
        checkpoint.size_bytes or 0,
    )


# How far (relative to its largest magnitude) a tensor of B may be from a fold computed from A and still be that fold,
# by B's dtype: exporters fold in float32 and may round the result to 16 bits; bncheck folds in float64.
FOLD_TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2}
FOLD_TOLERANCE_DEFAULT = 1e-5
_HEAD = 16  # elements compared before a candidate tensor is compared whole


class _Budget:
    """What the fold search may still spend, in bytes read or compared: twice the two files' sizes, room to read
    every tensor of both twice over. A crafted pair (thousands of tensor records viewing one large storage,
    thousands of layers against thousands of same-shape candidates) would otherwise read or compare without end."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.spent_out = False

    def take(self, cost: int) -> bool:
        if cost > self.left:
            self.spent_out = True
            return False
        self.left -= cost
        return True


def _folded(names: list[str], a: _Side, b: _Side, default_eps: float, budget: _Budget) -> list[FoldedLayer]:
    """The layers of ``names`` (in A, not in B) whose statistics B holds folded into the layer feeding them.

    Found by value, not by name (exporters rename folded weights, ``onnx::Conv_25``): A's feeding weight and bias
    are folded with the layer's statistics in float64, and B's tensors of the same shape are compared with the
    result (B's same-named tensor first). A fold that leaves the weight unchanged within B's rounding (statistics
    that scale by 1) cannot be told from a dropped layer, and is not claimed. The search stops where ``budget``
    runs out; the layers it did not reach stay only in A.
    """
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, ref in b.tensors.items():
        if ref.dtype in FLOATING and ref.no_data is None:
            by_shape.setdefault(ref.shape, []).append(name)
    heads: dict[str, np.ndarray | None] = {}

    def matching(expected: np.ndarray, preferred: str) -> str | None:
        candidates = sorted(by_shape.get(expected.shape, []), key=lambda name: name != preferred)
        scale = float(np.max(np.abs(expected), initial=0.0))
        for name in candidates:
            tolerance = FOLD_TOLERANCE.get(b.tensors[name].dtype, FOLD_TOLERANCE_DEFAULT) * scale
            if name not in heads:
                heads[name] = _float64(b.tensors[name], budget, _HEAD)
            head = heads[name]
            if not budget.take(_HEAD * 8):
                return None
            if head is None or not np.all(np.abs(head - expected.ravel()[:_HEAD]) <= tolerance):
                continue
            values = _float64(b.tensors[name], budget)
            if values is not None and np.all(np.abs(values - expected) <= tolerance):
                return name
        return None

    found = []
    for name in names:
        if budget.spent_out:
            break
        data = a.layers[name]
        mean, var = data.floats("running_mean"), data.floats("running_var")
        if mean is None or var is None or mean.ndim != 1 or mean.shape != var.shape:
            continue
        feeder = feeding_layer(name, a.tensors, mean.size)
        weight = _float64(a.tensors[f"{feeder}.weight"], budget) if feeder is not None else None
        if feeder is None or weight is None:
            continue
        gamma = data.floats("weight")
        beta = data.floats("bias")
        bias = _float64(a.tensors[f"{feeder}.bias"], budget) if f"{feeder}.bias" in a.tensors else None
        if any(values is not None and values.shape != mean.shape for values in (gamma, beta, bias)):
            continue  # a malformed affine parameter or feeding bias (inspect reports it): nothing to fold
        recorded = data.config.eps.value if data.config.eps is not None else None
        eps = float(recorded) if isinstance(recorded, float) else default_eps  # the layer's own, else torch's default
        with np.errstate(all="ignore"):
            scale = (gamma if gamma is not None else 1.0) / np.sqrt(var + eps)
            folded_weight = weight * scale.reshape(-1, *[1] * (weight.ndim - 1))
            folded_bias = (beta if beta is not None else 0.0) + ((bias if bias is not None else 0.0) - mean) * scale
        tolerance = FOLD_TOLERANCE_DEFAULT * float(np.max(np.abs(weight), initial=0.0))
        if not np.all(np.isfinite(folded_weight)) or np.all(np.abs(folded_weight - weight) <= tolerance):
            continue  # nothing to tell a fold from the unscaled weight
        weight_b = matching(folded_weight, f"{feeder}.weight")
        if weight_b is not None:
            found.append(
                FoldedLayer(
                    name_a=name,
                    feeder_a=feeder,
                    weight_b=weight_b,
                    bias_b=matching(np.asarray(folded_bias, dtype=np.float64), f"{feeder}.bias"),
                )
            )
    return found


def _float64(ref: TensorRef, budget: _Budget, count: int | None = None) -> np.ndarray | None:
    """A floating tensor's values (its first ``count``, flattened, when given) as float64; None when unreadable or
    beyond the budget (the whole tensor is read, and paid for, either way)."""
    if ref.dtype not in FLOATING or not budget.take(ref.numel * ITEMSIZE.get(ref.dtype, 8)):
        return None
    try:
        values = ref.read()
    except BncheckError:
        return None
    with np.errstate(all="ignore"):
        return np.asarray(values.ravel()[:count] if count is not None else values, dtype=np.float64)


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


def _floating(data: LayerData, name: str) -> np.ndarray | None:
    """A floating statistic as the file stores it (as LayerData.floats, before its conversion to float64, which the
    drift of a whole width makes once for all the layers)."""
    return data.arrays.get(name) if data.dtype(name) in FLOATING else None


# A layer of both files: its name in A and in B, and A's mean and variance, then B's
_Shared = tuple[str, str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _drifts(shared: list[_Shared], eps: float) -> list[Drift]:
    """Each shared layer's drift from A to B, the layers of one width measured together (measure_stored_drifts)."""
    drifts: list[Drift | None] = [None] * len(shared)
    by_width: dict[int, list[int]] = {}
    for index, (_, _, mean_a, var_a, mean_b, var_b) in enumerate(shared):
        if mean_a.ndim == 1 and mean_a.shape == var_a.shape == mean_b.shape == var_b.shape:
            by_width.setdefault(mean_a.size, []).append(index)
        else:  # malformed statistics of different shapes: measured alone, as numpy broadcasts them
            drifts[index] = measure_drift(mean_a, var_a, mean_b, var_b, samples=None, eps=eps)
    for indices in by_width.values():
        columns = [np.stack([shared[index][column] for index in indices]) for column in range(2, 6)]
        for index, drift in zip(indices, measure_stored_drifts(*columns, eps=eps), strict=True):
            drifts[index] = drift
    return [drift for drift in drifts if drift is not None]


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
        side_a, side_b = _side(path_a, source_a), _side(path_b, source_b)
    except BncheckError as exc:
        return DiffReport(
            path_a=str(a), path_b=str(b), error=FileError(code=exc.code, message=str(exc)), tool_version=__version__
        )
    layers_a, layers_b = side_a.layers, side_b.layers
    prefix_a, prefix_b = _prefixes(list(layers_a), list(layers_b))
    key_a = {name.removeprefix(prefix_a): name for name in layers_a}
    key_b = {name.removeprefix(prefix_b): name for name in layers_b}
    diffs: list[LayerDiff] = []
    changes: list[tuple[str, int | None, int | None]] = []
    shared: list[_Shared] = []
    for key, name_a in key_a.items():
        name_b = key_b.get(key)
        if name_b is None:
            continue
        da, db = layers_a[name_a], layers_b[name_b]
        mean_a, var_a = _floating(da, "running_mean"), _floating(da, "running_var")
        mean_b, var_b = _floating(db, "running_mean"), _floating(db, "running_var")
        if da.layer.num_features != db.layer.num_features:
            changes.append((name_a, da.layer.num_features, db.layer.num_features))
            continue
        if mean_a is None or var_a is None or mean_b is None or var_b is None or mean_a.shape != mean_b.shape:
            continue  # missing or malformed statistics: inspect reports them
        shared.append((name_a, name_b, mean_a, var_a, mean_b, var_b))
    for (name_a, name_b, mean_a, var_a, mean_b, var_b), drift in zip(shared, _drifts(shared, t.drift.eps), strict=True):
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
    only_in_a = [name for key, name in key_a.items() if key not in key_b]
    budget = _Budget(2 * (side_a.size + side_b.size))
    folded = _folded(only_in_a, side_a, side_b, t.eps, budget) if only_in_a else []
    folded_names = {layer.name_a for layer in folded}
    notes = (
        (
            f"the search for folded layers stopped after reading and comparing {2 * (side_a.size + side_b.size)} "
            "bytes (twice the two files' size): the layers it did not reach are listed as only in A",
        )
        if budget.spent_out
        else ()
    )
    return DiffReport(
        path_a=str(a),
        path_b=str(b),
        source_a=side_a.source,
        source_b=side_b.source,
        format_a=side_a.format,
        format_b=side_b.format,
        only_in_a=tuple(name for name in only_in_a if name not in folded_names),
        only_in_b=tuple(name for key, name in key_b.items() if key not in key_a),
        channel_changes=tuple(changes),
        layers=tuple(diffs),
        folded=tuple(folded),
        notes=notes,
        tool_version=__version__,
    )
