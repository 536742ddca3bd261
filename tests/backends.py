"""Backends the relays forward to: TCP echo and HTTP servers served from
threads in the test process."""

from __future__ import annotations

import contextlib
import re
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

from basics import LOCALHOST, pattern_bytes

BACKEND_PAGE = b"hello from backend\n"


class BackgroundServer:
    """A socketserver served from a daemon thread; use as a context manager."""

    def __init__(self, server: socketserver.TCPServer) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.request.recv(256 * 1024):
                self.request.sendall(chunk)


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class EchoServer(BackgroundServer):
    """Raw TCP echo backend."""

    def __init__(self) -> None:
        super().__init__(_ThreadingTCPServer((LOCALHOST, 0), _EchoHandler))


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    page: bytes = BACKEND_PAGE


class _BackendHandler(BaseHTTPRequestHandler):
    server: _HttpServer

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path == "/":
            self._reply(self.server.page, "text/plain")
        elif match := re.fullmatch(r"/bytes/(\d+)", self.path):
            self._reply(pattern_bytes(int(match[1])), "application/octet-stream")
        else:
            self.send_error(404)

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/echo":
            self.send_error(404)
            return
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if len(body) != length:
            self.send_error(400, "short body")
            return
        self._reply(body, "application/octet-stream")

    def _reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class HttpBackend(BackgroundServer):
    """HTTP/1.0 backend: GET / -> page, GET /bytes/N -> N bytes, POST /echo -> body."""

    def __init__(self, page: bytes = BACKEND_PAGE) -> None:
        server = _HttpServer((LOCALHOST, 0), _BackendHandler)
        server.page = page
        super().__init__(server)
        self.page = page


def http_backend_on(port: int, page: bytes = BACKEND_PAGE, host: str = LOCALHOST) -> BackgroundServer:
    """An HttpBackend bound to a given port (e.g. one a relay already forwards to),
    on 127.0.0.1 or another loopback address (127.0.0.2: a second host of a table)."""
    server = _HttpServer((host, port), _BackendHandler)
    server.page = page
    return BackgroundServer(server)
