"""A loopback HTTP server for the remote-checkpoint tests: serves files from a folder, honours (or, on request,
ignores) Range headers, can drop connections, can answer slowly, can misbehave in the ways that would hang a client
or grow its memory (``hostile``), and counts every request and byte of body it sends."""

from __future__ import annotations

import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

# How a hostile server answers every ranged GET (HEAD stays honest, so the client gets as far as reading):
#   endless      206, no Content-Length, then the range followed by zeros for ever
#   drip         206 with honest headers, then the body at one byte per second
#   overlong     206 whose Content-Length and body are OVERLONG_EXTRA bytes longer than the range asked for
#   huge-length  206 declaring a Content-Length of 2**62, then zeros for ever
Hostile = Literal["endless", "drip", "overlong", "huge-length"]
OVERLONG_EXTRA = 512 * 1024 * 1024


class RangeServer:
    def __init__(
        self,
        root: Path,
        *,
        honour_range: bool = True,
        drop_after_requests: int | None = None,
        latency: float = 0.0,
        hostile: Hostile | None = None,
        hostile_after_requests: int = 0,
        rate: int | None = None,
    ) -> None:
        self.root = root
        self.hostile = hostile
        self.hostile_after_requests = hostile_after_requests  # honest until then: the prefetch meets the hostility
        self.rate = rate  # bytes per second of an honest body (a slow but steady link)
        self.latency = latency  # seconds before each GET is answered, like an object store's first byte
        self.honour_range = honour_range
        self.drop_after_requests = drop_after_requests
        self.bytes_served = 0
        self.requests = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes; no 40 ms delayed-ACK stalls

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _file(self) -> Path | None:
                path = (server.root / self.path.lstrip("/").split("?")[0]).resolve()
                return path if path.is_file() and server.root.resolve() in path.parents else None

            def do_HEAD(self) -> None:
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.send_header("Accept-Ranges", "bytes" if server.honour_range else "none")
                self.end_headers()

            def do_GET(self) -> None:
                time.sleep(server.latency)
                with server._lock:
                    server.requests += 1
                    dropping = server.drop_after_requests is not None and server.requests > server.drop_after_requests
                    hostile = server.hostile is not None and server.requests > server.hostile_after_requests
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                if dropping:  # the peer goes away mid-conversation
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                size = path.stat().st_size
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match and server.honour_range:
                    start = int(match.group(1))
                    end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                else:
                    start, end = 0, size - 1
                    self.send_response(200)
                length = end - start + 1
                if hostile and match:
                    self._misbehave(path, start, length)
                    return
                self.send_header("Content-Length", str(length))
                self.end_headers()
                with path.open("rb") as handle:
                    handle.seek(start)
                    remaining = length
                    try:
                        while remaining:
                            chunk = handle.read(min(remaining, 1 << 20 if server.rate is None else server.rate // 10))
                            self.wfile.write(chunk)
                            if server.rate is not None:
                                time.sleep(0.1)
                            with server._lock:
                                server.bytes_served += len(chunk)
                            remaining -= len(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client stopped reading (a refused full download)

            def _misbehave(self, path: Path, start: int, length: int) -> None:
                with path.open("rb") as handle:
                    handle.seek(start)
                    body = handle.read(length)
                if server.hostile in ("endless", "huge-length"):
                    declared = None if server.hostile == "endless" else 2**62
                    self._send(body, declared, then_zeros=None)
                elif server.hostile == "overlong":
                    self._send(body, length + OVERLONG_EXTRA, then_zeros=OVERLONG_EXTRA)
                else:
                    self._send(body, length, then_zeros=0, drip=True)

            def _send(self, body: bytes, declared: int | None, *, then_zeros: int | None, drip: bool = False) -> None:
                """``body`` then ``then_zeros`` zero bytes (None: for ever), as fast as the client takes them or one
                byte a second."""
                if declared is None:
                    self.send_header("Connection", "close")  # a body delimited only by the connection closing
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(declared))
                self.end_headers()
                zeros = bytes(1 << 20)
                sent = 0
                try:
                    if drip:
                        for index in range(len(body)):
                            self.wfile.write(body[index : index + 1])
                            self.wfile.flush()
                            with server._lock:
                                server.bytes_served += 1
                            time.sleep(1)
                        return
                    self.wfile.write(body)
                    with server._lock:
                        server.bytes_served += len(body)
                    while then_zeros is None or sent < then_zeros:
                        chunk = zeros if then_zeros is None else zeros[: then_zeros - sent]
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        with server._lock:
                            server.bytes_served += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up, as it should

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> RangeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
