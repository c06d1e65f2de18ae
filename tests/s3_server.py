"""A real S3 API on loopback for the object-store tests: moto's server (the Flask app behind ``moto_server``) on
127.0.0.1, wrapped in a WSGI layer that counts every request and every byte of response body it sends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server

StartResponse = Callable[..., Any]


class S3Server:
    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args: object) -> None:  # keep test output clean
                pass

        self.requests = 0
        self.bytes_served = 0
        self.log: list[str] = []  # "GET /bucket/key", "GET /bucket?list-type=2&prefix=...", ...
        self._lock = threading.Lock()
        self._app = DomainDispatcherApplication(create_backend_app)
        self.httpd: BaseWSGIServer = make_server(
            "127.0.0.1", 0, self._counting, threaded=True, request_handler=QuietHandler
        )
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _counting(self, environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        with self._lock:
            self.requests += 1
            query = environ.get("QUERY_STRING")
            self.log.append(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}" + (f"?{query}" if query else ""))
        body: Iterable[bytes] = self._app(environ, start_response)
        for chunk in body:
            with self._lock:
                self.bytes_served += len(chunk)
            yield chunk

    def reset_counts(self) -> None:
        with self._lock:
            self.requests, self.bytes_served, self.log = 0, 0, []

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> S3Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
