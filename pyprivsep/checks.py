"""The health checks themselves (relayd's `check tcp|tls|http|https|send`),
all of a round at once on one selector: the hce may not start threads (its
seccomp filter refuses clone), and a host that hangs must not delay the
others' checks.

Each check is a generator that yields (socket, EVENT_READ|EVENT_WRITE)
whenever it would block and returns why the host is up; it raises
CheckFailed (or OSError) with why it is not.  Checks runs them: it
registers what they wait for, advances them as their sockets get ready,
and ends each one at its deadline (the check's `timeout`).
"""
from __future__ import annotations

import errno
import fnmatch
import os
import selectors
import socket
import ssl
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from pyprivsep.config import Check
from pyprivsep.tables import Host

READ_MAX = 4096                         # what a check reads of an answer

Wait = tuple[socket.socket, int]        # a socket, the event it waits for
Steps = Generator[Wait, None, str]


class CheckFailed(Exception):
    pass


@dataclass(frozen=True)
class Target:
    """A host to check, with its forward's check, timeout and interval."""

    host: Host
    check: Check
    timeout_ms: int
    interval: int


def tls_context() -> ssl.SSLContext:
    """No certificate verification, as relayd's TLS checks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def matches(data: bytes, pattern: str) -> bool:
    """relayd's expect: an fnmatch(3) pattern, against the first line or
    the whole answer (trailing newline removed)."""
    text = data.decode("latin-1")
    return fnmatch.fnmatchcase(text.rstrip("\r\n"), pattern) or \
        fnmatch.fnmatchcase(text.split("\n", 1)[0].rstrip("\r"), pattern)


def _send(conn: socket.socket, data: bytes) -> Generator[Wait, None, None]:
    while data:
        try:
            data = data[conn.send(data):]
        except (BlockingIOError, ssl.SSLWantWriteError):
            yield conn, selectors.EVENT_WRITE
        except ssl.SSLWantReadError:
            yield conn, selectors.EVENT_READ


def _read(conn: socket.socket, done: Callable[[bytes], bool]
          ) -> Generator[Wait, None, bytes]:
    """Until done(what came), EOF or READ_MAX bytes."""
    data = b""
    while len(data) < READ_MAX and not done(data):
        try:
            chunk = conn.recv(READ_MAX - len(data))
        except (BlockingIOError, ssl.SSLWantReadError):
            yield conn, selectors.EVENT_READ
            continue
        except ssl.SSLWantWriteError:
            yield conn, selectors.EVENT_WRITE
            continue
        except ssl.SSLEOFError:
            break
        if not chunk:
            break
        data += chunk
    return data


def steps(t: Target, ctx: ssl.SSLContext, opened: list[socket.socket]) -> Steps:
    """One check of one host, as a generator (see the module's comment).
    Every socket it makes is put in `opened`, for the caller to close."""
    c, h = t.check, t.host
    family = socket.AF_INET6 if ":" in h.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    opened.append(sock)
    sock.setblocking(False)
    err = sock.connect_ex((h.address, h.port))
    if err == errno.EINPROGRESS:
        yield sock, selectors.EVENT_WRITE
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))
    if c.kind == "tcp":
        return "tcp connect ok"
    conn: socket.socket = sock
    if c.tls:
        conn = ctx.wrap_socket(sock, do_handshake_on_connect=False)
        opened.append(conn)
        while True:
            try:
                conn.do_handshake()
                break
            except ssl.SSLWantReadError:
                yield conn, selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                yield conn, selectors.EVENT_WRITE
            except ssl.SSLError as e:
                raise CheckFailed(f"tls handshake failed: {e.reason}") from None
        if c.kind == "tls":
            return "tls connect ok"
    if c.kind in ("http", "https"):
        yield from _send(conn, f"GET {c.path} HTTP/1.0\r\nHost: {h.name}\r\n"
                               "Connection: close\r\n\r\n".encode())
        answer = yield from _read(conn, lambda data: b"\r\n" in data)
        parts = answer.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise CheckFailed("no http answer")
        if parts[1] != str(c.code).encode():
            raise CheckFailed(f"http code {parts[1].decode(errors='replace')}, "
                              f"not {c.code}")
        return f"http code {c.code} ok"
    if c.send:
        yield from _send(conn, c.send.encode())
    answer = yield from _read(conn, lambda data: bool(data) and matches(data, c.expect))
    if not matches(answer, c.expect):
        raise CheckFailed("send/expect: no match")
    return "send/expect ok"


Result = Callable[[Target, bool, int, str], None]   # target, up, ms, why


@dataclass(eq=False)
class _Job:
    target: Target
    gen: Steps
    opened: list[socket.socket]
    start: float
    deadline: float
    fd: int = -1                        # registered with the selector
    events: int = 0


@dataclass(eq=False)
class Checks:
    """Checks in progress on `sel` (shared with the caller, who passes
    on the events of the keys whose data is a _Job)."""

    sel: selectors.BaseSelector
    ctx: ssl.SSLContext
    result: Result
    jobs: dict[int, _Job] = field(default_factory=dict)   # by host id

    def start(self, t: Target) -> None:
        now = time.monotonic()
        opened: list[socket.socket] = []
        job = _Job(t, steps(t, self.ctx, opened), opened, now,
                   now + t.timeout_ms / 1000)
        self.jobs[t.host.id] = job
        self.advance(job)

    def running(self, host_id: int) -> bool:
        return host_id in self.jobs

    def event(self, job: object) -> None:
        """A socket of `job` is ready (the key's data); a job that has
        ended meanwhile (this turn's events) is left alone."""
        if isinstance(job, _Job) and self.jobs.get(job.target.host.id) is job:
            self.advance(job)

    def next_deadline(self) -> float | None:
        return min((j.deadline for j in self.jobs.values()), default=None)

    def advance(self, job: _Job) -> None:
        try:
            sock, events = next(job.gen)
        except StopIteration as done:
            self.finish(job, True, str(done.value))
            return
        except CheckFailed as e:
            self.finish(job, False, str(e))
            return
        except (OSError, ValueError) as e:
            self.finish(job, False, getattr(e, "strerror", None) or str(e)
                        or type(e).__name__)
            return
        fd = sock.fileno()
        if fd != job.fd:
            self.unregister(job)
            self.sel.register(fd, events, job)
        elif events != job.events:
            self.sel.modify(fd, events, job)
        job.fd, job.events = fd, events

    def unregister(self, job: _Job) -> None:
        if job.fd != -1:
            try:
                self.sel.unregister(job.fd)
            except (KeyError, ValueError):
                pass
            job.fd = -1

    def expire(self, now: float) -> None:
        for job in [j for j in self.jobs.values() if j.deadline <= now]:
            self.finish(job, False, "timeout")

    def finish(self, job: _Job, up: bool, why: str) -> None:
        self.unregister(job)
        job.gen.close()
        for s in job.opened:
            s.close()
        del self.jobs[job.target.host.id]
        self.result(job.target, up, int((time.monotonic() - job.start) * 1000), why)


def check_once(t: Target, ctx: ssl.SSLContext) -> tuple[bool, int, str]:
    """One check run to its end, on a selector of its own (tests, -n)."""
    out: list[tuple[bool, int, str]] = []
    with selectors.DefaultSelector() as sel:
        checks = Checks(sel, ctx, lambda _t, up, ms, why: out.append((up, ms, why)))
        checks.start(t)
        while not out:
            deadline = checks.next_deadline()
            wait = 0.0 if deadline is None else max(deadline - time.monotonic(), 0)
            for key, _mask in sel.select(wait):
                checks.event(key.data)
            checks.expire(time.monotonic())
    return out[0]
