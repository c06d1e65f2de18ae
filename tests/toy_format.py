"""A made-up checkpoint format, registered only by tests, to prove that a format is one module plus one entry.

Layout: b"BNX1", an 8-byte little-endian header length, a JSON header mapping state_dict names to
``{"shape": [...], "offset": n}``, then float32 data. Like an exported graph, it stores no batch counter.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from bncheck.loaders.dtypes import bytes_to_array
from bncheck.loaders.files import ByteSource
from bncheck.loaders.interface import Checkpoint, Format, TensorRef

FORMAT = Format(
    name="bnx",
    described="a bnx file",
    suffixes=(".bnx",),
    matches=lambda head, _: head.startswith(b"BNX1"),
    reader="toy_format:open_bnx",
    batch_counter=False,
)


def write_bnx(path: object, tensors: dict[str, np.ndarray]) -> None:
    header, data, offset = {}, b"", 0
    for name, array in tensors.items():
        raw = np.asarray(array, dtype="<f4").tobytes()
        header[name] = {"shape": list(array.shape), "offset": offset}
        data += raw
        offset += len(raw)
    encoded = json.dumps(header).encode()
    with open(path, "wb") as handle:  # type: ignore[call-overload]
        handle.write(b"BNX1" + struct.pack("<Q", len(encoded)) + encoded + data)


def open_bnx(source: ByteSource) -> Checkpoint:
    (length,) = struct.unpack("<Q", source.read(4, 8))
    header = json.loads(source.read(12, length))
    start = 12 + length
    root = {}
    for name, entry in header.items():
        shape = tuple(entry["shape"])
        at, size = start + entry["offset"], 4 * int(np.prod(shape))

        def read(at: int = at, size: int = size, shape: tuple[int, ...] = shape) -> np.ndarray:
            return bytes_to_array(source.read(at, size), "float32").reshape(shape)

        root[name] = TensorRef(dtype="float32", shape=shape, reader=read)
    return Checkpoint(format="bnx", root=root)
