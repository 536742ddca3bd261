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
import selectors
import threading
from typing import Any, Callable

from pyprivsep import ca, keys, native, privsep, relay
from pyprivsep.config import Config, ConfigError, Listen, Relay, parse_config
from pyprivsep.native import HDR_SIZE, Frame, P, ffi

log = logging.getLogger("pyprivsep")

EX_CONFIG = 78                  # a child found the configuration unusable
MAX_BACKOFF = 10.0
SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
CTL_TIMEOUT = 2.0               # seconds a relay has to answer the parent


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


Sockets = dict[tuple[str, int], list[socket.socket]]


def prepare(cfg: Config, use_syslog: bool, verbose: bool,
            reuse: Sockets | None = None) -> relay.RelaySetup:
    """Everything the relays need, read and opened by the parent: the
    certificates (public), the listening sockets, the backend addresses.
    On reload, listening sockets of `reuse` with the same address and port
    are kept, so no connection is refused while generations change."""
    certs, listeners, forward = [], [], []
    for r in cfg.relays:
        certs.append([keys.load_cert(kp) for kp in r.keypairs])
        forward.append(forward_address(r))
    opened: list[socket.socket] = []
    try:
        for r in cfg.relays:
            socks = []
            for ln in r.listens:
                old = (reuse or {}).get((ln.host, ln.port))
                if old is None:
                    old = open_listener(ln)
                    opened += old
                socks += old
            listeners.append(socks)
    except ConfigError:
        for s in opened:
            s.close()
        raise
    return relay.RelaySetup(cfg, certs, listeners, forward, b"",
                            use_syslog, verbose)


def sockets_of(setup: relay.RelaySetup) -> Sockets:
    out: Sockets = {}
    for r, socks in zip(setup.cfg.relays, setup.listeners):
        for ln in r.listens:
            out[(ln.host, ln.port)] = [s for s in socks
                                       if s.getsockname()[1] == ln.port]
    return out


@dataclass
class Pair:
    """Relay process i and its ca, with the descriptors that join them."""

    index: int
    generation: int
    relay_end: socket.socket        # the relay's end of relay <-> ca
    ca_end: socket.socket           # the ca's end
    ctl: socket.socket              # the parent's end of parent <-> relay
    ctl_relay: socket.socket        # the relay's end
    pids: dict[str, int] = field(default_factory=dict)       # role -> pid
    started: dict[str, float] = field(default_factory=dict)
    backoff: dict[str, float] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)      # restart at
    draining: bool = False

    @classmethod
    def new(cls, index: int, generation: int) -> "Pair":
        r, c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        p, rc = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (r, c, p, rc):
            s.set_inheritable(True)
        return cls(index, generation, r, c, p, rc)

    def close(self) -> None:
        for s in (self.relay_end, self.ca_end, self.ctl, self.ctl_relay):
            s.close()


class Parent:
    def __init__(self, cfg: Config, setup: relay.RelaySetup,
                 macros: dict[str, str]) -> None:
        self.cfg = cfg
        self.setup = setup
        self.macros = macros
        self.verbose = setup.verbose        # `ctl log verbose` changes it
        self.generation = 1
        self.pairs = [Pair.new(i, 1) for i in range(1, cfg.prefork + 1)]
        self.draining: list[Pair] = []      # old generations, finishing
        self.tickets = [new_ticket_key()]
        self.next_rotation = time.monotonic() + self.rotation
        self.stopping = False
        self.status = 0
        self.ctl_lock = threading.Lock()    # metrics thread vs main loop
        self.ctl_id = 0
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.selector = selectors.DefaultSelector()
        self.control: Any = None            # control.Server
        self.metrics: Any = None            # metrics.Server

    @property
    def rotation(self) -> int:
        """Ticket keys rotate every quarter of their lifetime (relayd)."""
        return max(self.cfg.ticket_lifetime // 4, 1)

    def roles(self) -> tuple[str, ...]:
        return ("relay",) if self.cfg.keys_inprocess else ("ca", "relay")

    # ---- children ----------------------------------------------------

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
            signal.set_wakeup_fd(-1)
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
            privsep.close_fds_except({pair.ca_end.fileno()} | log_fds())
            return ca.main(self.cfg, pair.index, pair.ca_end,
                           self.setup.use_syslog, self.verbose)
        ca_fd = -1 if self.cfg.keys_inprocess else pair.relay_end.fileno()
        listeners = {s.fileno() for socks in self.setup.listeners for s in socks}
        keep = {pair.ctl_relay.fileno()} | listeners | log_fds()
        if ca_fd != -1:
            keep.add(ca_fd)
        privsep.close_fds_except(keep)
        self.setup.ticket_keys = b"".join(self.tickets)
        self.setup.verbose = self.verbose
        return relay.main(self.setup, pair.index, ca_fd,
                          pair.ctl_relay.fileno())

    def all_pairs(self) -> list[Pair]:
        return self.pairs + self.draining

    def reap(self) -> None:
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for pair in self.all_pairs():
                for role, p in list(pair.pids.items()):
                    if p == pid:
                        del pair.pids[role]
                        self.exited(pair, role, wstatus)

    def exited(self, pair: Pair, role: str, wstatus: int) -> None:
        code = os.waitstatus_to_exitcode(wstatus)
        if self.stopping:
            return
        if pair.draining:
            self.drained(pair, role)
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

    def drained(self, pair: Pair, role: str) -> None:
        """An old generation's relay finished its sessions: its ca goes too."""
        if role == "relay":
            log.info("relay %d of generation %d drained", pair.index,
                     pair.generation)
            if "ca" in pair.pids:
                kill(pair.pids["ca"], signal.SIGTERM)
        if not pair.pids:
            self.draining.remove(pair)
            pair.close()

    # ---- talking to the relays -----------------------------------------

    def ask(self, pair: Pair, type: int, arg: int = 0) -> list[Frame]:
        """Send a control message and collect its answers (until arg 0)."""
        with self.ctl_lock:
            self.ctl_id += 1
            want = self.ctl_id
            pair.ctl.send(Frame(type, arg, want, b"", b"").pack())
            answers: list[Frame] = []
            deadline = time.monotonic() + CTL_TIMEOUT
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"relay {pair.index} did not answer")
                pair.ctl.settimeout(left)
                try:
                    data = pair.ctl.recv(1 << 16)
                finally:
                    pair.ctl.settimeout(None)
                if len(data) < HDR_SIZE:
                    continue
                hdr = ffi.from_buffer("struct pps_hdr *", data)
                if hdr.id != want or hdr.type != type:
                    continue                # a late answer to an old question
                answers.append(Frame(hdr.type, hdr.arg, hdr.id, b"",
                                     data[HDR_SIZE:HDR_SIZE + hdr.len]))
                if hdr.arg == 0:
                    return answers

    def wait_ready(self, pairs: list[Pair], timeout: float = 8.0) -> None:
        """Until each relay answers: it does once its ca answers it and it
        accepts (or gave up waiting for the ca).  The old generation keeps
        accepting meanwhile."""
        deadline = time.monotonic() + timeout
        for pair in pairs:
            while time.monotonic() < deadline and "relay" in pair.pids:
                try:
                    self.ask(pair, P.PPS_CTL_STATS)
                    break
                except TimeoutError:
                    continue
                except OSError:
                    break

    def tell(self, pair: Pair, type: int, arg: int = 0,
             payload: bytes = b"") -> None:
        """Send a control message that has no answer."""
        if "relay" not in pair.pids:
            return
        try:
            pair.ctl.send(Frame(type, arg, 0, b"", payload).pack())
        except OSError as e:
            log.warning("relay %d: message %d not sent: %s", pair.index,
                        type, e)

    def relay_stats(self) -> list[dict[str, Any]]:
        """Each live relay process's counters, for ctl and metrics."""
        out = []
        for pair in self.all_pairs():
            if "relay" not in pair.pids:
                continue
            entry: dict[str, Any] = {
                "relay": pair.index, "generation": pair.generation,
                "pid": pair.pids["relay"], "ca_pid": pair.pids.get("ca"),
                "draining": pair.draining}
            try:
                (answer,) = self.ask(pair, P.PPS_CTL_STATS)
                st = ffi.from_buffer("struct pps_stats *", answer.payload)
                entry["stats"] = {name: getattr(st, name) for name in
                                  STATS_FIELDS}
                entry["stats"]["keyop_lat"] = list(st.keyop_lat)
            except (OSError, ValueError) as e:
                entry["error"] = str(e)
            out.append(entry)
        return out

    def sessions(self) -> list[dict[str, Any]]:
        out = []
        for pair in self.all_pairs():
            if "relay" not in pair.pids:
                continue
            try:
                answers = self.ask(pair, P.PPS_CTL_SESSIONS)
            except OSError as e:
                log.warning("relay %d: %s", pair.index, e)
                continue
            size = ffi.sizeof("struct pps_session")
            for a in answers:
                for off in range(0, len(a.payload) - size + 1, size):
                    s = ffi.from_buffer("struct pps_session *",
                                        a.payload[off:off + size])
                    out.append(session_dict(s, pair, self.relay_names()))
        return out

    def relay_names(self) -> list[str]:
        return [r.name for r in self.cfg.relays]

    def set_verbose(self, verbose: bool) -> None:
        self.verbose = verbose
        logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
        for pair in self.all_pairs():
            self.tell(pair, P.PPS_CTL_VERBOSE, int(verbose))

    # ---- ticket keys -------------------------------------------------

    def rotate_tickets(self) -> None:
        """A new key seals new tickets; the older ones, kept for the
        lifetime, still open theirs."""
        keep = min(self.cfg.ticket_lifetime // self.rotation + 1,
                   P.PPS_MAX_TICKET_KEYS)
        self.tickets = [new_ticket_key()] + self.tickets[:keep - 1]
        self.send_tickets()
        log.debug("session ticket keys rotated")

    def send_tickets(self) -> None:
        for pair in self.all_pairs():
            self.tell(pair, P.PPS_CTL_TICKET_KEYS, 0, b"".join(self.tickets))

    # ---- reload ------------------------------------------------------

    def reload(self) -> str | None:
        """Re-read the configuration and the keys: new pairs start, the old
        relays stop accepting, finish their sessions and exit.  A broken
        configuration keeps the running generation; returns its error."""
        old_sockets = sockets_of(self.setup)
        old_fds = {s.fileno() for socks in old_sockets.values() for s in socks}
        try:
            cfg = parse_config(self.cfg.path, self.macros)
            privsep.check_users(cfg)
            setup = prepare(cfg, self.setup.use_syslog, self.verbose,
                            reuse=old_sockets)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            return str(e)
        error = None if cfg.keys_inprocess else check_keys(cfg)
        if error is not None:
            for socks in setup.listeners:
                for s in socks:
                    if s.fileno() not in old_fds:
                        s.close()
            log.error("reload failed, keeping the running configuration: %s",
                      error)
            return error
        kept = {s.fileno() for socks in setup.listeners for s in socks}
        for socks in old_sockets.values():
            for s in socks:
                if s.fileno() not in kept:
                    s.close()           # old relays still hold their copy
        self.generation += 1
        old = self.pairs
        self.cfg, self.setup = cfg, setup
        self.pairs = [Pair.new(i, self.generation)
                      for i in range(1, cfg.prefork + 1)]
        for pair in self.pairs:
            for role in self.roles():
                self.spawn(pair, role)
        self.wait_ready(self.pairs)
        for pair in old:
            pair.draining = True
            pair.due.clear()
            self.draining.append(pair)
            if "relay" in pair.pids:
                self.tell(pair, P.PPS_CTL_DRAIN)
            else:
                self.drained(pair, "relay")
        log.info("reloaded: generation %d, %d relay processes",
                 self.generation, cfg.prefork)
        return None

    # ---- the loop ----------------------------------------------------

    def stop(self) -> None:
        self.stopping = True

    def on_signal(self, signo: int) -> None:
        if signo == signal.SIGCHLD:
            self.reap()
        elif signo in (signal.SIGTERM, signal.SIGINT):
            self.stop()
        elif signo == signal.SIGHUP:
            self.reload()

    def run(self) -> int:
        self.wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_w.fileno(), warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, lambda signo, frame: None)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, None)
        if self.control is not None:
            self.selector.register(self.control.sock, selectors.EVENT_READ,
                                   self.control)
        for pair in self.pairs:
            for role in self.roles():
                self.spawn(pair, role)
        while not self.stopping:
            now = time.monotonic()
            due = [t for p in self.pairs for t in p.due.values()]
            wake = min(due + [self.next_rotation])
            for key, _ in self.selector.select(max(wake - now, 0.0)):
                if key.data is None:
                    for signo in self.wakeup_r.recv(512):
                        self.on_signal(signo)
                else:
                    key.data.serve_one(self)
            now = time.monotonic()
            if now >= self.next_rotation:
                self.rotate_tickets()
                self.next_rotation = now + self.rotation
            for pair in self.pairs:
                # a ca first, so that a relay restarted with it finds it
                for role in self.roles():
                    if not self.stopping and pair.due.get(role, now + 1) <= now:
                        self.spawn(pair, role)
        self.shutdown()
        return self.status

    def shutdown(self) -> None:
        log.info("stopping")
        if self.metrics is not None:
            self.metrics.close()
        if self.control is not None:
            self.control.close()
        pids = [p for pair in self.all_pairs() for p in pair.pids.values()]
        for pid in pids:
            kill(pid, signal.SIGTERM)
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
            kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


STATS_FIELDS = ("accepted", "active", "hs_full", "hs_resumed", "fail_client",
                "fail_ca", "fail_timeout", "fail_backend", "keyops",
                "keyop_fail", "keyop_timeout", "keyop_lat_sum", "bytes_in",
                "bytes_out")
LATENCY_BOUNDS_US = tuple(native.lib.pps_lat_bound(i)
                          for i in range(P.PPS_LAT_BUCKETS - 1))  # then +Inf


def session_dict(s: Any, pair: Pair, names: list[str]) -> dict[str, Any]:
    raw = bytes(s.addr)
    addr = socket.inet_ntop(socket.AF_INET6, raw) if s.family == 6 else \
        socket.inet_ntop(socket.AF_INET, raw[:4])
    return {"relay_process": pair.index, "generation": pair.generation,
            "relay": names[s.relay] if s.relay < len(names) else s.relay,
            "client": f"{addr}:{s.port}",
            "state": ("handshake", "connecting", "relaying")[min(s.state, 2)],
            "age": s.age, "idle": s.idle, "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out}


def check_keys(cfg: Config) -> str | None:
    """Load every key and match it to its certificate, as the new cas will,
    in a throwaway child: the parent never holds a private key.  Returns
    the error, or None."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            signal.set_wakeup_fd(-1)
            os.close(r)
            ca.load_keys(cfg)
        except ConfigError as e:
            os.write(w, str(e).encode()[:4000])
        except BaseException as e:
            os.write(w, f"checking the keys: {e}".encode()[:4000])
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        error = f.read().decode(errors="replace")
    os.waitpid(pid, 0)
    return error or None


def log_fds() -> set[int]:
    fds = set()
    for h in logging.getLogger().handlers:
        sock = getattr(h, "socket", None)
        if sock is not None:
            fds.add(sock.fileno())
    return fds


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:     # e.g. a unit that took CAP_KILL away
        log.error("cannot signal pid %d: permission denied", pid)


def new_ticket_key() -> bytes:
    return os.urandom(P.PPS_TICKET_KEY_LEN)
