"""Bounded remote reads: every request bncheck sends ends within a deadline and never buffers more than it asked for.

fsspec's HTTP file sets no timeout and reads a 206 answer with ``await response.read()``, whatever its length, so a
server that streams without end, drips a byte a second or declares a huge body could hang bncheck or grow it without
bound. bncheck therefore reads http(s) ranges itself, on fsspec's own aiohttp session (the same redirects, TLS and
connection pool), and holds the reads of the other asynchronous backends (s3, gs) to the same deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import Any

from bncheck.errors import CheckpointNotFoundError, UnreadableFileError

# The time a request may take is a fixed allowance plus its length at a minimum throughput, checked as it goes: by
# any moment t after the start, at least REMOTE_MIN_THROUGHPUT * (t - REMOTE_START_ALLOWANCE) bytes must have
# arrived. The allowance covers DNS, connecting, TLS, redirects and an object store's first byte (usually well under
# a second, occasionally several). The throughput is per request while 16 prefetch requests share one link: 16 KiB/s
# each is 2.1 Mbit/s for all 16, so a 16 MiB block may take up to 17 minutes on a slow link, while a server that
# drips a byte a second falls behind the pace as soon as the allowance is spent, whatever the length asked for.
REMOTE_START_ALLOWANCE = 10.0  # seconds until the answer's headers, and before the pace starts counting
REMOTE_MIN_THROUGHPUT = 16 * 1024  # bytes per second per request, after the allowance
# No byte at all for this long ends a request even when it is ahead of the pace: a server that has gone silent.
REMOTE_READ_TIMEOUT = 15.0
# Metadata (the size, from HEAD, or from GET when HEAD fails) is two answers at most, each within the allowance.
REMOTE_INFO_DEADLINE = 2 * REMOTE_START_ALLOWANCE
# The body is taken in pieces of at most this many bytes, and never more than one byte past the range asked for:
# with aiohttp's own read buffer (it stops reading the socket at 2 x 64 KiB) this is all the slack there is.
REMOTE_READ_PIECE = 64 * 1024

IGNORES_RANGE = (
    "the server ignores HTTP Range requests; bncheck reads only the bytes it needs and will not download the whole file"
)


def request_deadline(length: int) -> float:
    """The most seconds a request for ``length`` bytes may take (the pace ends most requests sooner)."""
    return REMOTE_START_ALLOWANCE + length / REMOTE_MIN_THROUGHPUT


async def read_http_range(
    session: Any, url: str, offset: int, length: int, *, headers: Mapping[str, str] | None = None
) -> bytes:
    """The ``length`` bytes at ``offset`` of an http(s) URL (fewer if the file ends sooner), within the deadline and
    without reading more than one byte past them; anything else a server sends is refused with one line."""
    import aiohttp

    loop = asyncio.get_running_loop()
    started = loop.time()
    request_headers = {
        **(headers or {}),
        "Range": f"bytes={offset}-{offset + length - 1}",
        "Accept-Encoding": "identity",
    }
    try:
        async with asyncio.timeout(REMOTE_START_ALLOWANCE):
            response = await session.get(
                url,
                headers=request_headers,
                # aiohttp's own timeouts back up the pace below: connecting, and silence between two reads
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=REMOTE_START_ALLOWANCE, sock_read=REMOTE_READ_TIMEOUT
                ),
            )
    except TimeoutError:
        raise UnreadableFileError(f"cannot read {url}: no answer within {REMOTE_START_ALLOWANCE:g} s") from None
    complete = False
    try:
        _check_answer(response, url, offset, length)
        if response.status == 416:  # the range starts past the end: a truncated file, which the caller reports
            complete = True
            return b""
        pieces: list[bytes] = []
        received = 0
        while True:
            elapsed = loop.time() - started
            budget = min(REMOTE_READ_TIMEOUT, REMOTE_START_ALLOWANCE + received / REMOTE_MIN_THROUGHPUT - elapsed)
            try:
                if budget <= 0:
                    raise TimeoutError
                async with asyncio.timeout(budget):
                    piece: bytes = await response.content.read(min(REMOTE_READ_PIECE, length + 1 - received))
            except TimeoutError:
                raise UnreadableFileError(
                    f"cannot read {url}: the server is too slow ({received} of {length} bytes after "
                    f"{loop.time() - started:.0f} s; bncheck needs {REMOTE_MIN_THROUGHPUT // 1024} KiB/s per request "
                    f"after {REMOTE_START_ALLOWANCE:g} s, and a byte at least every {REMOTE_READ_TIMEOUT:g} s)"
                ) from None
            if not piece:
                complete = True
                return b"".join(pieces)
            received += len(piece)
            if received > length:
                raise UnreadableFileError(f"cannot read {url}: the server sent more than the requested range")
            pieces.append(piece)
    finally:
        # close, not release, unless the body was read to its end: a connection with unread bytes is dropped rather
        # than drained, so an endless or overlong body costs nothing more once refused
        if complete:
            response.release()
        else:
            response.close()


def _check_answer(response: Any, url: str, offset: int, length: int) -> None:
    """Refuse, before reading any of the body, an answer that is not the range asked for or says it is longer."""
    status: int = response.status
    if status == 404:
        raise CheckpointNotFoundError(f"not found: {url}")
    if status == 416:
        return
    response.raise_for_status()
    declared = response.headers.get("Content-Length")
    declared_length = int(declared) if declared is not None and declared.isdigit() else None
    if response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
        # a compressed body could inflate a thousandfold past the range; bncheck asked for identity
        raise UnreadableFileError(f"cannot read {url}: the server compressed the range although asked not to")
    if status == 200:
        # the whole file instead of a range: acceptable only when the range is the whole file
        if offset == 0 and declared_length == length:
            return
        raise UnreadableFileError(IGNORES_RANGE)
    if status != 206:
        raise UnreadableFileError(f"cannot read {url}: unexpected HTTP status {status} for a range request")
    if declared_length is not None and declared_length > length:
        raise UnreadableFileError(f"cannot read {url}: the server sent more than the requested range")
    content_range = response.headers.get("Content-Range", "")
    unit, _, span = content_range.partition(" ")
    first, _, last = span.partition("/")[0].partition("-")
    if not content_range:
        return
    if unit != "bytes" or not first.isdigit() or int(first) != offset or not last.isdigit():
        raise UnreadableFileError(f"cannot read {url}: the server sent another range than the one requested")
    if int(last) >= offset + length:
        raise UnreadableFileError(f"cannot read {url}: the server sent more than the requested range")


async def within_deadline(fetch: Awaitable[bytes], url: str, length: int) -> bytes:
    """A read through another asynchronous fsspec backend (s3, gs), cancelled at the deadline for its length."""
    try:
        async with asyncio.timeout(request_deadline(length)):
            data = await fetch
    except TimeoutError:
        raise UnreadableFileError(
            f"cannot read {url}: no complete answer within {request_deadline(length):.0f} s"
        ) from None
    if len(data) > length:
        raise UnreadableFileError(f"cannot read {url}: the server sent more than the requested range")
    return data


async def info_within_deadline(fetch: Awaitable[dict[str, Any]], url: str) -> dict[str, Any]:
    """The size and kind of a remote file, within REMOTE_INFO_DEADLINE."""
    try:
        async with asyncio.timeout(REMOTE_INFO_DEADLINE):
            return await fetch
    except TimeoutError:
        raise UnreadableFileError(f"cannot read {url}: no answer within {REMOTE_INFO_DEADLINE:g} s") from None
