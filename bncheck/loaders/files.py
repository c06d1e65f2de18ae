"""Bounded reads of byte ranges, shared by the loaders."""

from __future__ import annotations

from pathlib import Path

from bncheck.errors import CorruptCheckpointError, UnreadableFileError


def read_range(path: Path, offset: int, length: int) -> bytes:
    """Exactly ``length`` bytes at ``offset``; a short read means the file is truncated."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
    except OSError as exc:
        raise UnreadableFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) != length:
        raise CorruptCheckpointError(f"file is truncated: needed {length} bytes at offset {offset}, got {len(data)}")
    return data
