"""Dtype names and the conversion of raw little/big-endian bytes into numpy arrays, without torch.

Dtypes are named as torch names them (``float32``, ``bfloat16``...), whatever format the file is in, so reports read
the same for a ``.pt`` and a ``.safetensors``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from bncheck.errors import UnsupportedDtypeError

# torch dtype name -> numpy dtype of the stored bytes (bfloat16 is stored as its 16 raw bits).
_STORAGE_NUMPY = {
    "float64": "f8",
    "float32": "f4",
    "float16": "f2",
    "bfloat16": "u2",
    "int64": "i8",
    "int32": "i4",
    "int16": "i2",
    "int8": "i1",
    "uint64": "u8",
    "uint32": "u4",
    "uint16": "u2",
    "uint8": "u1",
    "bool": "?",
    "complex128": "c16",
    "complex64": "c8",
}

ITEMSIZE = {
    **{name: np.dtype(code).itemsize for name, code in _STORAGE_NUMPY.items()},
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "complex32": 4,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
}

FLOATING = frozenset({"float64", "float32", "float16", "bfloat16"} | {n for n in ITEMSIZE if n.startswith("float8")})
INTEGER = frozenset({"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8"})


# (torch dtype name, big-endian) -> the numpy dtype of the stored bytes, built once: a checkpoint of thousands of
# small tensors would otherwise build two numpy dtypes per tensor
_STORED = {
    (name, big_endian): np.dtype(code).newbyteorder(">" if big_endian else "<")
    for name, code in _STORAGE_NUMPY.items()
    for big_endian in (False, True)
}


def bytes_to_array(buffer: bytes, dtype: str, *, big_endian: bool = False) -> np.ndarray:
    """Interpret ``buffer`` as a flat array of ``dtype``, in native byte order.

    bfloat16 comes back as float32 (exactly: bf16 is the top half of a float32); every other dtype keeps its own
    numpy type. Raises UnsupportedDtypeError for dtypes numpy cannot represent (float8, quantised types).
    """
    stored = _STORED.get((dtype, big_endian))
    if stored is None:
        raise UnsupportedDtypeError(f"tensors of dtype {dtype} cannot be read without torch")
    raw = np.frombuffer(buffer, dtype=stored)
    # a read-only view when already native
    native = raw if stored.isnative else raw.astype(stored.newbyteorder("="), copy=False)
    if dtype == "bfloat16":
        return (native.astype(np.uint32) << 16).view(np.float32)
    return native


def array_to_bytes(values: np.ndarray, dtype: str, *, big_endian: bool = False) -> bytes:
    """The inverse of :func:`bytes_to_array`: ``values`` cast to ``dtype`` (bfloat16 rounded to nearest even)."""
    code = _STORAGE_NUMPY.get(dtype)
    if code is None:
        raise UnsupportedDtypeError(f"cannot write tensors of dtype {dtype}")
    order: Literal[">", "<"] = ">" if big_endian else "<"
    # A value beyond the target's range becomes +-inf, exactly as torch's own cast stores it, and numpy's overflow
    # warning is not wanted: storing it is the point. The caller judges the result (recalibrate re-reads and
    # inspects its copy and refuses an fp16 statistic that overflowed, as BN001), not this encoder.
    with np.errstate(over="ignore"):
        if dtype == "bfloat16":
            bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(np.asarray(values, np.float32)), np.uint16(0x7FC0), rounded)
            return rounded.astype(np.dtype("u2").newbyteorder(order)).tobytes()
        return np.asarray(values).astype(np.dtype(code).newbyteorder(order)).tobytes()
