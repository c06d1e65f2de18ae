"""Open a checkpoint of any supported format, recognised by its leading bytes rather than its extension."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import os
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from bncheck.errors import UnsupportedFormatError
from bncheck.loaders.files import ByteSource, is_remote_folder, is_url, list_remote_folder, open_source
from bncheck.loaders.interface import Checkpoint, Format, TensorRef

__all__ = [
    "FORMATS",
    "Checkpoint",
    "Format",
    "TensorRef",
    "find_checkpoints",
    "is_url",
    "open_checkpoint",
    "open_source_checkpoint",
    "search_checkpoints",
    "shards_named_by",
]

# torch.load reads any file that is not a zip archive as a legacy file: it unpickles the first pickle, running
# whatever it names, before comparing it with the magic number 0x1950a86a20f9469cfc6c. So every pickle (protocol 2
# and later start with PROTO; see _is_pickle for 0 and 1) goes to the legacy reader, which reports the globals of one
# that is not torch's.
_PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INDEX_SUFFIX = ".index.json"
# what the leading-bytes tests see: a tar header block is 512 bytes
SNIFF_BYTES = 512
# a file found in a folder: a local path or a URL
_Found = TypeVar("_Found", Path, str)


# The opcodes a protocol 0 or 1 pickle (no PROTO opcode) of an object worth loading starts with: a global, a mark, an
# instance, an empty container. torch.load runs such a pickle just the same.
_OLD_PICKLE_STARTS = frozenset({"GLOBAL", "MARK", "INST", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE"})


def _is_pickle(head: bytes) -> bool:
    """Whether the file starts with a pickle: a PROTO opcode (protocol 2 and later), or a protocol 0/1 pickle whose
    opcodes decode to its STOP, or through the whole head, from a plausible first opcode."""
    if head.startswith(_PICKLE_PROTOCOLS):
        return True
    import io
    import pickletools  # only for files that are no archive and no safetensors
    import warnings

    decoded = 0
    try:
        with warnings.catch_warnings():
            # a STRING with an invalid escape decodes with a DeprecationWarning; the legacy reader refuses it
            warnings.simplefilter("error", DeprecationWarning)
            for opcode, _, _ in pickletools.genops(io.BytesIO(head)):
                if decoded == 0 and opcode.name not in _OLD_PICKLE_STARTS:
                    return False
                decoded += 1
                if opcode.name == "STOP":
                    return decoded >= 3
    except DeprecationWarning:
        return decoded >= 3
    except (ValueError, TypeError, EOFError, OverflowError, UnicodeDecodeError) as exc:
        # a valid start cut off by the end of the head, not an unknown opcode
        return decoded >= 3 and len(head) == SNIFF_BYTES and "unknown" not in str(exc)
    return False


# An ONNX model is a protobuf ModelProto, which has no magic number: a file named .onnx whose first bytes are the key
# of one of its fields, with the field's wire type. Exporters write ir_version (field 1, a varint: 08) first.
_ONNX_FIRST_KEYS = frozenset(bytes([key]) for key in (0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72))
_ONNX_FIRST_TWO_BYTE_KEYS = (b"\xa2\x01", b"\xca\x01", b"\xd2\x01")  # training_info, functions, configuration
ONNX_SUFFIX = ".onnx"


def _is_onnx(head: bytes, name: str) -> bool:
    return name.lower().endswith(ONNX_SUFFIX) and (
        head[:1] in _ONNX_FIRST_KEYS or head.startswith(_ONNX_FIRST_TWO_BYTE_KEYS)
    )


def _is_tar_header(head: bytes) -> bool:
    """Whether ``tarfile`` accepts the first block as a member header: the test torch's loader makes first."""
    if len(head) < SNIFF_BYTES:
        return False
    # the checksum field holds octal digits padded with NUL or spaces (or, first byte 0x80/0xff, a base-256 number):
    # anything else tarfile refuses too, so a safetensors or pickle file is turned away without importing tarfile
    checksum = head[148:156]
    if checksum[:1] not in (b"\x80", b"\xff") and checksum.translate(None, b"01234567 \x00"):
        return False
    import tarfile  # only for files that could be tar archives

    try:
        tarfile.TarInfo.frombuf(head[:SNIFF_BYTES], "utf-8", "surrogateescape")
    except (tarfile.TarError, ValueError, UnicodeError, OverflowError):
        return False
    return True


def _pickle_first(head: bytes) -> bool:
    """Whether a zip's first local header names ``<folder>/data.pkl`` (in any case, as torch's reader compares
    names): torch.save writes its pickle first, so a torch.save file skips the content test of the .pt2 format, which
    reads the zip directory. A file whose directory then holds no data.pkl is refused by the zip reader."""
    name_length = int.from_bytes(head[26:28], "little")
    return head[30 : 30 + name_length].lower().endswith(b"/data.pkl")


# Every format bncheck reads, in the order their leading-bytes tests are tried (torch's order for its own
# formats). A new format is a loader module and one entry here: the dispatcher, the directory search, the CLI help
# and the rules that depend on the format's semantics all read this table (a test keeps .pre-commit-hooks.yaml in
# step with it).
FORMATS: tuple[Format, ...] = (
    Format(
        name="onnx",
        described="an ONNX model",
        suffixes=(ONNX_SUFFIX,),
        # by name and first field, before the torch formats: no ModelProto starts as a zip, and the name decides
        matches=_is_onnx,
        reader="bncheck.loaders.onnx:open_onnx",
        # an exported graph keeps no num_batches_tracked
        batch_counter=False,
    ),
    Format(
        name="torch export",
        described="a torch.export archive",
        suffixes=(".pt2",),
        # a zip as torch.save writes it, told apart by its contents as torch tells them apart: torch.export.load
        # checks the archive_format record, torch.load reads data.pkl
        matches=lambda head, _: head.startswith(b"PK\x03\x04") and not _pickle_first(head),
        claims="bncheck.loaders.torch_export:holds_exported_program",
        reader="bncheck.loaders.torch_export:open_torch_export",
    ),
    Format(
        name="torch zip",
        described="a torch.save file",
        suffixes=_TORCH_SUFFIXES,
        # torch's own test (_is_zipfile): a local header first; anything else goes on to the tar and legacy tests
        matches=lambda head, _: head.startswith(b"PK\x03\x04"),
        reader="bncheck.loaders.torch_zip:open_torch_zip",
    ),
    Format(
        name="torch tar",
        described="a torch.save file",
        suffixes=_TORCH_SUFFIXES,
        # torch tries tarfile before the legacy pickle, so a first block tarfile accepts wins over the legacy magic
        matches=lambda head, _: _is_tar_header(head),
        reader="bncheck.loaders.torch_tar:open_torch_tar",
    ),
    Format(
        name="safetensors",
        described="a safetensors file",
        suffixes=(".safetensors",),
        # an 8-byte header length, then the JSON header (whose length is checked when it is read). Tried before the
        # pickle test: a header of 640 bytes starts the file with 80 02, as a protocol-2 pickle starts; torch's
        # legacy magic number puts f9 where a safetensors file has its "{"
        matches=lambda head, _: head[8:9] == b"{",
        reader="bncheck.loaders.safetensors:open_safetensors",
        sorted_names=True,
    ),
    Format(
        name="torch legacy",
        described="a torch.save file",
        suffixes=_TORCH_SUFFIXES,
        matches=lambda head, _: _is_pickle(head),
        reader="bncheck.loaders.torch_legacy:open_torch_legacy",
    ),
    Format(
        name="shard index",
        described="a shard index",
        suffixes=(INDEX_SUFFIX,),
        matches=lambda head, name: name.endswith(INDEX_SUFFIX) or head.lstrip()[:1] == b"{",
        reader="bncheck.loaders.safetensors:open_sharded",
        sorted_names=True,
    ),
)


def checkpoint_suffixes() -> tuple[str, ...]:
    """The file name endings a directory search picks up: every registered format's, in registry order."""
    return tuple(dict.fromkeys(suffix for fmt in FORMATS for suffix in fmt.suffixes))


def sniff(source: ByteSource) -> Format:
    """The format of a file, from its first bytes (and, for a shard index, its name)."""
    size = source.size
    if size == 0:
        raise UnsupportedFormatError("file is empty")
    head = source.read(0, min(size, SNIFF_BYTES))
    for fmt in FORMATS:
        if fmt.matches(head, source.name) and (fmt.claims is None or _function(fmt.claims)(source)):
            return fmt
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


def _disagreement(name: str, fmt: Format) -> tuple[str, ...]:
    """A note when the file's name promises another kind of file than its bytes are."""
    lowered = name.lower()
    promised = {other.described for other in FORMATS if lowered.endswith(other.suffixes)}
    if not promised or fmt.described in promised:
        return ()
    suffix = PurePosixPath(name).suffix.lower()
    return (f"named {suffix} but its bytes are {fmt.described}; read as what the bytes say",)


def open_checkpoint(path: os.PathLike[str] | str) -> Checkpoint:
    """Open one checkpoint: a file, a shard index, a directory holding one index or one ``model.safetensors``, or
    an fsspec URL (``https://``, ``s3://``, ``gs://``) of a file or shard index.

    Raises a BncheckError subclass with a one-line reason when the path cannot be read as a checkpoint.
    """
    if not is_url(path) and Path(path).is_dir():
        return open_checkpoint(_checkpoint_in_directory(Path(path)))
    return open_source_checkpoint(open_source(path))


def _function(name: str) -> Callable[[ByteSource], Any]:
    """A registry entry's ``module:function``, imported when first called for."""
    module, _, function = name.partition(":")
    found: Callable[[ByteSource], Any] = getattr(importlib.import_module(module), function)
    return found


def open_source_checkpoint(source: ByteSource) -> Checkpoint:
    """Open the checkpoint whose bytes ``source`` gives, with the reader its leading bytes call for."""
    fmt = sniff(source)
    checkpoint: Checkpoint = _function(fmt.reader)(source)
    size = checkpoint.size_bytes if checkpoint.size_bytes is not None else source.size
    return dataclasses.replace(
        checkpoint,
        notes=checkpoint.notes + _disagreement(source.name, fmt),
        size_bytes=size,
        batch_counter=checkpoint.batch_counter and fmt.batch_counter,
        sorted_names=fmt.sorted_names,
    )


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


def _checkpoint_in_directory(path: Path) -> Path:
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return indexes[0]
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    raise UnsupportedFormatError("directory holds no single checkpoint (a *.index.json or a model.safetensors)")


def _shard_names(data: bytes) -> set[str]:
    """The shard file names in a shard index's JSON (raises when it is not one)."""
    from bncheck.loaders.safetensors import parse_json

    return set(parse_json(data, "shard index").get("weight_map", {}).values())


def shards_named_by(index: Path) -> set[Path]:
    """The shard files a shard index points to (empty when the index is unreadable: opening it reports why)."""
    from bncheck.errors import BncheckError
    from bncheck.loaders.safetensors import MAX_HEADER_BYTES

    try:
        if index.stat().st_size > MAX_HEADER_BYTES:
            return set()
        return {(index.parent / name).resolve() for name in _shard_names(index.read_bytes())}
    except (OSError, BncheckError, ValueError, AttributeError, TypeError):
        return set()


def _shard_urls_named_by(index: str) -> set[str]:
    """The URLs of the shards a remote shard index points to, normalised (empty when the index is unreadable)."""
    from bncheck.errors import BncheckError
    from bncheck.loaders.safetensors import MAX_HEADER_BYTES

    try:
        source = open_source(index)
        if source.size > MAX_HEADER_BYTES:
            return set()
        return {_normalised_url(source.sibling(name).name) for name in _shard_names(source.read(0, source.size))}
    except (BncheckError, ValueError, AttributeError, TypeError):
        return set()


def _normalised_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{posixpath.normpath(rest)}"


def _excluded(relative: str, patterns: Sequence[str]) -> bool:
    name = relative.rpartition("/")[2]
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _names_a_folder(url: str) -> bool:
    """A URL ending in / names a folder; one ending in a checkpoint's suffix names a file without a request to ask."""
    if url.endswith("/"):
        return True
    return not url.lower().endswith(checkpoint_suffixes()) and is_remote_folder(url)


def _checkpoints_among(
    files: Mapping[str, _Found], *, shards_of: Callable[[_Found], set[Any]], same_file: Callable[[_Found], Any]
) -> list[tuple[str, _Found]]:
    """The checkpoints among a folder's files (path below the folder -> the file), sorted by location: every shard
    index, and every other file with a checkpoint's suffix that no index names as a shard, outside dot-folders."""
    visible = {
        relative: found
        for relative, found in files.items()
        if not any(part.startswith(".") for part in relative.split("/"))
    }
    indexes = [relative for relative in visible if relative.endswith(INDEX_SUFFIX)]
    shards = set().union(*(shards_of(visible[relative]) for relative in indexes))
    suffixes = checkpoint_suffixes()
    singles = [
        relative
        for relative, found in visible.items()
        if relative.lower().endswith(suffixes)
        and not relative.endswith(INDEX_SUFFIX)
        and not (shards and same_file(found) in shards)
    ]
    return sorted(((relative, visible[relative]) for relative in indexes + singles), key=lambda pair: str(pair[1]))


def find_checkpoints(path: os.PathLike[str] | str, *, exclude: Sequence[str] = ()) -> list[Path | str]:
    """The checkpoints a path or URL stands for, in sorted order.

    A file is itself (whatever its name). A directory is searched recursively: every shard index is one checkpoint
    that stands for its shards, and every other file with a checkpoint extension is one checkpoint. A URL that ends
    in ``/``, or that names a bucket or prefix on its object store, is a folder searched the same way through fsspec.
    ``exclude`` globs drop files found in folders (matched against the path below the folder, or the file name).
    Raises a BncheckError with one line when a remote folder cannot be listed.
    """
    return [found for found, _ in search_checkpoints(path, exclude=exclude)]


def search_checkpoints(
    path: os.PathLike[str] | str, *, exclude: Sequence[str] = (), mark: Sequence[str] = ()
) -> list[tuple[Path | str, bool]]:
    """``find_checkpoints(path, exclude=exclude)``, each paired with whether the ``mark`` globs would drop it too: one
    search (one listing of a remote folder) serves two sets of globs."""
    chosen: list[tuple[str, Path]] | list[tuple[str, str]]
    if is_url(path):
        url = str(path)
        if not _names_a_folder(url):
            return [(url, False)]
        chosen = _checkpoints_among(list_remote_folder(url), shards_of=_shard_urls_named_by, same_file=_normalised_url)
    else:
        path = Path(path)
        if not path.is_dir():
            return [(path, False)]
        files = {found.relative_to(path).as_posix(): found for found in sorted(path.rglob("*")) if found.is_file()}
        chosen = _checkpoints_among(files, shards_of=shards_named_by, same_file=Path.resolve)
    return [(found, _excluded(relative, mark)) for relative, found in chosen if not _excluded(relative, exclude)]
