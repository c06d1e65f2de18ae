"""Where checkpoint bytes come from: a local file, or a URL read through fsspec with ranged requests.

Every loader reads through a :class:`ByteSource`, asking only for the byte ranges it needs, so a remote checkpoint
costs its header, its index structures and the BatchNorm tensors, not its size.
"""

from __future__ import annotations

import bisect
import io
import os
import posixpath
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from bncheck.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MissingDependencyError,
    UnreadableFileError,
    UnsupportedFormatError,
    first_line,
)

# Prefetching remote ranges: ranges closer than this are fetched as one block (a request costs more than this many
# bytes on an object store), no block grows beyond the second figure, and this many requests run at once.
PREFETCH_MAX_GAP = 256 * 1024
PREFETCH_MAX_BLOCK = 16 * 1024 * 1024
PREFETCH_CONNECTIONS = 16


def is_url(location: str | os.PathLike[str]) -> bool:
    return "://" in str(location)


def merge_ranges(ranges: Sequence[tuple[int, int]], *, max_gap: int, max_block: int) -> list[tuple[int, int]]:
    """(offset, length) ranges as fewer (start, end) blocks: sorted, overlapping or nearby ones joined."""
    blocks: list[tuple[int, int]] = []
    for start, end in sorted((offset, offset + length) for offset, length in ranges if length > 0):
        if blocks and start - blocks[-1][1] <= max_gap and end - blocks[-1][0] <= max_block:
            blocks[-1] = (blocks[-1][0], max(blocks[-1][1], end))
        else:
            blocks.append((start, end))
    return blocks


class ByteSource:
    """Random access to the bytes of one checkpoint file."""

    name: str
    size: int

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; a short read means the file is truncated."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptCheckpointError(
                f"file is truncated: needed {length} bytes at offset {offset}, the file has {self.size}"
            )
        data = self._read(offset, length)
        if len(data) != length:
            raise CorruptCheckpointError(
                f"file is truncated: needed {length} bytes at offset {offset}, got {len(data)}"
            )
        return data

    def _read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def open(self) -> IO[bytes]:
        """A seekable binary file object (for zipfile)."""
        raise NotImplementedError

    def sibling(self, name: str) -> ByteSource:
        """Another file in the same folder (a shard beside its index)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the open file or connection; a later read opens it again."""

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Fetch these (offset, length) ranges ahead of the reads that will ask for them. A local file needs nothing:
        the reads are cheap and the page cache reads ahead."""

    @property
    def local_path(self) -> Path | None:
        return None


@dataclass(eq=False)
class LocalSource(ByteSource):
    path: Path
    name: str = ""
    size: int = 0
    _handle: IO[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.name = str(self.path)
        try:
            if not self.path.exists():
                raise CheckpointNotFoundError("no such file or directory")
            self.size = self.path.stat().st_size
        except PermissionError as exc:
            raise UnreadableFileError(f"permission denied: {exc.filename}") from exc

    def _read(self, offset: int, length: int) -> bytes:
        # one open file for all the reads of a checkpoint: thousands of small tensors cost one open
        try:
            if self._handle is None:
                self._handle = self.path.open("rb")
            # one system call (seek and read were two), and no copy through the file object's buffer
            fd = self._handle.fileno()
            data = os.pread(fd, length, offset)
            while len(data) < length:  # the end of the file, or a read beyond the system's limit per call
                more = os.pread(fd, length - len(data), offset + len(data))
                if not more:
                    break
                data += more
            return data
        except OSError as exc:
            raise UnreadableFileError(f"cannot read {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __del__(self) -> None:
        self.close()

    def open(self) -> IO[bytes]:
        try:
            return self.path.open("rb")
        except OSError as exc:
            raise UnreadableFileError(f"cannot read {self.path}: {exc.strerror or exc}") from exc

    def sibling(self, name: str) -> ByteSource:
        return LocalSource(self.path.parent / name)

    @property
    def local_path(self) -> Path | None:
        return self.path


def _remote_error(url: str, exc: BaseException) -> Exception:
    """One clear error for everything a remote read or listing can raise."""
    reason = first_line(exc).partition(": ")[2] or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        # s3fs's message is the bare key for a missing object, a sentence for a missing bucket
        return CheckpointNotFoundError(f"not found: {url}" + ("" if reason in url else f" ({reason})"))
    if isinstance(exc, PermissionError):  # 403: AccessDenied, an unknown key id, a bad signature
        return UnreadableFileError(f"access denied: {url} ({reason})"[:300])
    if "Credential" in type(exc).__name__:  # botocore's NoCredentialsError, google.auth's DefaultCredentialsError...
        return UnreadableFileError(
            f"no credentials for {url} ({reason}); bncheck takes them where the backend looks: environment "
            "variables, its config files, an instance role"[:300]
        )
    if "range requests" in str(exc).lower():
        return UnreadableFileError(
            "the server ignores HTTP Range requests; bncheck reads only the bytes it needs and will not "
            "download the whole file"
        )
    return UnreadableFileError(f"cannot read {url}: {first_line(exc)}"[:300])


def _is_http(fs: Any) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "http" in protocols or "https" in protocols


def _remote_errors() -> tuple[type[BaseException], ...]:
    """What fsspec and its HTTP/cloud backends raise for missing objects, refused access, missing credentials,
    refused ranges and dropped connections. aiohttp's errors are not OSErrors (it is imported only when a URL is read,
    as it is slow to import); neither are botocore's and google-auth's (credentials, endpoints), which are looked up
    only when their backend has loaded them."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, TimeoutError)
    for module, name in (("botocore.exceptions", "BotoCoreError"), ("google.auth.exceptions", "GoogleAuthError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            errors += (getattr(loaded, name),)
    try:
        import aiohttp
    except ImportError:
        return errors
    return (*errors, aiohttp.ClientError)


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of a URL and the path on it, with listings asked afresh: fsspec keeps one file system
    per backend and process, whose cached listings would give a process that lives for days (a Dask worker) the
    size of an object since replaced."""
    try:
        import fsspec
    except ImportError:
        raise MissingDependencyError("reading URLs needs fsspec: pip install 'bncheck[remote]'") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise MissingDependencyError(f"no fsspec backend for {url}: {exc}") from None
    fs.invalidate_cache(path)
    return fs, path


def _info_within_deadline(fs: Any, path: str, url: str) -> dict[str, Any]:
    """What the backend knows of one path (its kind and size), within the remote deadline."""
    if not fs.async_impl:
        info: dict[str, Any] = fs.info(path)
        return info
    from fsspec.asyn import sync

    from bncheck.loaders.remote import info_within_deadline

    return cast(dict[str, Any], sync(fs.loop, info_within_deadline, fs._info(path), url))


def is_remote_folder(url: str) -> bool:
    """Whether a URL names a folder: a directory, a bucket, or an object-store prefix that objects lie below (one
    metadata request). An http(s) URL names a file: a web server has no listing."""
    try:
        fs, path = _filesystem(url)
        return not _is_http(fs) and _info_within_deadline(fs, path, url).get("type") == "directory"
    except _remote_errors() as exc:
        raise _remote_error(url, exc) from exc


def list_remote_folder(url: str) -> dict[str, str]:
    """Every file below a remote folder (at any depth), as its path below the folder -> its URL, in sorted order.

    The listing comes from the backend (one request per 1,000 keys on S3) and its requests are bounded by the
    backend's own timeouts. Raises a BncheckError with one line when it fails (no such bucket, access denied, no
    credentials) or when the URL is http(s), whose servers have no listing.
    """
    folder = url if url.endswith("/") else f"{url}/"
    try:
        fs, path = _filesystem(url)
        if _is_http(fs):
            raise UnsupportedFormatError(
                f"{url} names a folder, but a web server has no listing to search: name each checkpoint file"
            )
        root = path.rstrip("/")
        names: list[str] = fs.find(root)
    except _remote_errors() as exc:
        raise _remote_error(folder, exc) from exc
    # the backend names files by their path (bucket/key), not by URL; the URL keeps the scheme the user wrote
    relatives = sorted(name[len(root) + 1 :] for name in names if name.startswith(f"{root}/"))
    # a key ending in / is a folder marker some tools write, not a file
    return {relative: folder + relative for relative in relatives if relative and not relative.endswith("/")}


@dataclass(eq=False)
class RemoteSource(ByteSource):
    """A file behind an fsspec URL (``https://``, ``s3://``, ``gs://``...), read with exact ranged requests."""

    url: str
    name: str = ""
    size: int = 0
    _fs: Any = field(default=None, repr=False)
    _path: str = ""
    _handle: Any = field(default=None, repr=False)
    _blocks: list[tuple[int, bytes]] = field(default_factory=list, repr=False)  # prefetched, sorted by offset
    _starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.name = self.url
        try:
            self._fs, self._path = _filesystem(self.url)
            info = _info_within_deadline(self._fs, self._path, self.url)
        except _remote_errors() as exc:
            raise _remote_error(self.url, exc) from exc
        if info.get("type") == "directory":
            raise UnreadableFileError(f"{self.url} is a folder; end it with / to search it for checkpoints")
        size = info.get("size")
        if not isinstance(size, int):
            raise UnreadableFileError(f"the server does not say how large {self.url} is")
        self.size = size

    def _bounded_read(self, offset: int, length: int) -> bytes | None:
        """One ranged request held to the deadline and byte cap of :mod:`bncheck.loaders.remote`: read by bncheck
        itself for http(s), through the backend's ``_cat_file`` for the other asynchronous ones; None for a
        synchronous backend (a local or in-memory file system), which has nothing to wait for."""
        if not self._fs.async_impl:
            return None
        from fsspec.asyn import sync

        from bncheck.loaders import remote

        if _is_http(self._fs):
            session = sync(self._fs.loop, self._fs.set_session)
            url = self._fs.encode_url(self._path)
            headers = self._fs.kwargs.get("headers")
            return cast(
                bytes, sync(self._fs.loop, remote.read_http_range, session, url, offset, length, headers=headers)
            )
        fetch = self._fs._cat_file(self._path, start=offset, end=offset + length)
        return cast(bytes, sync(self._fs.loop, remote.within_deadline, fetch, self.url, length))

    def _file(self) -> Any:
        if self._handle is None:
            # no read-ahead cache: every read is one ranged request for exactly the bytes asked for
            self._handle = self._fs.open(self._path, "rb", cache_type="none", size=self.size)
        return self._handle

    def _read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        cached = self._cached(offset, length)
        if cached is not None:
            return cached
        return self._fetch(offset, length, shared_handle=True)

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Fetch the ranges as merged blocks, many requests at once, so that reading a thousand tensors costs a few
        round trips instead of a thousand. Reads outside the blocks still go to the server."""
        blocks = merge_ranges(
            [(offset, min(length, self.size - offset)) for offset, length in ranges if 0 <= offset < self.size],
            max_gap=PREFETCH_MAX_GAP,
            max_block=PREFETCH_MAX_BLOCK,
        )
        if not blocks:
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(PREFETCH_CONNECTIONS, len(blocks))) as pool:
            fetched = list(pool.map(lambda block: self._fetch(block[0], block[1] - block[0]), blocks))
        for (start, end), data in zip(blocks, fetched, strict=True):
            if len(data) != end - start:
                raise UnreadableFileError(f"cannot read {self.url}: the server sent {len(data)} of {end - start} bytes")
        self._blocks = [(start, data) for (start, _), data in zip(blocks, fetched, strict=True)]
        self._starts = [start for start, _ in self._blocks]

    def _fetch(self, offset: int, length: int, *, shared_handle: bool = False) -> bytes:
        """One ranged read; a synchronous backend reads on the shared handle or, when prefetching runs several at
        once, on a handle of its own."""
        try:
            bounded = self._bounded_read(offset, length)
            if bounded is not None:
                return bounded
            if shared_handle:
                handle = self._file()
                handle.seek(offset)
                data: bytes = handle.read(length)
                return data
            with self._fs.open(self._path, "rb", cache_type="none", size=self.size) as handle:
                handle.seek(offset)
                data = handle.read(length)
                return data
        except _remote_errors() as exc:
            raise _remote_error(self.url, exc) from exc

    def _cached(self, offset: int, length: int) -> bytes | None:
        index = bisect.bisect_right(self._starts, offset) - 1
        if index < 0:
            return None
        start, data = self._blocks[index]
        if offset + length > start + len(data):
            return None
        return data[offset - start : offset - start + length]

    def open(self) -> IO[bytes]:
        return cast(IO[bytes], SourceFile(self))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def sibling(self, name: str) -> ByteSource:
        scheme, sep, rest = self.url.partition("://")
        return RemoteSource(f"{scheme}{sep}{posixpath.join(posixpath.dirname(rest), name)}")


@dataclass(eq=False)
class SliceSource(ByteSource):
    """A file stored inside another (a torch.save archive kept as a member of a .pt2 archive), read in place: a
    nested archive costs the bytes its reader asks for, not its size."""

    parent: ByteSource
    start: int
    name: str = ""
    size: int = 0

    def _read(self, offset: int, length: int) -> bytes:
        return self.parent.read(self.start + offset, length)

    def open(self) -> IO[bytes]:
        return cast(IO[bytes], SourceFile(self))

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        self.parent.prefetch([(self.start + offset, length) for offset, length in ranges])


@dataclass(eq=False)
class MemorySource(ByteSource):
    """Bytes already in memory (a compressed member, inflated within its reader's bounds)."""

    data: bytes
    name: str = ""
    size: int = 0

    def __post_init__(self) -> None:
        self.size = len(self.data)

    def _read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def open(self) -> IO[bytes]:
        return io.BytesIO(self.data)


class SourceFile(io.RawIOBase):
    """A seekable file object over any ByteSource: every read maps to one ``source.read`` and never asks for more
    than the file holds (a crafted length field cannot make it allocate gigabytes)."""

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._source.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        end = self._source.size if size is None or size < 0 else min(self._source.size, self._position + size)
        length = max(0, end - self._position)
        data = self._source.read(self._position, length) if length else b""
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class ReadAheadFile(SourceFile):
    """A SourceFile for reads of a few bytes at a time (decoding a pickle opcode by opcode): a short read fetches
    ``block`` bytes, and the reads that follow are served from them, so a remote file costs a request per block
    rather than per read. Like SourceFile it never asks for more than the file holds (io.BufferedReader would
    allocate whatever length a crafted opcode names)."""

    def __init__(self, source: ByteSource, *, block: int) -> None:
        super().__init__(source)
        self._block = block
        self._start = 0
        self._data = b""

    def read(self, size: int | None = -1) -> bytes:
        end = self._source.size if size is None or size < 0 else min(self._source.size, self._position + size)
        length = max(0, end - self._position)
        if length == 0:
            return b""
        offset = self._position - self._start
        if offset < 0 or offset + length > len(self._data):
            if length >= self._block:
                return super().read(size)
            self._start, offset = self._position, 0
            self._data = self._source.read(self._position, min(self._block, self._source.size - self._position))
        self._position += length
        return self._data[offset : offset + length]


def open_source(location: str | os.PathLike[str]) -> ByteSource:
    """A local file or an fsspec URL."""
    if is_url(location):
        return RemoteSource(str(location))
    return LocalSource(Path(location))
