"""The parent: opens the listening sockets, forks the relay/ca pairs,
supervises them, rotates the session-ticket keys, and never loads a
private key.

Each pair i has two SOCK_SEQPACKET socketpairs: relay <-> ca for key
operations, parent <-> relay for control.  The parent keeps both ends of
the relay <-> ca pair open, so a restarted ca or relay simply inherits its
end and the survivor never sees the channel break: requests sent while a
ca was down time out in the relay, and their late replies are dropped by
request id.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from pyprivsep import ca, keys, native, privsep, relay
from pyprivsep.config import Config, ConfigError, Listen, Relay
from pyprivsep.native import Frame, P

log = logging.getLogger("pyprivsep")

EX_CONFIG = 78                  # a child found the configuration unusable
TICKET_LIFETIME = 7200          # seconds, relayd's default
MAX_BACKOFF = 10.0
SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def open_listener(ln: Listen) -> list[socket.socket]:
    host = None if ln.host == "*" else ln.host
    try:
        infos = socket.getaddrinfo(host, ln.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(ln.where.file, ln.where.line,
                          f"cannot resolve {ln.host}: {e.strerror}") from None
    socks = []
    for family, stype, proto, _, addr in infos:
        s = socket.socket(family, stype, proto)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind(addr)
            s.listen(511)
        except OSError as e:
            s.close()
            raise ConfigError(ln.where.file, ln.where.line,
                              f"cannot listen on {ln.host} port {ln.port}: "
                              f"{e.strerror}") from None
        s.setblocking(False)
        socks.append(s)
    return socks


def forward_address(r: Relay) -> str:
    """The backend's numeric address (the relays cannot resolve names)."""
    try:
        infos = socket.getaddrinfo(r.forward_host, r.forward_port,
                                   type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(r.where.file, r.where.line,
                          f"relay {r.name}: cannot resolve {r.forward_host}: "
                          f"{e.strerror}") from None
    return str(infos[0][4][0])


def prepare(cfg: Config, use_syslog: bool, verbose: bool) -> relay.RelaySetup:
    """Everything the relays need, read and opened by the parent: the
    certificates (public), the listening sockets, the backend addresses."""
    certs, listeners, forward = [], [], []
    for r in cfg.relays:
        for ln in r.listens:
            if not ln.tls:
                raise ConfigError(ln.where.file, ln.where.line,
                                  "listen without tls is not supported")
        certs.append([keys.load_cert(kp) for kp in r.keypairs])
        forward.append(forward_address(r))
    for r in cfg.relays:
        listeners.append([s for ln in r.listens for s in open_listener(ln)])
    return relay.RelaySetup(cfg, certs, listeners, forward, new_ticket_key(),
                            use_syslog, verbose)


@dataclass
class Pair:
    """Relay process i and its ca, with the descriptors that join them."""

    index: int
    relay_end: socket.socket        # the relay's end of relay <-> ca
    ca_end: socket.socket           # the ca's end
    ctl: socket.socket              # the parent's end of parent <-> relay
    ctl_relay: socket.socket        # the relay's end
    pids: dict[str, int] = field(default_factory=dict)       # role -> pid
    started: dict[str, float] = field(default_factory=dict)
    backoff: dict[str, float] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)      # restart at

    @classmethod
    def new(cls, index: int) -> "Pair":
        r, c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        p, rc = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (r, c, p, rc):
            s.set_inheritable(True)
        return cls(index, r, c, p, rc)


class Parent:
    def __init__(self, cfg: Config, setup: relay.RelaySetup) -> None:
        self.cfg = cfg
        self.setup = setup
        self.tickets = [setup.ticket_keys]
        self.rotation = max(TICKET_LIFETIME // 4, 1)
        self.next_rotation = time.monotonic() + self.rotation
        self.pairs = [Pair.new(i) for i in range(1, cfg.prefork + 1)]
        self.roles = ("relay",) if cfg.keys_inprocess else ("ca", "relay")
        self.stopping = False
        self.status = 0

    # ---- children ----------------------------------------------------

    def listener_fds(self) -> set[int]:
        return {s.fileno() for socks in self.setup.listeners for s in socks}

    def spawn(self, pair: Pair, role: str) -> None:
        pid = os.fork()
        if pid:
            pair.pids[role] = pid
            pair.started[role] = time.monotonic()
            pair.due.pop(role, None)
            log.debug("%s %d started, pid %d", role, pair.index, pid)
            return
        status = 1
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            privsep.set_title(f"{role} {pair.index}")
            status = self.child(pair, role)
        except ConfigError as e:
            log.error("%s %d: %s", role, pair.index, e)
            status = EX_CONFIG
        except BaseException:
            log.error("%s %d: %s", role, pair.index, traceback.format_exc())
        finally:
            logging.shutdown()
            native.leak_check()
            os._exit(status)

    def child(self, pair: Pair, role: str) -> int:
        if role == "ca":
            privsep.close_fds_except({pair.ca_end.fileno()} | self.log_fds())
            return ca.main(self.cfg, pair.index, pair.ca_end)
        ca_fd = -1 if self.cfg.keys_inprocess else pair.relay_end.fileno()
        keep = {pair.ctl_relay.fileno()} | self.listener_fds() | self.log_fds()
        if ca_fd != -1:
            keep.add(ca_fd)
        privsep.close_fds_except(keep)
        self.setup.ticket_keys = b"".join(self.tickets)
        return relay.main(self.setup, pair.index, ca_fd,
                          pair.ctl_relay.fileno())

    @staticmethod
    def log_fds() -> set[int]:
        fds = set()
        for h in logging.getLogger().handlers:
            sock = getattr(h, "socket", None)
            if sock is not None:
                fds.add(sock.fileno())
        return fds

    def reap(self) -> None:
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for pair in self.pairs:
                for role, p in list(pair.pids.items()):
                    if p == pid:
                        del pair.pids[role]
                        self.exited(pair, role, wstatus)

    def exited(self, pair: Pair, role: str, wstatus: int) -> None:
        code = os.waitstatus_to_exitcode(wstatus)
        if self.stopping:
            return
        how = f"killed by signal {-code}" if code < 0 else f"exited {code}"
        log.warning("%s %d %s", role, pair.index, how)
        if code == EX_CONFIG:
            log.error("%s %d cannot use the configuration, stopping", role,
                      pair.index)
            self.status = 1
            self.stop()
            return
        now = time.monotonic()
        lived = now - pair.started.get(role, now)
        backoff = 0.0 if lived > MAX_BACKOFF else \
            min(max(pair.backoff.get(role, 0.05) * 2, 0.1), MAX_BACKOFF)
        pair.backoff[role] = backoff
        pair.due[role] = now + backoff

    # ---- ticket keys -------------------------------------------------

    def rotate_tickets(self) -> None:
        keep = TICKET_LIFETIME // self.rotation + 1
        self.tickets = [new_ticket_key()] + self.tickets[:keep - 1]
        msg = Frame(P.PPS_CTL_TICKET_KEYS, 0, 0, b"",
                    b"".join(self.tickets)).pack()
        for pair in self.pairs:
            if "relay" in pair.pids:
                try:
                    pair.ctl.send(msg)
                except OSError as e:
                    log.warning("relay %d: ticket keys not sent: %s",
                                pair.index, e)
        log.debug("session ticket keys rotated")

    # ---- the loop ----------------------------------------------------

    def stop(self) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        for pair in self.pairs:
            for role in self.roles:
                self.spawn(pair, role)
        handlers: dict[int, Callable[[], None]] = {
            signal.SIGCHLD: self.reap,
            signal.SIGTERM: self.stop,
            signal.SIGINT: self.stop,
            signal.SIGHUP: lambda: log.warning("reload is not supported yet"),
        }
        while not self.stopping:
            now = time.monotonic()
            due = [t for p in self.pairs for t in p.due.values()]
            wake = min(due + [self.next_rotation])
            info = signal.sigtimedwait(SIGNALS, max(wake - now, 0.0))
            if info is not None:
                handlers[info.si_signo]()
            now = time.monotonic()
            if now >= self.next_rotation:
                self.rotate_tickets()
                self.next_rotation = now + self.rotation
            for pair in self.pairs:
                # a ca first, so that a relay restarted with it finds it
                for role in self.roles:
                    if not self.stopping and pair.due.get(role, now + 1) <= now:
                        self.spawn(pair, role)
        self.shutdown()
        return self.status

    def shutdown(self) -> None:
        log.info("stopping")
        pids = [p for pair in self.pairs for p in pair.pids.values()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.02)
            elif pid in pids:
                pids.remove(pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def new_ticket_key() -> bytes:
    return os.urandom(P.PPS_TICKET_KEY_LEN)
