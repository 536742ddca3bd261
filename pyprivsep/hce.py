"""The health check engine ("hce", as relayd's): a child of the parent that
checks the hosts of every table with a `check`, and tells the parent when
one goes up or down.

It is given no key and no listening socket (the parent closes every
descriptor but its end of the pipe before it starts), runs as the relays'
user in the chroot, and under a seccomp filter of its own (sandbox.c,
PPS_SANDBOX_HCE: sockets to IPv4/IPv6 hosts, nothing else new).  It
never talks to a ca.

Every host is checked every `interval` seconds of its forward, all the
checks due at once (checks.py), each ended at its timeout.  A result goes
to the parent only when a host's state changes (and the first time), as
one SOCK_SEQPACKET frame: struct HOST_STATE (host id, up, milliseconds
the check took) and a reason of at most MAX_REASON bytes.
"""
from __future__ import annotations

import fnmatch
import selectors
import socket
import ssl
import struct
import time

from pyprivsep import privsep
from pyprivsep.checks import Checks, Target, matches, tls_context
from pyprivsep.config import Config
from pyprivsep.tables import Host

HOST_STATE = struct.Struct("=IIH")      # id, up (0, 1), milliseconds
MAX_REASON = 200
MAX_FRAME = HOST_STATE.size + MAX_REASON


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


class Reporter:
    """Sends a host's state to the parent when it changed."""

    def __init__(self, fd: socket.socket) -> None:
        self.fd = fd
        self.state: dict[int, bool] = {}
        self.gone = False                   # the parent's end is closed

    def __call__(self, t: Target, up: bool, ms: int, why: str) -> None:
        if self.state.get(t.host.id) == up:
            return
        try:
            self.fd.send(encode(t.host.id, up, ms, why))
            self.state[t.host.id] = up
        except BlockingIOError:
            pass                            # the parent is busy: next time
        except OSError:
            self.gone = True


def loop(fd: socket.socket, targets_: list[Target], ctx: ssl.SSLContext,
         sel: selectors.BaseSelector) -> None:
    """Start each host's check when its interval is due; return when the
    parent closes the pipe.  `fd` is registered on `sel` with data None."""
    report = Reporter(fd)
    due = {t.host.id: 0.0 for t in targets_}

    def result(t: Target, up: bool, ms: int, why: str) -> None:
        due[t.host.id] = time.monotonic() + t.interval
        report(t, up, ms, why)
    checks = Checks(sel, ctx, result)
    while not report.gone:
        now = time.monotonic()
        for t in targets_:
            if due[t.host.id] <= now and not checks.running(t.host.id):
                checks.start(t)
        times = [d for i, d in due.items() if not checks.running(i)]
        deadline = checks.next_deadline()
        if deadline is not None:
            times.append(deadline)
        wait = max(min(times, default=now + 3600) - time.monotonic(), 0)
        for key, _mask in sel.select(wait):
            if key.data is not None:
                checks.event(key.data)
                continue
            try:
                if not fd.recv(64):
                    return
            except BlockingIOError:
                pass
            except OSError:
                return
        checks.expire(time.monotonic())


def main(cfg: Config, hosts: list[Host], fd: socket.socket) -> int:
    """The hce process: set up, drop privileges, sandbox, loop."""
    checks = targets(cfg, hosts)
    ctx = tls_context()         # before the chroot: OpenSSL reads its files
    fd.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ, None)
    # what the checks use, loaded before the chroot hides the modules
    fnmatch.fnmatchcase("x", "x*")
    matches(b"x", "x")
    b"x".decode("latin-1").encode(errors="replace")
    privsep.drop_privileges(cfg, "hce")
    privsep.sandbox("hce")
    loop(fd, checks, ctx, sel)
    return 0
