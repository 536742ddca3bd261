"""The parent: opens the listening sockets, forks the relay/ca pairs,
supervises them, rotates the session-ticket keys, and never loads a
private key.

Each pair i has two SOCK_SEQPACKET socketpairs: relay <-> ca for key
operations, parent <-> relay for control.  The parent keeps both ends of
the relay <-> ca pair open, so a restarted ca or relay simply inherits its
end and the survivor never sees the channel break: requests sent while a
ca was down time out in the relay, and their late replies are dropped by
request id.  Each relay process gets a fresh control channel, so nothing
queued for a dead relay reaches its successor.

The parent is root and must never block on a child or a client, nor do
unbounded work for one: every channel and connection is non-blocking and
served from one selector loop; every question has a deadline; a child
that stops reading its channel, does not answer the heartbeat, or is
stopped (SIGSTOP, SIGTSTP) is killed and restarted.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import time
import traceback
from dataclasses import dataclass, field
import selectors
from typing import Any, Callable, Optional

from pyprivsep import ca, hce, keys, native, privsep, relay, tables, tickets
from pyprivsep.hoststate import HostStates, host_state_payload
from pyprivsep.channel import (Answer, Channel, decode_sessions,
                               decode_stats)
from pyprivsep.config import (Config, ConfigError, KeyService, Listen,
                              parse_config)
from pyprivsep.native import Frame, P

log = logging.getLogger("pyprivsep")

EX_CONFIG = 78                  # a child found the configuration unusable
MAX_BACKOFF = 10.0
SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
CTL_TIMEOUT = 2.0               # seconds a relay has to answer ctl/metrics
READY_TIMEOUT = 8.0             # reload: seconds to wait for the new relays
HEARTBEAT_INTERVAL = 3.0        # seconds between two heartbeats of a relay
TICK = 1.0                      # the loop looks at its timers at least this often


def relay_processes(cfg: Config) -> int:
    """`prefork` relay processes, none without relay blocks (a configuration
    of keyservices alone)."""
    return cfg.prefork if cfg.relays else 0


def heartbeat_deadline(cfg: Config) -> float:
    """Seconds a relay has to answer a heartbeat.  In `keyops blocking`
    mode a relay legitimately sits in one key operation up to its `tls
    keyop timeout` (at most 60 s) and may meet a second one before it
    reads its channel: twice the longest timeout, plus 10 s of slack for
    a loaded machine (12 s with the default 1 s timeout)."""
    longest = max((r.keyop_timeout_ms for r in cfg.relays),
                  default=cfg.keyop_timeout_ms)
    return 2 * longest / 1000 + 10


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


Sockets = dict[tuple[str, int], list[socket.socket]]


def prepare(cfg: Config, use_syslog: bool, verbose: bool,
            reuse: Sockets | None = None) -> relay.RelaySetup:
    """Everything the relays need, read and opened by the parent: the
    certificates (public), the listening sockets, the backend addresses.
    On reload, listening sockets of `reuse` with the same address and port
    are kept, so no connection is refused while generations change."""
    certs, listeners = [], []
    client_cas: list[bytes | None] = []
    for r in cfg.relays:
        certs.append(relay_certs(r))
        client_cas.append(None if r.client_ca is None
                          else keys.load_client_ca(r.client_ca))
    hosts = tables.hosts_of(cfg)
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
    setup = relay.RelaySetup(cfg, certs, listeners, hosts, set(), b"",
                             use_syslog, verbose, client_cas)
    try:
        setup.file_tickets = read_file_tickets(cfg)
    except ConfigError:
        for s in opened:
            s.close()
        raise
    return setup


def read_file_tickets(cfg: Config) -> list[bytes] | None:
    """`tls ticket keys`: the file's keys, read by the parent (before
    any chroot, at start and on every reload); None without it."""
    if cfg.ticket_keys_file is None or cfg.ticket_keys_where is None:
        return None
    keys_ = tickets.read_ticket_keys(cfg.ticket_keys_file, cfg.ticket_keys_where)
    log.debug("%d session ticket key(s) read from %s", len(keys_),
              cfg.ticket_keys_file)
    return keys_


def relay_certs(r: Relay) -> list[keys.Cert]:
    """A relay block's certificates with their OCSP responses, read here,
    by the parent (at start and at every reload); what is wrong with a
    response that may right itself (expired) is logged, not refused."""
    out = []
    for kp in r.keypairs:
        cert, warning = keys.load_staple(keys.load_cert(kp))
        if warning is not None:
            log.warning("%s", warning)
        out.append(cert)
    return out


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
    channel: Optional[Channel] = None
    heartbeat: bool = False         # a heartbeat question is out

    @classmethod
    def new(cls, index: int, generation: int) -> "Pair":
        r, c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        p, rc = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (r, c, p, rc):
            s.set_inheritable(True)
        return cls(index, generation, r, c, p, rc)

    def new_ctl(self) -> None:
        """A fresh control channel, for a new relay process."""
        for s in (self.ctl, self.ctl_relay):
            s.close()
        self.ctl, self.ctl_relay = socket.socketpair(socket.AF_UNIX,
                                                     socket.SOCK_SEQPACKET)
        self.ctl_relay.set_inheritable(True)

    def close(self) -> None:
        for s in (self.relay_end, self.ca_end, self.ctl, self.ctl_relay):
            s.close()


# A keyservice ca told to drain (a reload retired its generation) stops
# accepting and ends with its last client; clients such as an nginx worker
# may hold their connection for ever, so after this long it is stopped and
# they reconnect to the new generation, as after a restart.
KEYSERVICE_DRAIN = 60.0


@dataclass(eq=False)               # identity: records, compared by `is`
class Service:
    """A keyservice as the parent runs it: its listening socket (the cas
    inherit it) and its certificates (public), for ctl and metrics."""

    ks: KeyService
    sock: socket.socket
    certs: list[keys.Cert]
    restarts: int = 0               # cas restarted since the daemon started

    def close(self, unlink: bool) -> None:
        self.sock.close()
        if unlink:
            unlink_socket(self.ks.socket)


@dataclass(eq=False)
class ServiceCa:
    """Ca number `index` of a keyservice.  It has no relay partner: the
    parent supervises it as it does a pair's ca (pids, backoff, restart),
    and Parent.find/reap/gone treat it as a pair with one role, "ca"."""

    service: Service
    index: int
    generation: int
    pids: dict[str, int] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    backoff: dict[str, float] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)
    draining: bool = False
    drain_until: float = 0.0
    channel: Optional[Channel] = None   # none: nothing to ask a ca
    heartbeat: bool = False

    def close(self) -> None:
        pass                        # the socket is the Service's


@dataclass(eq=False)
class Hce:
    """The health check process of a generation: no key, no listener, a
    SOCK_SEQPACKET pair to the parent (kept across its restarts, like a
    pair's), supervised as a pair with one role, "hce"."""

    generation: int
    sock: socket.socket             # the parent's end
    child_end: socket.socket
    pids: dict[str, int] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    backoff: dict[str, float] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)
    draining: bool = False
    channel: Optional[Channel] = None   # none: it only reports
    heartbeat: bool = False

    @classmethod
    def new(cls, generation: int) -> "Hce":
        p, c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        p.setblocking(False)
        c.set_inheritable(True)
        return cls(generation, p, c)

    def close(self) -> None:
        self.sock.close()
        self.child_end.close()


def label(pair: "Pair | ServiceCa | Hce", role: str) -> str:
    """How logs and the process title name a child."""
    if isinstance(pair, Hce):
        return "hce"
    if isinstance(pair, ServiceCa):
        return f"keyservice {pair.service.ks.name} ca {pair.index}"
    return f"{role} {pair.index}"


def unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def open_service_socket(ks: KeyService) -> socket.socket:
    """The keyservice's SOCK_SEQPACKET socket, made by the parent as root.
    Its directory is created (0755) if missing; a stale socket is
    replaced, one a process still listens on is refused (like the control
    socket).  The file is mode 0666: anyone may connect, and each ca
    decides who is served by the peer's SO_PEERCRED (ca.c), which a file
    mode could not express (several users and groups)."""
    path, w = ks.socket, ks.where

    def fail(why: str) -> ConfigError:
        return ConfigError(w.file, w.line, f'keyservice "{ks.name}": socket '
                                           f"{path}: {why}")
    directory = os.path.dirname(path)
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o755)
            os.chmod(directory, 0o755)
    except OSError as e:
        raise fail(f"cannot create {directory}: {e.strerror}") from None
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise fail("exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
            raise fail("another process is listening on it")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)         # stale
        except OSError as e:        # e.g. a full backlog: someone serves it
            raise fail(f"in use ({e.strerror or e})") from None
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(511)
    except OSError as e:
        sock.close()
        raise fail(e.strerror or str(e)) from None
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def prepare_services(cfg: Config, reuse: dict[str, socket.socket] | None = None
                     ) -> list[Service]:
    """Every keyservice's certificates and socket; on reload the socket of
    `reuse` with the same path is kept, so no client is refused."""
    certs = [[keys.load_cert(kp) for kp in ks.keypairs]
             for ks in cfg.keyservices]
    out: list[Service] = []
    try:
        for ks, c in zip(cfg.keyservices, certs):
            sock = (reuse or {}).get(ks.socket)
            out.append(Service(ks, sock if sock is not None
                               else open_service_socket(ks), c))
    except ConfigError:
        for svc in out:
            if svc.sock not in (reuse or {}).values():
                svc.close(unlink=True)
        raise
    return out


def service_cas(services: list[Service], generation: int) -> list[ServiceCa]:
    return [ServiceCa(svc, i, generation) for svc in services
            for i in range(1, svc.ks.prefork + 1)]


Stats = list[dict[str, Any]]


class Parent:
    def __init__(self, cfg: Config, setup: relay.RelaySetup,
                 macros: dict[str, str],
                 services: list[Service] | None = None) -> None:
        self.cfg = cfg
        self.setup = setup
        self.macros = macros
        self.verbose = setup.verbose        # `ctl log verbose` changes it
        self.generation = 1
        self.pairs = [Pair.new(i, 1) for i in range(1, relay_processes(cfg) + 1)]
        self.services = services or []
        self.kscas = service_cas(self.services, 1)
        self.draining: list[Any] = []       # old generations, finishing
        self.tickets = list(setup.file_tickets or [new_ticket_key()])
        now = time.monotonic()
        self.next_rotation = now + self.rotation
        self.next_heartbeat = now + HEARTBEAT_INTERVAL
        self.stopping = False
        self.status = 0
        self.reloading = False              # new relays not all ready yet
        self.reload_waiters: list[Callable[[str | None], None]] = []
        self.reload_again: list[Callable[[str | None], None]] = []
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.selector = selectors.DefaultSelector()
        self.control: Any = None            # control.Server
        self.metrics: Any = None            # metrics.Server
        self.hosts = HostStates(cfg, setup.hosts)
        self.hce: Hce | None = None

    @property
    def rotation(self) -> int:
        """Ticket keys rotate every quarter of their lifetime (relayd)."""
        return max(self.cfg.ticket_lifetime // 4, 1)

    def roles(self) -> tuple[str, ...]:
        return ("relay",) if self.cfg.keys_inprocess else ("ca", "relay")

    # ---- children ----------------------------------------------------

    def spawn(self, pair: Pair, role: str) -> None:
        if role == "relay":
            self.open_channel(pair)
        pid = os.fork()
        if pid:
            pair.pids[role] = pid
            pair.started[role] = time.monotonic()
            pair.due.pop(role, None)
            log.debug("%s started, pid %d", label(pair, role), pid)
            return
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            privsep.set_title(label(pair, role))
            status = self.child(pair, role)
        except ConfigError as e:
            log.error("%s: %s", label(pair, role), e)
            status = EX_CONFIG
        except BaseException:
            log.error("%s: %s", label(pair, role), traceback.format_exc())
        finally:
            native.leak_check()
            os._exit(status)

    def child(self, pair: Any, role: str) -> int:
        if isinstance(pair, Hce):
            privsep.close_fds_except({pair.child_end.fileno()} | log_fds())
            return hce.main(self.cfg, self.setup.hosts, pair.child_end)
        if isinstance(pair, ServiceCa):
            svc = pair.service
            privsep.close_fds_except({svc.sock.fileno()} | log_fds())
            return ca.service_main(self.cfg, svc.ks, pair.index, svc.sock,
                                   self.setup.use_syslog, self.verbose)
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
        self.setup.down = self.hosts.down()
        return relay.main(self.setup, pair.index, ca_fd,
                          pair.ctl_relay.fileno())

    def all_pairs(self) -> list[Pair]:
        """The relay/ca pairs, current and draining (not keyservice cas)."""
        return self.pairs + [p for p in self.draining if isinstance(p, Pair)]

    def everyone(self) -> list[Any]:
        """Every supervised child's record: pairs, keyservice cas, hce."""
        return self.pairs + self.kscas + ([self.hce] if self.hce else []) \
            + self.draining

    def find(self, pid: int) -> tuple[Any, str] | None:
        for pair in self.everyone():
            for role, p in pair.pids.items():
                if p == pid:
                    return pair, role
        return None

    def reap(self) -> None:
        """Exited children, and stopped ones: a stopped child (SIGSTOP,
        SIGTSTP, a debugger) answers nobody, so it is killed and replaced.
        Pids the parent no longer tracks (children it killed) are reaped
        and forgotten."""
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                return
            if pid == 0:
                return
            found = self.find(pid)
            if found is None:
                continue
            pair, role = found
            if os.WIFSTOPPED(wstatus):
                self.condemn(pair, role, f"stopped by signal "
                                         f"{os.WSTOPSIG(wstatus)}")
            else:
                del pair.pids[role]
                self.exited(pair, role, wstatus)

    def condemn(self, pair: Pair, role: str, why: str) -> None:
        """Kill a child that stopped serving and restart it now, the
        normal way, without waiting for it to exit: a frozen process may
        not exit before it is thawed.  It is reaped whenever it goes."""
        pid = pair.pids.pop(role, None)
        if pid is None:
            return
        log.warning("%s %s: killing it", label(pair, role), why)
        kill(pid, signal.SIGKILL)
        self.gone(pair, role, None)

    def exited(self, pair: Pair, role: str, wstatus: int) -> None:
        code = os.waitstatus_to_exitcode(wstatus)
        if not self.stopping and not pair.draining:
            how = f"killed by signal {-code}" if code < 0 else f"exited {code}"
            log.warning("%s %s", label(pair, role), how)
        self.gone(pair, role, code)

    def gone(self, pair: Pair, role: str, code: int | None) -> None:
        """A child is no more (exited, or killed by the parent): restart it
        after its backoff, or finish its pair's drain."""
        if role == "relay":
            self.close_channel(pair)
        if self.stopping:
            return
        if pair.draining:
            self.drained(pair, role)
            return
        if code == EX_CONFIG:
            log.error("%s cannot use the configuration, stopping",
                      label(pair, role))
            self.status = 1
            self.stop()
            return
        if isinstance(pair, ServiceCa):
            pair.service.restarts += 1
        now = time.monotonic()
        lived = now - pair.started.get(role, now)
        backoff = 0.0 if lived > MAX_BACKOFF else \
            min(max(pair.backoff.get(role, 0.05) * 2, 0.1), MAX_BACKOFF)
        pair.backoff[role] = backoff
        pair.due[role] = now + backoff

    def drained(self, pair: Pair, role: str) -> None:
        """An old generation's relay finished its sessions: its ca goes too."""
        if role == "relay" and isinstance(pair, Pair):
            log.info("relay %d of generation %d drained", pair.index,
                     pair.generation)
            if "ca" in pair.pids:
                kill(pair.pids["ca"], signal.SIGTERM)
        if not pair.pids:
            self.draining.remove(pair)
            self.close_channel(pair)
            pair.close()

    # ---- health checks -----------------------------------------------

    def start_hce(self) -> None:
        """A new generation's hce, if any forward has a check; the old
        one (reload) is stopped: host ids are per generation."""
        old, self.hce = self.hce, None
        if old is not None:
            self.selector.unregister(old.sock)
            old.draining = True
            old.due.clear()
            self.draining.append(old)
            if "hce" in old.pids:
                kill(old.pids["hce"], signal.SIGTERM)
            else:
                self.drained(old, "hce")
        if not self.hosts.checked:
            return
        self.hce = Hce.new(self.generation)
        self.selector.register(self.hce.sock, selectors.EVENT_READ,
                               lambda mask, h=self.hce: self.on_hce(h))
        self.spawn(self.hce, "hce")

    def on_hce(self, h: Hce) -> None:
        """Host states from the hce: checked, logged, told to the relays."""
        for _ in range(64):
            try:
                frame = h.sock.recv(hce.MAX_FRAME + 1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("hce: %s", e)
                return
            if not frame:
                return
            try:
                host_id, up, ms, reason = hce.decode(frame)
                changed = self.hosts.report(host_id, up, ms, reason)
            except ValueError as e:
                log.warning("hce: malformed report: %s", e)
                continue
            if changed:
                for pair in self.pairs:
                    self.tell(pair, P.PPS_CTL_HOST, 0,
                              host_state_payload(host_id, up))

    # ---- control channels --------------------------------------------

    def open_channel(self, pair: Pair) -> None:
        self.close_channel(pair)
        pair.new_ctl()
        pair.channel = Channel(pair.ctl, f"relay {pair.index}",
                               max_sessions=self.cfg.max_connections)
        pair.heartbeat = False
        self.selector.register(pair.ctl, selectors.EVENT_READ,
                               lambda mask, p=pair: self.on_channel(p, mask))

    def close_channel(self, pair: Pair) -> None:
        ch, pair.channel = pair.channel, None
        if ch is None:
            return
        self.selector.unregister(ch.sock)
        ch.close()              # its questions are answered "no answer"

    def on_channel(self, pair: Pair, mask: int) -> None:
        ch = pair.channel
        if ch is None:
            return
        if mask & selectors.EVENT_READ:
            ch.on_readable()
        if mask & selectors.EVENT_WRITE and pair.channel is ch:
            ch.flush()
        self.watch(pair)

    def watch(self, pair: Pair) -> None:
        """Poll for writability only while frames wait; a relay that lets
        its queue overflow or stops draining it is killed."""
        ch = pair.channel
        if ch is None:
            return
        why = ch.overdue(time.monotonic())
        if why is not None:
            self.condemn(pair, "relay", why)
            return
        events = selectors.EVENT_READ | \
            (selectors.EVENT_WRITE if ch.wants_write() else 0)
        if self.selector.get_key(ch.sock).events != events:
            self.selector.modify(ch.sock, events, self.selector.get_key(
                ch.sock).data)

    def ask(self, pair: Pair, type: int, timeout: float,
            done: Callable[[Answer], None]) -> None:
        """A question to a relay; done(frames), or done(None) if it does
        not answer usably in time."""
        if pair.channel is None or "relay" not in pair.pids:
            done(None)
            return
        pair.channel.ask(type, timeout, done)
        self.watch(pair)

    def tell(self, pair: Pair, type: int, arg: int = 0,
             payload: bytes = b"") -> None:
        """Send a control message that has no answer."""
        if pair.channel is None or "relay" not in pair.pids:
            return
        pair.channel.send(Frame(type, arg, 0, b"", payload).pack())
        self.watch(pair)

    def gather(self, pairs: list[Pair], type: int, timeout: float,
               done: Callable[[list[tuple[Pair, Answer]]], None]) -> None:
        """Ask every live relay of `pairs`; done(answers, in pair order)
        once each answered or its deadline passed."""
        live = [p for p in pairs if "relay" in p.pids]
        answers: dict[int, Answer] = {}

        def one(i: int, answer: Answer) -> None:
            answers[i] = answer
            if len(answers) == len(live):
                done([(p, answers[j]) for j, p in enumerate(live)])
        if not live:
            done([])
        for i, pair in enumerate(live):
            self.ask(pair, type, timeout, lambda a, i=i: one(i, a))

    def relay_stats(self, done: Callable[[Stats], None]) -> None:
        """Each live relay process's counters, for ctl and metrics."""
        def entries(answers: list[tuple[Pair, Answer]]) -> None:
            done([stats_entry(pair, answer) for pair, answer in answers])
        self.gather(self.all_pairs(), P.PPS_CTL_STATS, CTL_TIMEOUT, entries)

    def sessions(self, done: Callable[[Stats], None]) -> None:
        names = self.relay_names()

        def entries(answers: list[tuple[Pair, Answer]]) -> None:
            done([session_dict(s, pair, names) for pair, frames in answers
                  for f in frames or [] for s in decode_sessions(f.payload)])
        self.gather(self.all_pairs(), P.PPS_CTL_SESSIONS, CTL_TIMEOUT, entries)

    def relay_names(self) -> list[str]:
        return [r.name for r in self.cfg.relays]

    def set_verbose(self, verbose: bool) -> None:
        self.verbose = verbose
        logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
        for pair in self.all_pairs():
            self.tell(pair, P.PPS_CTL_VERBOSE, int(verbose))

    def heartbeats(self) -> None:
        """Ask each relay for its counters; one that does not answer in
        time (or answers garbage) is killed and restarted."""
        deadline = heartbeat_deadline(self.cfg)
        for pair in self.all_pairs():
            if pair.heartbeat or pair.channel is None \
                    or "relay" not in pair.pids:
                continue
            pair.heartbeat = True
            self.ask(pair, P.PPS_CTL_STATS, deadline,
                     lambda a, p=pair, ch=pair.channel:
                     self.heartbeat_answer(p, ch, a, deadline))

    def heartbeat_answer(self, pair: Pair, ch: Channel, answer: Answer,
                         deadline: float) -> None:
        if pair.channel is not ch:
            return                      # that relay is gone already
        pair.heartbeat = False
        if answer is None:
            self.condemn(pair, "relay", f"did not answer the heartbeat "
                                        f"within {deadline:g} s")

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

    def reload(self, done: Callable[[str | None], None] | None = None) -> None:
        """Re-read the configuration and the keys: new pairs start, and
        once they answer (wait_ready) the old relays stop accepting, finish
        their sessions and exit.  A broken configuration keeps the running
        generation.  done(error or None) when it is over; a reload asked
        for meanwhile runs after this one."""
        if self.reloading:
            self.reload_again.append(done or (lambda error: None))
            return
        # waiting before it starts: without a live relay to wait for (a
        # configuration of keyservices alone) the new generation is ready,
        # and the waiters told, before start_generation() returns
        if done is not None:
            self.reload_waiters.append(done)
        error = self.start_generation()
        if error is not None and done is not None:
            self.reload_waiters.remove(done)
            done(error)

    def start_generation(self) -> str | None:
        old_sockets = sockets_of(self.setup)
        old_fds = {s.fileno() for socks in old_sockets.values() for s in socks}
        old_services = {svc.ks.socket: svc.sock for svc in self.services}
        services: list[Service] = []
        try:
            cfg = parse_config(self.cfg.path, self.macros)
            privsep.check_users(cfg)
            setup = prepare(cfg, self.setup.use_syslog, self.verbose,
                            reuse=old_sockets)
            try:
                services = prepare_services(cfg, reuse=old_services)
            except ConfigError:
                for socks in setup.listeners:
                    for s in socks:
                        if s.fileno() not in old_fds:
                            s.close()
                raise
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            return str(e)
        error = None if cfg.keys_inprocess and not cfg.keyservices \
            else check_keys(cfg)
        if error is not None:
            for socks in setup.listeners:
                for s in socks:
                    if s.fileno() not in old_fds:
                        s.close()
            for svc in services:
                if svc.sock not in old_services.values():
                    svc.close(unlink=True)
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
        old_kscas, old_svcs = self.kscas, self.services
        had_file = self.setup.file_tickets is not None
        self.cfg, self.setup = cfg, setup
        if setup.file_tickets is not None or had_file:
            # the file's keys now (read again), or generated ones again;
            # the running relays, draining too, take them at once
            self.tickets = list(setup.file_tickets or [new_ticket_key()])
            self.next_rotation = time.monotonic() + self.rotation
            self.send_tickets()
        self.pairs = [Pair.new(i, self.generation)
                      for i in range(1, relay_processes(cfg) + 1)]
        self.services = services
        self.kscas = service_cas(services, self.generation)
        self.hosts = HostStates(cfg, setup.hosts)
        for pair in self.pairs:
            for role in self.roles():
                self.spawn(pair, role)
        for sca in self.kscas:
            self.spawn(sca, "ca")
        self.start_hce()
        for svc in old_svcs:            # restarts: counted per service name
            for new in services:
                if new.ks.name == svc.ks.name:
                    new.restarts += svc.restarts
        self.reloading = True
        self.wait_ready(self.pairs,
                        lambda: self.retire(old, old_kscas, old_svcs))
        return None

    def wait_ready(self, pairs: list[Pair], then: Callable[[], None]) -> None:
        """then() once each relay answered: it does once its ca answers it
        and it accepts (or gave up waiting for the ca), or READY_TIMEOUT
        passed.  The old generation keeps accepting meanwhile."""
        self.gather(pairs, P.PPS_CTL_STATS, READY_TIMEOUT, lambda _: then())

    def retire(self, old: list[Pair], old_kscas: list[ServiceCa] | None = None,
               old_svcs: list[Service] | None = None) -> None:
        """The new generation serves: the old one drains.  Old keyservice
        cas stop accepting (SIGUSR1) and end with their last client, or
        after KEYSERVICE_DRAIN; a socket no service names any more goes."""
        now = time.monotonic()
        for sca in old_kscas or []:
            sca.draining = True
            sca.due.clear()
            sca.drain_until = now + KEYSERVICE_DRAIN
            self.draining.append(sca)
            if "ca" in sca.pids:
                kill(sca.pids["ca"], signal.SIGUSR1)
            else:
                self.drained(sca, "ca")
        current = {svc.sock for svc in self.services}
        for svc in old_svcs or []:
            if svc.sock not in current:
                svc.close(unlink=svc.ks.socket not in
                          {n.ks.socket for n in self.services})
        for pair in old:
            pair.draining = True
            pair.due.clear()
            self.draining.append(pair)
            if "relay" in pair.pids:
                self.tell(pair, P.PPS_CTL_DRAIN)
            else:
                self.drained(pair, "relay")
        log.info("reloaded: generation %d, %d relay processes, %d keyservice "
                 "cas", self.generation, len(self.pairs), len(self.kscas))
        self.reloading = False
        waiters, self.reload_waiters = self.reload_waiters, []
        for done in waiters:
            done(None)
        again, self.reload_again = self.reload_again, []
        if again:
            self.reload(lambda error: [d(error) for d in again])

    # ---- the loop ----------------------------------------------------

    def stop(self) -> None:
        self.stopping = True

    def on_wakeup(self, mask: int) -> None:
        """Signals arrive here, as bytes on the wakeup socket."""
        for signo in self.wakeup_r.recv(512):
            self.on_signal(signo)

    def on_signal(self, signo: int) -> None:
        if signo == signal.SIGCHLD:
            self.reap()
        elif signo in (signal.SIGTERM, signal.SIGINT):
            self.stop()
        elif signo == signal.SIGHUP:
            self.reload()

    def deadlines(self) -> list[float]:
        """When the loop must next look at its timers."""
        now = time.monotonic()
        times = [now + TICK, self.next_rotation, self.next_heartbeat]
        times += [t for p in self.pairs + self.kscas + ([self.hce] if self.hce
                                                          else [])
                  for t in p.due.values()]
        times += [p.drain_until for p in self.draining
                  if isinstance(p, ServiceCa) and "ca" in p.pids]
        for pair in self.all_pairs():
            if pair.channel is not None:
                t = pair.channel.next_deadline()
                if t is not None:
                    times.append(t)
        for server in (self.control, self.metrics):
            if server is not None:
                t = server.next_deadline()
                if t is not None:
                    times.append(t)
        return times

    def timers(self, now: float) -> None:
        """Everything due: deadlines of questions, channels and
        connections, ticket rotation, heartbeats, restarts."""
        for pair in self.all_pairs():
            if pair.channel is not None:
                pair.channel.expire(now)
                self.watch(pair)
        for server in (self.control, self.metrics):
            if server is not None:
                server.expire(now)
        if now >= self.next_rotation and self.setup.file_tickets is None:
            self.rotate_tickets()
            self.next_rotation = now + self.rotation
        if now >= self.next_heartbeat:
            self.heartbeats()
            self.next_heartbeat = now + HEARTBEAT_INTERVAL
        for pair in self.pairs:
            # a ca first, so that a relay restarted with it finds it
            for role in self.roles():
                if not self.stopping and pair.due.get(role, now + 1) <= now:
                    self.spawn(pair, role)
        for sca in self.kscas:
            if not self.stopping and sca.due.get("ca", now + 1) <= now:
                self.spawn(sca, "ca")
        if self.hce is not None and not self.stopping \
                and self.hce.due.get("hce", now + 1) <= now:
            self.spawn(self.hce, "hce")
        for sca in self.draining:
            if isinstance(sca, ServiceCa) and "ca" in sca.pids \
                    and now >= sca.drain_until:
                log.info("%s of generation %d: clients still connected "
                         "after %g s of draining, stopping it",
                         label(sca, "ca"), sca.generation, KEYSERVICE_DRAIN)
                sca.drain_until = now + 3600
                kill(sca.pids["ca"], signal.SIGTERM)

    def run(self) -> int:
        self.wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_w.fileno(), warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, lambda signo, frame: None)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ,
                               self.on_wakeup)
        for server in (self.control, self.metrics):
            if server is not None:
                server.parent = self
                server.attach(self.selector)
        for pair in self.pairs:
            for role in self.roles():
                self.spawn(pair, role)
        for sca in self.kscas:
            self.spawn(sca, "ca")
        self.start_hce()
        while not self.stopping:
            wait = max(min(self.deadlines()) - time.monotonic(), 0.0)
            for key, mask in self.selector.select(wait):
                key.data(mask)          # each source its handler
            self.timers(time.monotonic())
        self.shutdown()
        return self.status

    def shutdown(self) -> None:
        log.info("stopping")
        if self.metrics is not None:
            self.metrics.close()
        if self.control is not None:
            self.control.close()
        for svc in self.services:
            svc.close(unlink=True)          # no client connects any more
        pids = [p for pair in self.everyone() for p in pair.pids.values()]
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


LATENCY_BOUNDS_US = tuple(native.lib.pps_lat_bound(i)
                          for i in range(P.PPS_LAT_BUCKETS - 1))  # then +Inf


SESSION_STATES = {getattr(P, n): n[len("PPS_SESSION_"):].lower()
                  for n in dir(P) if n.startswith("PPS_SESSION_")}


def stats_entry(pair: Pair, answer: Answer) -> dict[str, Any]:
    """One relay's line of `show summary` (and of the metrics)."""
    entry: dict[str, Any] = {
        "relay": pair.index, "generation": pair.generation,
        "pid": pair.pids.get("relay"), "ca_pid": pair.pids.get("ca"),
        "draining": pair.draining}
    if answer is None:
        entry["error"] = f"relay {pair.index} did not answer"
    else:
        entry["stats"] = decode_stats(answer[0].payload)
    return entry


def session_dict(s: Any, pair: Pair, names: list[str]) -> dict[str, Any]:
    raw = bytes(s.addr)
    addr = socket.inet_ntop(socket.AF_INET6, raw) if s.family == 6 else \
        socket.inet_ntop(socket.AF_INET, raw[:4])
    backend = ""
    if s.backend_family in (4, 6):
        raw = bytes(s.backend)
        host = socket.inet_ntop(socket.AF_INET6, raw) if s.backend_family == 6 \
            else socket.inet_ntop(socket.AF_INET, raw[:4])
        backend = f"[{host}]:{s.backend_port}" if s.backend_family == 6 \
            else f"{host}:{s.backend_port}"
    return {"relay_process": pair.index, "generation": pair.generation,
            "relay": names[s.relay] if s.relay < len(names) else s.relay,
            "client": f"{addr}:{s.port}", "backend": backend,
            "state": SESSION_STATES.get(s.state, str(s.state)),
            "age": s.age, "idle": s.idle, "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out}


def check_keys(cfg: Config) -> str | None:
    """Load every key and match it to its certificate, as the new cas will,
    in a throwaway child: the parent never holds a private key, nor loads
    a PKCS#11 module.  Returns the error, or None."""
    error = check_keys_error(cfg)
    return None if error is None else str(error)


def check_keys_error(cfg: Config, *, files: bool = True) -> ConfigError | None:
    """check_keys()'s child, its error as a ConfigError (file and line
    kept), for reload and for `pyprivsep -n` (files False: only the keys
    in a token, -n reads key files itself)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            signal.set_wakeup_fd(-1)
            os.close(r)
            ca.check_keys(cfg, files=files)
        except ConfigError as e:
            os.write(w, json.dumps([e.file, e.line, e.msg]).encode()[:4000])
        except BaseException as e:
            os.write(w, json.dumps([cfg.path, 0, f"checking the keys: {e}"]).encode()[:4000])
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        return None
    try:
        file, line, msg = json.loads(data)
        return ConfigError(str(file), int(line), str(msg))
    except (ValueError, TypeError):
        return ConfigError(cfg.path, 0, "checking the keys: "
                           + data.decode(errors="replace"))


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
