"""Build the user's model and sample batches from command-line specs. Needs torch, imported lazily.

MODEL is ``package.module:factory`` or ``path/to/file.py:factory`` (a callable returning an ``nn.Module``), or a
TorchScript archive. DATA is a tensor file (``.safetensors``, ``.pt`` read with bncheck's safe reader, ``.npy``,
``.npz``) whose first dimension is the sample axis, or a ``module:callable`` / ``file.py:callable`` returning an
iterable of batches. This runs the user's own code (the factory, the data callable), never the checkpoint's.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.discover import StateDict
from bncheck.errors import BncheckError, DataError, ModelError, TorchRequiredError, first_line
from bncheck.recompute import Batch

if TYPE_CHECKING:
    import torch


def require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise TorchRequiredError(
            "recomputing statistics runs the model and needs torch: pip install 'bncheck[torch]'"
        ) from None
    return torch


def load_callable(spec: str, *, error: type[BncheckError]) -> Any:
    """``package.module:name`` or ``path/to/file.py:name`` -> the object."""
    target, sep, attribute = spec.rpartition(":")
    if not sep or not target or not attribute:
        raise error(f"{spec!r} is not of the form module:name or file.py:name")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise error(f"no such file: {target}")
            name = f"_bncheck_user_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise error(f"cannot import {target}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look the module up by name
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except BncheckError:
        raise
    except Exception as exc:  # the user's module failed to import: report it, one line
        raise error(f"importing {target} failed: {first_line(exc)}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise error(f"{target} has no attribute {attribute!r}") from None


def load_model(spec: str, *, kwargs: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Build the model from a factory spec or load a TorchScript archive."""
    torch = require_torch()
    path = Path(spec)
    if ":" not in spec or (path.is_file() and not spec.endswith(".py")):
        if not path.is_file():
            raise ModelError(f"{spec!r} is neither module:factory, file.py:factory nor a TorchScript file")
        try:
            return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-any-return]
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"{spec} is not a TorchScript archive: {first_line(exc)}") from exc
    factory = load_callable(spec, error=ModelError)
    if not callable(factory):
        raise ModelError(f"{spec} is not callable")
    try:
        model = factory(**(kwargs or {}))
    except Exception as exc:  # the user's factory raised: say so in one line
        raise ModelError(f"model factory {spec} raised {first_line(exc)}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model  # type: ignore[no-any-return]


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"--model-kwargs is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelError("--model-kwargs must be a JSON object of keyword arguments")
    return value


def _tensor_file(path: Path) -> dict[str, np.ndarray]:
    """Named arrays of a tensor file, read without running code."""
    from bncheck.loaders import open_checkpoint

    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {first_line(exc)}") from exc
    try:
        root = open_checkpoint(path).root
    except BncheckError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    from bncheck.loaders.interface import TensorRef

    if isinstance(root, TensorRef):
        return {"": root.read()}
    if isinstance(root, Mapping) and root and all(isinstance(v, TensorRef) for v in root.values()):
        return {str(name): ref.read() for name, ref in root.items()}
    raise DataError(f"{path} must hold one tensor or a flat dict of tensors")


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    import torch

    # torch wants writable memory; the checkpoint reader's arrays are read-only views, so those are copied
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def _sliced(arrays: dict[str, np.ndarray], batch_size: int, max_samples: int | None) -> Iterator[Batch]:
    lengths = {name: (array.shape[0] if array.ndim else None) for name, array in arrays.items()}
    if any(n is None for n in lengths.values()):
        raise DataError("data tensors need a sample axis (their first dimension); got a scalar")
    if len(set(lengths.values())) != 1:
        raise DataError(f"data tensors disagree on the number of samples: {lengths}")
    total = next(iter(lengths.values())) or 0
    if max_samples is not None:
        total = min(total, max_samples)
    for start in range(0, total, batch_size):
        part = {name: _to_tensor(array[start : min(start + batch_size, total)]) for name, array in arrays.items()}
        if len(part) == 1:  # one tensor is the one positional argument, whatever its name
            yield Batch(tuple(part.values()))
        else:
            yield Batch((), part)


def _from_callable(spec: str, max_samples: int | None) -> Iterator[Batch]:
    torch = require_torch()
    provider = load_callable(spec, error=DataError)
    try:
        batches = provider() if callable(provider) else provider
        iterator = iter(batches)
    except Exception as exc:  # the user's data code raised
        raise DataError(f"data callable {spec} raised {first_line(exc)}") from exc
    seen = 0
    while max_samples is None or seen < max_samples:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # a data loader that fails midway
            raise DataError(f"data callable {spec} raised {first_line(exc)}") from exc
        if isinstance(item, torch.Tensor):
            batch = Batch((item,))
        elif isinstance(item, tuple | list):
            batch = Batch(tuple(item))
        elif isinstance(item, Mapping):
            batch = Batch((), dict(item))
        else:
            raise DataError(f"data callable {spec} yielded {type(item).__name__}: expected a tensor, tuple or dict")
        size = next((v.shape[0] for v in (*batch.args, *batch.kwargs.values()) if isinstance(v, torch.Tensor)), 0)
        if max_samples is not None and seen + size > max_samples:
            keep = max_samples - seen
            batch = Batch(
                tuple(v[:keep] if isinstance(v, torch.Tensor) else v for v in batch.args),
                {k: v[:keep] if isinstance(v, torch.Tensor) else v for k, v in batch.kwargs.items()},
            )
            size = keep
        seen += size
        yield batch


def load_batches(spec: str, *, batch_size: int = 64, max_samples: int | None = None) -> list[Batch]:
    """The sample batches a DATA spec stands for (read fully: sample data is small)."""
    require_torch()
    if batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    path = Path(spec)
    if path.is_file() and not spec.endswith(".py"):
        batches = list(_sliced(_tensor_file(path), batch_size, max_samples))
    elif ":" in spec:
        batches = list(_from_callable(spec, max_samples))
    else:
        raise DataError(f"{spec!r} is neither a tensor file nor module:callable / file.py:callable")
    if not batches:
        raise DataError(f"{spec} holds no samples")
    return batches


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _prefix_for(model_keys: list[str], tensors: Mapping[str, Any]) -> tuple[str, int]:
    """The wrapper prefix (``''``, ``module.``, ``model.``...) under which most of the model's keys are found."""
    best, best_hits = "", sum(1 for k in model_keys if k in tensors)
    anchor = model_keys[0] if model_keys else ""
    for name in tensors:
        if anchor and name.endswith(anchor):
            prefix = name[: -len(anchor)]
            if prefix.endswith("."):
                hits = sum(1 for k in model_keys if prefix + k in tensors)
                if hits > best_hits:
                    best, best_hits = prefix, hits
    return best, best_hits


def load_state_into(
    model: torch.nn.Module, state_dicts: list[StateDict], *, source: str | None = None
) -> tuple[StateDict, str]:
    """Load the checkpoint's matching state dict into ``model`` with strict=True; return it and its prefix.

    Without ``source`` the state dict that fits the model best is used, raw weights before averaged ones.
    """

    if source is not None:
        state_dicts = [sd for sd in state_dicts if sd.source == source]
        if not state_dicts:
            raise ModelError(f"the checkpoint has no entry {source!r}")
    if not state_dicts:
        raise ModelError("the checkpoint holds no state dict to load into the model")
    model_keys = list(model.state_dict())
    ranked = sorted(state_dicts, key=lambda sd: (-_prefix_for(model_keys, sd.tensors)[1], sd.averaged))
    chosen = ranked[0]
    prefix, _ = _prefix_for(model_keys, chosen.tensors)
    missing = [k for k in model_keys if prefix + k not in chosen.tensors]
    unexpected = [
        name[len(prefix) :]
        for name in chosen.tensors
        if name.startswith(prefix) and name[len(prefix) :] not in set(model_keys)
    ]
    if missing or unexpected:
        where = f" (entry {chosen.source!r}, prefix {prefix!r})" if chosen.source or prefix else ""
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_listing(unexpected)}")
        raise ModelError(f"checkpoint does not fit the model{where}; " + "; ".join(parts))
    state = {}
    for key in model_keys:
        array = chosen.tensors[prefix + key].read()
        state[key] = _to_tensor(array)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shapes that differ; torch lists them one per line after a heading
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [first_line(exc)]
        raise ModelError(f"checkpoint does not fit the model: {_listing(details)}") from exc
    return chosen, prefix
