"""Open a checkpoint, find its BatchNorm layers and read their tensors: everything before the rules run.

``inspect``, ``diff`` and ``recalibrate`` all come through :func:`read_checkpoint`, so they see the same layers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
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
