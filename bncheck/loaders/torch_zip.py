"""Zip checkpoints written by ``torch.save`` (PyTorch >= 1.6) and ``torch.jit.save``, read without torch.

The archive holds ``<name>/data.pkl`` (the object tree, whose tensors point at storages by key), one member
``<name>/data/<key>`` per storage (stored uncompressed, so a tensor's bytes can be read in place), and a
``<name>/byteorder`` record. TorchScript archives add ``code/`` and ``constants.pkl``.
"""

from __future__ import annotations

import struct
import zipfile
import zlib

import numpy as np

from bncheck.errors import CorruptCheckpointError, UnreadableFileError
from bncheck.loaders.dtypes import ITEMSIZE, bytes_to_array
from bncheck.loaders.files import ByteSource
from bncheck.loaders.interface import ByteLocation, Checkpoint, TensorRef
from bncheck.loaders.restricted_pickle import StorageRef, strided_copy, unpickle, view_span

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (skipped fields), file name length, extra field length
# a local header's size and room for its extra field (torch pads data to 64 bytes), when prefetching a member
_LOCAL_ALLOWANCE = _LOCAL_HEADER.size + 256
# What zipfile raises for archives it cannot handle: corrupt structures, undecodable names, encrypted members,
# unsupported compression methods.
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    RuntimeError,
    UnicodeDecodeError,
    ValueError,
    EOFError,
    OSError,
    zlib.error,
    struct.error,
    OverflowError,
)
# data.pkl is a few hundred bytes per tensor; a member declaring more is corrupt or a decompression bomb.
MAX_PICKLE_BYTES = 512 * 1024 * 1024


def member_data_start(source: ByteSource, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes begin: after its local header, whose extra field (torch's alignment padding) can
    differ in length from the central directory's."""
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(source.read(info.header_offset, _LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise CorruptCheckpointError(f"bad local header for archive member {info.filename}")
    return int(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)


def _find_prefix(names: list[str]) -> str:
    candidates = sorted((n for n in names if n.endswith("data.pkl") and n.count("/") <= 1), key=len)
    if not candidates:
        raise CorruptCheckpointError("zip archive has no data.pkl: not a torch checkpoint")
    return candidates[0][: -len("data.pkl")]


class _Archive:
    def __init__(self, source: ByteSource, archive: zipfile.ZipFile) -> None:
        self.source = source
        self.archive = archive
        self.prefix = _find_prefix(archive.namelist())
        self.big_endian = self._byteorder() == "big"

    def member(self, name: str) -> zipfile.ZipInfo:
        info = self.archive.NameToInfo.get(self.prefix + name)  # called per tensor: a plain lookup
        if info is None:
            raise CorruptCheckpointError(f"archive member {self.prefix + name} is missing")
        return info

    def read_member(self, name: str) -> bytes:
        return self.read_full(self.member(name))

    def read_full(self, info: zipfile.ZipInfo | str) -> bytes:
        """A whole (small) member: pickles and records, never tensor storages."""
        info = self.archive.getinfo(info) if isinstance(info, str) else info
        if info.file_size > MAX_PICKLE_BYTES or info.compress_size > self.source.size:
            raise CorruptCheckpointError(f"archive member {info.filename} declares {info.file_size} bytes: too large")
        try:
            data = self.archive.read(info)
        except ZIP_ERRORS as exc:
            raise CorruptCheckpointError(f"cannot read archive member {info.filename}: {exc}") from exc
        if len(data) != info.file_size:
            raise CorruptCheckpointError(f"archive member {info.filename} is not the size its entry declares")
        return data

    def _byteorder(self) -> str:
        if self.prefix + "byteorder" not in self.archive.NameToInfo:
            return "little"  # files from before the record existed were written on little-endian machines
        order = self.read_member("byteorder").decode("ascii", "replace")
        if order not in ("little", "big"):
            raise CorruptCheckpointError(f"unknown byteorder record {order!r}")
        return order

    def read_bytes(self, info: zipfile.ZipInfo, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` within a member, read in place when the member is stored."""
        if info.flag_bits & 0x1:
            raise CorruptCheckpointError(f"archive member {info.filename} is encrypted")
        if start + length > info.file_size:
            raise CorruptCheckpointError(f"tensor reaches past the end of its storage {info.filename}")
        if info.compress_type != zipfile.ZIP_STORED:
            # Re-zipped with compression (torch never does this): inflate the member, then slice, unless it
            # would expand into a decompression bomb.
            if info.file_size > MAX_PICKLE_BYTES or info.file_size > 1000 * max(info.compress_size, 1):
                raise CorruptCheckpointError(
                    f"compressed member {info.filename} would expand {info.compress_size} bytes to {info.file_size}"
                )
            try:
                with self.source.open() as handle, zipfile.ZipFile(handle) as archive:
                    return archive.read(info)[start : start + length]
            except ZIP_ERRORS as exc:
                raise CorruptCheckpointError(f"cannot read archive member {info.filename}: {exc}") from exc
        data_start = member_data_start(self.source, info)
        if data_start + info.file_size > self.archive.start_dir:
            raise CorruptCheckpointError(f"archive member {info.filename} declares more bytes than it holds")
        return self.source.read(data_start + start, length)

    def make_tensor(
        self, storage: StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...], dtype: str
    ) -> TensorRef:
        itemsize, span = view_span(offset, size, stride, dtype)
        info = self.member("data/" + storage.key)
        storage_bytes = storage.numel * ITEMSIZE.get(storage.dtype, 1)
        if span and (offset + span) * itemsize > storage_bytes:
            raise CorruptCheckpointError(
                f"tensor of size {size} at offset {offset} reaches past its {storage_bytes}-byte storage"
            )

        def read() -> np.ndarray:
            raw = self.read_bytes(info, offset * itemsize, span * itemsize)
            return strided_copy(bytes_to_array(raw, dtype, big_endian=self.big_endian), size, stride)

        path = self.source.local_path
        location = ByteLocation(path, info.filename, offset * itemsize, stride, self.big_endian) if path else None
        if path is not None or info.compress_type != zipfile.ZIP_STORED:
            return TensorRef(dtype, size, read, location)
        # remote: the local header (its padding can differ from the central directory's) and the data, to prefetch
        needed = _LOCAL_ALLOWANCE + len(info.filename) + (offset + span) * itemsize
        return TensorRef(dtype, size, read, None, (self.source, info.header_offset, needed))


def open_torch_zip(source: ByteSource) -> Checkpoint:
    handle = source.open()
    try:
        archive = zipfile.ZipFile(handle)
    except ZIP_ERRORS as exc:
        handle.close()
        if isinstance(exc, OSError) and not isinstance(exc, zipfile.BadZipFile):
            raise UnreadableFileError(f"cannot read {source.name}: {exc.strerror or exc}") from exc
        raise CorruptCheckpointError(f"broken zip archive: {type(exc).__name__}: {exc}"[:300]) from exc
    with handle, archive:
        names = archive.namelist()
        if len(set(names)) != len(names):
            raise CorruptCheckpointError("zip archive has duplicate member names: which one torch reads is ambiguous")
        reader = _Archive(source, archive)
        root, untrusted = unpickle(reader.read_member("data.pkl"), reader.make_tensor)
        # TorchScript keeps more pickles (constants.pkl, debug info); their globals are checked too, tensors unread
        for name in names:
            if name.endswith((".pkl", ".debug_pkl")) and name != reader.prefix + "data.pkl":
                _, more = unpickle(reader.read_full(name), _unread_tensor)
                untrusted += tuple(g for g in more if g not in untrusted)
    is_script = any(n.startswith(reader.prefix + "code/") for n in names)
    return Checkpoint(format="torchscript" if is_script else "torch zip", root=root, globals=untrusted)


def _unread_tensor(
    storage: StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...], dtype: str
) -> TensorRef:
    def refuse() -> np.ndarray:
        raise CorruptCheckpointError("tensors of this pickle are not read")

    return TensorRef(dtype=dtype, shape=size, reader=refuse)
