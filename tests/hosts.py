"""A table's hosts on loopback: HTTP backends on 127.0.0.1, 127.0.0.2 and
127.0.0.3 sharing one port (a table's hosts share the forward's port),
each answering a page that names it, and a client that says which host
answered through a relay."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator, Sequence

from backends import BackgroundServer, http_backend_on
from basics import LOCALHOST, free_port
from tlsclients import client_context

HOST_A, HOST_B, HOST_C = "127.0.0.1", "127.0.0.2", "127.0.0.3"
PAGE = {HOST_A: b"backend A\n", HOST_B: b"backend B\n", HOST_C: b"backend C\n"}
WHO = {page: host for host, page in PAGE.items()}


def backend_port() -> int:
    """A port free on 127.0.0.1, 127.0.0.2 and 127.0.0.3 alike (a table's
    hosts share the forward's port)."""
    for _ in range(50):
        port = free_port()
        try:
            for host in (HOST_B, HOST_C):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every loopback address")


@contextlib.contextmanager
def backends(port: int, hosts: Sequence[str]) -> Iterator[dict[str, BackgroundServer]]:
    """HTTP backends on `hosts`, port `port`, each answering its own page."""
    with contextlib.ExitStack() as stack:
        yield {h: stack.enter_context(http_backend_on(port, PAGE[h], host=h)) for h in hosts}


def get(port: int, sni: str, source: str = LOCALHOST, timeout: float = 10.0) -> str:
    """GET / through the relay from `source`: which backend answered."""
    ctx = client_context()
    with socket.create_connection((LOCALHOST, port), timeout=timeout,
                                  source_address=(source, 0)) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            with contextlib.suppress(ssl.SSLEOFError, ConnectionResetError):
                while chunk := tls.recv(65536):
                    data += chunk
    body = data.partition(b"\r\n\r\n")[2]
    assert body in WHO, f"no backend's page: {data!r}"
    return WHO[body]
