"""An attacker who owns one relay gets nothing more.

Relays and cas run as two users of their own (_pyprivsep, _pyprivsep_ca)
and, once set up, under a seccomp filter with no_new_privs.  These tests
start real daemons as root, look at their processes, and play a
compromised relay: a process set up with the relay's own privsep steps
(chroot, setuid, pps_sandbox) that then attacks the daemon's other
processes.  `pytest -s` prints the ps/status evidence.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends import BACKEND_PAGE, HttpBackend
from basics import REPO_ROOT, wait_until
from daemonctl import SANITIZED, Daemon, DaemonConfig, StartDaemon, pyprivsep_env, run_pyprivsep, simple_relay
from keypairs import Pki
from procs import pid_alive, proc_status
from pyprivsep import privsep
from tlsclients import handshake_succeeds, https_get

requires_root = pytest.mark.skipif(
    os.geteuid() != 0 or SANITIZED,
    reason="users and the seccomp filter need a daemon started as root "
    "(and not `make asan`, whose children stay root and unfiltered for LeakSanitizer)")

RELAY_USER, CA_USER = "_pyprivsep", "_pyprivsep_ca"
SIGSYS = -int(signal.SIGSYS)  # a subprocess's returncode when the filter killed it


@pytest.fixture
def daemon2(start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend) -> Daemon:
    return start_daemon(DaemonConfig([simple_relay(pki, http_backend.port)], prefork=2))


def ps_line(pid: int) -> str:
    return subprocess.run(["ps", "-o", "pid=,user:16=,args=", "-p", str(pid)],
                          capture_output=True, text=True, check=True).stdout.strip()


def status_of(pid: int) -> dict[str, str]:
    st = proc_status(pid)
    return {k: st.get(k, "?") for k in ("Uid", "Gid", "NoNewPrivs", "Seccomp")}


def wait_settled(daemon: Daemon) -> None:
    """Until every child has its role's uid and its filter (both happen in
    the child after fork, so a just-started child may not be there yet)."""
    uids = {"relay": pwd.getpwnam(RELAY_USER).pw_uid, "ca": pwd.getpwnam(CA_USER).pw_uid}

    def settled() -> bool:
        kids = daemon.children()
        return len(kids) == 4 and all(
            status_of(c.pid)["Uid"].split()[0] == str(uids[c.role])
            and status_of(c.pid)["Seccomp"] == "2" for c in kids)

    wait_until(settled, 30, lambda: "relays and cas to drop privileges and install their filter: "
               + str({c.pid: status_of(c.pid) for c in daemon.children()}) + "\n" + daemon.describe())


def assert_serving(daemon: Daemon) -> None:
    relay = daemon.config.relays[0]
    for kp in relay.keypairs:
        for _ in range(4):
            assert handshake_succeeds(relay.listen_port, kp.dns_name, timeout=5.0), daemon.describe()
    kp = relay.keypairs[0]
    assert https_get(relay.listen_port, kp.dns_name, cafile=kp.cert_path) == BACKEND_PAGE


@requires_root
def test_each_role_has_its_user_and_a_filter(daemon2: Daemon) -> None:
    wait_settled(daemon2)
    parent = daemon2.parent_pid
    print()
    for pid in [parent] + [c.pid for c in daemon2.children()]:
        st = status_of(pid)
        print(f"{ps_line(pid):<48} Uid: {' '.join(st['Uid'].split()):<16} NoNewPrivs: {st['NoNewPrivs']}  Seccomp: {st['Seccomp']}")
    assert ps_line(parent).split()[1] == "root"
    assert (status_of(parent)["NoNewPrivs"], status_of(parent)["Seccomp"]) == ("0", "0"), \
        "the parent must stay able to fork, signal and reload"
    for child in daemon2.children():
        user = RELAY_USER if child.role == "relay" else CA_USER
        pw = pwd.getpwnam(user)
        st = status_of(child.pid)
        name = f"{child.role} {child.index}"
        assert ps_line(child.pid).split()[1] == user, f"{name}: {ps_line(child.pid)}"
        assert st["Uid"].split() == [str(pw.pw_uid)] * 4, f"{name}: {st}"
        assert st["Gid"].split() == [str(pw.pw_gid)] * 4, f"{name}: {st}"
        assert (st["NoNewPrivs"], st["Seccomp"]) == ("1", "2"), f"{name}: {st}"
    assert pwd.getpwnam(RELAY_USER).pw_uid != pwd.getpwnam(CA_USER).pw_uid
    assert_serving(daemon2)


@requires_root
def test_every_thread_has_the_filter(daemon2: Daemon) -> None:
    """The filter covers every thread of a relay and a ca, not only the one
    that installed it: a kqueue build on Linux (make POLLER=kqueue) runs
    libkqueue's own thread, started before the sandbox, which
    prctl(PR_SET_SECCOMP) alone would leave unfiltered."""
    wait_settled(daemon2)
    print()
    for child in daemon2.children():
        tids = sorted(int(t) for t in os.listdir(f"/proc/{child.pid}/task"))
        for tid in tids:
            st = proc_status(tid)
            print(f"{child.role} {child.index} thread {tid} ({st.get('Name')}): "
                  f"NoNewPrivs: {st.get('NoNewPrivs')}  Seccomp: {st.get('Seccomp')}")
            assert (st.get("NoNewPrivs"), st.get("Seccomp")) == ("1", "2"), \
                f"{child.role} {child.index}: thread {tid} ({st.get('Name')}) unfiltered: " \
                f"NoNewPrivs {st.get('NoNewPrivs')}, Seccomp {st.get('Seccomp')}"
    assert_serving(daemon2)


def nice_of(pid: int) -> int:
    """The process's nice value: field 19 of /proc/PID/stat (after the
    parenthesised name, which may hold spaces)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


@requires_root
def test_cas_yield_the_cpu_to_relays(daemon2: Daemon) -> None:
    """A ca runs niced (privsep.CA_NICE), so that a relay with work takes
    the CPU from a ca in the middle of a long signature; relays keep the
    parent's priority (the test's own: 0, or 19 under `nice -n 19 make
    test`), a ca is CA_NICE below it, as far as 19 goes."""
    wait_settled(daemon2)
    assert privsep.CA_NICE > 0
    base = nice_of(daemon2.parent_pid)
    assert base == os.getpriority(os.PRIO_PROCESS, 0)
    for child in daemon2.children():
        want = base if child.role == "relay" else min(19, base + privsep.CA_NICE)
        assert nice_of(child.pid) == want, f"{child.role} {child.index}: nice {nice_of(child.pid)}"
    assert_serving(daemon2)


# A process set up like a relay (or a ca): the daemon's own configuration,
# the daemon's own privsep steps, then one attack; it prints what happened.
ATTACKER = r"""
import ctypes, errno, os, resource, signal, socket, sys
from pyprivsep import privsep
from pyprivsep.config import parse_config

conf, role, sandboxed, action, target = sys.argv[1:6]
target = int(target)
cfg = parse_config(conf)
libc = ctypes.CDLL(None, use_errno=True)       # before chroot: no files after
privsep.drop_privileges(cfg, role)              # chroot, setuid to the role's user
if sandboxed == "1":
    privsep.sandbox(role)                       # pps_sandbox(PPS_SANDBOX_<role>)
os.write(1, b"ready\n")
try:
    if action == "sigstop":
        os.kill(target, signal.SIGSTOP)
    elif action == "sigkill":
        os.kill(target, signal.SIGKILL)
    elif action == "signal0":
        os.kill(target, 0)
    elif action == "prlimit":
        resource.prlimit(target, resource.RLIMIT_CORE, (0, 0))
    elif action == "ptrace":
        if libc.ptrace(16, target, None, None) == -1:       # PTRACE_ATTACH
            raise OSError(ctypes.get_errno(), "ptrace")
    elif action == "execve":
        os.execv("/bin/sh", ["sh", "-c", "exit 0"])
    elif action == "fork":
        if os.fork() == 0:
            os._exit(0)
    elif action == "open":
        open("/etc/passwd", "rb").close()
    elif action == "socket_unix":
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()
    elif action == "socket_inet":
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    result = "ok"
except OSError as e:
    result = errno.errorcode.get(e.errno, str(e.errno))
os.write(1, f"result {result}\n".encode())
os._exit(0)
"""


def attack(daemon: Daemon, role: str, action: str, target: int, sandboxed: bool = True) -> str:
    """Run one attack; "SIGSYS" if the filter killed the attacker, else the
    errno name it got (or "ok")."""
    proc = subprocess.run(
        [sys.executable, "-c", ATTACKER, str(daemon.conf_path), role, "1" if sandboxed else "0",
         action, str(target)],
        cwd=REPO_ROOT, env=pyprivsep_env(), capture_output=True, text=True, timeout=30)
    lines = proc.stdout.splitlines()
    assert lines[:1] == ["ready"], f"attacker setup failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
    if proc.returncode == SIGSYS:
        return "SIGSYS"
    assert proc.returncode == 0 and len(lines) == 2, f"{proc.returncode}: {proc.stdout}{proc.stderr}"
    return lines[1].removeprefix("result ")


@pytest.fixture
def nobody_sleep() -> Iterator[int]:
    """An unrelated process running as nobody, like an nginx worker."""
    proc = subprocess.Popen(["sleep", "600"], user="nobody", group="nogroup")
    yield proc.pid
    proc.kill()
    proc.wait(10)


@requires_root
def test_compromised_relay_cannot_touch_other_processes(daemon2: Daemon, nobody_sleep: int) -> None:
    wait_settled(daemon2)
    relays, cas = daemon2.relay_pids(), daemon2.ca_pids()
    other_relay, ca = relays[2], cas[1]
    expected = {
        # (role, action, target): what the filter does
        ("relay", "sigstop", ca): "SIGSYS",
        ("relay", "sigkill", other_relay): "SIGSYS",
        ("relay", "sigkill", nobody_sleep): "SIGSYS",
        ("relay", "prlimit", ca): "SIGSYS",
        ("relay", "ptrace", ca): "SIGSYS",
        ("relay", "execve", 0): "SIGSYS",
        ("relay", "fork", 0): "SIGSYS",
        ("relay", "open", 0): "EACCES",             # not killed: libraries probe files
        ("relay", "socket_unix", 0): "EACCES",      # e.g. syslog reconnecting to /dev/log
        ("relay", "socket_inet", 0): "ok",          # backends
        ("ca", "sigkill", other_relay): "SIGSYS",
        ("ca", "socket_inet", 0): "EACCES",         # a ca opens no socket at all
        # a keyservice ca's filter adds accept4 and getsockopt, nothing else
        ("keyservice", "sigkill", other_relay): "SIGSYS",
        ("keyservice", "ptrace", ca): "SIGSYS",
        ("keyservice", "execve", 0): "SIGSYS",
        ("keyservice", "fork", 0): "SIGSYS",
        ("keyservice", "socket_unix", 0): "EACCES",
        ("keyservice", "socket_inet", 0): "EACCES",
    }
    got = {key: attack(daemon2, *key) for key in expected}
    print()
    for (role, action, target), result in got.items():
        print(f"owned {role} (filtered): {action} {target or ''} -> {result}")
    assert got == expected
    # nothing happened to anyone
    assert daemon2.relay_pids() == relays and daemon2.ca_pids() == cas, daemon2.describe()
    for pid in [*relays.values(), *cas.values(), nobody_sleep]:
        assert pid_alive(pid) and proc_status(pid)["State"][0] in "RS", f"{pid}: {proc_status(pid)['State']}"
        assert proc_status(pid)["TracerPid"] == "0"
    assert_serving(daemon2)


@requires_root
def test_relay_uid_alone_cannot_signal_a_ca_or_another_daemon(daemon2: Daemon, nobody_sleep: int) -> None:
    """The uid layer without the filter: the relay's user owns nothing else."""
    wait_settled(daemon2)
    ca = daemon2.ca_pids()[1]
    got = {
        "kill(ca, 0)": attack(daemon2, "relay", "signal0", ca, sandboxed=False),
        "prlimit(ca)": attack(daemon2, "relay", "prlimit", ca, sandboxed=False),
        "kill(sleep as nobody, SIGKILL)": attack(daemon2, "relay", "sigkill", nobody_sleep, sandboxed=False),
    }
    print()
    for what, result in got.items():
        print(f"relay uid, no filter: {what} -> {result}")
    assert got == dict.fromkeys(got, "EPERM")
    assert pid_alive(nobody_sleep) and pid_alive(ca)
    assert_serving(daemon2)


@requires_root
def test_no_child_dies_of_its_filter_through_reload_and_shutdown(daemon2: Daemon) -> None:
    """Handshakes, a reload (new generation, old one drains), SIGTERM: every
    relay and ca exits cleanly, none is killed by a syscall it was refused.
    conftest's teardown reads the kernel's audit lines for every pid."""
    wait_settled(daemon2)
    assert_serving(daemon2)
    old = {c.pid for c in daemon2.children()}
    os.kill(daemon2.parent_pid, signal.SIGHUP)
    wait_until(lambda: len(daemon2.children()) == 4 and not old & {c.pid for c in daemon2.children()},
               30.0, lambda: f"a new generation\n{daemon2.describe()}")
    wait_settled(daemon2)
    assert_serving(daemon2)
    assert daemon2.stop(signal.SIGTERM) == 0, daemon2.describe()
    assert daemon2.seccomp_kills() == []


def write_conf(tmp_path: Path, text: str) -> Path:
    (tmp_path / "empty").mkdir(exist_ok=True)
    conf = tmp_path / "pyprivsep.conf"
    conf.write_text(f'chroot "{tmp_path / "empty"}"\nsocket "{tmp_path / "ctl.sock"}"\n' + text)
    return conf


@pytest.mark.skipif(os.geteuid() != 0, reason="users are looked up only when started as root")
@pytest.mark.parametrize("directive, what", [
    ('user "_pyprivsep_nosuchuser"', "user"),
    ('ca user "_pyprivsep_nosuchuser"', "ca user"),
])
def test_missing_user_is_a_clear_error(tmp_path: Path, pki: Pki, directive: str, what: str) -> None:
    relay = "\n".join(simple_relay(pki, 9).render())
    conf = write_conf(tmp_path, f"prefork 1\n{directive}\n{relay}\n")
    proc = run_pyprivsep("-d", "-f", str(conf))
    print(proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert f'{conf}:4: {what} "_pyprivsep_nosuchuser" does not exist' in proc.stderr
    assert "make users" in proc.stderr and "useradd --system" in proc.stderr
    assert "starting" not in proc.stderr, "it got as far as starting children"


def test_ca_user_equal_to_user_is_refused(tmp_path: Path, pki: Pki) -> None:
    relay = "\n".join(simple_relay(pki, 9).render())
    conf = write_conf(tmp_path, f'user "www"\nca user "www"\n{relay}\n')
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 1, proc.stderr
    assert f'{conf}:4: ca user "www" is the relays\' user too' in proc.stderr
