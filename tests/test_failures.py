"""Failures survived under load: a ca killed or stalled, a relay killed, the
backend down; and what the processes hold afterwards (memory, descriptors).

tests/test_procs.py covers the basics (a killed relay or ca is restarted, a
frozen ca fails handshakes quickly); these go further: each fault happens
while clients keep handshaking, and the tests check what every client saw.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backends import BACKEND_PAGE, EchoServer, HttpBackend, http_backend_on
from basics import LOCALHOST, MIB, free_port, wait_until
from daemonctl import SANITIZED, Daemon, StartDaemon, TunedConfig, simple_relay
from keypairs import KeyPair, Pki, found_components, key_patterns
from memscan import scan_process_memory
from procs import Freezer, open_fds, pid_alive, proc_title
from tlsclients import (
    HTTP_GET_ROOT,
    NO_TLS13_RESUMPTION,
    TLS13_RESUMES,
    STimeResult,
    TlsVersion,
    client_context,
    curl,
    handshake_succeeds,
    https_get,
    s_client,
    tls_handshake,
)

KEYOP_TIMEOUT = 1.0  # the default `tls keyop timeout 1000`
RESTART_TIMEOUT = 5.0
VERSIONS: tuple[TlsVersion, ...] = ("1.2", "1.3")


# -- helpers ---------------------------------------------------------------------


def wait_replaced(daemon: Daemon, role: str, victim: int, count: int) -> dict[int, int]:
    """Wait until ``role`` has processes 1..count again and ``victim`` is not among them."""

    def replaced() -> dict[int, int] | None:
        pids = daemon.relay_pids() if role == "relay" else daemon.ca_pids()
        return pids if sorted(pids) == list(range(1, count + 1)) and victim not in pids.values() else None

    return wait_until(replaced, RESTART_TIMEOUT, lambda: f"{role} {victim} to be replaced\n{daemon.describe()}")


def wait_gone(pid: int) -> None:
    wait_until(lambda: not pid_alive(pid), 30, f"pid {pid} to die")


@dataclass(frozen=True)
class Attempt:
    started: float
    ended: float
    ok: bool
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class HandshakeLoad:
    """Full handshakes back to back in a thread, each one recorded."""

    port: int
    keypairs: Sequence[KeyPair]
    client_timeout: float = 10.0  # far above any bound asserted: a hang shows as a long attempt
    attempts: list[Attempt] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> HandshakeLoad:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(self.client_timeout + 5)

    def _run(self) -> None:
        for kp in itertools.cycle(self.keypairs):
            if self._stop.is_set() or len(self.attempts) >= 20_000:
                return
            began = time.monotonic()
            try:
                info = tls_handshake(self.port, kp.dns_name, cafile=kp.cert_path, timeout=self.client_timeout)
            except (OSError, ssl.SSLError) as exc:
                self.attempts.append(Attempt(began, time.monotonic(), False, repr(exc)))
            else:
                ok = info.peer_cert_der == kp.cert_der
                self.attempts.append(Attempt(began, time.monotonic(), ok, "" if ok else "wrong certificate"))

    def successes_after(self, moment: float) -> list[Attempt]:
        return [a for a in list(self.attempts) if a.ok and a.started >= moment]


def echo_roundtrip(tls: ssl.SSLSocket, payload: bytes) -> float:
    """Send ``payload`` on an established session, read it back; returns seconds."""
    began = time.monotonic()
    tls.sendall(payload)
    got = bytearray()
    while len(got) < len(payload):
        chunk = tls.recv(len(payload) - len(got))
        assert chunk, f"session closed after {len(got)} of {len(payload)} echoed bytes"
        got += chunk
    assert bytes(got) == payload, "echoed bytes differ"
    return time.monotonic() - began


def log_ids(text: str, pattern: str) -> set[int]:
    return {int(m) for m in re.findall(pattern, text)}


@dataclass
class STimeLoad:
    """`openssl s_time -new -time 1` runs back to back in a thread."""

    port: int
    www: str | None = "/"  # None: handshakes only (an echo backend never ends a GET)
    runs: list[tuple[float, float, STimeResult]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> STimeLoad:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.runs) < 100:
            args = ["openssl", "s_time", "-connect", f"{LOCALHOST}:{self.port}", "-new", "-time", "1"]
            args += [] if self.www is None else ["-www", self.www]
            began = time.monotonic()
            proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
            self.runs.append((began, time.monotonic(), STimeResult(args, proc.returncode, proc.stdout, proc.stderr)))

    def completed_after(self, moment: float) -> int:
        return sum(1 for began, _, result in list(self.runs) if began >= moment and result.returncode == 0)


# -- the ca killed under load --------------------------------------------------------


def test_ca_killed_under_load(start_daemon: StartDaemon, pki: Pki, echo_backend: EchoServer) -> None:
    relay = simple_relay(pki, echo_backend.port, ("rsa2048", "p256"))
    daemon = start_daemon(TunedConfig([relay], prefork=1))
    relay_pid, ca_pid = daemon.relay_pids()[1], daemon.ca_pids()[1]
    kp = relay.keypairs[0]
    ctx = client_context(cafile=kp.cert_path)
    with socket.create_connection((LOCALHOST, relay.listen_port), timeout=10) as raw, ctx.wrap_socket(
        raw, server_hostname=kp.dns_name
    ) as session:
        echo_roundtrip(session, b"opened before the kill\n")
        # measured handshakes in one thread, s_time runs in another for more load
        with (
            STimeLoad(relay.listen_port, www=None) as s_time_load,
            HandshakeLoad(relay.listen_port, relay.keypairs) as load,
        ):
            wait_until(lambda: len(load.successes_after(0)) >= 10, 30, "handshakes to flow before the kill")
            wait_until(lambda: s_time_load.runs or None, 30, "an s_time run before the kill")
            killed = time.monotonic()
            os.kill(ca_pid, signal.SIGKILL)
            wait_gone(ca_pid)
            # the established session does not need the ca: it flows on at once
            during = echo_roundtrip(session, os.urandom(64 * 1024))
            wait_replaced(daemon, "ca", ca_pid, count=1)
            first = wait_until(
                lambda: next(iter(load.successes_after(killed)), None),
                3.0,
                lambda: f"a handshake started after the kill to succeed\n{daemon.describe()}",
            )
            recovered = first.ended
            # keep the load going a while on the new ca
            wait_until(lambda: len(load.successes_after(recovered)) >= 20, 30, "handshakes on the new ca")
            wait_until(lambda: s_time_load.completed_after(recovered), 30, "an s_time run on the new ca")
        after = echo_roundtrip(session, os.urandom(256 * 1024))
        echo_roundtrip(session, b"still here\n")
    assert recovered - killed <= 2.0, f"first handshake via the new ca done {recovered - killed:.2f}s after the kill"
    assert during <= KEYOP_TIMEOUT + 1.0, f"established session stalled {during:.2f}s after the kill"
    assert after < 5.0, f"256 KiB took {after:.2f}s to echo"
    attempts = list(load.attempts)
    slow = [a for a in attempts if a.seconds > KEYOP_TIMEOUT + 1.0]
    assert not slow, f"handshakes hung past the keyop timeout + 1 s: {slow[:5]}"
    wrong = [a for a in attempts if not a.ok and "wrong certificate" in a.error]
    assert not wrong, wrong[:5]
    # failures only while the ca was away, each a clean TLS alert or close
    failed = [a for a in attempts if not a.ok]
    assert all(killed - KEYOP_TIMEOUT - 1.0 <= a.started <= recovered for a in failed), (
        f"handshakes failed outside the outage [{killed:.2f}, {recovered:.2f}]: {failed[:5]}"
    )
    assert daemon.relay_pids() == {1: relay_pid} and pid_alive(relay_pid), f"the relay died\n{daemon.describe()}"


# -- the ca stalled (SIGSTOP) --------------------------------------------------------

STALL_KEYOP_MS = 300
STALL_SECONDS = 1.5


def verified_s_client(port: int, kp: KeyPair, version: TlsVersion) -> None:
    result = s_client(
        port, servername=kp.dns_name, version=version, extra=["-CAfile", str(kp.cert_path), "-verify_return_error"]
    )
    assert result.handshake_ok, result.describe()
    assert "Verify return code: 0 (ok)" in result.stdout, result.describe()
    assert result.peer_certificate == kp.certificate, result.describe()


def test_stalled_ca_fails_handshakes_at_the_keyop_timeout_and_late_replies_are_dropped(
    start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend, freezer: Freezer
) -> None:
    relay = simple_relay(pki, http_backend.port, ("rsa2048", "p256"))
    daemon = start_daemon(TunedConfig([relay], prefork=1, keyop_timeout_ms=STALL_KEYOP_MS), args=["-v"])
    relay_pid, ca_pid = daemon.relay_pids()[1], daemon.ca_pids()[1]
    kp = relay.keypairs[0]
    for version in VERSIONS:
        verified_s_client(relay.listen_port, kp, version)

    freezer.freeze(ca_pid)
    began = time.monotonic()
    failures: list[float] = []
    for n in itertools.count():
        if time.monotonic() - began >= STALL_SECONDS - 0.4:
            break
        t0 = time.monotonic()
        with pytest.raises(OSError):  # an alert or a close, not a hang
            tls_handshake(relay.listen_port, kp.dns_name, cafile=kp.cert_path, version=VERSIONS[n % 2], timeout=10)
        failures.append(time.monotonic() - t0)
    wait_until(lambda: time.monotonic() - began >= STALL_SECONDS, 2.0, "the stall to last", interval=0.01)
    freezer.thaw(ca_pid)
    bound = STALL_KEYOP_MS / 1000 + 0.4
    assert len(failures) >= 2 and max(failures) <= bound, f"failed after {failures} s, bound {bound:.2f}s"

    # the ca now answers every stale request; the relay drops them by id
    for n in range(20):
        verified_s_client(relay.listen_port, relay.keypairs[n % 2], VERSIONS[n // 2 % 2])
    assert daemon.relay_pids() == {1: relay_pid} and daemon.ca_pids() == {1: ca_pid}, daemon.describe()

    def late_matches_timed_out() -> tuple[set[int], set[int]] | None:
        text = daemon.stderr_text()
        timed_out = log_ids(text, r"ca: request (\d+) timed out")
        late = log_ids(text, r"ca: late reply (\d+) dropped")
        return (timed_out, late) if timed_out and timed_out <= late else None

    timed_out, late = wait_until(
        late_matches_timed_out, 30, lambda: f"a late reply for every timed-out request\n{daemon.describe()}"
    )
    assert len(timed_out) >= len(failures), f"{len(failures)} failed handshakes, timed out: {sorted(timed_out)}"
    assert late == timed_out, f"late replies {sorted(late - timed_out)} for requests that never timed out"


# -- a relay killed under s_time load -------------------------------------------------


@pytest.mark.skipif(not TLS13_RESUMES, reason=f"resumes a TLS 1.3 session; {NO_TLS13_RESUMPTION}")
def test_relay_killed_under_s_time_load(
    start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend, tmp_path: Path, freezer: Freezer
) -> None:
    relay = simple_relay(pki, http_backend.port, ("rsa2048",))
    daemon = start_daemon(TunedConfig([relay], prefork=2), args=["-v"])
    port, kp = relay.listen_port, relay.keypairs[0]
    sessions = {version: tmp_path / f"session-{version}.pem" for version in VERSIONS}
    for version, path in sessions.items():
        result = s_client(port, servername=kp.dns_name, version=version, sess_out=path, request=HTTP_GET_ROOT)
        assert result.handshake_ok and result.reused is False and path.exists(), result.describe()
    before = daemon.relay_pids()
    victim, survivor = before[1], before[2]

    with STimeLoad(port) as load:
        wait_until(lambda: load.completed_after(0) >= 1, 30, "an s_time run before the kill")
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        after = wait_replaced(daemon, "relay", victim, count=2)
        replaced = time.monotonic()
        wait_until(lambda: load.completed_after(replaced) >= 2, 30, "s_time runs after the restart")
    new_relay = after[1]
    assert after[2] == survivor, f"the other relay was restarted too\n{daemon.describe()}"
    assert proc_title(new_relay) == "pyprivsep: relay 1"

    # s_time got connections throughout; only a run with a connection on the
    # killed relay at the moment of the kill may have stopped early
    runs = list(load.runs)
    broken = [(b, e, r) for b, e, r in runs if r.returncode != 0 or not r.connections]
    assert all(b <= killed <= e for b, e, _ in broken), "\n".join(r.describe() for _, _, r in broken)
    assert len(broken) <= 1, "\n".join(r.describe() for _, _, r in broken)
    gaps = [b2 - e1 for (_, e1, _), (b2, _, _) in itertools.pairwise(runs)]
    assert runs[0][0] < killed and max(gaps) < 1.0, f"s_time did not run throughout: gaps {gaps}"

    # the new relay alone (the other one frozen) serves and resumes old sessions
    freezer.freeze(survivor)  # returns once the cgroup reads FROZEN
    offset = len(daemon.stderr_text())
    for version, path in sessions.items():
        result = s_client(port, servername=kp.dns_name, version=version, sess_in=path, request=HTTP_GET_ROOT)
        assert result.handshake_ok and result.reused, f"session not resumed on the new relay\n{result.describe()}"
        assert BACKEND_PAGE.decode() in result.stdout, result.describe()
    assert https_get(port, kp.dns_name, cafile=kp.cert_path) == BACKEND_PAGE
    # the relay logs a connection once it is done with it: wait for the lines
    served = wait_until(
        lambda: (text := daemon.stderr_text()[offset:]).count("relay 1: relay www:") and "resumed handshake" in text
        and text,
        30,
        lambda: f"relay 1 to log the resumed sessions\n{daemon.stderr_text()[offset:][-3000:]}",
    )
    assert "relay 2:" not in served, f"relay 2 served while frozen\n{served[-3000:]}"
    freezer.thaw(survivor)
    assert daemon.relay_pids() == {1: new_relay, 2: survivor}, daemon.describe()


# -- the backend down ---------------------------------------------------------------


def test_backend_down_then_up(start_daemon: StartDaemon, pki: Pki) -> None:
    backend_port = free_port()  # nothing listens there yet
    relay = simple_relay(pki, backend_port, ("rsa2048",))
    daemon = start_daemon(TunedConfig([relay], prefork=1))
    relay_pid = daemon.relay_pids()[1]
    port, kp = relay.listen_port, relay.keypairs[0]

    began = time.monotonic()
    result = s_client(port, servername=kp.dns_name, request=HTTP_GET_ROOT, timeout=10)
    elapsed = time.monotonic() - began
    assert result.handshake_ok, f"the handshake itself must complete\n{result.describe()}"
    assert elapsed < 5.0, f"s_client took {elapsed:.1f}s to see the close"
    assert "HTTP/1." not in result.stdout, result.describe()

    began = time.monotonic()
    proc = curl(port, kp.dns_name, cacert=kp.cert_path, timeout=10)
    elapsed = time.monotonic() - began
    assert proc.returncode not in (0, 28), f"curl: exit {proc.returncode}: {proc.stderr!r}"
    assert elapsed < 5.0, f"curl took {elapsed:.1f}s to fail"
    wait_until(
        lambda: re.search(r"relay www: .*backend.*Connection refused", daemon.stderr_text()),
        30,
        lambda: f"the relay to log the backend error\n{daemon.describe()}",
    )
    assert daemon.relay_pids() == {1: relay_pid}, daemon.describe()

    with http_backend_on(backend_port):
        assert https_get(port, kp.dns_name, cafile=kp.cert_path) == BACKEND_PAGE
        proc = curl(port, kp.dns_name, cacert=kp.cert_path, timeout=10)
        assert proc.returncode == 0 and proc.stdout == BACKEND_PAGE, proc.stderr
    assert daemon.relay_pids() == {1: relay_pid}, daemon.describe()


# -- memory after a ca restart ---------------------------------------------------------

MIN_SCANNED_BYTES = 4 * MIB


@pytest.mark.skipif(SANITIZED, reason="memory scan skipped in an AddressSanitizer run")
def test_no_key_material_outside_the_ca_after_a_ca_restart(
    start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend
) -> None:
    relay = simple_relay(pki, http_backend.port, ("rsa2048", "p256"))
    daemon = start_daemon(TunedConfig([relay], prefork=1))
    ca_pid = daemon.ca_pids()[1]
    os.kill(ca_pid, signal.SIGKILL)
    new_ca = wait_replaced(daemon, "ca", ca_pid, count=1)[1]

    def through_new_ca() -> bool:
        try:
            for kp, version in itertools.product(relay.keypairs, VERSIONS):
                info = tls_handshake(relay.listen_port, kp.dns_name, cafile=kp.cert_path, version=version)
                assert info.peer_cert_der == kp.cert_der
        except OSError:
            return False
        return True

    wait_until(through_new_ca, 30, lambda: f"handshakes through the new ca\n{daemon.describe()}")
    for _ in range(3):
        assert through_new_ca()
    patterns = key_patterns(relay.keypairs)
    targets = {"relay 1": daemon.relay_pids()[1], "parent": daemon.parent_pid}
    if os.geteuid() == 0:  # control: the new ca (not dumpable) holds the keys
        targets["new ca"] = new_ca
    found = {}
    for name, pid in targets.items():
        try:
            result = scan_process_memory(pid, patterns)
        except PermissionError as exc:
            pytest.skip(f"cannot read /proc/{pid}/mem: {exc}")
        assert result.bytes_scanned >= MIN_SCANNED_BYTES, f"{name}: scanned only {result}"
        found[name] = found_components(result.found)
    expected: dict[str, set[str]] = {"relay 1": set(), "parent": set()}
    if "new ca" in targets:
        expected["new ca"] = set().union(*(kp.components() for kp in relay.keypairs))
    assert found == expected, "private key material outside the ca (or the control ca lacks it)"


# -- descriptors ---------------------------------------------------------------------------


def unix_sockets() -> dict[int, tuple[int, int, int]]:
    """inode -> (type, state, flags) from /proc/net/unix."""
    table = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        table[int(fields[6])] = (int(fields[4], 16), int(fields[5], 16), int(fields[3], 16))
    return table


def inet_inodes() -> set[int]:
    inodes = set()
    for name in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/net/{name}")
        if path.exists():
            inodes |= {int(line.split()[9]) for line in path.read_text().splitlines()[1:]}
    return inodes


def unix_peers() -> dict[int, int]:
    """inode -> peer inode of every connected unix socket (ss)."""
    out = subprocess.run(["ss", "-x", "-a", "-n"], capture_output=True, text=True, check=True, timeout=10).stdout
    peers = {}
    for match in re.finditer(r"^u_\w+\s+\S+\s+\d+\s+\d+\s+\S+\s+(\d+)\s+\S+\s+(\d+)", out, re.M):
        peers[int(match[1])] = int(match[2])
    return peers


def socket_inode(target: str) -> int | None:
    match = re.fullmatch(r"socket:\[(\d+)\]", target)
    return int(match[1]) if match else None


SOCK_DGRAM, SOCK_SEQPACKET = 2, 5
SS_CONNECTED = 3
SO_ACCEPTCON = 0x10000  # __SO_ACCEPTCON: a listening socket


def assert_ca_descriptors(daemon: Daemon, index: int, pid: int, relay_pid: int) -> None:
    fds = open_fds(pid)
    name = f"ca {index} (pid {pid})"
    stdio = {0: "/dev/null", 1: str(daemon.workdir / "daemon.stdout"), 2: str(daemon.stderr_path)}
    assert {fd: fds.get(fd) for fd in stdio} == stdio, f"{name}: stdio {fds}"
    others = {fd: target for fd, target in fds.items() if fd not in stdio}
    inodes = {fd: socket_inode(target) for fd, target in others.items()}
    assert all(inodes.values()), f"{name} holds more than sockets besides stdio: {others}"
    table, inet = unix_sockets(), inet_inodes()
    kinds = {fd: table.get(ino or 0, (0, 0, 0)) for fd, ino in inodes.items()}
    channel = [fd for fd, kind in kinds.items() if kind[:2] == (SOCK_SEQPACKET, SS_CONNECTED)]
    logging = [fd for fd, kind in kinds.items() if kind[0] == SOCK_DGRAM]
    assert len(channel) == 1, f"{name}: want one connected seqpacket socket: {others}"
    assert len(others) == 1 + len(logging) and len(logging) <= 1, f"{name}: unexpected descriptors {others}"
    for fd, ino in inodes.items():
        assert ino not in inet, f"{name}: fd {fd} is a network socket"
        assert not kinds[fd][2] & SO_ACCEPTCON, f"{name}: fd {fd} is listening"
    # its one channel leads to its own relay, not to another pair
    peer = unix_peers().get(inodes[channel[0]] or 0)
    relay_inodes = {socket_inode(t) for t in open_fds(relay_pid).values()}
    assert peer is not None and peer in relay_inodes, f"{name}: channel peer {peer} is not in relay {index}"


def assert_no_key_files(pid: int, what: str, keypairs: Sequence[KeyPair], *, no_files: bool) -> None:
    """No descriptor of ``pid`` is a key file (with ``no_files``: no file at all but stdio)."""
    key_paths = {str(kp.key_path) for kp in keypairs} | {os.path.realpath(kp.key_path) for kp in keypairs}
    fds = open_fds(pid)
    held = {fd: target for fd, target in fds.items() if target in key_paths or target.endswith(".key")}
    assert not held, f"{what} holds key files: {held}"
    files = {fd: t for fd, t in fds.items() if fd > 2 and t.startswith("/")}
    assert not (no_files and files), f"{what} holds files besides stdio: {files}"


def listening_tcp_ports(inodes: set[int]) -> set[int]:
    """Local ports of the listening TCP sockets among ``inodes``."""
    ports = set()
    for name in ("tcp", "tcp6"):
        path = Path(f"/proc/net/{name}")
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def assert_relay_listens_only_on(pid: int, what: str, port: int) -> None:
    """A relay's listening sockets are its TLS listeners: not the parent's
    control socket, nor any other listener the parent may hold."""
    inodes = {ino for t in open_fds(pid).values() if (ino := socket_inode(t))}
    table = unix_sockets()
    unix_listening = [ino for ino in inodes if table.get(ino, (0, 0, 0))[2] & SO_ACCEPTCON]
    assert not unix_listening, f"{what} holds listening unix sockets {unix_listening}"
    assert listening_tcp_ports(inodes) == {port}, f"{what} listens on {listening_tcp_ports(inodes)}"


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to find socket peers")
def test_ca_holds_only_its_channel_and_nobody_holds_key_files(
    start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend
) -> None:
    relay = simple_relay(pki, http_backend.port, ("rsa2048", "p256"))
    daemon = start_daemon(TunedConfig([relay], prefork=2))
    for kp, version in itertools.product(relay.keypairs, VERSIONS):  # the cas have signed
        tls_handshake(relay.listen_port, kp.dns_name, cafile=kp.cert_path, version=version)
    relays, cas = daemon.relay_pids(), daemon.ca_pids()
    assert sorted(cas) == [1, 2], daemon.describe()
    for index, pid in cas.items():
        assert_ca_descriptors(daemon, index, pid, relays[index])
    # a restarted ca is forked later, from a parent that may hold more by then
    os.kill(cas[2], signal.SIGKILL)
    cas = wait_replaced(daemon, "ca", cas[2], count=2)
    wait_until(
        lambda: all(handshake_succeeds(relay.listen_port, kp.dns_name) for kp in relay.keypairs),
        30,
        "handshakes after the restart",
    )
    for index, pid in cas.items():
        assert_ca_descriptors(daemon, index, pid, relays[index])
    for index, pid in relays.items():
        assert_no_key_files(pid, f"relay {index}", relay.keypairs, no_files=True)
        assert_relay_listens_only_on(pid, f"relay {index}", relay.listen_port)
    assert_no_key_files(daemon.parent_pid, "the parent", relay.keypairs, no_files=False)
