"""Process model: prefork, restarts, ca failures, shutdown, privilege drop."""

from __future__ import annotations

import os
import pwd
import signal
import time

import pytest

from backends import BACKEND_PAGE, HttpBackend
from basics import wait_until
from daemonctl import SANITIZED, Daemon, DaemonConfig, StartDaemon, simple_relay
from keypairs import KeyPair, Pki
from procs import ChildProcess, Freezer, pid_alive, proc_status, proc_title
from tlsclients import TlsVersion, handshake_succeeds, https_get, tls_handshake

RESTART_TIMEOUT = 5.0  # spec: restarted within ~1-2 s
RECOVERY_TIMEOUT = 10.0
KEYOP_FAILURE_BOUND = 3.0  # spec: keyop timeout 1 s, handshakes fail within ~2 s

requires_root = pytest.mark.skipif(
    os.geteuid() != 0 or SANITIZED,
    reason="chroot and privilege drop only happen as root (and not under `make asan`, whose children stay root)")


def start(start_daemon: StartDaemon, pki: Pki, backend: HttpBackend, prefork: int) -> Daemon:
    return start_daemon(DaemonConfig([simple_relay(pki, backend.port)], prefork=prefork))


@pytest.fixture
def daemon3(start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend) -> Daemon:
    return start(start_daemon, pki, http_backend, prefork=3)


@pytest.fixture
def daemon1(start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend) -> Daemon:
    """prefork 1: every connection lands on relay 1, whose ca is ca 1."""
    return start(start_daemon, pki, http_backend, prefork=1)


def port_and_key(daemon: Daemon) -> tuple[int, KeyPair]:
    relay = daemon.config.relays[0]
    return relay.listen_port, relay.keypairs[0]


def assert_serving(daemon: Daemon, handshakes: int = 6) -> None:
    """Some full handshakes with each key, then an HTTP GET, all succeed."""
    relay = daemon.config.relays[0]
    for kp in relay.keypairs:
        for i in range(handshakes):
            info = tls_handshake(relay.listen_port, kp.dns_name, cafile=kp.cert_path)
            assert info.peer_cert_der == kp.cert_der, f"handshake {i} with {kp.name}: wrong certificate"
    kp = relay.keypairs[0]
    assert https_get(relay.listen_port, kp.dns_name, cafile=kp.cert_path) == BACKEND_PAGE


def wait_serving(daemon: Daemon, timeout: float = RECOVERY_TIMEOUT) -> None:
    port, kp = port_and_key(daemon)
    wait_until(
        lambda: all(handshake_succeeds(port, kp.dns_name, timeout=2.0) for _ in range(3)),
        timeout,
        lambda: f"handshakes to succeed again\n{daemon.describe()}",
        interval=0.1,
    )
    assert_serving(daemon)


def wait_replaced(daemon: Daemon, role: str, victim: int, count: int) -> dict[int, int]:
    """Wait until ``role`` has processes 1..count again and ``victim`` is not among them."""

    def replaced() -> dict[int, int] | None:
        pids = daemon.relay_pids() if role == "relay" else daemon.ca_pids()
        return pids if sorted(pids) == list(range(1, count + 1)) and victim not in pids.values() else None

    return wait_until(replaced, RESTART_TIMEOUT, lambda: f"{role} {victim} to be replaced\n{daemon.describe()}")


# -- process set ---------------------------------------------------------------


def test_prefork_3_starts_three_relays_and_three_cas(daemon3: Daemon) -> None:
    assert proc_title(daemon3.parent_pid) == "pyprivsep: parent"
    relays, cas = daemon3.processes("relay"), daemon3.processes("ca")
    assert sorted(p.index for p in relays) == [1, 2, 3], daemon3.describe()
    assert sorted(p.index for p in cas) == [1, 2, 3], daemon3.describe()
    assert len({p.pid for p in relays + cas}) == 6
    for child in relays + cas:
        assert proc_title(child.pid) == f"pyprivsep: {child.role} {child.index}"
    assert_serving(daemon3)


# -- failures ------------------------------------------------------------------


def test_killed_relay_is_restarted(daemon3: Daemon) -> None:
    before = daemon3.relay_pids()
    victim = before[1]
    os.kill(victim, signal.SIGKILL)
    after = wait_replaced(daemon3, "relay", victim, count=3)
    survivors = {i: pid for i, pid in before.items() if pid != victim}
    assert set(survivors.values()) <= set(after.values()), "other relays were restarted too"
    wait_serving(daemon3)


def test_killed_ca_is_restarted_and_its_relay_survives(daemon1: Daemon) -> None:
    relay_pid, ca_pid = daemon1.relay_pids()[1], daemon1.ca_pids()[1]
    os.kill(ca_pid, signal.SIGKILL)
    wait_replaced(daemon1, "ca", ca_pid, count=1)
    assert daemon1.relay_pids() == {1: relay_pid}, f"relay was restarted\n{daemon1.describe()}"
    wait_serving(daemon1)
    assert daemon1.relay_pids() == {1: relay_pid}, f"relay was restarted\n{daemon1.describe()}"


def test_killed_ca_with_prefork_3_keeps_all_relays(daemon3: Daemon) -> None:
    relays, cas = daemon3.relay_pids(), daemon3.ca_pids()
    os.kill(cas[2], signal.SIGKILL)
    wait_replaced(daemon3, "ca", cas[2], count=3)
    assert daemon3.relay_pids() == relays, f"a relay was restarted\n{daemon3.describe()}"
    wait_serving(daemon3)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_frozen_ca_fails_handshakes_quickly(daemon1: Daemon, freezer: Freezer, version: TlsVersion) -> None:
    port, kp = port_and_key(daemon1)
    relay_pid, ca_pid = daemon1.relay_pids()[1], daemon1.ca_pids()[1]
    freezer.freeze(ca_pid)
    for attempt in range(2):
        began = time.monotonic()
        with pytest.raises(OSError):  # ssl.SSLError, reset or EOF -- not a hang
            tls_handshake(port, kp.dns_name, cafile=kp.cert_path, version=version, timeout=10.0)
        elapsed = time.monotonic() - began
        assert elapsed < KEYOP_FAILURE_BOUND, f"attempt {attempt}: handshake took {elapsed:.1f}s to fail"
    assert pid_alive(relay_pid) and daemon1.relay_pids() == {1: relay_pid}, daemon1.describe()
    freezer.thaw(ca_pid)
    wait_serving(daemon1)
    assert daemon1.relay_pids() == {1: relay_pid}, daemon1.describe()


# -- shutdown ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_everything(daemon3: Daemon, sig: signal.Signals) -> None:
    children = [child.pid for child in daemon3.children()]
    assert len(children) == 6, daemon3.describe()
    assert daemon3.stop(sig) == 0, daemon3.describe()
    wait_until(
        lambda: not any(pid_alive(pid) for pid in children),
        30,
        lambda: f"children to exit: {[pid for pid in children if pid_alive(pid)]}",
    )


# -- privileges (root only) ------------------------------------------------------


def owner(path: str) -> int:
    return os.stat(path).st_uid


# The default users: relays and cas each their own (`make users`).
ROLE_USERS = {"relay": "_pyprivsep", "ca": "_pyprivsep_ca"}


def wait_privileges_dropped(daemon: Daemon) -> list[ChildProcess]:
    """All 6 children end up with the uid of their role's user (fails on timeout)."""
    uids = {role: str(pwd.getpwnam(user).pw_uid) for role, user in ROLE_USERS.items()}

    def dropped() -> list[ChildProcess] | None:
        children = daemon.children()
        ok = len(children) == 6 and all(
            proc_status(c.pid)["Uid"].split() == [uids[c.role]] * 4 for c in children)
        return children if ok else None

    def state() -> str:
        seen = {f"{c.role} {c.index}": proc_status(c.pid)["Uid"] for c in daemon.children()}
        return f"relays and cas to run as uids {uids}: {seen}\n{daemon.describe()}"

    return wait_until(dropped, 30, state)


@requires_root
def test_children_drop_privileges_and_chroot(daemon3: Daemon) -> None:
    chroot = os.path.realpath(daemon3.chroot)
    for child in wait_privileges_dropped(daemon3):
        name = f"{child.role} {child.index}"
        gid = str(pwd.getpwnam(ROLE_USERS[child.role]).pw_gid)
        gids = proc_status(child.pid)["Gid"]
        assert gids.split() == [gid] * 4, f"{name}: Gid {gids}"
        assert os.readlink(f"/proc/{child.pid}/root") == chroot, f"{name} is not chrooted to {chroot}"


@requires_root
def test_ca_processes_are_not_dumpable_or_traced(daemon3: Daemon) -> None:
    cas = [child for child in wait_privileges_dropped(daemon3) if child.role == "ca"]
    assert len(cas) == 3
    for ca in cas:
        assert proc_status(ca.pid)["TracerPid"] == "0", f"ca {ca.index} is traced"

    # /proc/PID/{mem,environ} of a non-dumpable process are owned by root whatever
    # its uid (the /proc/PID directory itself is not: it keeps the task's uid).
    # The ca runs as _pyprivsep_ca now, so uid 0 here means "not dumpable".
    def owners() -> dict[int, tuple[int, int]]:
        return {ca.pid: (owner(f"/proc/{ca.pid}/mem"), owner(f"/proc/{ca.pid}/environ")) for ca in cas}

    wait_until(
        lambda: all(owner == (0, 0) for owner in owners().values()),
        30,
        lambda: f"ca processes to be non-dumpable; (mem, environ) owners: {owners()}",
    )


# -- stopped children ---------------------------------------------------------


@pytest.mark.parametrize("role", ["relay", "ca"])
def test_stopped_child_is_killed_and_replaced(daemon3: Daemon, role: str) -> None:
    """A child stopped by SIGSTOP serves nobody: the parent sees it stop
    (waitpid WUNTRACED), kills it and starts another; the daemon serves."""
    before = daemon3.relay_pids() if role == "relay" else daemon3.ca_pids()
    victim = before[1]
    began = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    after = wait_replaced(daemon3, role, victim, count=3)
    print(f"{role} 1: SIGSTOP to a new pid in {time.monotonic() - began:.3f} s")
    assert {i: p for i, p in after.items() if i != 1} == {i: p for i, p in before.items() if i != 1}, daemon3.describe()
    wait_until(lambda: not pid_alive(victim), RESTART_TIMEOUT, f"the stopped {role} to be gone")
    assert f"{role} 1 stopped by signal {int(signal.SIGSTOP)}: killing it" in daemon3.stderr_text(), daemon3.describe()
    wait_serving(daemon3)
