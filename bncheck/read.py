"""Open a checkpoint, find its BatchNorm layers and read their tensors: everything before the rules run.

``inspect``, ``diff`` and ``recalibrate`` all come through :func:`read_checkpoint`, so they see the same layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from bncheck.discover import BNLayer, find_bn_layers
from bncheck.errors import CorruptCheckpointError, UnsupportedDtypeError
from bncheck.layer_config import ScriptCode, exported_configs, layer_config
from bncheck.loaders import is_url, open_checkpoint, prefetch
from bncheck.loaders.dtypes import FLOATING, INTEGER
from bncheck.loaders.interface import Checkpoint
from bncheck.pickle_globals import Risk, grade_global
from bncheck.report import LayerConfig


@dataclass(frozen=True)
class LayerData:
    """A BatchNorm layer with its tensors read: what the rules see."""

    layer: BNLayer
    arrays: Mapping[str, np.ndarray]
    # momentum, eps, training... as far as the file records them (bncheck.layer_config); empty for a state dict
    config: LayerConfig = field(default_factory=LayerConfig)

    def dtype(self, name: str) -> str | None:
        ref = self.layer.tensors.get(name)
        return ref.dtype if ref is not None else None

    def floats(self, name: str) -> np.ndarray | None:
        """A floating tensor as float64 (read-only, converted once for all the rules), or None when absent or not
        floating."""
        return self._float64.get(name)

    @cached_property
    def _float64(self) -> dict[str, np.ndarray]:
        converted = {}
        with np.errstate(all="ignore"):  # a mislabelled or crafted array may not cast cleanly; rules see NaN
            for name, array in self.arrays.items():
                if self.dtype(name) in FLOATING:
                    values = np.array(array, dtype=np.float64)
                    values.setflags(write=False)
                    converted[name] = values
        return converted

    def count(self) -> int | None:
        """num_batches_tracked when it is a valid integer scalar."""
        array = self.arrays.get("num_batches_tracked")
        if array is None or self.dtype("num_batches_tracked") not in INTEGER or array.size != 1:
            return None
        return int(array.reshape(()))


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Run the cyclic garbage collector rarely while a checkpoint is read and checked (as a decorator or a ``with``).

    Reading a file of thousands of layers makes hundreds of thousands of small objects that form almost no cycles
    and all live until the report is built; at the default threshold (a collection every 700 allocations) the
    collector walks that growing heap again and again, a third of the time of a 4,000-layer file. Reference counting
    still frees everything as usual; the previous thresholds come back on the way out.
    """
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], 100_000), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


# the floating tensors that the rules' screens and the summaries read for all of a file's layers at once
STACKED = ("running_mean", "running_var", "weight", "bias")


@dataclass(frozen=True)
class Stacked:
    """One floating tensor of every layer that holds it, as float64 matrices of equal-width layers (one row per
    layer), so that a condition is evaluated for thousands of layers in one numpy call rather than layer by layer.

    ``groups`` holds each width's (layer indices, layers x channels matrix); ``irregular`` the indices of layers
    whose tensor is floating but not 1-D (malformed), which callers read one by one.
    """

    groups: tuple[tuple[np.ndarray, np.ndarray], ...]
    irregular: np.ndarray


@dataclass(frozen=True)
class LayerStack:
    """A file's layers as the rules' screens and the summaries read them together: each of :data:`STACKED` as
    :class:`Stacked`, and per layer what the rules read besides values. Index i is ``layers[i]``."""

    count: int
    tensors: Mapping[str, Stacked]
    dtypes: Mapping[str, np.ndarray]  # name -> each layer's dtype of it ("" when absent), for np.isin
    counts: Sequence[int | None]  # each layer's num_batches_tracked (LayerData.count)
    configured: Sequence[int]  # the layers whose file records some configuration (LayerConfig.known)
    # each layer's tensor names, dtypes, shapes and missing data, and the layer facts the rules read besides them:
    # two layers of equal signature get the same hits from a rule that reads no values
    signatures: Sequence[Hashable]

    def any_channel(self, name: str, condition: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Per layer, whether ``condition`` (elementwise, on float64 values) holds in some channel of ``name``:
        False where the layer has no floating ``name``, True where it is malformed (the rule must look)."""
        return self._per_layer(name, condition, every=False)

    def all_channels(self, name: str, condition: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Per layer, whether ``condition`` holds in every channel of ``name``: False where the layer has no
        floating ``name``, True where it is malformed (the rule must look)."""
        return self._per_layer(name, condition, every=True)

    def _per_layer(self, name: str, condition: Callable[[np.ndarray], np.ndarray], *, every: bool) -> np.ndarray:
        stacked = self.tensors[name]
        mask = np.zeros(self.count, dtype=bool)
        with np.errstate(all="ignore"):
            for rows, values in stacked.groups:
                held = condition(values)
                mask[rows] = held.all(axis=1) if every else held.any(axis=1)
        mask[stacked.irregular] = True
        return mask


def stack_layers(layers: Sequence[LayerData]) -> LayerStack:
    """The layers' statistics stacked, in one pass over the layers and one conversion per tensor name and width
    (the values are those of :meth:`LayerData.floats`)."""
    widths: dict[str, dict[int, tuple[list[int], list[np.ndarray]]]] = {name: {} for name in STACKED}
    irregular: dict[str, list[int]] = {name: [] for name in STACKED}
    dtypes: dict[str, list[str]] = {name: [] for name in STACKED}
    counts: list[int | None] = []
    configured: list[int] = []
    signatures: list[Hashable] = []
    for i, data in enumerate(layers):
        layer, arrays = data.layer, data.arrays
        for name in STACKED:
            ref = layer.tensors.get(name)
            dtype = "" if ref is None else ref.dtype
            dtypes[name].append(dtype)
            array = arrays.get(name)
            if array is None or dtype not in FLOATING:
                continue
            if array.ndim == 1:
                rows, values = widths[name].setdefault(array.shape[0], ([], []))
                rows.append(i)
                values.append(array)
            else:
                irregular[name].append(i)
        counts.append(data.count())
        if data.config.known:
            configured.append(i)
        signatures.append(
            (
                tuple([(name, ref.dtype, ref.shape, ref.no_data) for name, ref in layer.tensors.items()]),
                layer.batch_counter,
                layer.frozen,
            )
        )
    tensors = {}
    with np.errstate(all="ignore"):  # as LayerData.floats: a crafted array that does not cast cleanly gives NaN
        for name in STACKED:
            groups = tuple(
                (np.array(rows, dtype=np.intp), np.array(values, dtype=np.float64))
                for rows, values in widths[name].values()
            )
            tensors[name] = Stacked(groups, np.array(irregular[name], dtype=np.intp))
    return LayerStack(
        count=len(layers),
        tensors=tensors,
        dtypes={name: np.array(values, dtype=object) for name, values in dtypes.items()},
        counts=counts,
        configured=configured,
        signatures=signatures,
    )


def read_layer(
    layer: BNLayer, code: ScriptCode | None = None, exported: Mapping[str, LayerConfig] | None = None
) -> LayerData:
    """Read a layer's tensors from the file, and its configuration from its recorded module (and TorchScript
    ``code``) or an exported graph's calls (``exported``) when the file has them. A tensor the file holds no values
    for (BN018) is left out of ``arrays``: the rules that look at values see it as unreadable, BN018 says why."""
    arrays = {name: ref.read() for name, ref in layer.tensors.items() if ref.no_data is None}
    return LayerData(layer, arrays, layer_config(layer, code, exported))


def read_layers(layers: Sequence[BNLayer], checkpoint: Checkpoint) -> list[LayerData]:
    """Read every layer's tensors, and its configuration wherever ``checkpoint`` records it; the bytes of a remote
    file are fetched together first."""
    prefetch(ref for layer in layers for ref in layer.tensors.values() if ref.no_data is None)
    code = ScriptCode(checkpoint.code) if checkpoint.code else None
    exported = exported_configs(checkpoint.calls) if checkpoint.calls else None
    return [read_layer(layer, code, exported) for layer in layers]


def read_checkpoint(path: os.PathLike[str] | str, *, unsafe_load: bool = False) -> tuple[Checkpoint, list[LayerData]]:
    """Open a checkpoint and read its BatchNorm layers; raises a BncheckError when it cannot be read.

    With ``unsafe_load``, torch's unpickler (which runs the file's code) takes over the local files that bncheck's
    own reader cannot read, or in which it finds no BatchNorm layer behind the objects it would not build.
    """
    checkpoint = _open(path, unsafe_load)
    layers = find_bn_layers(
        checkpoint.root, batch_counter=checkpoint.batch_counter, sorted_names=checkpoint.sorted_names
    )
    return checkpoint, read_layers(layers, checkpoint)


def _open(path: os.PathLike[str] | str, unsafe_load: bool) -> Checkpoint:
    try:
        checkpoint = open_checkpoint(path)
    except (CorruptCheckpointError, UnsupportedDtypeError) as exc:
        if not unsafe_load or is_url(path):
            raise
        from bncheck.loaders.unsafe import globals_torch_would_meet

        # bncheck's reader refused the file, so its pickles were not graded: read their globals from the opcodes
        dangerous = _code_execution(globals_torch_would_meet(Path(path)))
        if dangerous:
            raise type(exc)(
                f"{exc}; --unsafe-load did not hand it to torch: its pickle names {', '.join(dangerous)}, which "
                "torch would run"
            ) from exc
        return _open_with_torch(path)
    if unsafe_load and checkpoint.globals and not find_bn_layers(checkpoint.root) and not is_url(path):
        # a pickle that names a global able to run code is never handed to torch, whatever --unsafe-load says;
        # BN101 stays in the report
        dangerous = _code_execution(checkpoint.globals)
        if dangerous:
            note = (
                f"--unsafe-load did not hand this file to torch: its pickle names {', '.join(dangerous)} (BN101), "
                "which torch would run"
            )
            return dataclasses.replace(checkpoint, notes=(*checkpoint.notes, note))
        return _open_with_torch(path)
    return checkpoint


def _code_execution(names: Sequence[str]) -> list[str]:
    return [name for name in names if grade_global(name) is Risk.CODE_EXECUTION]


def _open_with_torch(path: os.PathLike[str] | str) -> Checkpoint:
    from bncheck.loaders.unsafe import open_with_torch

    return open_with_torch(Path(path))
