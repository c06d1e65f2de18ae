"""``--unsafe-load``: let torch unpickle a file, running whatever code it holds. Never the default.

Only for files whose tensors exist only after their own code runs (tensors rebuilt by custom ``__reduce__``
methods or stored as objects bncheck does not rebuild) and that come from a trusted source.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bncheck.errors import BncheckError, CorruptCheckpointError, TorchRequiredError
from bncheck.loaders.files import LocalSource
from bncheck.loaders.interface import Checkpoint, in_memory
from bncheck.loaders.restricted_pickle import scan_globals
from bncheck.loaders.torch_zip import ZIP_ERRORS, scan_pickle_members

# pickles are a few hundred bytes per tensor: a tar member, or the start of a legacy file, is scanned up to this size
MAX_SCANNED_PICKLE_BYTES = 64 * 1024 * 1024
WARNING = "--unsafe-load runs the code inside the checkpoint's pickle with your rights; use it only on trusted files"


def _convert(obj: Any, torch: Any, depth: int = 0) -> Any:
    if depth > 64:
        return None
    if isinstance(obj, torch.Tensor):
        dtype = str(obj.dtype).removeprefix("torch.")
        tensor = obj.detach().cpu()
        return in_memory(tensor.float().numpy() if dtype == "bfloat16" else tensor.numpy(), dtype)
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "fiub":
        return in_memory(obj, str(obj.dtype))
    if isinstance(obj, torch.nn.Module):
        return _convert(obj.state_dict(), torch, depth + 1)
    if isinstance(obj, dict):
        return {key: _convert(value, torch, depth + 1) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_convert(value, torch, depth + 1) for value in obj]
    if hasattr(obj, "__dict__"):
        return {key: _convert(value, torch, depth + 1) for key, value in vars(obj).items()}
    return obj


def globals_torch_would_meet(path: Path) -> tuple[str, ...]:
    """The globals named by every pickle torch.load could unpickle in a file bncheck's own reader refused, read
    statically (``scan_globals``): a zip's pickle members as torch's reader finds them, a tar's members, or the five
    pickles a legacy file starts with. Whatever cannot be parsed adds nothing."""
    names: list[str] = []
    with contextlib.suppress(*ZIP_ERRORS, tarfile.TarError, BncheckError):
        if zipfile.is_zipfile(path):
            source = LocalSource(path)
            try:
                return scan_pickle_members(source)
            finally:
                source.close()
        if tarfile.is_tarfile(path):
            with tarfile.open(path) as archive:
                for member in archive.getmembers():
                    handle = archive.extractfile(member) if member.size <= MAX_SCANNED_PICKLE_BYTES else None
                    if handle is not None:
                        names += scan_globals(io.BytesIO(handle.read()))
        else:
            # the pickles come first and are small (the storages follow them): an opcode claiming gigabytes of
            # bytes reads at most this prefix
            with path.open("rb") as handle:
                head = io.BytesIO(handle.read(MAX_SCANNED_PICKLE_BYTES))
            for _ in range(5):  # magic number, protocol, system information, objects, storage keys
                names += scan_globals(head)
    return tuple(dict.fromkeys(names))


def open_with_torch(path: Path) -> Checkpoint:
    try:
        import torch
    except ImportError:
        raise TorchRequiredError("--unsafe-load needs torch: pip install 'bncheck[torch]'") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary code ran and failed: report it, do not crash
        raise CorruptCheckpointError(f"torch.load failed: {type(exc).__name__}: {exc}"[:300]) from exc
    return Checkpoint(
        format="torch (unsafe load)",
        root=_convert(obj, torch),
        notes=("read with --unsafe-load: torch ran the pickle's code",),
        size_bytes=path.stat().st_size,
    )
