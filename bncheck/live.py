"""Check a live torch module, as a training loop holds it: the same rules, report and verdict as for a file.

The BatchNorm modules are found by type and named by their module path, as ``state_dict()`` names them. Their
statistics come to the CPU in one copy per device and dtype (the tensors are stacked on their device first), never
one synchronising copy per tensor, and nothing but BatchNorm tensors is read: the rules need every channel to name
the ones at fault, and a model's BatchNorm statistics are a small fraction of its weights. Each layer's momentum,
eps, track_running_stats and affine are its module's; its ``training`` flag is not judged, since a model in a
training loop is in train mode by design. Needs torch, imported lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.checks import run_checks
from bncheck.config import Options
from bncheck.discover import BNLayer
from bncheck.layer_config import module_config
from bncheck.loaders.interface import Checkpoint, TensorRef, without_data
from bncheck.read import LayerData, stack_layers
from bncheck.report import FileReport
from bncheck.summary import file_report

if TYPE_CHECKING:
    import torch

LIVE = "live module"
_TENSORS = ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")


def inspect_module(model: torch.nn.Module, *, options: Options | None = None, name: str | None = None) -> FileReport:
    """Check every BatchNorm layer of ``model`` with the static rules (statistics and configuration, BN001-BN018).

    ``name`` labels the report (its ``path``; per-file ignores match it); by default ``<ClassName>``. The model is
    only read: no forward pass, no change of mode, no copy of anything but the BatchNorm tensors.
    """
    from bncheck.recompute import batchnorm_modules

    options = options or Options()
    label = name or f"<{type(model).__name__}>"
    modules = batchnorm_modules(model)
    live = {
        f"{module_name}.{key}": tensor
        for module_name, module in modules.items()
        for key in _TENSORS
        if (tensor := getattr(module, key, None)) is not None
    }
    values = _on_cpu({key: tensor for key, tensor in live.items() if _has_data(tensor)})
    layers = []
    for module_name, module in modules.items():
        refs: dict[str, TensorRef] = {}
        arrays: dict[str, np.ndarray] = {}
        for key in _TENSORS:
            tensor = live.get(f"{module_name}.{key}")
            if tensor is None:
                continue
            refs[key] = _ref(tensor, values.get(f"{module_name}.{key}"))
            if f"{module_name}.{key}" in values:
                arrays[key] = values[f"{module_name}.{key}"]
        layer = BNLayer(
            name=module_name, source="", averaged=False, kind=type(module).__name__, kind_inferred=False, tensors=refs
        )
        layers.append(LayerData(layer, arrays, module_config(module, LIVE)))
    stack = stack_layers(layers)  # shared by the rules and the summaries, as for a file
    findings = [
        finding
        for finding in run_checks(layers, (), thresholds=options.thresholds, stack=stack)
        if options.verdict(finding.code, label)[0]
    ]
    return file_report(label, Checkpoint(format=LIVE, root=None), layers, findings, stack=stack)


def _has_data(tensor: torch.Tensor) -> bool:
    from torch.nn.parameter import is_lazy

    return not is_lazy(tensor) and not tensor.is_meta


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _ref(tensor: torch.Tensor, values: np.ndarray | None) -> TensorRef:
    import torch

    dtype = _dtype_name(tensor)
    if values is None:  # the reasons and shapes a file gives for the same tensors
        if tensor.is_meta:
            return without_data(dtype, tuple(tensor.shape), "meta-device tensor")
        kind = "parameter" if isinstance(tensor, torch.nn.Parameter) else "buffer"
        return without_data("float32", (0,), f"uninitialised lazy {kind}")
    return TensorRef(dtype=dtype, shape=tuple(values.shape), reader=lambda: values)


def _on_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Each tensor's values as a numpy array (bfloat16 as float32). Tensors on the same device and of the same
    dtype are concatenated there and copied in one transfer; CPU tensors are not copied at all (except bfloat16,
    which numpy lacks)."""
    import torch

    groups: dict[tuple[Any, torch.dtype], list[str]] = {}
    for key, tensor in tensors.items():
        groups.setdefault((tensor.device, tensor.dtype), []).append(key)
    found: dict[str, np.ndarray] = {}
    for (device, dtype), keys in groups.items():
        parts = [tensors[key].detach() for key in keys]
        flat = torch.cat([part.reshape(-1) for part in parts]) if device.type != "cpu" else None
        host = flat.cpu() if flat is not None else None
        offset = 0
        for key, part in zip(keys, parts, strict=True):
            if host is not None:
                piece = host[offset : offset + part.numel()].reshape(part.shape)
                offset += part.numel()
            else:
                piece = part
            found[key] = (piece.float() if dtype == torch.bfloat16 else piece).numpy()
    return found
