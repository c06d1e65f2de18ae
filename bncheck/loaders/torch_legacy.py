"""Legacy (pre-1.6, non-zip) ``torch.save`` files: only torch can read them, with its restricted unpickler."""

from __future__ import annotations

import pickle
import re
from typing import Any

from bncheck.errors import CorruptCheckpointError, TorchRequiredError, UnreadableFileError
from bncheck.loaders.files import ByteSource
from bncheck.loaders.interface import Checkpoint, in_memory


def _to_refs(obj: Any, torch: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        dtype = str(obj.dtype).removeprefix("torch.")
        tensor = obj.detach().cpu()
        array = tensor.float().numpy() if dtype == "bfloat16" else tensor.numpy()
        return in_memory(array, dtype)
    if isinstance(obj, dict):
        return type(obj)((key, _to_refs(value, torch)) for key, value in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_to_refs(value, torch) for value in obj)
    return obj


def open_torch_legacy(source: ByteSource) -> Checkpoint:
    path = source.local_path
    if path is None:
        raise UnreadableFileError("legacy torch.save files can only be read from a local path (torch reads them whole)")
    try:
        import torch
    except ImportError:
        raise TorchRequiredError(
            "legacy (pre-1.6) torch.save format, which only torch can read: pip install 'bncheck[torch]'"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"the global {named.group(1)}" if named else "objects"
        raise CorruptCheckpointError(
            f"legacy torch.save file holds {what}, which torch's weights-only loader refuses; "
            "bncheck does not run its pickle"
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CorruptCheckpointError(f"torch cannot read this legacy file: {str(exc)[:200]}") from exc
    return Checkpoint(format="torch legacy", root=_to_refs(obj, torch))
