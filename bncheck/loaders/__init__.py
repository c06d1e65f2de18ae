"""Open a checkpoint of any supported format, recognised by its leading bytes rather than its extension."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

from bncheck.errors import UnsupportedFormatError
from bncheck.loaders.files import ByteSource, is_url, open_source
from bncheck.loaders.interface import Checkpoint, TensorRef

__all__ = [
    "Checkpoint",
    "TensorRef",
    "find_checkpoints",
    "is_url",
    "open_checkpoint",
    "open_source_checkpoint",
    "shards_named_by",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
INDEX_SUFFIX = ".index.json"
# A pickled int 0x1950a86a20f9469cfc6c (torch's legacy magic number), as protocol 2 writes it.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

_EXPECTED_BY_SUFFIX = {
    ".safetensors": "safetensors",
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
}


def sniff(source: ByteSource) -> str:
    """The format family of a file from its first bytes: 'safetensors', 'zip', 'legacy' or 'index'."""
    size = source.size
    if size == 0:
        raise UnsupportedFormatError("file is empty")
    head = source.read(0, min(size, 64))
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy"
    if len(head) >= 9 and head[8:9] == b"{":  # the header's length is checked when it is read
        return "safetensors"
    if source.name.endswith(INDEX_SUFFIX) or head.lstrip()[:1] == b"{":
        return "index"
    if head.startswith(b"\x80"):
        raise UnsupportedFormatError("a plain pickle, not a torch.save checkpoint")
    if _looks_like_text(head):
        raise UnsupportedFormatError("a text file, not a checkpoint")
    raise UnsupportedFormatError(f"unknown format (first bytes {head[:8].hex(' ')})")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def _disagreement(name: str, family: str) -> tuple[str, ...]:
    suffix = PurePosixPath(name).suffix.lower()
    expected = _EXPECTED_BY_SUFFIX.get(suffix)
    actual = "safetensors" if family == "safetensors" else "torch"
    if family == "index" or expected is None or expected == actual:
        return ()
    described = "a safetensors file" if actual == "safetensors" else "a torch.save file"
    return (f"named {suffix} but its bytes are {described}; read as what the bytes say",)


def open_checkpoint(path: os.PathLike[str] | str) -> Checkpoint:
    """Open one checkpoint: a file, a shard index, a directory holding one index or one ``model.safetensors``, or
    an fsspec URL (``https://``, ``s3://``, ``gs://``) of a file or shard index.

    Raises a BncheckError subclass with a one-line reason when the path cannot be read as a checkpoint.
    """
    if not is_url(path) and Path(path).is_dir():
        return open_checkpoint(_checkpoint_in_directory(Path(path)))
    return open_source_checkpoint(open_source(path))


def open_source_checkpoint(source: ByteSource) -> Checkpoint:
    """Open the checkpoint whose bytes ``source`` gives."""
    family = sniff(source)
    checkpoint = _reader(family)(source)
    notes = _disagreement(source.name, family)
    size = checkpoint.size_bytes if family == "index" else source.size
    return dataclasses.replace(checkpoint, notes=checkpoint.notes + notes, size_bytes=size)


def prefetch(refs: Iterable[TensorRef]) -> None:
    """Fetch the bytes these tensors will read together, per source: for a remote checkpoint a few concurrent
    requests instead of one round trip per tensor; nothing for local files."""
    by_source: dict[int, tuple[ByteSource, list[tuple[int, int]]]] = {}
    for ref in refs:
        if ref.span is not None:
            source, offset, length = ref.span
            by_source.setdefault(id(source), (source, []))[1].append((offset, length))
    for source, ranges in by_source.values():
        source.prefetch(ranges)


def _reader(family: str) -> Callable[[ByteSource], Checkpoint]:
    """The reader of one format, imported when a file of that format is first opened."""
    if family == "zip":
        from bncheck.loaders.torch_zip import open_torch_zip

        return open_torch_zip
    if family == "legacy":
        from bncheck.loaders.torch_legacy import open_torch_legacy

        return open_torch_legacy
    from bncheck.loaders.safetensors import open_safetensors, open_sharded

    return open_sharded if family == "index" else open_safetensors


def _checkpoint_in_directory(path: Path) -> Path:
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return indexes[0]
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    raise UnsupportedFormatError("directory holds no single checkpoint (a *.index.json or a model.safetensors)")


def shards_named_by(index: Path) -> set[Path]:
    """The shard files a shard index points to (empty when the index is unreadable)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {(index.parent / name).resolve() for name in weight_map.values()}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()  # opening the index will report what is wrong with it


def _excluded(path: Path, root: Path, patterns: Sequence[str]) -> bool:
    relative = path.relative_to(root).as_posix()
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(path.name, p) for p in patterns)


def find_checkpoints(path: os.PathLike[str] | str, *, exclude: Sequence[str] = ()) -> list[Path | str]:
    """The checkpoints a path stands for, in sorted order.

    A file is itself (whatever its name). A directory is searched recursively: every shard index is one checkpoint
    that stands for its shards, and every other file with a checkpoint extension is one checkpoint. ``exclude``
    globs drop files found in directories (matched against the path below the directory, or the file name).
    """
    if is_url(path):
        return [str(path)]  # a URL names one file or shard index; object stores are not listed
    path = Path(path)
    if not path.is_dir():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    indexes = [p for p in files if p.name.endswith(INDEX_SUFFIX)]
    shards = set().union(*(shards_named_by(index) for index in indexes)) if indexes else set()
    singles = [p for p in files if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.resolve() not in shards]
    return sorted((p for p in indexes + singles if not _excluded(p, path, exclude)), key=str)
