"""Find every BatchNorm-like layer in a loaded checkpoint, wherever the saving code put it.

A checkpoint is a tree: a bare state dict; a dict of state dicts (``{'model': ..., 'optimizer': ...}``, Lightning's
``state_dict``, timm's ``state_dict_ema``); a pickled ``nn.Module`` or a TorchScript module (placeholders whose
recorded state holds the parameters, buffers and submodules). Every dict or module that directly holds tensors is a
*container*; within a container a BatchNorm layer is a dotted prefix that owns ``running_mean`` and/or
``running_var``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from bncheck.loaders.interface import TensorRef
from bncheck.loaders.restricted_pickle import Placeholder

STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")
AFFINE_NAMES = ("weight", "bias")
# Key path components that mark averaged weights: timm's state_dict_ema / model_ema, ema_model, swa_model...
_AVERAGED = re.compile(r"(^|_)(ema|swa|averaged)(_|$)", re.IGNORECASE)
# Nesting deeper than any real checkpoint; a guard against crafted or cyclic object trees.
MAX_DEPTH = 64
# Feeding layer's weight rank -> the BatchNorm that normally follows it (Linear/Conv1d, Conv2d, Conv3d).
_NORM_WORD = re.compile(r"batch_?norm|normalization|norm|bn", re.IGNORECASE)
_KIND_BY_FEEDER_RANK = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


@dataclass(frozen=True)
class BNLayer:
    """One layer's tensors as found in the file, unread."""

    name: str
    source: str
    averaged: bool
    kind: str
    kind_inferred: bool
    tensors: Mapping[str, TensorRef]
    # whether the file's format stores num_batches_tracked at all (rules about the counter ask)
    batch_counter: bool = True
    # the inert pickled or scripted module object that holds the layer, when the file has one: its recorded state
    # carries the layer's configuration (bncheck.layer_config)
    module: Placeholder | None = field(default=None, repr=False, compare=False)

    @property
    def num_features(self) -> int | None:
        return _width(self.tensors)


def _width(tensors: Mapping[str, TensorRef]) -> int | None:
    """A layer's channel count: the length of its first 1-D statistic or affine parameter."""
    for key in ("running_mean", "running_var", "weight", "bias"):
        ref = tensors.get(key)
        if ref is not None and len(ref.shape) == 1:
            return ref.shape[0]
    return None


@dataclass
class StateDict:
    """A dict or module of the checkpoint that directly holds tensors, flattened to ``state_dict()`` names."""

    path: tuple[str, ...]
    tensors: dict[str, TensorRef]
    classes: dict[str, str]  # module prefix -> class name, when the file says it
    modules: dict[str, Placeholder] = field(default_factory=dict)  # module prefix -> its recorded object

    @property
    def source(self) -> str:
        return ".".join(self.path)

    @property
    def averaged(self) -> bool:
        return any(_AVERAGED.search(part) for part in self.path) or "n_averaged" in self.tensors


def _class_name(placeholder: Placeholder) -> str:
    return placeholder.global_name.rsplit(".", 1)[-1]


def _module_state(node: Placeholder) -> dict[str, Any] | None:
    state = node.state
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]  # (dict state, slot state)
    return state if isinstance(state, dict) else None


def _is_module(node: Any) -> bool:
    if not isinstance(node, Placeholder):
        return False
    state = _module_state(node)
    if state is None:
        return False
    return node.global_name.startswith("__torch__.") or "_modules" in state or "_buffers" in state


def _flatten_module(node: Placeholder, prefix: str, out: StateDict, depth: int, seen: set[int]) -> None:
    """Parameters and buffers of a pickled nn.Module (``_parameters``/``_buffers``/``_modules``) or a TorchScript
    module (every attribute), under dotted names as ``state_dict()`` would give them.

    A module object met again (a shared submodule) is not walked again: its tensors are listed under the first
    name only, so a file whose modules reuse one child at every level costs its size, not 2 ** depth."""
    if depth > MAX_DEPTH or id(node) in seen:
        return
    seen.add(id(node))
    out.classes[prefix] = _class_name(node)
    out.modules[prefix] = node
    state = _module_state(node) or {}
    if node.global_name.startswith("__torch__."):
        members: list[tuple[str, Any]] = list(state.items())
    else:
        members = [
            item
            for group in ("_parameters", "_buffers", "_modules")
            if isinstance(state.get(group), dict)
            for item in state[group].items()
        ]
    for name, value in members:
        full = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, TensorRef):
            out.tensors[full] = value
        elif _is_module(value):
            _flatten_module(value, full, out, depth + 1, seen)


def _flatten_dict(node: Mapping[Any, Any], prefix: str, out: StateDict, depth: int, seen: set[int]) -> None:
    if depth > MAX_DEPTH or id(node) in seen:
        return
    seen.add(id(node))
    for key, value in node.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, TensorRef):
            out.tensors[full] = value
        elif isinstance(value, Mapping):
            _flatten_dict(value, full, out, depth + 1, seen)
        elif _is_module(value):
            _flatten_module(value, full, out, depth + 1, seen)


def _children(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        yield from ((str(k), v) for k, v in node.items())
    elif isinstance(node, list | tuple):
        yield from ((str(i), v) for i, v in enumerate(node))
    elif isinstance(node, Placeholder):
        # an untrusted object (hyper-parameters, a wrapper): its tensors are still found, under its recorded parts
        yield from (("args", v) for v in node.args)
        yield from node.kwargs.items()
        yield "state", node.state
        yield from (("items", v) for v in node.items)
        yield from ((str(k), v) for k, v in node.dictitems.items())


def _state_dicts(node: Any, path: tuple[str, ...], depth: int, seen: set[int]) -> Iterator[StateDict]:
    if depth > MAX_DEPTH or id(node) in seen:
        return
    seen.add(id(node))
    if _is_module(node):
        container = StateDict(path, {}, {})
        _flatten_module(node, "", container, depth, set())
        yield container
        return
    if isinstance(node, Mapping) and any(isinstance(v, TensorRef) for v in node.values()):
        container = StateDict(path, {}, {})
        _flatten_dict(node, "", container, depth, set())
        yield container
        return
    for key, child in _children(node):
        yield from _state_dicts(child, (*path, key), depth + 1, seen)


def _feeder_candidates(prefix: str) -> Iterator[str]:
    """Where the layer that feeds a BatchNorm usually lives: the previous index of a Sequential (``features.1`` <-
    ``features.0``), or the same name with the norm word swapped (``layer1.0.bn2`` <- ``layer1.0.conv2``,
    ``normalization`` <- ``convolution``)."""
    parent, _, leaf = prefix.rpartition(".")
    dot = f"{parent}." if parent else ""
    if leaf.isdigit() and int(leaf) > 0:
        yield f"{dot}{int(leaf) - 1}"
    for word in ("conv", "convolution", "fc", "linear", "dense"):
        renamed = _NORM_WORD.sub(word, leaf, count=1)
        if renamed != leaf:
            yield dot + renamed


def _infer_kind(prefix: str, tensors: Mapping[str, TensorRef], width: int | None) -> str | None:
    """BatchNormNd from the rank of the feeding layer's weight, when that layer is found and its width matches.

    File order is not used: safetensors sorts its tensors, so a neighbour in the file need not be a neighbour in
    the model.
    """
    for candidate in _feeder_candidates(prefix):
        weight = tensors.get(f"{candidate}.weight")
        if weight is not None and len(weight.shape) >= 2:
            return _KIND_BY_FEEDER_RANK.get(len(weight.shape)) if weight.shape[0] == width else None
    return None


def _layers_of(container: StateDict, batch_counter: bool) -> Iterator[BNLayer]:
    source = container.source
    container_averaged = container.averaged
    prefixes: dict[str, None] = {}  # ordered set
    for name in container.tensors:
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("running_mean", "running_var"):
            prefixes[prefix] = None
    for prefix in prefixes:
        dot = f"{prefix}." if prefix else ""
        tensors = {
            leaf: container.tensors[dot + leaf] for leaf in STAT_NAMES + AFFINE_NAMES if dot + leaf in container.tensors
        }
        averaged = container_averaged or any(_AVERAGED.search(part) for part in prefix.split("."))
        if prefix in container.classes:
            kind, inferred = container.classes[prefix], False
        else:
            guess = _infer_kind(prefix, container.tensors, _width(tensors))
            kind, inferred = (guess, True) if guess else ("BatchNorm", False)
        yield BNLayer(prefix, source, averaged, kind, inferred, tensors, batch_counter, container.modules.get(prefix))


def find_state_dicts(root: Any) -> list[StateDict]:
    """Every state dict (or pickled/scripted module) in a checkpoint's object tree, in file order."""
    return list(_state_dicts(root, (), 0, set()))


def find_bn_layers(root: Any, *, batch_counter: bool = True) -> list[BNLayer]:
    """Every BatchNorm-like layer in a checkpoint's object tree, in file order. ``batch_counter`` is the format's
    word on whether its layers can store num_batches_tracked."""
    return [layer for container in find_state_dicts(root) for layer in _layers_of(container, batch_counter)]
