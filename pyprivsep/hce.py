"""The health check engine ("hce", as relayd's): a child of the parent that
checks the hosts of every table with a `check`, and tells the parent when
one goes up or down.

It is given no key and no listening socket (the parent closes every
descriptor but its end of the pipe before it starts), runs as the relays'
user in the chroot, and under a seccomp filter of its own (sandbox.c,
PPS_SANDBOX_HCE: sockets to IPv4/IPv6 hosts, nothing else new).  It
never talks to a ca.

Checks run one after another, each bounded by its timeout (relayd's
`timeout`, ms), every `interval` seconds per table.  A result goes to the
parent only when a host's state changes (and the first time), as one
SOCK_SEQPACKET frame: struct HOST_STATE (host id, up, milliseconds the
check took) and a reason of at most MAX_REASON bytes.
"""
from __future__ import annotations

import fnmatch
import selectors
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from pyprivsep import privsep
from pyprivsep.config import Check, Config
from pyprivsep.tables import Host

HOST_STATE = struct.Struct("=IIH")      # id, up (0, 1), milliseconds
MAX_REASON = 200
MAX_FRAME = HOST_STATE.size + MAX_REASON
READ_MAX = 4096                         # what a check reads of an answer


@dataclass(frozen=True)
class Target:
    """A host to check, with its forward's check, timeout and interval."""

    host: Host
    check: Check
    timeout_ms: int
    interval: int


def targets(cfg: Config, hosts: list[Host]) -> list[Target]:
    """Every host of a forward with a check (not of a disabled table)."""
    out = []
    for h in hosts:
        if h.disabled:
            continue
        relay = next(r for r in cfg.relays if r.name == h.relay)
        fwd = relay.forwards[h.forward]
        if fwd.check is not None:
            out.append(Target(h, fwd.check, fwd.timeout_ms, fwd.interval))
    return out


def encode(host_id: int, up: bool, ms: int, reason: str) -> bytes:
    return HOST_STATE.pack(host_id, int(up), min(ms, 0xFFFF)) + \
        reason.encode(errors="replace")[:MAX_REASON]


def decode(frame: bytes) -> tuple[int, bool, int, str]:
    """A frame from the hce, checked: ValueError if it is not one."""
    if not HOST_STATE.size <= len(frame) <= MAX_FRAME:
        raise ValueError(f"host state frame of {len(frame)} bytes")
    host_id, up, ms = HOST_STATE.unpack_from(frame)
    if up not in (0, 1):
        raise ValueError(f"host state {up}")
    return host_id, bool(up), ms, frame[HOST_STATE.size:].decode(errors="replace")


class CheckFailed(Exception):
    pass


def _context() -> ssl.SSLContext:
    """No certificate verification, as relayd's TLS checks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _read(sock: socket.socket, deadline: float, until: bytes | None,
          pattern: str | None) -> bytes:
    """Read until `until` is seen, the pattern matches, EOF, READ_MAX
    bytes or the deadline."""
    data = b""
    while len(data) < READ_MAX:
        if until is not None and until in data:
            break
        if pattern is not None and _matches(data, pattern):
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise CheckFailed("timeout")
        sock.settimeout(left)
        try:
            chunk = sock.recv(READ_MAX - len(data))
        except (TimeoutError, socket.timeout):
            raise CheckFailed("timeout") from None
        except ssl.SSLEOFError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _matches(data: bytes, pattern: str) -> bool:
    text = data.decode("latin-1")
    return fnmatch.fnmatchcase(text.rstrip("\r\n"), pattern) or \
        fnmatch.fnmatchcase(text.split("\n", 1)[0].rstrip("\r"), pattern)


def run_check(t: Target, ctx: ssl.SSLContext) -> str:
    """One check of one host: the reason it is up ("tcp connect ok"...);
    CheckFailed (or OSError) with why it is not."""
    deadline = time.monotonic() + t.timeout_ms / 1000
    c, h = t.check, t.host
    family = socket.AF_INET6 if ":" in h.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(t.timeout_ms / 1000)
        try:
            sock.connect((h.address, h.port))
        except (TimeoutError, socket.timeout):
            raise CheckFailed("connect timeout") from None
        if c.kind == "tcp":
            return "tcp connect ok"
        conn: socket.socket = sock
        if c.tls:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                conn = ctx.wrap_socket(sock, server_hostname=None)
            except (TimeoutError, socket.timeout):
                raise CheckFailed("tls handshake timeout") from None
            except ssl.SSLError as e:
                raise CheckFailed(f"tls handshake failed: {e.reason}") from None
            if c.kind == "tls":
                conn.close()
                return "tls connect ok"
        if c.kind in ("http", "https"):
            conn.sendall(f"GET {c.path} HTTP/1.0\r\nHost: {h.name}\r\n"
                         "Connection: close\r\n\r\n".encode())
            head = _read(conn, deadline, b"\r\n", None).split(b"\r\n", 1)[0]
            parts = head.split()
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
                raise CheckFailed("no http answer")
            if parts[1] != str(c.code).encode():
                raise CheckFailed(f"http code {parts[1].decode(errors='replace')}, "
                                  f"not {c.code}")
            return f"http code {c.code} ok"
        if c.send:
            conn.sendall(c.send.encode())
        data = _read(conn, deadline, None, c.expect)
        if not _matches(data, c.expect):
            raise CheckFailed("send/expect: no match")
        return "send/expect ok"
    finally:
        sock.close()


def check_once(t: Target, ctx: ssl.SSLContext) -> tuple[bool, int, str]:
    start = time.monotonic()
    try:
        up, reason = True, run_check(t, ctx)
    except CheckFailed as e:
        up, reason = False, str(e)
    except (OSError, ValueError) as e:
        up, reason = False, getattr(e, "strerror", None) or str(e) or type(e).__name__
    return up, int((time.monotonic() - start) * 1000), reason


def loop(fd: socket.socket, checks: list[Target], ctx: ssl.SSLContext,
         sel: selectors.BaseSelector) -> None:
    """Check each host when its interval is due; return when the parent
    closes the pipe."""
    state: dict[int, bool] = {}
    due = {t.host.id: 0.0 for t in checks}
    while True:
        now = time.monotonic()
        for t in checks:
            if due[t.host.id] > now:
                continue
            up, ms, reason = check_once(t, ctx)
            due[t.host.id] = time.monotonic() + t.interval
            if state.get(t.host.id) != up:
                state[t.host.id] = up
                try:
                    fd.send(encode(t.host.id, up, ms, reason))
                except BlockingIOError:
                    state.pop(t.host.id)        # the parent is busy: again
                except OSError:
                    return
        wait = max(min(due.values(), default=now + 3600) - time.monotonic(), 0)
        for _key, _mask in sel.select(wait):
            try:
                if not fd.recv(64):
                    return
            except BlockingIOError:
                pass
            except OSError:
                return


def main(cfg: Config, hosts: list[Host], fd: socket.socket) -> int:
    """The hce process: set up, drop privileges, sandbox, loop."""
    checks = targets(cfg, hosts)
    ctx = _context()            # before the chroot: OpenSSL reads its files
    fd.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    # what the checks use, loaded before the chroot hides the modules
    fnmatch.fnmatchcase("x", "x*")
    b"x".decode("latin-1").encode(errors="replace")
    privsep.drop_privileges(cfg, "hce")
    privsep.sandbox("hce")
    loop(fd, checks, ctx, sel)
    return 0
