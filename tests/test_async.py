"""Asynchronous key operations: a relay keeps serving while its ca works.

The ca is stalled from the outside, frozen in a cgroup v1 freezer (the
``freezer`` fixture: no signal it or its parent could see, and the parent
replaces a child it finds stopped), so that the difference between
`keyops async` and `keyops blocking` is large and plain: an established
session's round trip while handshakes wait for the ca.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

from backends import EchoServer
from basics import LOCALHOST, free_port, wait_until
from daemonctl import DaemonConfig, RelaySpec, StartDaemon
from keypairs import KeyPair, Pki
from procs import Freezer
from pyprivsep import native
from tlsclients import client_context, handshake_succeeds

pytestmark = pytest.mark.skipif(not native.async_supported(),
                                reason="this TLS library has no ASYNC (LibreSSL)")

STALL_S = 3.0                   # how long the ca stays frozen


@dataclass(frozen=True)
class KeyopsConfig(DaemonConfig):
    """DaemonConfig plus global lines (keyops mode, timeouts)."""

    extra: tuple[str, ...] = ()

    def render(self) -> str:
        return "\n".join(self.extra) + "\n" + super().render()


def relay_for(pki: Pki, backend: EchoServer, key: str = "rsa2048") -> RelaySpec:
    return RelaySpec("www", free_port(), backend.port, [pki[key]])


def session_rtt_ms(tls: ssl.SSLSocket) -> float:
    start = time.perf_counter()
    tls.sendall(b"ping")
    got = b""
    while len(got) < 4:
        got += tls.recv(4 - len(got))
    return (time.perf_counter() - start) * 1000


@pytest.mark.parametrize("mode", ["async", "blocking"])
def test_stalled_ca_stalls_sessions_only_when_blocking(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon,
    freezer: Freezer, mode: str,
) -> None:
    relay = relay_for(pki, echo_backend)
    daemon = start_daemon(KeyopsConfig([relay], prefork=1,
                                       extra=(f"keyops {mode}", "tls keyop timeout 20000")))
    (ca_pid,) = daemon.ca_pids().values()
    stall_ms = STALL_S * 1000
    ctx = client_context()
    with socket.create_connection((LOCALHOST, relay.listen_port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname=relay.keypairs[0].dns_name) as tls:
        before = max(session_rtt_ms(tls) for _ in range(5))
        # the ca stalls for STALL_S while eight handshakes wait for it;
        # sample the session's round trip for as long as it stalls
        freezer.freeze(ca_pid)
        thawed_at = time.monotonic() + STALL_S
        thaw = threading.Timer(STALL_S, freezer.thaw)
        thaw.start()
        try:
            clients = [subprocess.Popen(
                ["openssl", "s_client", "-connect", f"{LOCALHOST}:{relay.listen_port}", "-brief"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for _ in range(8)]
            during = []
            while time.monotonic() < thawed_at:
                during.append(session_rtt_ms(tls))
                time.sleep(0.01)
        finally:
            thaw.join()
        for c in clients:
            c.wait(timeout=60)
    assert all(c.returncode == 0 for c in clients), daemon.describe()
    if mode == "async":
        # the relay's loop never waits for the ca: round trips stay short
        assert max(during) < stall_ms / 6, (before, during)
    else:
        # relayd's model: the whole relay process waits for its ca
        assert max(during) > stall_ms / 3, (before, during)


async def one_handshake(port: int, name: str, ctx: ssl.SSLContext) -> bool:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(LOCALHOST, port, ssl=ctx, server_hostname=name),
            timeout=60)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.transport.abort()        # no close_notify wait: the handshake is what counts
    return True


async def many_handshakes(port: int, name: str, n: int) -> list[bool]:
    ctx = client_context()
    return list(await asyncio.gather(*(one_handshake(port, name, ctx) for _ in range(n))))


def relay_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_thousand_concurrent_handshakes_on_one_relay(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon,
) -> None:
    relay = relay_for(pki, echo_backend, "p256")
    daemon = start_daemon(KeyopsConfig([relay], prefork=1,
                                       extra=("keyops async", "tls keyop timeout 20000")))
    (relay_pid,) = daemon.relay_pids().values()
    results = asyncio.run(many_handshakes(relay.listen_port, relay.keypairs[0].dns_name, 1000))
    assert results.count(True) == 1000, f"{results.count(False)} failed\n{daemon.describe()}"
    assert daemon.relay_pids() == {1: relay_pid}


def test_killing_the_ca_fails_paused_handshakes_and_leaks_nothing(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon,
    freezer: Freezer,
) -> None:
    relay = relay_for(pki, echo_backend)
    name = relay.keypairs[0].dns_name
    daemon = start_daemon(KeyopsConfig([relay], prefork=1,
                                       extra=("keyops async", "tls keyop timeout 1000")))
    (relay_pid,) = daemon.relay_pids().values()
    (ca_pid,) = daemon.ca_pids().values()
    baseline_fds = relay_fds(relay_pid)

    async def storm() -> list[bool]:
        freezer.freeze(ca_pid)
        task = asyncio.ensure_future(many_handshakes(relay.listen_port, name, 300))
        # hundreds paused, waiting for the stalled ca, past their keyop
        # timeout: the requests still queued would reach the new ca too late
        await asyncio.sleep(1.5)
        os.kill(ca_pid, signal.SIGKILL)
        freezer.thaw()                  # a frozen task takes its SIGKILL once thawed
        return await task

    start = time.monotonic()
    results = asyncio.run(storm())
    elapsed = time.monotonic() - start
    # some finished through the new ca; the rest failed with an alert once
    # their keyop timeout passed -- none hung
    assert results.count(False) > 0, "the kill failed no handshake: it came too late"
    assert elapsed < 30, f"handshakes hung for {elapsed:.1f} s"
    assert daemon.relay_pids() == {1: relay_pid}, daemon.describe()
    wait_until(lambda: daemon.ca_pids() not in ({}, {1: ca_pid}), timeout=5,
               what="a new ca")
    wait_until(lambda: handshake_succeeds(relay.listen_port, name), timeout=10,
               what="a handshake through the new ca")
    # every paused job ended with its connection: no descriptor left behind
    wait_until(lambda: relay_fds(relay_pid) <= baseline_fds, timeout=10,
               what=lambda: f"the relay to hold {baseline_fds} fds, not {relay_fds(relay_pid)}")


def test_rsa8192_handshakes_at_once_all_succeed(
    rsa8192: KeyPair, echo_backend: EchoServer, start_daemon: StartDaemon,
) -> None:
    """32 concurrent handshakes on one relay with an RSA-8192 key (~40 ms a
    signature, 1.2 s for all): the ca answered a batch only once all of it
    was signed, so with the default 1 s keyop timeout only 1 of 32 succeeded.
    The timeout here is long, so that only the ca's order matters and a
    loaded machine cannot fail the test; tests/test_ca_hostile.py checks the
    order itself, on the wire."""
    relay = RelaySpec("www", free_port(), echo_backend.port, [rsa8192])
    daemon = start_daemon(KeyopsConfig([relay], prefork=1,
                                       extra=("keyops async", "tls keyop timeout 5000")))
    results = asyncio.run(many_handshakes(relay.listen_port, rsa8192.dns_name, 32))
    assert results.count(True) == 32, f"{results.count(False)} failed\n{daemon.describe()}"


def test_handshake_timeout_while_waiting_for_the_ca_ends_the_paused_job(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon,
    freezer: Freezer,
) -> None:
    """A connection closed while its handshake waits for the ca: the relay
    fails that key operation, runs the paused job to its end and frees it
    all (keyop_abandon), then drops the ca's late reply and goes on."""
    # the ca stalls (frozen) until the handshakes have timed out (after 2 to
    # 4 s, test_clients.py: the sweep's rounding) while their requests wait
    # in it; thawed, it answers them late
    relay = relay_for(pki, echo_backend)
    daemon = start_daemon(KeyopsConfig([relay], prefork=1, extra=(
        "keyops async", "tls keyop timeout 20000", "tls handshake timeout 3",
        "log errors")))
    (relay_pid,) = daemon.relay_pids().values()
    (ca_pid,) = daemon.ca_pids().values()
    baseline_fds = relay_fds(relay_pid)
    freezer.freeze(ca_pid)
    clients = [subprocess.Popen(
        ["openssl", "s_client", "-connect", f"{LOCALHOST}:{relay.listen_port}", "-brief"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(4)]
    try:
        wait_until(lambda: daemon.stderr_text().count("handshake timeout") >= 2, timeout=15,
                   what="two handshakes to time out while they wait for the ca")
    finally:
        freezer.thaw()
        for c in clients:
            c.kill()
            c.wait(timeout=10)
    assert daemon.relay_pids() == {1: relay_pid}, daemon.describe()
    wait_until(lambda: relay_fds(relay_pid) <= baseline_fds, timeout=10,
               what=lambda: f"the relay to hold {baseline_fds} fds, not {relay_fds(relay_pid)}")
