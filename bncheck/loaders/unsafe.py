"""``--unsafe-load``: let torch unpickle a file, running whatever code it holds. Never the default.

Only for files whose tensors exist only after their own code runs (tensors rebuilt by custom ``__reduce__``
methods or stored as objects bncheck does not rebuild) and that come from a trusted source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bncheck.errors import CorruptCheckpointError, TorchRequiredError
from bncheck.loaders.interface import Checkpoint, in_memory

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
