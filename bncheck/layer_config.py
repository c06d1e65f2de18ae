"""Each BatchNorm layer's configuration (momentum, eps, training, track_running_stats, affine), read wherever the file
records it, without running any of it.

- A fully pickled module (``torch.save(model)``): the plain attributes of the layer's recorded ``__dict__`` state.
- A TorchScript archive: the layer's recorded attributes (``training``), the ``Final`` constants of its class in the
  archive's ``code/`` files (``momentum : Final[float] = 0.1``; what ``torch.jit.script`` keeps), and for a traced
  graph the literal arguments of the one ``torch.batch_norm(...)`` call in its ``forward`` (what ``torch.jit.trace``
  baked in: training flag, momentum, eps). The code is read as text, never executed.
- A Hugging Face folder: ``config.json`` beside ``model.safetensors`` / ``pytorch_model.bin``, whose BatchNorm keys
  (``batch_norm_momentum``, ``batch_norm_eps``) describe the model as a whole (:class:`ModelConfig`).

A state dict carries none of this: its layers' configuration is unknown, never guessed (recomputation fills it from
the real modules of the model given with --model: ``bncheck.recompute.model_layer_configs``). A value of the wrong type
(a pickle can put anything in a module's state) is not a setting; a config file that cannot be read is a note.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bncheck.discover import BNLayer
from bncheck.loaders.interface import EXPORTED_PROGRAM, ONNX_NODE, RecordedCall
from bncheck.loaders.restricted_pickle import Placeholder
from bncheck.report import LayerConfig, ModelConfig, Setting

PICKLED = "pickled module"
SCRIPT_ATTRIBUTE = "TorchScript attribute"
SCRIPT_CONSTANT = "TorchScript constant"
TRACED = "traced batch_norm call"
CONFIG_JSON = "config.json"


def is_exported(source: str) -> bool:
    """Whether a setting was read from an exported graph (.pt2, ONNX): what runs in production. Those sources are
    named by the loaders that record them (bncheck.loaders.interface)."""
    return source.startswith((EXPORTED_PROGRAM, ONNX_NODE))


_NUMBERS = ("momentum", "eps")
_FLAGS = ("training", "track_running_stats", "affine")

# TorchScript's printed class: "class BatchNorm1d(Module):" at column 0, members indented below it.
_CLASS = re.compile(r"^class (\w+)\(", re.MULTILINE)
_CONSTANT = re.compile(r"^  (\w+) : Final\[[\w.\[\], ]*\] = ([^\n]+)$", re.MULTILINE)
# torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
_BATCH_NORM_CALL = re.compile(r"\btorch\.batch_norm\(([^()\n]*)\)")
# A class body longer than this is no BatchNorm layer's; it is not searched (bounds the regex work on odd code).
MAX_CLASS_CHARS = 1 << 20


def recorded_setting(name: str, value: Any, source: str) -> Setting | None:
    """A recorded value as a setting: a bool for a flag; a real number for momentum and eps, or None for a
    momentum (a cumulative average). Anything else a file may hold there is not a setting."""
    if name in _FLAGS:
        return Setting(value=value, source=source) if isinstance(value, bool) else None
    if value is None:
        return Setting(value=None, source=source) if name == "momentum" else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int of hundreds of digits
        number = math.inf if value > 0 else -math.inf
    return Setting(value=number, source=source)


def _literal(text: str) -> Any:
    """A constant as TorchScript prints it (True, False, None, 0.10000000000000001, 1e-05, 8); else a str."""
    text = text.strip()
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    try:
        return int(text) if re.fullmatch(r"-?\d{1,30}", text) else float(text)
    except ValueError:
        return text


def _state(node: Placeholder) -> Mapping[Any, Any]:
    state = node.state
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]  # (dict state, slot state)
    return state if isinstance(state, dict) else {}


class ScriptCode:
    """The class definitions in a TorchScript archive's ``code/`` files, by qualified name
    (``__torch__.torch.nn.modules.batchnorm.___torch_mangle_1.BatchNorm1d``), as text."""

    def __init__(self, files: Sequence[tuple[str, str]]) -> None:
        self._classes: dict[str, str] = {}
        for path, text in files:
            module = path.removesuffix(".py").replace("/", ".")
            starts = list(_CLASS.finditer(text))
            ends = [match.start() for match in starts[1:]] + [len(text)] * bool(starts)
            for match, end in zip(starts, ends, strict=True):
                self._classes[f"{module}.{match.group(1)}"] = text[match.start() : end]

    def class_text(self, qualified: str) -> str | None:
        text = self._classes.get(qualified)
        return text if text is not None and len(text) <= MAX_CLASS_CHARS else None


def _script_constants(text: str) -> Iterator[tuple[str, Setting]]:
    for name, value in _CONSTANT.findall(text):
        if name in _NUMBERS or name in _FLAGS:
            setting = recorded_setting(name, _literal(value), SCRIPT_CONSTANT)
            if setting is not None:
                yield name, setting


def _traced_call(text: str) -> Iterator[tuple[str, Setting]]:
    """The settings a traced layer's one batch_norm call states as literals; nothing when it has another number of
    calls or its arguments are not what torch.jit.trace writes."""
    calls = _BATCH_NORM_CALL.findall(text)
    if len(calls) != 1:
        return
    arguments = [part.strip() for part in calls[0].split(",")]
    if len(arguments) != 9:
        return
    for name, index in (("training", 5), ("momentum", 6), ("eps", 7)):
        setting = recorded_setting(name, _literal(arguments[index]), TRACED)
        if setting is not None:
            yield name, setting
    if arguments[5] == "True" and arguments[3] == arguments[4] == "None":
        # in train mode F.batch_norm passes no running statistics exactly when track_running_stats is off
        yield "track_running_stats", Setting(value=False, source=TRACED)


def module_config(module: Any, source: str) -> LayerConfig:
    """The momentum, eps, track_running_stats and affine of a real BatchNorm module (one built by the code given
    with --model, or a live model in a training loop). Not ``training``: a module being trained or recomputed is in
    the mode its caller chose, which says nothing about how it will be saved."""
    found = {}
    for name in ("momentum", "eps", "track_running_stats", "affine"):
        setting = recorded_setting(name, getattr(module, name, ...), source)
        if setting is not None:
            found[name] = setting
    return LayerConfig(**found)


def exported_configs(calls: Sequence[RecordedCall]) -> dict[str, LayerConfig]:
    """Each layer's configuration from an exported graph's calls. A layer called more than once in training mode in
    any call is in training mode; its other values come from its first call."""
    found: dict[str, dict[str, Setting]] = {}
    for call in calls:
        settings = found.setdefault(call.layer, {})
        for name, value in call.arguments:
            setting = recorded_setting(name, value, call.source)
            if setting is not None and (name not in settings or (name == "training" and value is True)):
                settings[name] = setting
    return {layer: LayerConfig(**settings) for layer, settings in found.items()}


def layer_config(
    layer: BNLayer, code: ScriptCode | None = None, exported: Mapping[str, LayerConfig] | None = None
) -> LayerConfig:
    """The layer's configuration from its recorded module object (and, for TorchScript, its class's code), or from
    an exported graph's calls (:func:`exported_configs`); empty when the layer came from a state dict."""
    if exported is not None and layer.name in exported:
        return exported[layer.name]
    node = layer.module
    if not isinstance(node, Placeholder):
        return LayerConfig()
    scripted = node.global_name.startswith("__torch__.")
    found: dict[str, Setting] = {}
    for name, value in _state(node).items():
        if name in _NUMBERS or name in _FLAGS:
            setting = recorded_setting(name, value, SCRIPT_ATTRIBUTE if scripted else PICKLED)
            if setting is not None:
                found[name] = setting
    text = code.class_text(node.global_name) if scripted and code is not None else None
    if text is not None:
        for name, setting in _script_constants(text):
            found.setdefault(name, setting)
        # what a traced graph baked in is what it does, whatever its attributes say
        found.update(_traced_call(text))
    return LayerConfig(**found)


# ---------------------------------------------------------------- config.json beside a Hugging Face checkpoint

# The weight files save_pretrained writes, beside which config.json describes the model.
_HF_WEIGHTS = re.compile(
    r"^(model\.safetensors|pytorch_model\.bin|(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)|"
    r"(model\.safetensors|pytorch_model\.bin)\.index\.json)$"
)
# BatchNorm keys of transformers' configs (batch_norm_momentum, batch_norm_eps) and their common spellings.
# LayerNorm's layer_norm_eps is not one of them.
_BN_KEY = re.compile(r"^(batch_?norm|bn)_(momentum|eps|epsilon)$", re.IGNORECASE)
MAX_CONFIG_BYTES = 1 << 20
# how deep sub-configurations (vision_config, backbone_config) are searched
_MAX_CONFIG_DEPTH = 4


def _config_settings(node: Any, path: str, model_type: Any, depth: int) -> Iterator[ModelConfig]:
    if not isinstance(node, dict) or depth > _MAX_CONFIG_DEPTH:
        return
    found: dict[str, Setting] = {}
    own_type = node.get("model_type", model_type)
    for key, value in node.items():
        match = _BN_KEY.match(str(key))
        if match is None:
            continue
        name = "momentum" if match.group(2).lower() == "momentum" else "eps"
        setting = recorded_setting(name, value, f"{CONFIG_JSON} {path + '.' if path else ''}{key}")
        if setting is not None and setting.value is not None:
            found.setdefault(name, setting)
    if found:
        yield ModelConfig(
            file=CONFIG_JSON,
            path=path,
            model_type=own_type if isinstance(own_type, str) else None,
            settings=LayerConfig(**found),
        )
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _config_settings(value, f"{path}.{key}" if path else str(key), own_type, depth + 1)


def model_configs(path: os.PathLike[str] | str) -> tuple[tuple[ModelConfig, ...], tuple[str, ...]]:
    """The BatchNorm settings of the ``config.json`` beside a Hugging Face weight file, and notes on a config file
    that could not be read. Nothing for other files, for URLs and when there is no config.json."""
    weights = Path(path)
    if not _HF_WEIGHTS.match(weights.name):
        return (), ()
    config = weights.parent / CONFIG_JSON
    try:
        if not config.is_file():
            return (), ()
        if config.stat().st_size > MAX_CONFIG_BYTES:
            return (), (f"{CONFIG_JSON} beside it is larger than {MAX_CONFIG_BYTES} bytes; its settings were not read",)
        document = json.loads(config.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        return (), (f"{CONFIG_JSON} beside it could not be read ({reason}); its BatchNorm settings are unknown",)
    if not isinstance(document, dict):
        return (), (f"{CONFIG_JSON} beside it is not a JSON object; its BatchNorm settings are unknown",)
    return tuple(_config_settings(document, "", None, 0)), ()
