"""Asynchronous key operations: a relay keeps serving while its ca works.

The ca is slowed on purpose (PYPRIVSEP_TEST_CA_DELAY_MS, test only) so that
the difference between `keyops async` and `keyops blocking` is large and
plain: an established session's round trip while handshakes wait for the ca.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass

import pytest

from util import (
    LOCALHOST,
    DaemonConfig,
    EchoServer,
    Pki,
    RelaySpec,
    StartDaemon,
    client_context,
    free_port,
    handshake_succeeds,
    wait_until,
)
from pyprivsep import native

pytestmark = pytest.mark.skipif(not native.async_supported(),
                                reason="this TLS library has no ASYNC (LibreSSL)")

CA_DELAY_MS = 300


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
def test_slow_ca_stalls_sessions_only_when_blocking(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon,
    monkeypatch: pytest.MonkeyPatch, mode: str,
) -> None:
    monkeypatch.setenv("PYPRIVSEP_TEST_CA_DELAY_MS", str(CA_DELAY_MS))
    relay = relay_for(pki, echo_backend)
    daemon = start_daemon(KeyopsConfig([relay], prefork=1,
                                       extra=(f"keyops {mode}", "tls keyop timeout 5000")))
    ctx = client_context()
    with socket.create_connection((LOCALHOST, relay.listen_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=relay.keypairs[0].dns_name) as tls:
        before = max(session_rtt_ms(tls) for _ in range(5))
        # eight handshakes: the ca needs 8 x 300 ms for them; sample the
        # session's round trip for as long as they last
        clients = [subprocess.Popen(
            ["openssl", "s_client", "-connect", f"{LOCALHOST}:{relay.listen_port}", "-brief"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(8)]
        during = []
        deadline = time.monotonic() + 30
        try:
            while any(c.poll() is None for c in clients) and time.monotonic() < deadline:
                during.append(session_rtt_ms(tls))
                time.sleep(0.01)
        finally:
            for c in clients:
                c.wait(timeout=30)
    assert all(c.returncode == 0 for c in clients), daemon.describe()
    if mode == "async":
        # the relay's loop never waits for the ca: round trips stay short
        assert max(during) < CA_DELAY_MS / 2, (before, during)
    else:
        # relayd's model: the whole relay process waits for each signature
        assert max(during) > CA_DELAY_MS, (before, during)


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
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYPRIVSEP_TEST_CA_DELAY_MS", "20")
    relay = relay_for(pki, echo_backend)
    name = relay.keypairs[0].dns_name
    daemon = start_daemon(KeyopsConfig([relay], prefork=1,
                                       extra=("keyops async", "tls keyop timeout 1000")))
    (relay_pid,) = daemon.relay_pids().values()
    (ca_pid,) = daemon.ca_pids().values()
    baseline_fds = relay_fds(relay_pid)

    async def storm() -> list[bool]:
        task = asyncio.ensure_future(many_handshakes(relay.listen_port, name, 300))
        await asyncio.sleep(0.5)        # hundreds paused, waiting for the slow ca
        os.kill(ca_pid, signal.SIGKILL)
        return await task

    start = time.monotonic()
    results = asyncio.run(storm())
    elapsed = time.monotonic() - start
    # some finished before the kill or through the new ca; the rest failed
    # with an alert once their keyop timeout passed -- none hung
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


def test_handshake_timeout_while_waiting_for_the_ca_ends_the_paused_job(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection closed while its handshake waits for the ca: the relay
    fails that key operation, runs the paused job to its end and frees it
    all (keyop_abandon), then drops the ca's late reply and goes on."""
    # the ca answers one request each 1.5 s; a handshake times out after 2
    # to 4 s (test_clients.py: the sweep's rounding): of four at once, the
    # last two at least time out while their request waits in the ca
    monkeypatch.setenv("PYPRIVSEP_TEST_CA_DELAY_MS", "1500")
    relay = relay_for(pki, echo_backend)
    daemon = start_daemon(KeyopsConfig([relay], prefork=1, extra=(
        "keyops async", "tls keyop timeout 20000", "tls handshake timeout 3",
        "log errors")))
    (relay_pid,) = daemon.relay_pids().values()
    baseline_fds = relay_fds(relay_pid)
    clients = [subprocess.Popen(
        ["openssl", "s_client", "-connect", f"{LOCALHOST}:{relay.listen_port}", "-brief"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(4)]
    try:
        wait_until(lambda: daemon.stderr_text().count("handshake timeout") >= 2, timeout=15,
                   what="two handshakes to time out while they wait for the ca")
    finally:
        for c in clients:
            c.kill()
            c.wait(timeout=10)
    assert daemon.relay_pids() == {1: relay_pid}, daemon.describe()
    wait_until(lambda: relay_fds(relay_pid) <= baseline_fds, timeout=10,
               what=lambda: f"the relay to hold {baseline_fds} fds, not {relay_fds(relay_pid)}")
