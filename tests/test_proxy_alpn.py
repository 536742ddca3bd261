"""PROXY protocol v1/v2 towards the backend, and ALPN (`tls alpn`).

The backend (tests/proxybackend.py) parses the header strictly and answers
with what it found; the clients are Python's ssl, whose socket tells the
client's own address and port, and ``openssl s_client -alpn``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from basics import LOCALHOST, MIB, free_port, sha256
from daemonctl import Daemon, DaemonConfig, RelaySpec, run_pyprivsep
from keypairs import KeyPair, Pki
from proxybackend import V2_SIGNATURE, ProxyBackend
from tlsclients import NO_TLS13_RESUMPTION, TLS13_RESUMES, TlsVersion, client_context, s_client

LINE = b"hello through the relay\n"
ALPN = "h2,http/1.1"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = _ipv6_loopback()
HOSTS = [LOCALHOST, pytest.param("::1", marks=pytest.mark.skipif(not IPV6, reason="no ::1 here"))]


@dataclass(frozen=True)
class Env:
    daemon: Daemon
    kp: KeyPair
    ports: dict[str, int]  # relay name -> its port (127.0.0.1, and ::1 when there is IPv6)
    backends: dict[str, ProxyBackend]


# relay name -> (forward options, block options)
RELAYS = {
    "v1": ("proxy protocol v1", ()),
    "v2": ("proxy protocol v2", (f'tls alpn "{ALPN}"',)),
    "v2plain": ("proxy protocol v2", ()),  # no tls alpn: no ALPN at all
    "off": ("", (f'tls alpn "{ALPN}"',)),  # no PROXY header: the default
}


@pytest.fixture(scope="module")
def env(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    kp = pki["rsa2048"]
    with contextlib.ExitStack() as stack:
        backends = {name: stack.enter_context(ProxyBackend()) for name in RELAYS}
        ports = {name: free_port() for name in RELAYS}
        specs = [
            RelaySpec(name, ports[name], backends[name].port, [kp], forward_options=fwd,
                      options=[*opts, *([f"listen on ::1 port {ports[name]} tls"] if IPV6 else [])])
            for name, (fwd, opts) in RELAYS.items()
        ]
        daemon = Daemon(tmp_path_factory.mktemp("proxy"), DaemonConfig(specs, prefork=1))
        with daemon:
            daemon.start()
            yield Env(daemon, kp, ports, backends)
            assert daemon.stop() == 0, daemon.describe()


@dataclass(frozen=True)
class Exchange:
    client: tuple[str, int]  # the client socket's own address and port
    answer: bytes  # what the backend said, through the relay
    alpn: str | None  # what the client's handshake negotiated
    version: str | None
    cipher: str | None

    def parsed(self) -> dict[str, Any]:
        assert self.answer.startswith(b"{"), f"the backend did not parse a header: {self.answer!r}"
        return json.loads(self.answer)


def exchange(env: Env, relay: str, host: str = LOCALHOST, alpn: list[str] | None = None) -> Exchange:
    """One connection through a relay: send a line, read the backend's answer."""
    ctx = client_context(cafile=env.kp.cert_path)
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as raw:
        raw.settimeout(20)
        raw.connect((host, env.ports[relay]))
        client = raw.getsockname()[:2]
        with ctx.wrap_socket(raw, server_hostname=env.kp.dns_name) as tls:
            tls.sendall(LINE)
            chunks = []
            with contextlib.suppress(ssl.SSLEOFError, ConnectionResetError):
                while chunk := tls.recv(65536):
                    chunks.append(chunk)
            cipher = tls.cipher()
            return Exchange(client, b"".join(chunks), tls.selected_alpn_protocol(), tls.version(),
                            cipher[0] if cipher else None)


def _addr(host: str) -> str:
    return "::1" if ":" in host else host


# -- PROXY protocol: the client's address, and where it connected to ----------


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("version", [1, 2])
def test_backend_sees_client_and_local_address(env: Env, host: str, version: int) -> None:
    ex = exchange(env, f"v{version}", host)
    got = ex.parsed()
    family = "TCP6" if ":" in host else "TCP4"
    assert (got["version"], got["family"]) == (version, family), got
    assert got["src"] == [_addr(host), ex.client[1]], f"client was {ex.client}: {got}"
    assert got["dst"] == [_addr(host), env.ports[f"v{version}"]], got
    # the client's bytes follow the header unchanged
    assert got["line"] == LINE.decode().rstrip("\n"), got


def test_v2_carries_tls_version_cipher_and_server_name(env: Env) -> None:
    ex = exchange(env, "v2plain")
    assert ex.parsed()["tlvs"]["authority"] == env.kp.dns_name  # the client's SNI
    ssl_tlv = ex.parsed()["tlvs"]["ssl"]
    assert ssl_tlv["client"] & 0x01, ssl_tlv  # PP2_CLIENT_SSL
    assert not ssl_tlv["client"] & 0x06, ssl_tlv  # no client certificate asked for
    assert ssl_tlv["verify"] != 0, ssl_tlv  # ... so none was verified
    assert (ssl_tlv["version"], ssl_tlv["cipher"]) == (ex.version, ex.cipher), ssl_tlv


def test_every_connection_gets_its_own_header(env: Env) -> None:
    ports = {exchange(env, "v2").client[1] for _ in range(5)}
    seen = [r["src"][1] for r in env.backends["v2"].results if isinstance(r, dict)]
    assert ports <= set(seen), f"clients {ports}, backend saw {seen}"


@pytest.mark.parametrize("relay", ["v1", "v2"])
def test_bytes_after_the_header_pass_unchanged(env: Env, relay: str) -> None:
    """4 MiB each way behind the header: the header is sent once, before
    them, and nothing of the client's is lost or reordered around it."""
    payload = os.urandom(4 * MIB)

    async def run() -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection(
            LOCALHOST, env.ports[relay], ssl=client_context(cafile=env.kp.cert_path),
            server_hostname=env.kp.dns_name)

        async def send() -> None:
            writer.write(b"ECHO\n")
            for offset in range(0, len(payload), 256 * 1024):
                writer.write(payload[offset : offset + 256 * 1024])
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            answer = await asyncio.wait_for(reader.readline(), 30)
            echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 60)
            await sender
        finally:
            writer.close()
        return answer, echoed

    answer, echoed = asyncio.run(run())
    assert json.loads(answer)["version"] == int(relay[1]), answer
    assert sha256(echoed) == sha256(payload)


def test_no_header_unless_configured(env: Env) -> None:
    """`off` forwards to the same strict backend without `proxy protocol`:
    the client's bytes come first, and the backend says it got no header."""
    ex = exchange(env, "off", alpn=["h2"])
    assert ex.answer.startswith(b"ERROR no PROXY header"), ex.answer
    assert ex.alpn == "h2"  # ALPN works without the PROXY protocol


# -- ALPN ----------------------------------------------------------------------


def test_s_client_sees_alpn_and_backend_gets_the_tlv(env: Env) -> None:
    result = s_client(env.ports["v2"], servername=env.kp.dns_name, request=LINE, extra=["-alpn", "h2"])
    assert "ALPN protocol: h2" in result.stdout, result.describe()
    answer = next(line for line in result.stdout.splitlines() if line.startswith("{"))
    assert json.loads(answer)["tlvs"]["alpn"] == "h2", result.describe()


def test_s_client_without_alpn_gets_no_tlv(env: Env) -> None:
    result = s_client(env.ports["v2"], request=LINE, extra=["-noservername"])
    assert "No ALPN negotiated" in result.stdout, result.describe()
    answer = next(line for line in result.stdout.splitlines() if line.startswith("{"))
    tlvs = json.loads(answer)["tlvs"]
    # nor a server name: s_client sent no SNI
    assert "alpn" not in tlvs and "authority" not in tlvs, result.describe()


@pytest.mark.parametrize("offered, chosen", [
    (["http/1.1", "h2"], "h2"),  # the server's order, not the client's
    (["http/1.1"], "http/1.1"),
    (["spdy/3", "http/1.1"], "http/1.1"),
])
def test_alpn_picks_in_server_order(env: Env, offered: list[str], chosen: str) -> None:
    ex = exchange(env, "v2", alpn=offered)
    assert ex.alpn == chosen
    assert ex.parsed()["tlvs"]["alpn"] == chosen


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_resumed_session_gets_alpn_and_header(env: Env, tmp_path: Path, version: TlsVersion) -> None:
    if version == "1.3" and not TLS13_RESUMES:
        pytest.skip(NO_TLS13_RESUMPTION)
    session = tmp_path / "session.pem"
    args = {"servername": env.kp.dns_name, "version": version, "request": LINE}
    first = s_client(env.ports["v2"], sess_out=session, extra=["-alpn", "h2"], **args)
    assert first.handshake_ok and first.reused is False, first.describe()
    again = s_client(env.ports["v2"], sess_in=session, extra=["-alpn", "http/1.1,h2"], **args)
    assert again.reused is True, again.describe()
    assert "ALPN protocol: h2" in again.stdout, again.describe()
    answer = next(line for line in again.stdout.splitlines() if line.startswith("{"))
    assert json.loads(answer)["tlvs"]["alpn"] == "h2", again.describe()


def test_alpn_without_overlap_goes_on_without_alpn(env: Env) -> None:
    ex = exchange(env, "v2", alpn=["spdy/3", "imap"])
    assert ex.alpn is None
    got = ex.parsed()
    assert "alpn" not in got["tlvs"] and got["line"] == LINE.decode().rstrip("\n"), got


def test_relay_without_tls_alpn_negotiates_none(env: Env) -> None:
    ex = exchange(env, "v2plain", alpn=["h2"])
    assert ex.alpn is None
    assert "alpn" not in ex.parsed()["tlvs"]


# -- the test backend itself: strict -------------------------------------------

V2_TCP4 = V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([127, 0, 0, 1, 127, 0, 0, 2]) + b"\x04\xd2\x16\x2e"

GOOD = [
    b"PROXY TCP4 127.0.0.1 127.0.0.2 1234 5678\r\n",
    b"PROXY TCP6 ::1 ::1 1234 5678\r\n",
    b"PROXY UNKNOWN\r\n",
    V2_TCP4,
    V2_SIGNATURE + b"\x21\x11\x00\x11" + V2_TCP4[16:] + b"\x01\x00\x02h2",
]

BAD = {
    "no-header": b"GET / HTTP/1.0\r\n",
    "v1-lf-only": b"PROXY TCP4 127.0.0.1 127.0.0.2 1234 5678\n",
    "v1-two-spaces": b"PROXY TCP4  127.0.0.1 127.0.0.2 1234 5678\r\n",
    "v1-bad-family": b"PROXY UDP4 127.0.0.1 127.0.0.2 1234 5678\r\n",
    "v1-v6-as-tcp4": b"PROXY TCP4 ::1 ::1 1234 5678\r\n",
    "v1-leading-zero": b"PROXY TCP4 127.0.0.01 127.0.0.2 1234 5678\r\n",
    "v1-port-high": b"PROXY TCP4 127.0.0.1 127.0.0.2 65536 5678\r\n",
    "v1-missing-port": b"PROXY TCP4 127.0.0.1 127.0.0.2 1234\r\n",
    "v1-too-long": b"PROXY TCP6 " + b"1" * 120 + b"\r\n",
    "v2-bad-signature": b"\r\n\r\n\x00\r\nQUIX\n" + V2_TCP4[12:],
    "v2-version-1": V2_TCP4[:12] + b"\x11" + V2_TCP4[13:],
    "v2-command-2": V2_TCP4[:12] + b"\x22" + V2_TCP4[13:],
    "v2-udp": V2_TCP4[:13] + b"\x12" + V2_TCP4[14:],
    "v2-short-addresses": V2_SIGNATURE + b"\x21\x11\x00\x08" + V2_TCP4[16:24],
    "v2-tlv-overrun": V2_SIGNATURE + b"\x21\x11\x00\x11" + V2_TCP4[16:] + b"\x01\x00\x09h2",
    "v2-tlv-truncated": V2_SIGNATURE + b"\x21\x11\x00\x0e" + V2_TCP4[16:] + b"\x01\x00",
    "v2-empty-alpn": V2_SIGNATURE + b"\x21\x11\x00\x0f" + V2_TCP4[16:] + b"\x01\x00\x00",
    "v2-short-ssl": V2_SIGNATURE + b"\x21\x11\x00\x10" + V2_TCP4[16:] + b"\x20\x00\x01\x01",
}


def _raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection((LOCALHOST, port), timeout=10) as sock:
        sock.sendall(data + LINE)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture(scope="module")
def lone_backend() -> Iterator[ProxyBackend]:
    with ProxyBackend() as backend:
        yield backend


@pytest.mark.parametrize("header", GOOD, ids=range(len(GOOD)))
def test_backend_accepts_well_formed_headers(lone_backend: ProxyBackend, header: bytes) -> None:
    answer = _raw_exchange(lone_backend.port, header)
    assert answer.startswith(b"{"), answer


@pytest.mark.parametrize("header", BAD.values(), ids=BAD.keys())
def test_backend_rejects_malformed_headers(lone_backend: ProxyBackend, header: bytes) -> None:
    answer = _raw_exchange(lone_backend.port, header)
    assert answer.startswith(b"ERROR "), answer


# -- configuration: pyprivsep -n -----------------------------------------------


@pytest.mark.parametrize("line, message", [
    ("forward to 127.0.0.1 port 8080 proxy protocol v3", 'proxy protocol "v3": expected "v1" or "v2"'),
    ('tls alpn "h2,,http/1.1"', 'tls alpn "h2,,http/1.1": an empty name is not a protocol name'),
])
def test_check_names_file_and_line(pki: Pki, tmp_path: Path, line: str, message: str) -> None:
    kp = pki["rsa2048"]
    conf = tmp_path / "bad.conf"
    forward = "" if line.startswith("forward") else "    forward to 127.0.0.1 port 8080\n"
    conf.write_text(f'relay "r" {{\n    listen on 127.0.0.1 port {free_port()} tls\n{forward}    {line}\n'
                    f'    tls certificate "{kp.cert_path}" key "{kp.key_path}"\n}}\n')
    lineno = 3 if not forward else 4
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{conf}:{lineno}: {message}" in proc.stderr, proc.stderr


def test_check_accepts_proxy_and_alpn(pki: Pki, tmp_path: Path) -> None:
    kp = pki["rsa2048"]
    conf = tmp_path / "good.conf"
    conf.write_text(f'relay "r" {{\n    listen on 127.0.0.1 port {free_port()} tls\n'
                    "    forward to 127.0.0.1 port 8080 proxy protocol v2\n"
                    f'    tls alpn "{ALPN}"\n'
                    f'    tls certificate "{kp.cert_path}" key "{kp.key_path}"\n}}\n')
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 0 and "configuration OK" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
