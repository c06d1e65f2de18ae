"""Legacy ``torch.save`` files (before PyTorch 1.6, or ``_use_new_zipfile_serialization=False``), read without torch.

The file is a sequence of pickles: torch's magic number, a protocol version, a dict of system information, the
object tree (tensors point at storages by key, as in zip archives), and the sorted list of storage keys. The
storages follow, in that order, each as an int64 element count and its raw little-endian bytes.
"""

from __future__ import annotations

import pickletools
import struct
from typing import IO, Any, cast

import numpy as np

from bncheck.errors import CorruptCheckpointError
from bncheck.loaders.dtypes import ITEMSIZE, bytes_to_array
from bncheck.loaders.files import ByteSource, SourceFile
from bncheck.loaders.interface import Checkpoint, TensorRef
from bncheck.loaders.restricted_pickle import (
    StorageRef,
    invalid_escapes_refused,
    strided_copy,
    unpickle,
    view_span,
)

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


class PickleSequence:
    """The consecutive pickles at the start of the file, each located by decoding its opcodes before it is
    unpickled, so that it is unpickled from bytes whose size is known (and checked like any other pickle)."""

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.position = 0

    def next_bytes(self) -> bytes:
        stream = SourceFile(self.source)
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
        data = self.source.read(self.position, end - self.position)
        self.position = end
        return data

    def plain(self, what: str) -> Any:
        """One of the small header pickles, which hold only ints, strings and dicts."""

        def no_tensors(*_: Any) -> TensorRef:
            raise CorruptCheckpointError(f"unexpected tensor in the {what} record")

        value, untrusted = unpickle(self.next_bytes(), no_tensors)
        if untrusted:
            raise CorruptCheckpointError(f"the {what} record names {untrusted[0]}: not a torch.save file")
        return value


def open_torch_legacy(source: ByteSource) -> Checkpoint:
    offsets: dict[str, int] = {}  # storage key -> absolute offset of its bytes, known once the pickles are read
    sizes: dict[str, int] = {}

    def make_tensor(
        storage: StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...], dtype: str
    ) -> TensorRef:
        itemsize, span = view_span(offset, size, stride, dtype)
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
        raise CorruptCheckpointError("not a torch.save file: wrong magic number")
    if pickles.plain("protocol version") != PROTOCOL_VERSION:
        raise CorruptCheckpointError("unsupported legacy torch.save protocol version")
    pickles.plain("system information")
    storages: dict[str, StorageRef] = {}
    root, untrusted = unpickle(pickles.next_bytes(), make_tensor, storages=storages)
    keys = pickles.plain("storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CorruptCheckpointError("malformed storage key list")
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
    return Checkpoint(format="torch legacy", root=root, globals=untrusted)
