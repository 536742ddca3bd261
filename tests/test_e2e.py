"""TLS termination, certificate selection, data integrity and session resumption."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from backends import BACKEND_PAGE, EchoServer, HttpBackend
from basics import MIB, free_port, pattern_bytes, sha256, sha256_file
from daemonctl import Daemon, DaemonConfig, RelaySpec, StartDaemon, simple_relay
from keypairs import KEY_NAMES, Pki
from tlsclients import (
    HTTP_GET_ROOT,
    NO_TLS13_RESUMPTION,
    TLS13_RESUMES,
    TlsVersion,
    curl,
    https_get,
    s_client,
    s_time,
    tls_echo_roundtrip,
)

VERSIONS: tuple[TlsVersion, ...] = ("1.2", "1.3")
BIG = 10 * MIB


@dataclass(frozen=True)
class RelayEnv:
    daemon: Daemon
    www_port: int  # relay "www": all four keypairs -> HTTP backend
    echo_port: int  # relay "echo": rsa2048 -> raw TCP echo backend
    http: HttpBackend
    echo: EchoServer


@pytest.fixture(scope="module")
def env(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayEnv]:
    """One prefork-2 daemon shared by this module's tests."""
    with HttpBackend() as http, EchoServer() as echo:
        www = RelaySpec("www", free_port(), http.port, [pki[name] for name in KEY_NAMES])
        echo_relay = RelaySpec("echo", free_port(), echo.port, [pki["rsa2048"]])
        daemon = Daemon(tmp_path_factory.mktemp("e2e"), DaemonConfig([www, echo_relay], prefork=2))
        with daemon:
            daemon.start()
            yield RelayEnv(daemon, www.listen_port, echo_relay.listen_port, http, echo)
            assert daemon.stop() == 0, daemon.describe()


# -- handshakes --------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("key_name", KEY_NAMES)
def test_handshake_selects_cert_by_sni_and_relays_get(
    env: RelayEnv, pki: Pki, key_name: str, version: TlsVersion
) -> None:
    kp = pki[key_name]
    result = s_client(env.www_port, servername=kp.dns_name, version=version, request=HTTP_GET_ROOT)
    assert result.handshake_ok, result.describe()
    assert result.protocol == f"TLSv{version}", result.describe()
    assert result.peer_certificate == kp.certificate, f"expected the {key_name} certificate\n{result.describe()}"
    assert result.server_temp_key, f"no ephemeral key exchange\n{result.describe()}"
    signature = result.peer_signature_type or ""
    assert signature.startswith("RSA" if kp.is_rsa else "ECDSA"), result.describe()
    if version == "1.2":
        auth = "RSA" if kp.is_rsa else "ECDSA"
        assert (result.cipher or "").startswith(f"ECDHE-{auth}-"), result.describe()
    assert "HTTP/1.0 200" in result.stdout, result.describe()
    assert BACKEND_PAGE.decode() in result.stdout, result.describe()


@pytest.mark.parametrize("cipher", ["AES128-SHA", "AES256-GCM-SHA384", "DHE-RSA-AES128-GCM-SHA256"])
def test_tls12_without_ecdhe_is_refused(env: RelayEnv, pki: Pki, cipher: str) -> None:
    result = s_client(env.www_port, servername=pki["rsa2048"].dns_name, version="1.2", cipher=cipher)
    assert not result.handshake_ok, f"non-ECDHE cipher {cipher} was accepted\n{result.describe()}"


def test_tls12_ecdhe_cipher_is_accepted(env: RelayEnv, pki: Pki) -> None:
    """Control for the refusal test: the same invocation with an ECDHE suite works."""
    cipher = "ECDHE-RSA-AES128-GCM-SHA256"
    result = s_client(env.www_port, servername=pki["rsa2048"].dns_name, version="1.2", cipher=cipher)
    assert result.handshake_ok and result.cipher == cipher, result.describe()


# -- curl --------------------------------------------------------------------


@pytest.mark.parametrize("key_name", KEY_NAMES)
def test_curl_get_verifies_certificate(env: RelayEnv, pki: Pki, key_name: str) -> None:
    kp = pki[key_name]
    proc = curl(env.www_port, kp.dns_name, cacert=kp.cert_path)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout == BACKEND_PAGE


def test_curl_get_large_response(env: RelayEnv, pki: Pki, tmp_path: Path) -> None:
    kp = pki["rsa2048"]
    out = tmp_path / "bytes.out"
    proc = curl(env.www_port, kp.dns_name, f"/bytes/{BIG}", cacert=kp.cert_path, output=out)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert sha256_file(out) == sha256(pattern_bytes(BIG))


@pytest.mark.parametrize("version", VERSIONS)
def test_curl_post_10mib_roundtrip(env: RelayEnv, pki: Pki, tmp_path: Path, version: TlsVersion) -> None:
    kp = pki["p256"]
    body, out = tmp_path / "body.bin", tmp_path / "echo.out"
    body.write_bytes(os.urandom(BIG))
    proc = curl(env.www_port, kp.dns_name, "/echo", cacert=kp.cert_path, data_file=body, output=out, version=version)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert out.stat().st_size == BIG
    assert sha256_file(out) == sha256_file(body)


# -- raw TCP relay -----------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_raw_echo_10mib_both_ways(env: RelayEnv, pki: Pki, version: TlsVersion) -> None:
    kp = pki["rsa2048"]
    payload = os.urandom(BIG)
    received = tls_echo_roundtrip(env.echo_port, kp.dns_name, payload, cafile=kp.cert_path, version=version)
    assert len(received) == len(payload)
    assert sha256(received) == sha256(payload)


def test_two_relay_blocks_reach_their_own_backends(start_daemon: StartDaemon, pki: Pki) -> None:
    with HttpBackend(b"hello from backend A\n") as a, HttpBackend(b"hello from backend B\n") as b:
        relay_a = simple_relay(pki, a.port, ("rsa2048",), name="a")
        relay_b = simple_relay(pki, b.port, ("p256",), name="b")
        daemon = start_daemon(DaemonConfig([relay_a, relay_b], prefork=1))
        for relay, backend in ((relay_a, a), (relay_b, b)):
            kp = relay.keypairs[0]
            body = https_get(relay.listen_port, kp.dns_name, cafile=kp.cert_path)
            assert body == backend.page, f"relay {relay.name} reached the wrong backend: {body!r}"
        assert daemon.stop() == 0, daemon.describe()


# -- session resumption --------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_session_resumption_across_relays(env: RelayEnv, pki: Pki, tmp_path: Path, version: TlsVersion) -> None:
    """8 resumptions with prefork 2: with overwhelming likelihood some land on
    the relay that did not issue the session, so shared ticket keys are needed."""
    if version == "1.3" and not TLS13_RESUMES:
        pytest.skip(NO_TLS13_RESUMPTION)
    assert len(env.daemon.relay_pids()) == 2, env.daemon.describe()
    kp = pki["rsa2048"]
    session = tmp_path / "session.pem"
    first = s_client(env.www_port, servername=kp.dns_name, version=version, sess_out=session, request=HTTP_GET_ROOT)
    assert first.handshake_ok and first.reused is False, first.describe()
    assert session.stat().st_size > 0, "s_client wrote no session"
    for attempt in range(8):
        again = s_client(env.www_port, servername=kp.dns_name, version=version, sess_in=session, request=HTTP_GET_ROOT)
        assert again.handshake_ok, f"attempt {attempt}\n{again.describe()}"
        assert again.reused is True, f"attempt {attempt} not resumed\n{again.describe()}"
        assert BACKEND_PAGE.decode() in again.stdout, again.describe()


def test_a_resumed_tls13_session_gets_a_new_ticket(env: RelayEnv, pki: Pki, tmp_path: Path) -> None:
    """As from a stock OpenSSL server (nginx on the same library sends one):
    a TLS 1.3 ticket is for one use, so every resumption brings a fresh
    one, before the application data; the fresh ticket resumes too."""
    if not TLS13_RESUMES:
        pytest.skip(NO_TLS13_RESUMPTION)
    kp = pki["rsa2048"]
    first, second = tmp_path / "first.pem", tmp_path / "second.pem"
    full = s_client(env.www_port, servername=kp.dns_name, version="1.3", sess_out=first, request=HTTP_GET_ROOT)
    assert full.handshake_ok and full.reused is False, full.describe()
    resumed = s_client(env.www_port, servername=kp.dns_name, version="1.3", sess_in=first, sess_out=second,
                       request=HTTP_GET_ROOT, extra=["-msg"])
    assert resumed.reused is True, resumed.describe()
    out = resumed.stdout
    tickets = [line for line in out.splitlines() if line.startswith("<<< ") and "NewSessionTicket" in line]
    assert len(tickets) == 1, f"{len(tickets)} tickets after a resumption\n{resumed.describe()}"
    assert out.find("NewSessionTicket") < out.find(BACKEND_PAGE.decode()), resumed.describe()
    assert first.read_bytes() != second.read_bytes(), "the resumption's ticket is the old one"
    again = s_client(env.www_port, servername=kp.dns_name, version="1.3", sess_in=second, request=HTTP_GET_ROOT)
    assert again.reused is True, again.describe()


@pytest.mark.parametrize("mode", ["new", "reuse"])
def test_s_time(env: RelayEnv, mode: Literal["new", "reuse"]) -> None:
    if mode == "reuse" and not TLS13_RESUMES:
        pytest.skip(f"s_time negotiates TLS 1.3; {NO_TLS13_RESUMPTION}")
    result = s_time(env.www_port, mode, seconds=3, www="/")
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.describe()
    assert "ERROR" not in output, result.describe()
    assert (result.connections or 0) > 0, result.describe()
    assert (result.bytes_per_connection or 0) > 0, f"no data through the relay\n{result.describe()}"
    if mode == "reuse":
        assert "r" in result.progress, f"no session was resumed\n{result.describe()}"
