"""Health checks: the hce process (relayd's), the checks themselves, and
what the parent and the relays do with their results."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from backends import HttpBackend, http_backend_on
from basics import LOCALHOST, free_port, wait_until
from daemonctl import SANITIZED, Daemon, DaemonConfig, RelaySpec, StartDaemon, pyprivsep_command, pyprivsep_env
from keypairs import Pki, key_patterns
from memscan import scan_process_memory
from hosts import HOST_A, HOST_B, HOST_C, backend_port, backends, get
from procs import child_pids, open_fds, proc_status, proc_title

from pyprivsep import checks, hce
from pyprivsep.config import Check
from pyprivsep.tables import Host

INTERVAL = 1
CHECK_MS = 400
HTTP_CHECK = 'check http "/" code 200'
DOWN_LINE = r"host {host}, check .* \((?P<ms>\d+)ms,(?P<why>[^)]*)\), state \w+ -> down"
UP_LINE = r"host {host}, check .* state \w+ -> up"


def health_config(pki: Pki, port: int, *, check: str = HTTP_CHECK, fallback: bool = False,
                  prefork: int = 2, timeout_ms: int = CHECK_MS) -> tuple[DaemonConfig, RelaySpec]:
    tables = [f"interval {INTERVAL}", f"timeout {timeout_ms}",
              f"table <web> {{ {HOST_A}, {HOST_B} }}"]
    options = []
    if fallback:
        tables.append(f"table <backup> {{ {HOST_C} }}")
        options.append(f"forward to <backup> port {port} {check}")
    relay = RelaySpec("web", free_port(), port, [pki["p256"]], forward_host="<web>",
                      forward_options=check, options=options)
    return DaemonConfig([relay], prefork=prefork, globals=tables), relay


def wait_log(daemon: Daemon, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    return wait_until(lambda: re.search(pattern, daemon.stderr_text()), timeout,
                      lambda: f"{pattern!r} in the log\n{daemon.describe()}")


def hce_pid(daemon: Daemon) -> int:
    def find() -> int | None:
        return next((pid for pid in child_pids(daemon.parent_pid)
                     if proc_title(pid) == "pyprivsep: hce"), None)
    return wait_until(find, 10, lambda: f"the hce process\n{daemon.describe()}")


def ctl_hosts(daemon: Daemon) -> list[dict[str, object]]:
    out = subprocess.run(pyprivsep_command("ctl", "-j", "-s", str(daemon.workdir / "ctl.sock"),
                                           "show", "hosts"),
                         env=pyprivsep_env(), capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout)["hosts"])


class Load:
    """Clients GETting through the relay in a loop, each result timed."""

    def __init__(self, port: int, clients: int = 3) -> None:
        self.port = port
        self.results: list[tuple[float, str | None]] = []  # (time, host or None: failed)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                host: str | None = get(self.port, "p256.test", timeout=5)
            except (OSError, AssertionError):
                host = None
            self.results.append((time.monotonic(), host))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def refused_count(daemon: Daemon, host: str, port: int) -> int:
    return daemon.stderr_text().count(f"backend: Connection refused (host {host}:{port})")


def test_killed_backend_is_taken_out_under_load(start_daemon: StartDaemon, pki: Pki) -> None:
    port = backend_port()
    cfg, relay = health_config(pki, port)
    with backends(port, (HOST_A, HOST_B)) as servers:
        daemon = start_daemon(cfg)
        wait_log(daemon, UP_LINE.format(host=re.escape(HOST_A)))
        wait_log(daemon, UP_LINE.format(host=re.escape(HOST_B)))
        with Load(relay.listen_port) as load:
            time.sleep(1.0)
            servers[HOST_A].close()
            killed = time.monotonic()
            wait_log(daemon, DOWN_LINE.format(host=re.escape(HOST_A)))
            down_seen = time.monotonic()
            time.sleep(0.5)                 # every relay told
            refused = refused_count(daemon, HOST_A, port)
            time.sleep(2.0)
        # relays no longer try A: no new refusal once it is down
        assert refused_count(daemon, HOST_A, port) == refused, daemon.describe()
        hosts = {h["host"]: h["state"] for h in ctl_hosts(daemon)}
    assert hosts == {HOST_A: "down", HOST_B: "up"}, hosts
    # within the check interval (and the check's timeout), with slack for a
    # loaded machine
    assert down_seen - killed < INTERVAL + CHECK_MS / 1000 + 3.0
    failed_before = [t for t, host in load.results if host is None and t < down_seen + 0.5]
    failed_after = [t for t, host in load.results if host is None and t >= down_seen + 0.5]
    served_after = [host for t, host in load.results if t >= down_seen + 0.5]
    assert not failed_after, f"{len(failed_after)} requests failed after the check"
    # at most the connections in flight to A (one per client) before
    assert len(failed_before) <= len(load.threads), failed_before
    assert served_after and set(served_after) == {HOST_B}, set(served_after)


def test_fallback_serves_while_both_are_down_then_they_come_back(
        start_daemon: StartDaemon, pki: Pki) -> None:
    port = backend_port()
    cfg, relay = health_config(pki, port, fallback=True, prefork=1)
    with backends(port, (HOST_C,)):
        servers = {h: http_backend_on(port, f"backend {'AB'[i]}\n".encode(), host=h).start()
                   for i, h in enumerate((HOST_A, HOST_B))}
        try:
            daemon = start_daemon(cfg)
            for h in (HOST_A, HOST_B):
                wait_log(daemon, UP_LINE.format(host=re.escape(h)))
            assert {get(relay.listen_port, "p256.test") for _ in range(4)} == {HOST_A, HOST_B}
            for s in servers.values():
                s.close()
            for h in (HOST_A, HOST_B):
                wait_log(daemon, DOWN_LINE.format(host=re.escape(h)))
            time.sleep(0.3)
            assert [get(relay.listen_port, "p256.test") for _ in range(4)] == [HOST_C] * 4
            hosts = {(h["host"], h["fallback"]): h["state"] for h in ctl_hosts(daemon)}
            assert hosts == {(HOST_A, False): "down", (HOST_B, False): "down",
                             (HOST_C, True): "up"}, hosts
            servers = {h: http_backend_on(port, f"backend {'AB'[i]}\n".encode(), host=h).start()
                       for i, h in enumerate((HOST_A, HOST_B))}
            before = daemon.stderr_text().count("-> up")
            wait_until(lambda: daemon.stderr_text().count("-> up") >= before + 2, 10,
                       lambda: f"A and B up again\n{daemon.describe()}")
            time.sleep(0.3)
            assert {get(relay.listen_port, "p256.test") for _ in range(4)} == {HOST_A, HOST_B}
        finally:
            for s in servers.values():
                s.close()


@contextlib.contextmanager
def silent_backend(host: str, port: int) -> Iterator[list[socket.socket]]:
    """Accepts (the kernel completes the connection) and never answers."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(64)
        held: list[socket.socket] = []
        try:
            yield held
        finally:
            for s in held:
                s.close()


def test_hanging_check_times_out_at_timeout(start_daemon: StartDaemon, pki: Pki) -> None:
    port = backend_port()
    cfg, relay = health_config(pki, port, timeout_ms=300)
    with backends(port, (HOST_B,)), silent_backend(HOST_A, port):
        daemon = start_daemon(cfg)
        m = wait_log(daemon, DOWN_LINE.format(host=re.escape(HOST_A)))
        wait_log(daemon, UP_LINE.format(host=re.escape(HOST_B)))
    assert m["why"] == "timeout", m.group(0)
    assert 280 <= int(m["ms"]) < 1000, m.group(0)


@pytest.mark.skipif(SANITIZED, reason="memory scan skipped in an AddressSanitizer run")
def test_hce_holds_no_key_and_is_confined(start_daemon: StartDaemon, pki: Pki) -> None:
    port = backend_port()
    cfg, relay = health_config(pki, port)
    keys = [pki["p256"]]
    with backends(port, (HOST_A, HOST_B)):
        daemon = start_daemon(cfg)
        pid = hce_pid(daemon)
        wait_log(daemon, UP_LINE.format(host=re.escape(HOST_B)))
        get(relay.listen_port, "p256.test")
        result = scan_process_memory(pid, key_patterns(keys))
        status = proc_status(pid)
        fds = open_fds(pid)
        # the same scan finds the key where it is: the ca
        ca_found = scan_process_memory(next(iter(daemon.ca_pids().values())), key_patterns(keys))
    assert result.bytes_scanned > 1 << 20
    assert not result.found, f"hce holds key material: {sorted(result.found)}"
    assert ca_found.found, "the scan finds nothing even in the ca"
    if os.geteuid() == 0:
        assert int(status["Uid"].split()[0]) == pwd.getpwnam("_pyprivsep").pw_uid
        assert status.get("Seccomp", "").split()[0] == "2", status.get("Seccomp")
        assert status.get("NoNewPrivs", "").strip() == "1"
    # no listener, no ca channel: stdio (or not) and its one socket to the parent
    sockets = [target for fd, target in fds.items() if fd > 2 and target.startswith("socket:")]
    assert len(sockets) == 1, fds


# -- the checks themselves, run in the test process ----------------------------


def target(port: int, check: Check, timeout_ms: int = 1000, address: str = LOCALHOST,
           host_id: int = 0) -> checks.Target:
    return checks.Target(Host(host_id, "r", 0, "t", address, address, port, False), check,
                         timeout_ms, 1)


def test_check_kinds(start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend) -> None:
    relay = RelaySpec("tls", free_port(), http_backend.port, [pki["p256"]])
    start_daemon(DaemonConfig([relay], prefork=1))
    ctx = checks.tls_context()
    dead = free_port()
    cases = [
        (http_backend.port, Check("tcp"), True, "tcp connect ok"),
        (dead, Check("tcp"), False, "Connection refused"),
        (http_backend.port, Check("http", path="/", code=200), True, "http code 200 ok"),
        (http_backend.port, Check("http", path="/missing", code=200), False, "http code 404, not 200"),
        (relay.listen_port, Check("https", path="/", code=200, tls=True), True, "http code 200 ok"),
        (relay.listen_port, Check("tls", tls=True), True, "tls connect ok"),
        (http_backend.port, Check("tls", tls=True), False, "tls handshake failed"),
        (http_backend.port, Check("send", send="GET / HTTP/1.0\r\n\r\n", expect="HTTP/1.? 200 *"),
         True, "send/expect ok"),
        (http_backend.port, Check("send", send="GET / HTTP/1.0\r\n\r\n", expect="SSH-*"),
         False, "send/expect: no match"),
    ]
    for port, check, up, why in cases:
        got_up, _ms, reason = checks.check_once(target(port, check), ctx)
        assert (got_up, why in reason) == (up, True), (check, reason)


def test_check_that_hangs_ends_at_its_timeout() -> None:
    port = backend_port()
    with silent_backend(LOCALHOST, port):
        start = time.monotonic()
        up, ms, reason = checks.check_once(target(port, Check("http", path="/", code=200), 250),
                                           checks.tls_context())
        took = time.monotonic() - start
    assert (up, reason) == (False, "timeout")
    assert 0.24 <= took < 0.6, took


@pytest.mark.parametrize("frame", [b"", b"\x00" * 9, hce.HOST_STATE.pack(1, 2, 0),
                                   hce.HOST_STATE.pack(1, 1, 0) + b"x" * (hce.MAX_REASON + 1)])
def test_malformed_hce_reports_are_refused(frame: bytes) -> None:
    with pytest.raises(ValueError):
        hce.decode(frame)
    assert hce.decode(hce.encode(7, True, 12, "ok")) == (7, True, 12, "ok")


def test_restarted_relay_and_hce_keep_a_down_host_out(start_daemon: StartDaemon, pki: Pki) -> None:
    """A relay process started after a host went down gets its state at
    its start; a killed hce is restarted and checks again."""
    port = backend_port()
    cfg, relay = health_config(pki, port, prefork=1)
    with backends(port, (HOST_B,)):
        daemon = start_daemon(cfg)
        wait_log(daemon, DOWN_LINE.format(host=re.escape(HOST_A)))
        old_relay = daemon.relay_pids()[1]
        os.kill(old_relay, 9)
        wait_until(lambda: daemon.relay_pids().get(1) not in (None, old_relay), 15,
                   lambda: f"relay 1 restarted\n{daemon.describe()}")
        daemon.wait_ready()
        refused = refused_count(daemon, HOST_A, port)
        assert [get(relay.listen_port, "p256.test") for _ in range(4)] == [HOST_B] * 4
        assert refused_count(daemon, HOST_A, port) == refused, daemon.describe()
        old_hce = hce_pid(daemon)
        os.kill(old_hce, 9)
        wait_until(lambda: hce_pid(daemon) != old_hce, 15, lambda: f"a new hce\n{daemon.describe()}")
        states = {h["host"]: h["state"] for h in ctl_hosts(daemon)}
    assert states == {HOST_A: "down", HOST_B: "up"}, states


def test_reload_replaces_the_hce(start_daemon: StartDaemon, pki: Pki) -> None:
    port = backend_port()
    cfg, relay = health_config(pki, port, prefork=1)
    with backends(port, (HOST_A, HOST_B)):
        daemon = start_daemon(cfg)
        wait_log(daemon, UP_LINE.format(host=re.escape(HOST_B)))
        old = hce_pid(daemon)
        daemon.proc.send_signal(1)  # SIGHUP
        wait_until(lambda: hce_pid(daemon) != old, 15, lambda: f"a new hce\n{daemon.describe()}")
        wait_until(lambda: old not in child_pids(daemon.parent_pid), 15, "the old hce to go")
        wait_until(lambda: {h["state"] for h in ctl_hosts(daemon)} == {"up"}, 10, "hosts up again")
        assert {get(relay.listen_port, "p256.test") for _ in range(4)} == {HOST_A, HOST_B}


def test_ctl_show_hosts_lists_unchecked_and_disabled_hosts(start_daemon: StartDaemon, pki: Pki) -> None:
    port = backend_port()
    relay = RelaySpec("web", free_port(), port, [pki["p256"]], forward_host="<web>",
                      options=[f"forward to <off> port {port}"])
    cfg = DaemonConfig([relay], prefork=1, globals=[f"table <web> {{ {HOST_A} }}",
                                                    f"table <off> disable {{ {HOST_C} }}"])
    daemon = start_daemon(cfg)
    hosts = [(h["host"], h["table"], h["state"]) for h in ctl_hosts(daemon)]
    assert hosts == [(HOST_A, "<web>", "up (no check)"), (HOST_C, "<off>", "disabled")]
    out = subprocess.run(pyprivsep_command("ctl", "-s", str(daemon.workdir / "ctl.sock"), "show", "hosts"),
                         env=pyprivsep_env(), capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and "<off> (fallback)" in out.stdout and "disabled" in out.stdout, out
    # no check anywhere: no hce
    assert not any(proc_title(p) == "pyprivsep: hce" for p in child_pids(daemon.parent_pid))


def test_checks_run_at_once_so_a_hanging_host_delays_no_other(http_backend: HttpBackend) -> None:
    """The hce may not start threads (seccomp): its checks share one
    selector.  Two hosts that hang for their 300 ms and one that answers:
    the answer comes at once, and the round takes one timeout, not two."""
    port = backend_port()
    results: dict[int, tuple[float, bool, str]] = {}
    start = time.monotonic()
    with silent_backend(HOST_B, port), silent_backend(HOST_C, port), \
            selectors.DefaultSelector() as sel:
        running = checks.Checks(sel, checks.tls_context(),
                                lambda t, up, ms, why: results.__setitem__(
                                    t.host.id, (time.monotonic() - start, up, why)))
        http = Check("http", path="/", code=200)
        for i, (addr, p) in enumerate([(HOST_B, port), (HOST_C, port), (LOCALHOST, http_backend.port)]):
            running.start(target(p, http, 300, address=addr, host_id=i))
        while running.jobs:
            deadline = running.next_deadline()
            assert deadline is not None
            for key, _mask in sel.select(max(deadline - time.monotonic(), 0)):
                running.event(key.data)
            running.expire(time.monotonic())
    took = time.monotonic() - start
    assert results[2][1:] == (True, "http code 200 ok") and results[2][0] < 0.25, results
    assert [results[i][1:] for i in (0, 1)] == [(False, "timeout")] * 2, results
    assert 0.29 <= took < 0.55, took
