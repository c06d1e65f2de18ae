"""Build the user's model and sample batches from command-line specs. Needs torch, imported lazily.

MODEL is ``package.module:factory`` or ``path/to/file.py:factory`` (a callable returning an ``nn.Module``), or a
TorchScript archive. DATA is a tensor file (``.safetensors``, ``.pt`` read with bncheck's safe reader, ``.npy``,
``.npz``) whose first dimension is the sample axis, or a ``module:callable`` / ``file.py:callable`` returning an
iterable of batches. This runs the user's own code (the factory, the data callable), never the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.discover import StateDict
from bncheck.errors import BncheckError, DataError, ModelError, TorchRequiredError, first_line
from bncheck.recompute import DEFAULT_MAX_SAMPLES, Batch, batch_size_of

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
    if path.suffix == ".py" and ":" not in spec:
        raise ModelError(f"{spec} is a Python file: name the function that builds the model ({spec}:NAME)")
    if ":" not in spec or (path.is_file() and path.suffix != ".py"):
        if not path.is_file():
            raise ModelError(f"no such file: {spec} (expected a TorchScript archive, module:factory or file.py:NAME)")
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
        if suffix == ".npy":  # memory-mapped: each batch is read from disk when it is needed
            return {"": np.load(path, mmap_mode="r", allow_pickle=False)}
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


@dataclass(frozen=True, kw_only=True)
class SampleData:
    """A DATA spec's batches, read one at a time each time they are iterated (once per checkpoint).

    ``max_samples`` None means the whole loader. ``inputs`` chooses the model's inputs from each tuple or dict
    batch (indexes or keys); empty: the whole batch, or its first element when the model takes one input.
    """

    spec: str
    batch_size: int = 64
    max_samples: int | None = DEFAULT_MAX_SAMPLES
    inputs: tuple[str, ...] = ()
    # under torchrun: this process's rank and the number of ranks (see ``shard``)
    rank: int = 0
    world_size: int = 1

    def shard(self, rank: int, world_size: int) -> SampleData:
        """This rank's share of the data. bncheck splits a tensor file: the batches of its first ``max_samples``
        samples go to the ranks in turn (batch i to rank i mod N), so together the ranks run exactly the batches
        one process would. A callable runs in every rank and shards itself (a DistributedSampler); each rank takes
        its share of ``max_samples`` from it."""
        return dataclasses.replace(self, rank=rank, world_size=world_size)

    @property
    def budget(self) -> int | None:
        """The most samples this process takes from ``items()``; None: all of them."""
        if self.max_samples is None or self.world_size == 1 or self._tensor_path() is not None:
            return self.max_samples
        share, rest = divmod(self.max_samples, self.world_size)
        return share + (1 if self.rank < rest else 0)

    def check(self) -> None:
        """Raise DataError now for a spec that cannot give batches, before any model runs."""
        if self._tensor_path() is not None:
            _tensor_file(Path(self.spec))
        else:
            load_callable(self.spec, error=DataError)

    def items(self) -> Iterator[Any]:
        """The raw batches: a tensor, a tuple or list, or a dict of tensors each."""
        path = self._tensor_path()
        if path is not None:
            yield from _sliced(_tensor_file(path), self.batch_size, self.max_samples, self.rank, self.world_size)
        else:
            yield from _from_callable(self.spec)

    def total_samples(self) -> int | None:
        """How many samples one pass will use in this process, when that is known before it starts (for a
        progress bar)."""
        path = self._tensor_path()
        if path is None or path.suffix.lower() != ".npy":
            return None
        try:
            known = int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
        except (OSError, ValueError, IndexError):
            return None
        total = known if self.max_samples is None else min(known, self.max_samples)
        starts = range(0, total, self.batch_size)[self.rank :: self.world_size]
        return sum(min(self.batch_size, total - start) for start in starts)

    def _tensor_path(self) -> Path | None:
        """The tensor file the spec names; None for a callable spec; DataError for neither."""
        path = Path(self.spec)
        if path.is_file() and path.suffix != ".py":
            return path
        if ":" in self.spec and not path.exists():
            return None
        if path.suffix == ".py" and path.is_file():
            raise DataError(f"{self.spec} is a Python file: name the callable that returns batches ({self.spec}:NAME)")
        if not path.exists():
            raise DataError(f"no such file: {self.spec}")
        raise DataError(f"{self.spec} is not a file: give a tensor file or module:callable / file.py:callable")


def _sliced(
    arrays: dict[str, np.ndarray], batch_size: int, limit: int | None, rank: int = 0, world_size: int = 1
) -> Iterator[Any]:
    """Batches of the first ``limit`` samples (None: all); of those, every ``world_size``-th from ``rank`` on."""
    lengths = {name: (array.shape[0] if array.ndim else None) for name, array in arrays.items()}
    if any(n is None for n in lengths.values()):
        raise DataError("data tensors need a sample axis (their first dimension); got a scalar")
    if len(set(lengths.values())) != 1:
        raise DataError(f"data tensors disagree on the number of samples: {lengths}")
    total = next(iter(lengths.values())) or 0
    if limit is not None:
        total = min(total, limit)
    for start in range(0, total, batch_size)[rank::world_size]:
        end = min(start + batch_size, total)
        part = {name: _to_tensor(array[start:end]) for name, array in arrays.items()}
        # one tensor is the one input, whatever its name; several are a dict batch
        yield next(iter(part.values())) if len(part) == 1 else part


def _from_callable(spec: str) -> Iterator[Any]:
    provider = load_callable(spec, error=DataError)
    try:
        batches = provider() if callable(provider) else provider
        iterator = iter(batches)
    except Exception as exc:  # the user's data code raised
        raise DataError(f"data callable {spec} raised {first_line(exc)}") from exc
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # a data loader that fails midway
            raise DataError(f"data callable {spec} raised {first_line(exc)}") from exc
        yield item


def input_count(model: torch.nn.Module) -> int | None:
    """How many positional inputs ``model`` takes, when its signature says so exactly (None: it varies)."""
    import inspect

    import torch

    if isinstance(model, torch.jit.ScriptModule):
        try:
            arguments = model.forward.schema.arguments[1:]  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            return None
        return len(arguments)
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.default is not p.empty for p in positional):
        return None
    return len(positional)


def _select(item: Any, inputs: tuple[str, ...], spec: str) -> Batch:
    """The elements ``--inputs`` names: one is the model's one positional input; several from a tuple are
    positional arguments in that order, several from a dict keyword arguments."""
    chosen = []
    for key in inputs:
        try:
            if isinstance(item, Mapping):
                chosen.append(item[key])
            elif isinstance(item, tuple | list):
                chosen.append(item[int(key)])
            else:
                raise DataError(f"--inputs {','.join(inputs)} needs tuple or dict batches; {spec} yields a tensor")
        except (KeyError, IndexError, ValueError):
            have = list(item) if isinstance(item, Mapping) else f"indexes 0..{len(item) - 1}"
            raise DataError(f"--inputs: the batches of {spec} have no element {key!r} (they have {have})") from None
    if isinstance(item, Mapping) and len(inputs) > 1:
        return Batch((), dict(zip(inputs, chosen, strict=True)))
    return Batch(tuple(chosen))


def model_batches(data: SampleData, model: torch.nn.Module, notes: list[str]) -> Iterator[Batch]:
    """The model's inputs from each batch of ``data``, at most ``data.budget`` samples, one batch at a time.

    A tensor batch is the one input, a tuple the positional inputs and a dict the keyword inputs; when the model
    takes exactly one input and a tuple batch holds more (``(inputs, labels)``), its first element is used and
    ``notes`` says so.
    """
    import torch

    single = input_count(model) == 1
    budget = data.budget
    seen = 0
    for item in data.items():
        if budget is not None and seen >= budget:
            return
        if data.inputs:
            batch = _select(item, data.inputs, data.spec)
        elif isinstance(item, torch.Tensor):
            batch = Batch((item,))
        elif isinstance(item, tuple | list):
            if single and len(item) > 1 and isinstance(item[0], torch.Tensor):
                note = (
                    f"each batch holds {len(item)} elements and the model takes one input: element 0 was used "
                    "(choose with --inputs)"
                )
                if note not in notes:
                    notes.append(note)
                item = item[:1]
            batch = Batch(tuple(item))
        elif isinstance(item, Mapping):
            batch = Batch((), dict(item))
        else:
            raise DataError(f"{data.spec} yielded {type(item).__name__}: expected a tensor, tuple or dict")
        size = batch_size_of(batch)
        if budget is not None and seen + size > budget:
            keep = budget - seen
            batch = Batch(
                tuple(_first_rows(v, keep) for v in batch.args),
                {k: _first_rows(v, keep) for k, v in batch.kwargs.items()},
            )
            size = keep
        seen += size
        yield batch


def _first_rows(value: Any, rows: int) -> Any:
    import torch

    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[:rows]
    if isinstance(value, tuple | list):
        return type(value)(_first_rows(v, rows) for v in value)
    if isinstance(value, Mapping):
        return {k: _first_rows(v, rows) for k, v in value.items()}
    return value


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
    # torch's strict load accepts a state dict without num_batches_tracked when it carries no version metadata,
    # which no safetensors file and no state dict bncheck reads does: the layer keeps its own counter
    missing = [k for k in model_keys if prefix + k not in chosen.tensors and not _optional_counter(model, k)]
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
        if prefix + key not in chosen.tensors:
            continue
        array = chosen.tensors[prefix + key].read()
        state[key] = _to_tensor(array)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shapes that differ; torch lists them one per line after a heading
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [first_line(exc)]
        raise ModelError(f"checkpoint does not fit the model: {_listing(details)}") from exc
    return chosen, prefix


def _optional_counter(model: torch.nn.Module, key: str) -> bool:
    """Whether ``key`` is a BatchNorm's num_batches_tracked, which torch's loader fills in when it is missing."""
    from torch.nn.modules.batchnorm import _NormBase

    owner, _, name = key.rpartition(".")
    if name != "num_batches_tracked":
        return False
    try:
        return isinstance(model.get_submodule(owner), _NormBase)
    except AttributeError:
        return False
