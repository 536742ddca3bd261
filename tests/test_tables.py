"""Tables of backends: relayd's `table <name> { ... }`, the relay modes
(`forward to <table> port N mode M`), the retry of another host when a
connect is refused, and the fallback table (a second `forward to`)."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from basics import LOCALHOST, free_port, wait_until
from daemonctl import DaemonConfig, RelaySpec, StartDaemon, pyprivsep_command, pyprivsep_env, run_pyprivsep
from keypairs import Pki
from hosts import HOST_A, HOST_B, HOST_C, PAGE, WHO, backend_port, backends, get
from tlsclients import client_context

def table_config(pki: Pki, port: int, forward: str, *, options: Sequence[str] = (),
                 tables: Sequence[str] = (), prefork: int = 1) -> tuple[DaemonConfig, RelaySpec]:
    relay = RelaySpec("web", free_port(), port, [pki["p256"]], forward_host=forward,
                      options=list(options))
    return DaemonConfig([relay], prefork=prefork, globals=list(tables)), relay


TWO = f"table <web> {{ {HOST_A}, {HOST_B} }}"


def test_roundrobin_alternates(start_daemon: StartDaemon, pki: Pki) -> None:
    port = backend_port()
    cfg, relay = table_config(pki, port, "<web>", tables=[TWO])
    with backends(port, (HOST_A, HOST_B)):
        start_daemon(cfg)
        seen = [get(relay.listen_port, "p256.test") for _ in range(6)]
    # one relay process: its rotation, host after host
    assert seen in ([HOST_A, HOST_B] * 3, [HOST_B, HOST_A] * 3), seen


@pytest.mark.parametrize("mode, net", [("source-hash", "127.0.1"), ("loadbalance", "127.0.2")])
def test_client_hashing_modes_are_stable_per_client_and_spread(
        start_daemon: StartDaemon, pki: Pki, mode: str, net: str) -> None:
    """source-hash (the client's address) and loadbalance (relayd: that
    and the local address and port; one listener here): each client
    always the same host, whichever relay process; the clients spread
    over both hosts."""
    port = backend_port()
    relay = RelaySpec("web", free_port(), port, [pki["p256"]], forward_host="<web>",
                      forward_options=f"mode {mode}")
    cfg = DaemonConfig([relay], prefork=2, globals=[TWO])
    sources = [f"{net}.{i}" for i in range(1, 13)]
    with backends(port, (HOST_A, HOST_B)):
        start_daemon(cfg)
        chosen = {src: {get(relay.listen_port, "p256.test", source=src) for _ in range(4)}
                  for src in sources}
    assert all(len(hosts) == 1 for hosts in chosen.values()), chosen
    assert {h for hosts in chosen.values() for h in hosts} == {HOST_A, HOST_B}, chosen


def test_hash_depends_on_the_listener_only(start_daemon: StartDaemon, pki: Pki) -> None:
    """relayd's hash: the local address and port, not the client's.  Every
    client of one listener, from either relay process, gets one host."""
    port = backend_port()
    relay = RelaySpec("web", free_port(), port, [pki["p256"]], forward_host="<web>",
                      forward_options="mode hash")
    cfg = DaemonConfig([relay], prefork=2, globals=[TWO])
    with backends(port, (HOST_A, HOST_B)):
        start_daemon(cfg)
        seen = {get(relay.listen_port, "p256.test", source=f"127.0.3.{i}")
                for i in range(1, 13)}
    assert len(seen) == 1 and seen <= {HOST_A, HOST_B}, seen


def test_random_uses_every_host_of_the_table(start_daemon: StartDaemon, pki: Pki) -> None:
    """mode random: 40 connections, from one client, reach both hosts (all
    on one: odds 2**-39) and no other."""
    port = backend_port()
    relay = RelaySpec("web", free_port(), port, [pki["p256"]], forward_host="<web>",
                      forward_options="mode random")
    cfg = DaemonConfig([relay], prefork=1, globals=[TWO])
    with backends(port, (HOST_A, HOST_B, HOST_C)):
        start_daemon(cfg)
        seen = [get(relay.listen_port, "p256.test") for _ in range(40)]
    assert set(seen) == {HOST_A, HOST_B}, seen


def test_least_states_prefers_the_idle_host(start_daemon: StartDaemon, pki: Pki) -> None:
    port = backend_port()
    relay = RelaySpec("web", free_port(), port, [pki["p256"]], forward_host="<web>",
                      forward_options="mode least-states")
    cfg = DaemonConfig([relay], prefork=1, globals=[TWO])
    with backends(port, (HOST_A, HOST_B)):
        start_daemon(cfg)
        time.sleep(0.3)                 # the readiness probes' connections end
        ctx = client_context()
        # a long connection: it holds one host
        with socket.create_connection((LOCALHOST, relay.listen_port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="p256.test") as held:
            held.sendall(b"GET / HTTP/1.0\r\n")     # not finished: it stays
            time.sleep(0.3)
            seen = []
            for _ in range(6):
                seen.append(get(relay.listen_port, "p256.test"))
                time.sleep(0.05)
            held.sendall(b"\r\n")
            answer = b""
            with contextlib.suppress(ssl.SSLEOFError, ConnectionResetError):
                while chunk := held.recv(65536):
                    answer += chunk
    held_by = WHO.get(answer.partition(b"\r\n\r\n")[2])
    assert held_by in (HOST_A, HOST_B), answer
    idle = HOST_B if held_by == HOST_A else HOST_A
    # while one host has a connection open, every new one goes to the other
    assert seen == [idle] * 6, (held_by, seen)


def test_refused_connect_retries_another_host(start_daemon: StartDaemon, pki: Pki) -> None:
    """A: nothing listens.  Every request is served, by B: the refusal is
    retried on the next host, and no client sees it."""
    port = backend_port()
    cfg, relay = table_config(pki, port, "<web>", tables=[TWO])
    with backends(port, (HOST_B,)):
        daemon = start_daemon(cfg)
        seen = [get(relay.listen_port, "p256.test") for _ in range(6)]
    assert seen == [HOST_B] * 6, seen
    assert "Connection refused" in daemon.stderr_text()


def test_fallback_table_when_the_first_refuses(start_daemon: StartDaemon, pki: Pki) -> None:
    port = backend_port()
    tables = [f"table <web> {{ {HOST_A} }}", f"table <backup> {{ {HOST_C} }}"]
    cfg, relay = table_config(pki, port, "<web>", tables=tables,
                              options=[f"forward to <backup> port {port}"])
    with backends(port, (HOST_C,)):
        start_daemon(cfg)
        seen = [get(relay.listen_port, "p256.test") for _ in range(4)]
    assert seen == [HOST_C] * 4, seen


def test_disabled_table_is_never_used(start_daemon: StartDaemon, pki: Pki) -> None:
    port = backend_port()
    tables = [f"table <web> disable {{ {HOST_A}, {HOST_B} }}", f"table <backup> {{ {HOST_C} }}"]
    cfg, relay = table_config(pki, port, "<web>", tables=tables,
                              options=[f"forward to <backup> port {port} mode random"])
    with backends(port, (HOST_A, HOST_B, HOST_C)):
        start_daemon(cfg)
        seen = [get(relay.listen_port, "p256.test") for _ in range(4)]
    assert seen == [HOST_C] * 4, seen


def test_table_forward_takes_proxy_protocol(tmp_path: Path, pki: Pki) -> None:
    """`forward to <table> ... proxy protocol v2` passes `pyprivsep -n`
    (test_proxy_alpn.py runs the address form end to end)."""
    conf = tmp_path / "t.conf"
    relay = RelaySpec("web", free_port(), 80, [pki["p256"]], forward_host="<web>",
                      forward_options="mode hash proxy protocol v2",
                      options=[f"forward to {HOST_C} port 81 proxy protocol v2"])
    conf.write_text(DaemonConfig([relay], globals=[TWO]).render())
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 0, proc.stderr


def test_unresolvable_table_host_names_the_table_line(tmp_path: Path, pki: Pki) -> None:
    conf = tmp_path / "t.conf"
    relay = RelaySpec("web", free_port(), 80, [pki["p256"]], forward_host="<web>")
    conf.write_text(DaemonConfig([relay], globals=["table <web> {", f" {HOST_A}",
                                                   " no-such-host.invalid", "}"]).render())
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode != 0
    # line 1 is "prefork", the table opens on line 2
    assert f"{conf}:2: table <web>: cannot resolve no-such-host.invalid" in proc.stderr, proc.stderr


@contextlib.contextmanager
def blackhole(host: str, port: int) -> Iterator[None]:
    """A host that drops SYNs: a listener whose accept queue (backlog 0:
    one connection) is full, so the kernel answers no new connect."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(0)
        filler.connect((host, port))
        yield


def test_connect_without_answer_moves_on_to_another_host(start_daemon: StartDaemon, pki: Pki) -> None:
    """A: drops the SYN.  After PPS_CONNECT_TIMEOUT (5 s) the relay tries
    B: the client waits, but is served."""
    port = backend_port()
    cfg, relay = table_config(pki, port, "<web>", tables=[TWO])
    with backends(port, (HOST_B,)), blackhole(HOST_A, port):
        daemon = start_daemon(cfg)
        started = time.monotonic()
        seen = [get(relay.listen_port, "p256.test", timeout=20) for _ in range(2)]
        took = time.monotonic() - started
    assert seen == [HOST_B] * 2, seen
    assert 4.5 < took < 15, took
    assert f"backend: Connection timed out (host {HOST_A}:{port})" in daemon.stderr_text()


def test_show_sessions_names_the_backend_host(start_daemon: StartDaemon, pki: Pki) -> None:
    port = backend_port()
    cfg, relay = table_config(pki, port, "<web>", tables=[f"table <web> {{ {HOST_B} }}"])
    with backends(port, (HOST_B,)):
        daemon = start_daemon(cfg)
        ctx = client_context()
        with socket.create_connection((LOCALHOST, relay.listen_port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="p256.test") as held:
            held.sendall(b"GET / HTTP/1.0\r\n")
            client = f"{LOCALHOST}:{held.getsockname()[1]}"

            def mine() -> list[dict[str, object]]:
                out = subprocess.run(pyprivsep_command("ctl", "-j", "-s", str(daemon.workdir / "ctl.sock"),
                                                       "show", "sessions"),
                                     env=pyprivsep_env(), capture_output=True, text=True, timeout=20)
                return [s for s in json.loads(out.stdout)["sessions"]
                        if s["client"] == client and s["state"] == "relaying"]
            sessions = wait_until(mine, 10, "the session, relaying")
    assert sessions[0]["backend"] == f"{HOST_B}:{port}", sessions
