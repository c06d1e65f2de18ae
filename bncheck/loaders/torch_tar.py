"""Tar checkpoints, torch's first ``torch.save`` format (PyTorch 0.1), read without torch.

torch still loads them, with ``weights_only=False`` only, through ``tarfile`` (``legacy_load`` in
``torch/serialization.py``): it tries a file as a tar before it tries the legacy pickle format, so any file whose
first block ``tarfile`` accepts is read here, whatever bytes it starts with, and a file that ``tarfile`` refuses
goes on to the legacy reader, as in torch. bncheck reads the tar with the same ``tarfile`` module, so the members
are the ones torch reads; when a name occurs twice, both take the last.

torch reads three members, each unpickled with plain pickle, so every pickle in them is read here with the
restricted unpickler and its globals are reported:

- ``storages``: a pickled count, then per storage a pickled ``(key, location, storage class)``, an int64 element
  count and the raw little-endian elements; then a pickled list of views ``(key, root key, offset, size)``.
- ``tensors``: a pickled count, then per tensor a pickled ``(key, storage key, tensor class)``, an int32 rank
  (padded to 8 bytes), the sizes, the strides and the storage offset as int64s.
- ``pickle``: the object tree, whose tensors and storages are persistent ids ``str(key)``.

A pickle in any other member (``sys_info``, which torch never reads, an earlier copy of a member, an extra member)
is scanned too and its globals join the file's: torch would not run it, but another reader might.
"""

from __future__ import annotations

import struct
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from bncheck.errors import CorruptCheckpointError
from bncheck.loaders.dtypes import ITEMSIZE, bytes_to_array
from bncheck.loaders.files import ByteSource
from bncheck.loaders.interface import Checkpoint, TensorRef
from bncheck.loaders.restricted_pickle import (
    StorageRef,
    StorageType,
    globals_of,
    no_tensor,
    strided_copy,
    unpickle,
    view_span,
)
from bncheck.loaders.torch_legacy import PickleSequence, open_torch_legacy

# a pickle outside the three members torch reads is scanned when it is at most this large
MAX_PICKLE_BYTES = 512 * 1024 * 1024
_PICKLE_START = b"\x80"  # a pickle of protocol 2 or later; torch's tar files are protocol 2


@dataclass(frozen=True)
class _Storage:
    dtype: str
    start: int  # absolute offset of element 0
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class _Member:
    """The consecutive pickles and raw fields of one member, read from the file in place."""

    def __init__(self, source: ByteSource, member: tarfile.TarInfo, globals_named: list[str]) -> None:
        self.source = source
        self.name = member.name
        self.end = member.offset_data + member.size
        self.pickles = PickleSequence(source)
        self.pickles.position = member.offset_data
        self.globals_named = globals_named

    def pickle(self) -> Any:
        def no_tensors(*_: Any) -> TensorRef:
            raise CorruptCheckpointError(f"unexpected tensor record in tar member {self.name}")

        value, found = unpickle(self.pickles.next_bytes(), no_tensors)
        self._past_end()
        self.globals_named.extend(g for g in found if g not in self.globals_named)
        return value

    def raw(self, length: int) -> bytes:
        data = self.source.read(self.pickles.position, length)
        self.pickles.position += length
        self._past_end()
        return data

    def skip(self, length: int) -> int:
        start = self.pickles.position
        self.pickles.position += length
        self._past_end()
        return start

    def _past_end(self) -> None:
        if self.pickles.position > self.end:
            raise CorruptCheckpointError(f"tar member {self.name} ends inside one of its records")


def _key(value: Any, what: str) -> int:
    if type(value) is not int:
        raise CorruptCheckpointError(f"malformed {what} record in a tar checkpoint")
    return value


def _count(member: _Member) -> int:
    count = member.pickle()
    if type(count) is not int or count < 0 or count > member.end - member.pickles.position:
        raise CorruptCheckpointError(f"tar member {member.name} declares {count!r:.40} records")
    return count


def _read_storages(member: _Member) -> dict[int, _Storage]:
    storages: dict[int, _Storage] = {}
    for _ in range(_count(member)):
        record = member.pickle()
        if not (isinstance(record, tuple) and len(record) == 3 and isinstance(record[2], StorageType)):
            raise CorruptCheckpointError("malformed storage record in a tar checkpoint")
        dtype = record[2].dtype
        (numel,) = struct.unpack("<q", member.raw(8))
        itemsize = ITEMSIZE.get(dtype, 1)
        if numel < 0 or numel * itemsize > member.end - member.pickles.position:
            raise CorruptCheckpointError(f"tar storage claims {numel} elements, more than its member holds")
        storages[_key(record[0], "storage")] = _Storage(dtype, member.skip(numel * itemsize), numel)
    views = member.pickle()
    if not isinstance(views, list):
        raise CorruptCheckpointError("malformed storage view list in a tar checkpoint")
    for view in views:
        if not (isinstance(view, tuple) and len(view) == 4 and all(type(v) is int for v in view)):
            raise CorruptCheckpointError("malformed storage view in a tar checkpoint")
        target, root_key, offset, numel = view
        root = storages.get(root_key)
        if root is None or offset < 0 or numel < 0 or offset + numel > root.numel:
            raise CorruptCheckpointError(f"storage view {target} lies outside its root storage {root_key}")
        storages[target] = _Storage(root.dtype, root.start + offset * ITEMSIZE.get(root.dtype, 1), numel)
    return storages


def _read_tensors(member: _Member) -> dict[int, _Tensor]:
    tensors: dict[int, _Tensor] = {}
    for _ in range(_count(member)):
        record = member.pickle()
        if not (isinstance(record, tuple) and len(record) == 3):
            raise CorruptCheckpointError("malformed tensor record in a tar checkpoint")
        (ndim,) = struct.unpack("<i4x", member.raw(8))
        if ndim < 0 or 16 * ndim + 8 > member.end - member.pickles.position:
            raise CorruptCheckpointError(f"tar tensor record has {ndim} dimensions")
        fields = struct.unpack(f"<{2 * ndim + 1}q", member.raw(16 * ndim + 8))
        tensors[_key(record[0], "tensor")] = _Tensor(
            _key(record[1], "tensor"), tuple(fields[:ndim]), tuple(fields[ndim : 2 * ndim]), fields[-1]
        )
    return tensors


def _tensor_ref(source: ByteSource, tensor: _Tensor, storages: dict[int, _Storage]) -> TensorRef:
    storage = storages.get(tensor.storage)
    if storage is None:
        raise CorruptCheckpointError(f"tensor names storage {tensor.storage}, which the file does not hold")
    itemsize, span = view_span(tensor.offset, tensor.size, tensor.stride, storage.dtype)
    if span and tensor.offset + span > storage.numel:
        raise CorruptCheckpointError(f"tensor of size {tensor.size} reaches past its {storage.numel}-element storage")

    def read() -> np.ndarray:
        raw = source.read(storage.start + tensor.offset * itemsize, span * itemsize)
        return strided_copy(bytes_to_array(raw, storage.dtype), tensor.size, tensor.stride)

    return TensorRef(dtype=storage.dtype, shape=tensor.size, reader=read)  # no ByteLocation: recalibrate writes zip


def _hidden_pickles(source: ByteSource, members: list[tarfile.TarInfo], read: set[int]) -> list[tuple[str, ...]]:
    """The globals of every other member that holds a pickle: torch never unpickles them."""
    found = []
    for member in members:
        if id(member) in read or not member.isreg() or not 0 < member.size <= MAX_PICKLE_BYTES:
            continue
        data = source.read(member.offset_data, member.size)
        if data.startswith(_PICKLE_START):
            found.append((member.name, *globals_of(data)))
    return found


def open_torch_tar(source: ByteSource) -> Checkpoint:
    handle = source.open()
    try:
        archive = tarfile.open(fileobj=handle, mode="r:", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed below)
    except (tarfile.TarError, ValueError, UnicodeError, OverflowError, EOFError):
        handle.close()
        return open_torch_legacy(source)  # torch falls back to the legacy pickle format in the same way
    with handle, archive:
        try:
            members = archive.getmembers()
        except (tarfile.TarError, ValueError, UnicodeError, OverflowError, EOFError) as exc:
            raise CorruptCheckpointError(f"broken tar archive: {exc}"[:300]) from exc
    last = {member.name: member for member in members}  # tarfile, and so torch, reads a name's last copy
    globals_named: list[str] = []
    notes = ["a tar checkpoint: torch.load reads it only with weights_only=False"]
    hidden_read = {id(m) for name, m in last.items() if name in ("storages", "tensors", "pickle")}
    for name, *found in _hidden_pickles(source, members, hidden_read):
        if not found:
            continue  # torch writes sys_info, a plain dict, beside the three members it reads
        notes.append(f"tar member {name}, a pickle torch never reads, was scanned too")
        globals_named.extend(g for g in found if g not in globals_named)
    missing = [name for name in ("storages", "tensors", "pickle") if name not in last or not last[name].isreg()]
    if missing:
        suffix = f"; hidden pickles name {', '.join(globals_named[:4])}" if globals_named else ""
        raise CorruptCheckpointError(f"tar archive has no {missing[0]} member: not a torch checkpoint{suffix}")
    storages = _read_storages(_Member(source, last["storages"], globals_named))
    tensors = _read_tensors(_Member(source, last["tensors"], globals_named))
    refs: dict[int, TensorRef] = {}

    def persistent_load(saved_id: Any) -> Any:
        if isinstance(saved_id, tuple) and saved_id:
            return saved_id[0]  # (module class, source file, source): torch returns the class
        if not isinstance(saved_id, str) or not saved_id.isdigit():
            raise CorruptCheckpointError(f"unexpected persistent id {saved_id!r:.80}")
        key = int(saved_id)
        if key in tensors:
            if key not in refs:
                refs[key] = _tensor_ref(source, tensors[key], storages)
            return refs[key]
        if key in storages:
            return StorageRef(key=saved_id, dtype=storages[key].dtype, numel=storages[key].numel)
        raise CorruptCheckpointError(f"persistent id {key} names no tensor or storage of the file")

    pickle_member = last["pickle"]
    if pickle_member.size > MAX_PICKLE_BYTES:
        raise CorruptCheckpointError(f"tar member pickle declares {pickle_member.size} bytes: too large")
    root, named = unpickle(
        source.read(pickle_member.offset_data, pickle_member.size), no_tensor, persistent_load=persistent_load
    )
    globals_named += [g for g in named if g not in globals_named]
    # the tensor records name the tensor's class (torch.FloatTensor), which torch reads and ignores
    untrusted = tuple(g for g in globals_named if not _is_tensor_class(g))
    return Checkpoint(format="torch tar", root=root, globals=untrusted, notes=tuple(notes))


def _is_tensor_class(name: str) -> bool:
    module, _, cls = name.rpartition(".")
    return module in ("torch", "torch.cuda") and cls.endswith("Tensor") and cls[:-6].isalpha()
