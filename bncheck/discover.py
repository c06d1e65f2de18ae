"""Find every BatchNorm-like layer in a loaded checkpoint, wherever the saving code put it.

A checkpoint is a tree: a bare state dict; a dict of state dicts (``{'model': ..., 'optimizer': ...}``, Lightning's
``state_dict``, timm's ``state_dict_ema``); a pickled ``nn.Module`` or a TorchScript module (placeholders whose
recorded state holds the parameters, buffers and submodules). Every dict or module that directly holds tensors is a
*container*; within a container a BatchNorm layer is a dotted prefix that owns ``running_mean`` and/or
``running_var``, unless its class or its sibling keys say it is a running-statistics normaliser of reinforcement
learning (see :func:`_is_normaliser`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bncheck.loaders.interface import TensorRef
from bncheck.loaders.restricted_pickle import Placeholder

STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")
AFFINE_NAMES = ("weight", "bias")
# Key path components that mark averaged weights: timm's state_dict_ema / model_ema, ema_model, swa_model...
_AVERAGED = re.compile(r"(^|_)(ema|swa|averaged)(_|$)", re.IGNORECASE)
# the same, over a whole dotted module path at once (a component's ends are its dots)
_AVERAGED_PATH = re.compile(r"(^|[._])(ema|swa|averaged)([._]|$)", re.IGNORECASE)
# Nesting deeper than any real checkpoint; a guard against crafted or cyclic object trees.
MAX_DEPTH = 64
# Feeding layer's weight rank -> the BatchNorm that normally follows it (Linear/Conv1d, Conv2d, Conv3d).
_NORM_WORD = re.compile(r"batch_?norm|normalization|norm|bn", re.IGNORECASE)
_KIND_BY_FEEDER_RANK = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}

# Observation normalisers of reinforcement learning keep running statistics too, beside a sample counter of their
# own: rl_games' RunningMeanStd (running_mean, running_var, count), skrl's RunningStandardScaler (running_mean,
# running_variance, current_count). None of them is a BatchNorm layer, and none has BatchNorm's own keys.
NORMALISER_CLASSES = frozenset({"RunningMeanStd", "RunningStandardScaler"})
# BatchNorm1d/2d/3d, their Lazy and Sync variants, FrozenBatchNorm2d, InstanceNorm with tracked statistics
_BATCHNORM_CLASS = re.compile(r"(Batch|Instance)Norm")
_NORMALISER_KEYS = frozenset({"count", "current_count", "running_variance"})
_RUNNING = frozenset({"running_mean", "running_var"})
_LAYER_LEAVES = STAT_NAMES + AFFINE_NAMES
_BATCHNORM_ONLY_KEYS = frozenset({"num_batches_tracked", "weight", "bias"})

# FrozenBatchNorm2d (torchvision.ops.misc, detectron2.layers.batch_norm, and the copies in DETR-style code) holds
# exactly these buffers: its statistics never change, so it has no num_batches_tracked, by design.
FROZEN_CLASS = "FrozenBatchNorm2d"
FROZEN_BUFFERS = frozenset({"weight", "bias", "running_mean", "running_var"})
# Why a layer is taken for a FrozenBatchNorm2d: the file names the class; or, in a state dict, it holds exactly the
# frozen buffer set and either other BatchNorm layers of the file carry counters, or the frozen-looking layers are
# every BatchNorm layer under one prefix (a backbone) that is not the whole model (see _mark_frozen_by_buffers).
Frozen = Literal["class", "counters elsewhere", "whole prefix"]


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
    # taken for a FrozenBatchNorm2d, which keeps no num_batches_tracked by design, and on what evidence (or None)
    frozen: Frozen | None = None
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
    # module prefixes whose class the file names as a FrozenBatchNorm2d
    frozen: set[str] = field(default_factory=set)
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
    if out.classes[prefix] == FROZEN_CLASS:
        out.frozen.add(prefix)
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
    norm = _NORM_WORD.search(leaf)  # once per layer, not once per word: the first match is the one renamed
    if norm is not None:
        for word in ("conv", "convolution", "fc", "linear", "dense"):
            yield f"{dot}{leaf[: norm.start()]}{word}{leaf[norm.end() :]}"


def feeding_layer(prefix: str, tensors: Mapping[str, TensorRef], width: int | None) -> str | None:
    """The layer whose output a BatchNorm layer normalises (a convolution or linear layer), found by name and
    checked by width: the first candidate with a weight of rank 2 or more decides, and it must have ``width``
    outputs. File order is not used: safetensors sorts its tensors, so a neighbour in the file need not be a
    neighbour in the model."""
    for candidate in _feeder_candidates(prefix):
        weight = tensors.get(f"{candidate}.weight")
        if weight is not None and len(weight.shape) >= 2:
            return candidate if weight.shape[0] == width else None
    return None


def _infer_kind(prefix: str, tensors: Mapping[str, TensorRef], width: int | None) -> str | None:
    """BatchNormNd from the rank of the feeding layer's weight, when that layer is found and its width matches."""
    feeder = feeding_layer(prefix, tensors, width)
    return None if feeder is None else _KIND_BY_FEEDER_RANK.get(len(tensors[f"{feeder}.weight"].shape))


def _is_normaliser(class_name: str | None, keys: set[str]) -> bool:
    """Whether a prefix that owns running statistics is an observation normaliser rather than a BatchNorm layer.

    A class the file names decides when it is one of the normalisers, or a BatchNorm or InstanceNorm class
    (SyncBatchNorm, LazyBatchNorm2d, FrozenBatchNorm2d...). Otherwise the keys do: a normaliser's own counter
    (``count``, ``current_count``) or ``running_variance`` beside the statistics, and none of BatchNorm's
    ``num_batches_tracked``, ``weight`` or ``bias``. A BatchNorm layer that lost its running_var keeps its other keys,
    and is still checked.
    """
    if class_name in NORMALISER_CLASSES:
        return True
    if class_name is not None and _BATCHNORM_CLASS.search(class_name):
        return False
    return bool(keys & _NORMALISER_KEYS) and not keys & _BATCHNORM_ONLY_KEYS


def _layers_of(container: StateDict, batch_counter: bool) -> Iterator[BNLayer]:
    source = container.source
    container_averaged = container.averaged
    keys: dict[str, set[str]] = {}  # module prefix -> the names directly under it
    for name in container.tensors:
        prefix, _, leaf = name.rpartition(".")
        keys.setdefault(prefix, set()).add(leaf)
    prefixes = [
        (prefix, leaves)
        for prefix, leaves in keys.items()
        if not leaves.isdisjoint(_RUNNING) and not _is_normaliser(container.classes.get(prefix), leaves)
    ]
    for prefix, leaves in prefixes:
        dot = f"{prefix}." if prefix else ""
        tensors = {leaf: container.tensors[dot + leaf] for leaf in _LAYER_LEAVES if leaf in leaves}
        averaged = container_averaged or _AVERAGED_PATH.search(prefix) is not None
        if prefix in container.classes:
            kind, inferred = container.classes[prefix], False
        else:
            guess = _infer_kind(prefix, container.tensors, _width(tensors))
            kind, inferred = (guess, True) if guess else ("BatchNorm", False)
        frozen: Frozen | None = "class" if prefix in container.frozen else None
        yield BNLayer(
            prefix,
            source,
            averaged,
            kind,
            inferred,
            tensors,
            batch_counter,
            frozen=frozen,
            module=container.modules.get(prefix),
        )


def _lacks_counter(layer: BNLayer) -> bool:
    return layer.batch_counter and layer.frozen is None and "num_batches_tracked" not in layer.tensors


def _looks_frozen(layer: BNLayer) -> bool:
    """FrozenBatchNorm2d's buffers exactly, in a layer whose class the file does not name and that is not fed by a
    Linear or a 1-D/3-D convolution (FrozenBatchNorm2d follows 2-D convolutions)."""
    unnamed = layer.kind == "BatchNorm2d" if layer.kind_inferred else layer.kind == "BatchNorm"
    return unnamed and set(layer.tensors) == FROZEN_BUFFERS


def common_prefix(names: Sequence[str]) -> str:
    """The longest dotted prefix (whole components) that every name starts with ("" when none)."""
    parts = [name.split(".") for name in names]
    if not parts:
        return ""
    shared = []
    for components in zip(*parts, strict=False):
        if any(c != components[0] for c in components):
            break
        shared.append(components[0])
    return ".".join(shared)


def _mark_frozen_by_buffers(found: list[tuple[StateDict, list[BNLayer]]]) -> list[BNLayer]:
    """Mark the state-dict layers that are FrozenBatchNorm2d by their buffers and by what the file says around them.

    A missing counter means an old (before PyTorch 0.4.1) or stripped checkpoint unless nothing else suggests one:
    every layer of the file that lacks a counter must hold exactly FrozenBatchNorm2d's buffers, and either another
    BatchNorm layer of the file carries a counter (its writer saved them), or in each state dict the layers without
    one are two or more, are every BatchNorm layer under one prefix, and the state dict holds other tensors outside
    it (a backbone, as in a detection model: an old or stripped checkpoint lacks counters everywhere, not under one
    branch).
    """
    layers = [layer for _, members in found for layer in members]
    counterless = [layer for layer in layers if _lacks_counter(layer)]
    if not counterless or not all(_looks_frozen(layer) for layer in counterless):
        return layers
    evidence: Frozen
    if any("num_batches_tracked" in layer.tensors for layer in layers):
        evidence = "counters elsewhere"
    else:
        for container, members in found:
            lacking = [layer.name for layer in members if _lacks_counter(layer)]
            if not lacking:
                continue
            prefix = common_prefix(lacking)
            dot = prefix + "."
            under = [layer for layer in members if layer.name == prefix or layer.name.startswith(dot)]
            outside = any(name != prefix and not name.startswith(dot) for name in container.tensors)
            if len(lacking) < 2 or not prefix or len(under) != len(lacking) or not outside:
                return layers
        evidence = "whole prefix"
    return [dataclasses.replace(layer, frozen=evidence) if _lacks_counter(layer) else layer for layer in layers]


def find_state_dicts(root: Any) -> list[StateDict]:
    """Every state dict (or pickled/scripted module) in a checkpoint's object tree, in file order."""
    return list(_state_dicts(root, (), 0, set()))


def find_bn_layers(root: Any, *, batch_counter: bool = True, sorted_names: bool = False) -> list[BNLayer]:
    """Every BatchNorm-like layer in a checkpoint's object tree, in file order. ``batch_counter`` is the format's
    word on whether its layers can store num_batches_tracked. When the format sorts its tensors by name
    (``sorted_names``: safetensors, where ``layer1.10.bn1`` comes before ``layer1.2.bn1``), each container's layers
    are put in the natural order of their paths instead, the closest the file allows to the model's order."""
    found = [(container, list(_layers_of(container, batch_counter))) for container in find_state_dicts(root)]
    if sorted_names:
        found = [(container, sorted(layers, key=lambda layer: natural_key(layer.name))) for container, layers in found]
    return _mark_frozen_by_buffers(found)


def natural_key(name: str) -> list[Any]:
    """A module path ordered as people number things: ``features.2`` before ``features.10``. The pieces alternate
    text and numbers, so two keys always compare like with like; a number compares by its digits (length, then
    text), never converted, so a hostile name of thousands of digits costs no more than its length."""
    pieces = re.split(r"(\d+)", name)
    return [(len(p.lstrip("0")), p.lstrip("0"), p) if index % 2 else p for index, p in enumerate(pieces)]
