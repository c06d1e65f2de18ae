"""Legacy ``torch.save`` files (before PyTorch 1.6, or ``_use_new_zipfile_serialization=False``), read without torch.

The file is a sequence of pickles: torch's magic number, a protocol version, a dict of system information, the
object tree (tensors point at storages by key, as in zip archives), and the sorted list of storage keys. The
storages follow, in that order, each as an int64 element count and its raw little-endian bytes. torch.load unpickles
every one of those pickles with its full unpickler, so the globals of all five are recorded, and a file that torch
would refuse only after running some of them is reported with their globals rather than as unreadable.
"""

from __future__ import annotations

import pickletools
import struct
from typing import IO, Any, cast

import numpy as np

from bncheck.errors import CorruptCheckpointError, UnsupportedFormatError
from bncheck.loaders.dtypes import ITEMSIZE, bytes_to_array
from bncheck.loaders.files import ByteSource, ReadAheadFile
from bncheck.loaders.interface import Checkpoint, TensorRef, without_data
from bncheck.loaders.restricted_pickle import (
    StorageRef,
    TensorFactory,
    invalid_escapes_refused,
    strided_copy,
    unpickle,
    view_span,
)

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
PICKLE_READ_AHEAD = 64 * 1024


class PickleSequence:
    """The consecutive pickles at the start of the file, each located by decoding its opcodes before it is
    unpickled, so that it is unpickled from bytes whose size is known (and checked like any other pickle)."""

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.position = 0
        self.globals: list[str] = []  # every pickle's untrusted globals, in order: torch.load resolves them all
        # decoding asks for a few bytes per opcode: read ahead, a remote file costs a request per 64 KiB of pickles
        # rather than one per opcode
        self.stream = ReadAheadFile(source, block=PICKLE_READ_AHEAD)

    def next_bytes(self) -> bytes:
        stream = self.stream
        stream.seek(self.position)
        try:
            with invalid_escapes_refused():
                for _ in pickletools.genops(cast(IO[bytes], stream)):
                    pass  # decoding every opcode up to STOP validates lengths and finds where the pickle ends
            end = stream.tell()
        except (
            ValueError,
            TypeError,
            EOFError,
            OverflowError,
            struct.error,
            UnicodeDecodeError,
            DeprecationWarning,
        ) as exc:
            raise CorruptCheckpointError(f"cannot parse legacy torch.save file: {exc}"[:300]) from exc
        stream.seek(self.position)
        data = stream.read(end - self.position)  # from the read-ahead buffer unless the pickle is larger
        self.position = end
        return data

    def plain(self, what: str) -> Any:
        """One of the small header pickles, which torch writes with only ints, strings and dicts. torch.load
        unpickles each of them with its full unpickler, so a global hidden in one is recorded like any other."""

        def no_tensors(*_: Any) -> TensorRef:
            raise CorruptCheckpointError(f"unexpected tensor in the {what} record")

        return self.unpickle(no_tensors)

    def unpickle(self, make_tensor: TensorFactory, storages: dict[str, StorageRef] | None = None) -> Any:
        value, untrusted = unpickle(self.next_bytes(), make_tensor, storages=storages)
        self.globals.extend(g for g in untrusted if g not in self.globals)
        return value

    def refused(self, reason: str) -> Checkpoint:
        """What torch.load would refuse after running the pickles so far: an error, unless those pickles named
        globals, which torch resolved and called before refusing; then their findings are the report."""
        if not self.globals:
            raise CorruptCheckpointError(reason)
        note = f"{reason}: torch.load runs the pickles before it and then refuses the file; no layers were read"
        return Checkpoint(format="torch legacy", root=None, globals=tuple(self.globals), notes=(note,))


def open_torch_legacy(source: ByteSource) -> Checkpoint:
    offsets: dict[str, int] = {}  # storage key -> absolute offset of its bytes, known once the pickles are read
    sizes: dict[str, int] = {}

    def make_tensor(
        storage: StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...], dtype: str
    ) -> TensorRef:
        itemsize, span = view_span(offset, size, stride, dtype)
        if span and storage.numel == 0:  # a storage resized to zero, written as it is (see torch_zip)
            return without_data(dtype, size, "zero-size storage")
        start = storage.element_offset + offset

        def read() -> np.ndarray:
            if storage.key not in offsets:
                raise CorruptCheckpointError(f"storage {storage.key} is missing from the file")
            if (start + span) * itemsize > sizes[storage.key]:
                raise CorruptCheckpointError(f"tensor of size {size} reaches past its storage {storage.key}")
            flat = bytes_to_array(source.read(offsets[storage.key] + start * itemsize, span * itemsize), dtype)
            return strided_copy(flat, size, stride)

        return TensorRef(dtype=dtype, shape=size, reader=read)  # no ByteLocation: recalibrate writes zip files

    pickles = PickleSequence(source)
    if pickles.plain("magic number") != MAGIC_NUMBER:
        if not pickles.globals:
            raise UnsupportedFormatError("a plain pickle, not a torch.save checkpoint")
        return pickles.refused("not a torch.save file: its first pickle is not torch's magic number")
    if pickles.plain("protocol version") != PROTOCOL_VERSION:
        return pickles.refused("unsupported legacy torch.save protocol version")
    pickles.plain("system information")
    storages: dict[str, StorageRef] = {}
    root = pickles.unpickle(make_tensor, storages)
    keys = pickles.plain("storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return pickles.refused("malformed storage key list")
    position = pickles.position
    for key in keys:
        (count,) = struct.unpack("<q", source.read(position, 8))
        if key not in storages:
            raise CorruptCheckpointError(f"storage {key} is listed but no tensor or storage record names it")
        itemsize = ITEMSIZE.get(storages[key].dtype, 1)
        if count < 0 or position + 8 + count * itemsize > source.size:
            raise CorruptCheckpointError(f"storage {key} claims {count} elements, more than the file holds")
        offsets[key] = position + 8
        sizes[key] = count * itemsize
        position += 8 + count * itemsize
    return Checkpoint(format="torch legacy", root=root, globals=tuple(pickles.globals))
