"""Bounded, non-blocking request/answer servers in the parent's loop.

The control socket and the metrics endpoint are served by the root parent
itself, so nothing a client does may block it or cost it unbounded work:
at most `max_conns` connections at a time (more are accepted and closed at
once), a request of at most `max_request` bytes read within
`read_timeout`, an answer written within `write_timeout`; each connection
is a small state machine driven by the parent's selector.
"""
from __future__ import annotations

import functools
import logging
import selectors
import socket
import time
from typing import Callable

from pyprivsep.channel import RateLimited

log = logging.getLogger("pyprivsep")

Reply = Callable[[bytes], None]
WAIT_TIMEOUT = 30.0     # safety net while the parent gathers an answer


class Conn:
    """One client: reading its request, waiting for its answer, writing it."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.inbuf = b""
        self.out = b""
        self.state = "read"             # read -> wait -> write -> closed
        self.deadline = deadline


class Server:
    """Subclasses say when a request is complete and how to answer it."""

    def __init__(self, sock: socket.socket, name: str, *, max_conns: int = 16,
                 max_request: int = 4096, read_timeout: float = 2.0,
                 write_timeout: float = 5.0) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.max_conns = max_conns
        self.max_request = max_request
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.conns: set[Conn] = set()
        self.selector: selectors.BaseSelector | None = None
        self.refused_log = RateLimited()
        self.slow_log = RateLimited()

    # ---- what a subclass provides --------------------------------------

    def complete(self, data: bytes) -> bool:
        raise NotImplementedError

    def handle(self, request: bytes, reply: Reply) -> None:
        """Answer `request` through reply(bytes), now or later."""
        raise NotImplementedError

    # ---- the loop ------------------------------------------------------

    def attach(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        selector.register(self.sock, selectors.EVENT_READ, self.on_accept)

    def on_accept(self, mask: int) -> None:
        for _ in range(self.max_conns):     # bounded work per wakeup
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:            # EMFILE and the like
                self.refused_log.warning("%s: accept: %s", self.name, e)
                return
            if len(self.conns) >= self.max_conns:
                self.refused_log.warning("%s: %d connections open, refusing "
                                         "more", self.name, len(self.conns))
                sock.close()
                continue
            self.open(sock)

    def open(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        conn = Conn(sock, time.monotonic() + self.read_timeout)
        self.conns.add(conn)
        assert self.selector is not None
        self.selector.register(sock, selectors.EVENT_READ,
                               functools.partial(self.on_conn, conn))

    def on_conn(self, conn: Conn, mask: int) -> None:
        if conn.state == "read":
            self.read(conn)
        elif conn.state == "write":
            self.write(conn)

    def read(self, conn: Conn) -> None:
        try:
            chunk = conn.sock.recv(self.max_request + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close_conn(conn)
            return
        conn.inbuf += chunk
        if len(conn.inbuf) > self.max_request:
            log.warning("%s: request too long", self.name)
            self.close_conn(conn)
        elif chunk and not self.complete(conn.inbuf):
            return
        elif not conn.inbuf:
            self.close_conn(conn)       # a probe: connected, sent nothing
        else:
            self.wait(conn)

    def wait(self, conn: Conn) -> None:
        conn.state = "wait"
        conn.deadline = time.monotonic() + WAIT_TIMEOUT
        assert self.selector is not None
        self.selector.unregister(conn.sock)
        self.handle(conn.inbuf, functools.partial(self.reply_to, conn))

    def reply_to(self, conn: Conn, data: bytes) -> None:
        if conn.state != "wait":
            return                      # gone meanwhile (timed out, closed)
        conn.state = "write"
        conn.out = data
        conn.deadline = time.monotonic() + self.write_timeout
        assert self.selector is not None
        self.selector.register(conn.sock, selectors.EVENT_WRITE,
                               functools.partial(self.on_conn, conn))
        self.write(conn)

    def write(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close_conn(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self.close_conn(conn)

    def close_conn(self, conn: Conn) -> None:
        if conn.state == "closed":
            return
        if conn.state != "wait" and self.selector is not None:
            self.selector.unregister(conn.sock)
        conn.state = "closed"
        self.conns.discard(conn)
        conn.sock.close()

    def expire(self, now: float) -> None:
        for conn in [c for c in self.conns if c.deadline <= now]:
            if conn.state == "read":
                self.slow_log.warning("%s: request not sent in time",
                                      self.name)
            self.close_conn(conn)

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self.conns), default=None)

    def close(self) -> None:
        for conn in list(self.conns):
            self.close_conn(conn)
        if self.selector is not None:
            try:
                self.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self.sock.close()
