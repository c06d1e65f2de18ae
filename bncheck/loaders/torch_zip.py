"""Zip checkpoints written by ``torch.save`` (PyTorch >= 1.6) and ``torch.jit.save``, read without torch.

The archive holds ``<name>/data.pkl`` (the object tree, whose tensors point at storages by key), one member
``<name>/data/<key>`` per storage (stored uncompressed, so a tensor's bytes can be read in place), and a
``<name>/byteorder`` record. TorchScript archives add ``code/`` and ``constants.pkl``.

One view of the archive, the same as torch's. Python's ``zipfile`` and torch's reader (``PyTorchStreamReader`` over
miniz) can read one file two ways; a pickle hidden in the difference would be run by one and missed by the other.
Each case, as checked by running torch 2.13 on crafted files:

- *Which end record.* Both take the last end-of-central-directory signature with a whole record after it. When
  zipfile's choice differs from miniz's rule, the archive is refused.
- *An archive appended to other data* (directory offsets relative to a later start, which zipfile silently
  corrects): torch's reader fails on it. Refused, and the pickles of zipfile's view are scanned for the error.
- *Two archives, the later one with absolute offsets* (or any bytes between members): torch reads only the last
  central directory. bncheck reads that one too, and scans every local header it finds in bytes no member covers:
  the globals of a hidden pickle join the file's globals (so BN101 fires) and a note says where it was.
- *The archive name.* torch takes it from the first central-directory entry, up to the first ``/``, and refuses
  an archive with an entry outside that folder (compared case-sensitively); so does bncheck.
- *Case.* torch finds a record with miniz's case-insensitive lookup (ASCII only): ``archive/DATA.PKL`` alone is
  the ``data.pkl`` torch unpickles, so bncheck reads it as that. Two entries whose names are equal ignoring case
  (or equal outright) make which one torch reads depend on miniz's sort order: refused, and every pickle among
  them is scanned so that the error names what a hidden one calls.
- *CRC-32 and local header names.* torch checks neither; zipfile refuses both. bncheck reads the bytes torch
  reads (at the local header's data offset) and adds a note when the CRC or the local name disagrees.
- *Compression.* torch's reader inflates deflated members and supports no other method; so does bncheck.
"""

from __future__ import annotations

import contextlib
import io
import struct
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np

from bncheck.errors import CorruptCheckpointError, UnreadableFileError
from bncheck.loaders.dtypes import ITEMSIZE, bytes_to_array
from bncheck.loaders.files import ByteSource, MemorySource, SliceSource
from bncheck.loaders.interface import ByteLocation, Checkpoint, TensorRef, without_data
from bncheck.loaders.restricted_pickle import StorageRef, globals_of, scan_globals, strided_copy, unpickle, view_span

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (skipped fields), file name length, extra field length
# signature, version, flags, method, time, date, crc, compressed size, size, name length, extra length
_FULL_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
# a local header's size and room for its extra field (torch pads data to 64 bytes), when prefetching a member
_LOCAL_ALLOWANCE = _LOCAL_HEADER.size + 256
_END_RECORD = b"PK\x05\x06"
_END_RECORD_SIZE = 22
_LOCAL_SIGNATURE = b"PK\x03\x04"
# Bytes between members that need no explanation: a data descriptor (at most 16) written after a member's data.
_DESCRIPTOR_ALLOWANCE = 16
# Bytes between the central directory and the end record: the zip64 end record and its locator (56 + 20).
_ZIP64_ALLOWANCE = 76
# Uncovered bytes are searched for hidden local headers in windows of this size, up to this total.
_SCAN_WINDOW = 16 * 1024 * 1024
_SCAN_LIMIT = 1024 * 1024 * 1024
# miniz folds only ASCII letters when it compares names.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
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
# torch stores every member uncompressed; a deflated pickle is someone else's doing, and deflate expands up to
# ~1000x, so a small file could unpickle into gigabytes. Decompressed pickles stay within this.
MAX_DEFLATED_PICKLE_BYTES = 64 * 1024 * 1024


def member_data_start(source: ByteSource, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes begin: after its local header, whose extra field (torch's alignment padding) can
    differ in length from the central directory's."""
    return _data_start_after(info, source.read(info.header_offset, _LOCAL_HEADER.size))


def _data_start_after(info: zipfile.ZipInfo, header: bytes) -> int:
    """:func:`member_data_start` from bytes already read at the member's local header (at least the header)."""
    if len(header) < _LOCAL_HEADER.size:
        raise CorruptCheckpointError(f"archive member {info.filename}'s local header runs past the end of the file")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack_from(header)
    if signature != _LOCAL_SIGNATURE:
        raise CorruptCheckpointError(f"bad local header for archive member {info.filename}")
    return int(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)


def member_bytes(source: ByteSource, info: zipfile.ZipInfo) -> bytes:
    """A whole (small) member, read as torch's reader reads it: from the data offset its local header gives,
    whatever name the local header carries and whatever its CRC."""
    if info.file_size > MAX_PICKLE_BYTES or info.compress_size > source.size:
        raise CorruptCheckpointError(f"archive member {info.filename} declares {info.file_size} bytes: too large")
    if info.flag_bits & 0x1:
        raise CorruptCheckpointError(f"archive member {info.filename} is encrypted")
    raw = source.read(member_data_start(source, info), info.compress_size)
    if info.compress_type == zipfile.ZIP_STORED:
        data = raw
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > MAX_DEFLATED_PICKLE_BYTES:
            raise CorruptCheckpointError(
                f"deflated archive member {info.filename} would expand {info.compress_size} bytes to "
                f"{info.file_size} (at most {MAX_DEFLATED_PICKLE_BYTES} for a compressed member)"
            )
        data = _inflate(raw, info.file_size, info.filename)
    else:
        raise CorruptCheckpointError(
            f"archive member {info.filename} uses compression method {info.compress_type}, which torch cannot read"
        )
    if len(data) != info.file_size:
        raise CorruptCheckpointError(f"archive member {info.filename} is not the size its entry declares")
    return data


def scan_pickle_members(source: ByteSource) -> tuple[str, ...]:
    """The globals every member torch would unpickle names, read from its opcodes (``scan_globals``) as torch's
    reader finds its bytes, CRC unchecked: for an archive bncheck's reader refused. A member that cannot be read
    adds nothing and does not stop the others."""
    names: list[str] = []
    with source.open() as handle, zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            if _is_pickle_name(info.filename):
                with contextlib.suppress(CorruptCheckpointError):
                    names += scan_globals(io.BytesIO(member_bytes(source, info)))
    return tuple(dict.fromkeys(names))


def fold_case(name: str) -> str:
    """A member name as miniz compares it: ASCII letters folded to lower case, nothing else."""
    # str.lower folds exactly A-Z in an ASCII name, several times faster than translate (one call per tensor)
    return name.lower() if name.isascii() else name.translate(_ASCII_LOWER)


_PICKLE_SUFFIXES = (".pkl", ".debug_pkl")


def _is_pickle_name(name: str) -> bool:
    """Whether torch would unpickle a member so named (``DATA.PKL`` is found as ``data.pkl``)."""
    return fold_case(name).endswith(_PICKLE_SUFFIXES)


def _inflate(raw: bytes, size: int, name: str) -> bytes:
    try:
        return zlib.decompressobj(-15).decompress(raw, size + 1)
    except zlib.error as exc:
        raise CorruptCheckpointError(f"cannot inflate archive member {name}: {exc}") from exc


def _named(hidden: list[tuple[str, tuple[str, ...]]]) -> str:
    """The end of a refusal: what the pickles that hide in the ambiguity name."""
    named = [f"{name} names {', '.join(found[:4])}" for name, found in hidden if found]
    return "; hidden pickle " + "; ".join(named) if named else ""


class TorchArchive:
    """One view of an archive written by torch's ``PyTorchFileWriter`` (``torch.save``, ``torch.jit.save``,
    ``torch.export.save``), the same as torch's reader: the checks of the module docstring are made on opening it."""

    def __init__(self, source: ByteSource, archive: zipfile.ZipFile) -> None:
        self.source = source
        self.archive = archive
        self.infos = archive.infolist()
        self.notes: list[str] = []
        self._check_end_record()
        self.prefix = self._torch_prefix()
        self.by_folded = self._index_names()
        self.big_endian = self._byteorder() == "big"

    def refuse(self, reason: str, suspects: list[zipfile.ZipInfo]) -> CorruptCheckpointError:
        """The one-line refusal of an archive torch could read otherwise, naming the globals of every pickle among
        ``suspects`` (so a payload hidden in the ambiguity is still reported)."""
        hidden = []
        for info in suspects:
            if _is_pickle_name(info.filename):
                try:
                    hidden.append((info.filename, globals_of(self.read_full(info, noted=False))))
                except CorruptCheckpointError:
                    continue
        return CorruptCheckpointError(reason + _named(hidden))

    def _check_end_record(self) -> None:
        size = self.source.size
        tail_length = min(size, 0xFFFF + _END_RECORD_SIZE)
        tail = self.source.read(size - tail_length, tail_length)
        # miniz: the last signature that has a whole end record after it
        position = tail.rfind(_END_RECORD, 0, max(tail_length - _END_RECORD_SIZE + 4, 0))
        miniz_end = size - tail_length + position if position >= 0 else -1
        end_record = getattr(zipfile, "_EndRecData")(self.archive.fp)  # noqa: B009 (private, stable since 2.x)
        zipfile_end = end_record[9] if end_record else -2
        if miniz_end != zipfile_end:
            raise self.refuse(
                f"ambiguous zip archive: Python's zipfile reads the end record at byte {zipfile_end}, torch's reader"
                f" the one at byte {miniz_end}",
                self.infos,
            )
        shift = self.archive.start_dir - end_record[6]  # zipfile moves every offset by this much
        if shift:
            raise self.refuse(
                f"zip archive is appended to {shift} bytes of other data (its offsets start after them):"
                " torch's reader cannot read it",
                self.infos,
            )

    def _torch_prefix(self) -> str:
        if not self.infos:
            raise CorruptCheckpointError("zip archive has no members: not a torch checkpoint")
        first = self.infos[0].filename
        if "/" not in first:
            raise CorruptCheckpointError(f"zip archive member {first!r:.80} is not in a folder: torch cannot read it")
        prefix = first[: first.index("/") + 1]
        outside = [info for info in self.infos if not info.filename.startswith(prefix)]
        if outside:
            raise self.refuse(
                f"zip archive member {outside[0].filename!r:.80} is outside the folder {prefix!r:.80} that its first"
                " member names: torch refuses it",
                outside,
            )
        return prefix

    def _index_names(self) -> dict[str, zipfile.ZipInfo]:
        by_folded: dict[str, list[zipfile.ZipInfo]] = {}
        for info in self.infos:
            by_folded.setdefault(fold_case(info.filename), []).append(info)
        for same in by_folded.values():
            if len(same) > 1:
                names = ", ".join(sorted({info.filename for info in same}))
                kind = "duplicate member names" if len({i.filename for i in same}) == 1 else "member names"
                raise self.refuse(
                    f"zip archive has {kind} that torch's case-insensitive lookup cannot tell apart ({names:.120}):"
                    " which one torch reads is ambiguous",
                    same,
                )
        return {folded: same[0] for folded, same in by_folded.items()}

    def find(self, name: str) -> zipfile.ZipInfo | None:
        """The member torch's reader finds for a record name (``data.pkl``), as miniz looks it up."""
        return self.by_folded.get(fold_case(self.prefix + name))

    def member(self, name: str) -> zipfile.ZipInfo:
        info = self.find(name)
        if info is None:
            raise CorruptCheckpointError(f"archive member {self.prefix + name} is missing")
        return info

    def read_member(self, name: str) -> bytes:
        return self.read_full(self.member(name))

    def read_full(self, info: zipfile.ZipInfo, *, noted: bool = True) -> bytes:
        """A whole (small) member, read as torch's reader reads it (see :func:`member_bytes`); pickles and records,
        never storages."""
        data = member_bytes(self.source, info)
        if noted:
            self._note_disagreements(info, data)
        return data

    def _note_disagreements(self, info: zipfile.ZipInfo, data: bytes) -> None:
        if zlib.crc32(data) != info.CRC:
            self.notes.append(f"archive member {info.filename} fails its CRC-32 check; read as torch reads it")
        name_length = _LOCAL_HEADER.unpack(self.source.read(info.header_offset, _LOCAL_HEADER.size))[1]
        local_name = self.source.read(info.header_offset + _LOCAL_HEADER.size, name_length)
        if local_name not in (info.filename.encode("utf-8"), info.filename.encode("cp437", "replace")):
            self.notes.append(
                f"archive member {info.filename}'s local header names it {local_name.decode('utf-8', 'replace')!r:.80};"
                " torch reads it by the central directory's name"
            )

    def _byteorder(self) -> str:
        if self.find("byteorder") is None:
            return "little"  # files from before the record existed were written on little-endian machines
        order = self.read_member("byteorder").decode("ascii", "replace")
        if order not in ("little", "big"):
            raise CorruptCheckpointError(f"unknown byteorder record {order!r}")
        return order

    def uncovered(self) -> Iterator[tuple[int, int]]:
        """The (start, end) byte ranges that no member, the central directory or the end record accounts for:
        where another archive or a member torch never reads would hide. Reads a local header only where the
        central directory leaves more room than a header's padding explains."""
        ordered = sorted(self.infos, key=lambda i: i.header_offset)
        next_starts = [i.header_offset for i in ordered[1:]] + [self.archive.start_dir]
        position = 0
        for info, next_start in zip(ordered, next_starts, strict=True):
            if info.header_offset - position > _DESCRIPTOR_ALLOWANCE:
                yield position, info.header_offset
            estimate = info.header_offset + _LOCAL_HEADER.size + len(info.filename) + info.compress_size
            if next_start - estimate > _LOCAL_ALLOWANCE:  # more room than padding explains: measure it
                position = max(position, member_data_start(self.source, info) + info.compress_size)
            else:
                position = max(position, next_start, estimate)
        if self.archive.start_dir - position > _DESCRIPTOR_ALLOWANCE:
            yield position, self.archive.start_dir
        end_record = getattr(zipfile, "_EndRecData")(self.archive.fp)  # noqa: B009
        directory_end = self.archive.start_dir + end_record[5]
        if end_record[9] - directory_end > _ZIP64_ALLOWANCE:
            yield directory_end, end_record[9]
        record_end = end_record[9] + _END_RECORD_SIZE + len(end_record[8])
        if self.source.size > record_end:
            yield record_end, self.source.size

    def hidden_pickles(self) -> list[tuple[str, tuple[str, ...]]]:
        """Pickle members in bytes that no member covers (an earlier archive, a member cut from the directory):
        torch never reads them, other tools may. Each is (where it is, the untrusted globals it names)."""
        found: list[tuple[str, tuple[str, ...]]] = []
        budget = _SCAN_LIMIT
        for start, end in self.uncovered():
            offset = start
            while offset < end and budget > 0:
                length = min(end - offset, _SCAN_WINDOW + _FULL_LOCAL_HEADER.size)
                window = self.source.read(offset, length)
                budget -= length
                at = window.find(_LOCAL_SIGNATURE)
                while at >= 0:
                    found.extend(self._hidden_member(offset + at, end))
                    at = window.find(_LOCAL_SIGNATURE, at + 1)
                offset += _SCAN_WINDOW
            found.append((f"bytes {start}..{end}", ()))
        return found

    def _hidden_member(self, at: int, end: int) -> list[tuple[str, tuple[str, ...]]]:
        if at + _FULL_LOCAL_HEADER.size > end:
            return []
        fields = _FULL_LOCAL_HEADER.unpack(self.source.read(at, _FULL_LOCAL_HEADER.size))
        method, compressed, size, name_length, extra_length = fields[3], fields[7], fields[8], fields[9], fields[10]
        name_start = at + _FULL_LOCAL_HEADER.size
        if name_start + name_length > end:
            return []
        name = self.source.read(name_start, name_length).decode("utf-8", "replace")
        data_start = name_start + name_length + extra_length
        if not _is_pickle_name(name) or data_start > end:
            return []
        available = min(end - data_start, MAX_PICKLE_BYTES)
        raw = self.source.read(data_start, min(compressed, available) if compressed else available)
        try:
            limit = min(size or MAX_DEFLATED_PICKLE_BYTES, MAX_DEFLATED_PICKLE_BYTES)
            data = _inflate(raw, limit, name) if method == 8 else raw
        except CorruptCheckpointError:
            return []
        return [(f"{name} at byte {at}", globals_of(data))]

    def member_source(self, info: zipfile.ZipInfo) -> ByteSource:
        """A member that is itself a file (a torch.save archive inside a .pt2 archive), read in place when stored,
        inflated within the bounds of :func:`member_bytes` when compressed."""
        name = f"{self.source.name}:{info.filename}"
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return MemorySource(self.read_full(info, noted=False), name=name)
        data_start = member_data_start(self.source, info)
        if data_start + info.file_size > self.archive.start_dir:
            raise CorruptCheckpointError(f"archive member {info.filename} declares more bytes than it holds")
        return SliceSource(self.source, data_start, name=name, size=info.file_size)

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
            return self.read_full(info, noted=False)[start : start + length]
        # the local header and the bytes after it in one read, when its extra field (torch's padding) is no longer
        # than usual: a checkpoint's thousands of small tensors cost one system call each, not two
        header_offset = info.header_offset
        wanted = _LOCAL_ALLOWANCE + len(info.filename) + start + length
        block = self.source.read(header_offset, min(wanted, self.source.size - header_offset))
        data_start = _data_start_after(info, block)
        if data_start + info.file_size > self.archive.start_dir:
            raise CorruptCheckpointError(f"archive member {info.filename} declares more bytes than it holds")
        begin = data_start - header_offset + start
        if begin + length <= len(block):
            return block[begin : begin + length]
        return self.source.read(data_start + start, length)

    def make_tensor(
        self, storage: StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...], dtype: str
    ) -> TensorRef:
        view = view_span(offset, size, stride, dtype)
        if view[1] and storage.numel == 0:
            # torch writes a storage resized to zero (as FSDP frees one) as it is, shape and all; it cannot load it
            return without_data(dtype, size, "zero-size storage")
        info = self.member("data/" + storage.key)
        storage_bytes = storage.numel * ITEMSIZE.get(storage.dtype, 1)
        return self._viewing(info, offset, size, stride, dtype, storage_bytes, view)

    def member_tensor(
        self,
        info: zipfile.ZipInfo,
        offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...],
        dtype: str,
        storage_bytes: int,
    ) -> TensorRef:
        """A tensor viewing the first ``storage_bytes`` of a member (its storage) from element ``offset`` on, read
        in place when asked for."""
        return self._viewing(info, offset, size, stride, dtype, storage_bytes, view_span(offset, size, stride, dtype))

    def _viewing(
        self,
        info: zipfile.ZipInfo,
        offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...],
        dtype: str,
        storage_bytes: int,
        view: tuple[int, int],
    ) -> TensorRef:
        """:meth:`member_tensor` once ``view_span`` has checked the view and given its (item size, span)."""
        itemsize, span = view
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


@contextlib.contextmanager
def open_archive(source: ByteSource) -> Iterator[TorchArchive]:
    """The archive torch's reader sees in ``source``; the tensors it hands out stay readable after it is closed
    (they read through ``source``, not the zip file object)."""
    handle = source.open()
    try:
        archive = zipfile.ZipFile(handle)
    except ZIP_ERRORS as exc:
        handle.close()
        if isinstance(exc, OSError) and not isinstance(exc, zipfile.BadZipFile):
            raise UnreadableFileError(f"cannot read {source.name}: {exc.strerror or exc}") from exc
        raise CorruptCheckpointError(f"broken zip archive: {type(exc).__name__}: {exc}"[:300]) from exc
    with handle, archive:
        yield TorchArchive(source, archive)


def scan_uncovered(reader: TorchArchive) -> tuple[list[str], tuple[str, ...]]:
    """Notes on the bytes no member covers, and the globals of the pickles hidden there (see ``hidden_pickles``)."""
    notes: list[str] = []
    found_globals: list[str] = []
    for where, found in reader.hidden_pickles():
        if where.startswith("bytes "):
            notes.append(f"{where} of the file belong to no member that torch reads")
        else:
            notes.append(f"hidden pickle {where}, which torch never reads, was scanned too")
            found_globals += found
    return notes, tuple(dict.fromkeys(found_globals))


def open_torch_zip(source: ByteSource) -> Checkpoint:
    with open_archive(source) as reader:
        root, untrusted = unpickle(reader.read_member("data.pkl"), reader.make_tensor)
        data_pickle = reader.member("data.pkl")
        # TorchScript keeps more pickles (constants.pkl, debug info); their globals are checked too, tensors unread
        for folded, info in reader.by_folded.items():  # every name once, already folded as torch compares them
            if folded.endswith(_PICKLE_SUFFIXES) and info is not data_pickle:
                _, more = unpickle(reader.read_full(info), _unread_tensor)
                untrusted += tuple(g for g in more if g not in untrusted)
        notes, hidden = scan_uncovered(reader)
        notes = reader.notes + notes
        untrusted += tuple(g for g in hidden if g not in untrusted)
        code_folder = reader.prefix + "code/"
        is_script = reader.find("code/") is not None or any(
            name.startswith(code_folder) for name in reader.archive.namelist()
        )
        code = _script_code(reader, notes) if is_script else ()
    return Checkpoint(
        format="torchscript" if is_script else "torch zip",
        root=root,
        globals=untrusted,
        notes=tuple(notes),
        code=code,
    )


# TorchScript code is a few KB per module class; beyond these the rest is not read (the configuration of the
# layers it defines is then unknown, which a note says).
MAX_CODE_FILE_BYTES = 4 * 1024 * 1024
MAX_CODE_BYTES = 32 * 1024 * 1024


def _script_code(reader: TorchArchive, notes: list[str]) -> tuple[tuple[str, str], ...]:
    """The text of every ``code/**.py`` member, for the layers' configuration; never executed."""
    files: list[tuple[str, str]] = []
    budget = MAX_CODE_BYTES
    start = reader.prefix + "code/"
    for info in reader.infos:
        if not (info.filename.startswith(start) and info.filename.endswith(".py")):
            continue
        if info.file_size > min(MAX_CODE_FILE_BYTES, budget):
            notes.append(f"TorchScript code beyond {info.filename} was not read (too large); layer settings unknown")
            break
        budget -= info.file_size
        try:
            text = reader.read_full(info, noted=False).decode("utf-8", "replace")
        except CorruptCheckpointError:
            continue
        files.append((info.filename.removeprefix(start), text))
    return tuple(files)


def _unread_tensor(
    storage: StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...], dtype: str
) -> TensorRef:
    def refuse() -> np.ndarray:
        raise CorruptCheckpointError("tensors of this pickle are not read")

    return TensorRef(dtype=dtype, shape=size, reader=refuse)
