"""Ed25519 and Ed448 certificates, the private key in the ca (issue 13).

The relay serves them through a provider built into it
(src/_rsaengine/edkey.c) whose signing sends the whole message to the ca
(PPS_OP_EDDSA_SIGN).  Shown here: handshakes over TLS 1.3 and 1.2 from
openssl s_client and Python's ssl, with `keyops async` and `keyops
blocking`; TLS 1.2 with every group the relay offers (the ServerKeyExchange
the ca checks differs by group); no relay and not the parent holds the
private seed (memory scan); the ca's policy over the real wire signs a
server CertificateVerify and a ServerKeyExchange and refuses anything else,
and logs the refusal; `pyprivsep -n` takes such a configuration.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from backends import BACKEND_PAGE, EchoServer, HttpBackend
from basics import LOCALHOST, free_port, wait_until
from ca_child import CaChild, start_ca
from cawire import SKE_GROUP_SHARES, expected_status
from daemonctl import SANITIZED, Daemon, DaemonConfig, RelaySpec, StartDaemon, ca_config_text, run_pyprivsep
from keypairs import KeyPair, make_keypair
from memscan import assert_keys_only_in_cas
from procs import Freezer
from pyprivsep import native
from pyprivsep._rsaengine import lib
from pyprivsep.native import P
from tlsclients import HTTP_GET_ROOT, TlsVersion, client_context, s_client, tls_handshake

EDDSA = bool(lib.pps_eddsa_keys())
NO_EDDSA = (f"Ed25519/Ed448 keys need OpenSSL 3's providers (LibreSSL has none, nor EdDSA certificates in TLS); "
            f"pyprivsep is built against {native.library_version()}")

VERSIONS: tuple[TlsVersion, ...] = ("1.2", "1.3")
MODES = ("async", "blocking") if native.async_supported() else ("blocking",)
# TLS 1.2 groups the relay offers (OpenSSL's default list), their share length
GROUPS = {"X25519": (29, 32), "X448": (30, 56), "P-256": (23, 65), "P-384": (24, 97), "P-521": (25, 133)}
SERVER_CONTEXT = b"TLS 1.3, server CertificateVerify\x00"
CLIENT_CONTEXT = b"TLS 1.3, client CertificateVerify\x00"
FUZZ = settings(max_examples=int(os.environ.get("PYPRIVSEP_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class EdKeys:
    ed25519: KeyPair
    ed448: KeyPair
    p256: KeyPair            # not EdDSA: the EdDSA operation is refused on it

    def all(self) -> list[KeyPair]:
        return [self.ed25519, self.ed448]


@pytest.fixture(scope="module")
def edkeys(tmp_path_factory: pytest.TempPathFactory) -> EdKeys:
    """The keys; every test that takes them skips where they cannot be served."""
    if not EDDSA:
        pytest.skip(NO_EDDSA)
    directory = tmp_path_factory.mktemp("eddsa")
    return EdKeys(make_keypair(directory, "ed25519"), make_keypair(directory, "ed448"),
                  make_keypair(directory, "p256"))


@dataclass(frozen=True)
class Env:
    daemon: Daemon
    port: int
    mode: str


@pytest.fixture(scope="module", params=MODES)
def env(request: pytest.FixtureRequest, edkeys: EdKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    mode: str = request.param
    with HttpBackend() as http:
        relay = RelaySpec("www", free_port(), http.port, edkeys.all())
        daemon = Daemon(tmp_path_factory.mktemp(f"eddsa-{mode}"),
                        DaemonConfig([relay], prefork=2, globals=[f"keyops {mode}"]))
        with daemon:
            daemon.start()
            yield Env(daemon, relay.listen_port, mode)
            assert daemon.stop() == 0, daemon.describe()


@pytest.fixture(scope="module")
def ca(edkeys: EdKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaChild]:
    """A real ca holding the keys (the product's pyprivsep.ca.main)."""
    directory = tmp_path_factory.mktemp("eddsa-ca")
    config = directory / "pyprivsep.conf"
    config.write_text(ca_config_text([*edkeys.all(), edkeys.p256]))
    child = start_ca(config, directory / "ca.log")
    yield child
    child.stop()


def ask(ca: CaChild, kp: KeyPair, op: int, arg: int, data: bytes) -> tuple[int, bytes]:
    return ca.ask(kp.certificate, op, arg, data)


def verify(kp: KeyPair, signature: bytes, message: bytes) -> None:
    public = kp.certificate.public_key()
    assert isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    public.verify(signature, message)      # raises InvalidSignature


def certificate_verify(transcript_hash: bytes, context: bytes = SERVER_CONTEXT) -> bytes:
    return b"\x20" * 64 + context + transcript_hash


def server_key_exchange(group: int, share: bytes, *, curve_type: int = 3, length: int | None = None) -> bytes:
    randoms = os.urandom(64)
    return randoms + bytes([curve_type]) + group.to_bytes(2, "big") + bytes([len(share) if length is None else length]) \
        + share


def share_of(group: str) -> bytes:
    _, length = GROUPS[group]
    return os.urandom(length) if group.startswith("X") else b"\x04" + os.urandom(length - 1)


# -- handshakes ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["ed25519", "ed448"])
@pytest.mark.parametrize("version", VERSIONS)
def test_handshake_s_client(env: Env, edkeys: EdKeys, version: TlsVersion, which: str) -> None:
    kp: KeyPair = getattr(edkeys, which)
    result = s_client(env.port, servername=kp.dns_name, version=version, request=HTTP_GET_ROOT,
                      extra=["-sigalgs", which])
    assert result.handshake_ok, result.describe()
    assert result.protocol == f"TLSv{version}", result.describe()
    assert result.peer_certificate == kp.certificate, result.describe()
    assert (result.peer_signature_type or "").lower() == which, result.describe()
    assert BACKEND_PAGE.decode() in result.stdout, result.describe()


@pytest.mark.parametrize("group", list(GROUPS))
def test_tls12_each_group(env: Env, edkeys: EdKeys, group: str) -> None:
    """A TLS 1.2 ServerKeyExchange carries the group's share: each length
    the ca's policy knows is signed."""
    kp = edkeys.ed25519
    result = s_client(env.port, servername=kp.dns_name, version="1.2", request=HTTP_GET_ROOT,
                      extra=["-sigalgs", "ed25519", "-groups", group])
    assert result.handshake_ok, result.describe()
    assert (result.peer_signature_type or "").lower() == "ed25519", result.describe()
    assert BACKEND_PAGE.decode() in result.stdout, result.describe()


@pytest.mark.parametrize("which", ["ed25519", "ed448"])
@pytest.mark.parametrize("version", VERSIONS)
def test_handshake_python_ssl(env: Env, edkeys: EdKeys, version: TlsVersion, which: str) -> None:
    kp: KeyPair = getattr(edkeys, which)
    info = tls_handshake(env.port, kp.dns_name, cafile=kp.cert_path, version=version)
    assert info.peer_cert_der == kp.cert_der
    assert info.version == f"TLSv{version}"


@pytest.mark.skipif(SANITIZED, reason="memory scan skipped in an AddressSanitizer run")
def test_seed_not_in_relays_or_parent(env: Env, edkeys: EdKeys) -> None:
    """The 32- and 57-byte private seeds (the whole private key) are in the
    ca processes and nowhere else."""
    for kp, version, _ in itertools.product(edkeys.all(), VERSIONS, range(2)):
        tls_handshake(env.port, kp.dns_name, cafile=kp.cert_path, version=version)
    assert_keys_only_in_cas(env.daemon, edkeys.all(), relays=2)


def test_keys_inprocess(start_daemon: StartDaemon, edkeys: EdKeys) -> None:
    """`keys inprocess`: the relay's own OpenSSL signs, no provider."""
    with HttpBackend() as http:
        relay = RelaySpec("www", free_port(), http.port, edkeys.all())
        daemon = start_daemon(DaemonConfig([relay], prefork=1, keys_inprocess=True))
        for kp, version in itertools.product(edkeys.all(), VERSIONS):
            info = tls_handshake(relay.listen_port, kp.dns_name, cafile=kp.cert_path, version=version)
            assert info.peer_cert_der == kp.cert_der, kp.name
        assert daemon.stop() == 0, daemon.describe()


@pytest.mark.skipif("async" not in MODES, reason="this TLS library has no ASYNC (LibreSSL)")
def test_async_relay_serves_while_an_eddsa_signature_waits(
    edkeys: EdKeys, echo_backend: EchoServer, start_daemon: StartDaemon, freezer: Freezer, tmp_path: Path,
) -> None:
    """`keyops async`: the provider's signing pauses the handshake's ASYNC
    job as the shim's do, so with the ca frozen and an Ed25519 signature
    asked of it, the relay process still answers its control socket and
    relays an established session; the handshake ends once the ca thaws."""
    kp = edkeys.ed25519
    sock = tmp_path / "ctl.sock"
    relay = RelaySpec("www", free_port(), echo_backend.port, [kp])
    daemon = start_daemon(DaemonConfig([relay], prefork=1, globals=[f'socket "{sock}"', "keyops async",
                                                                    "tls keyop timeout 60000"]))
    wait_until(sock.exists, 30, f"control socket {sock}")

    def keyops() -> int:
        proc = run_pyprivsep("ctl", "-s", str(sock), "-j", "show", "summary")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return sum(int(r["stats"]["keyops"]) for r in json.loads(proc.stdout)["relays"])

    shown = run_pyprivsep("ctl", "-s", str(sock), "-j", "show", "keys")
    assert [k["type"] for k in json.loads(shown.stdout)["keys"]] == ["Ed25519"], shown.stdout + shown.stderr
    (ca_pid,) = daemon.ca_pids().values()
    with socket.create_connection((LOCALHOST, relay.listen_port), timeout=30) as raw, \
            client_context().wrap_socket(raw, server_hostname=kp.dns_name) as tls:
        before = keyops()
        freezer.freeze(ca_pid)
        waiting = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"{LOCALHOST}:{relay.listen_port}", "-servername", kp.dns_name,
             "-sigalgs", "ed25519", "-brief"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: keyops() > before, 30, "the Ed25519 signature asked of the frozen ca")
            tls.sendall(b"ping")
            got = b""
            while len(got) < 4:
                got += tls.recv(4 - len(got))
            assert got == b"ping"
            assert waiting.poll() is None, "the handshake ended while the ca was frozen"
        finally:
            freezer.thaw()
        _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert b"ed25519" in err.lower(), err
    assert daemon.stop() == 0, daemon.describe()


# -- the ca's policy -----------------------------------------------------------


@pytest.mark.parametrize("which", ["ed25519", "ed448"])
@pytest.mark.parametrize("hash_len", [32, 48])
def test_policy_signs_tls13_certificate_verify(ca: CaChild, edkeys: EdKeys, which: str, hash_len: int) -> None:
    kp: KeyPair = getattr(edkeys, which)
    message = certificate_verify(os.urandom(hash_len))
    status, signature = ask(ca, kp, P.PPS_OP_EDDSA_SIGN, 0, message)
    assert status == P.PPS_OK, ca.log()[-2000:]
    assert len(signature) == (64 if which == "ed25519" else 114)
    verify(kp, signature, message)


@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("which", ["ed25519", "ed448"])
def test_policy_signs_tls12_server_key_exchange(ca: CaChild, edkeys: EdKeys, which: str, group: str) -> None:
    kp: KeyPair = getattr(edkeys, which)
    message = server_key_exchange(GROUPS[group][0], share_of(group))
    status, signature = ask(ca, kp, P.PPS_OP_EDDSA_SIGN, 0, message)
    assert status == P.PPS_OK, ca.log()[-2000:]
    verify(kp, signature, message)


def refused_messages() -> dict[str, bytes]:
    """What a relay in an attacker's hands might ask the ca to sign."""
    x25519, p256 = GROUPS["X25519"][0], GROUPS["P-256"][0]
    cv = certificate_verify(os.urandom(32))
    ske = server_key_exchange(x25519, os.urandom(32))
    return {
        "empty": b"",
        "random": os.urandom(130),
        "client CertificateVerify": certificate_verify(os.urandom(32), CLIENT_CONTEXT),
        "CertificateVerify, 64-byte hash": certificate_verify(os.urandom(64)),
        "CertificateVerify, 31-byte hash": certificate_verify(os.urandom(31)),
        "CertificateVerify, no 0 byte": cv[:64 + 33] + b"\x01" + cv[64 + 34:],
        "CertificateVerify, one pad byte not 0x20": b"\x21" + cv[1:],
        "CertificateVerify, a byte more": cv + b"\x00",
        "context string alone": SERVER_CONTEXT + os.urandom(32),
        "ServerKeyExchange, a byte more": ske + b"\x00",
        "ServerKeyExchange, a byte short": ske[:-1],
        "ServerKeyExchange, explicit curve": server_key_exchange(x25519, os.urandom(32), curve_type=1),
        "ServerKeyExchange, unknown group": server_key_exchange(0x1234, os.urandom(32)),
        "ServerKeyExchange, ffdhe2048 group": server_key_exchange(256, os.urandom(32)),
        "ServerKeyExchange, x25519 share of 31": server_key_exchange(x25519, os.urandom(31)),
        "ServerKeyExchange, length lies": server_key_exchange(x25519, os.urandom(32), length=33),
        "ServerKeyExchange, compressed point": server_key_exchange(p256, b"\x02" + os.urandom(64)),
        "ServerKeyExchange, P-256 share as x25519's": server_key_exchange(p256, os.urandom(32)),
        "RSA DigestInfo": bytes.fromhex("3031300d060960864801650304020105000420") + os.urandom(32),
        "largest payload": os.urandom(P.PPS_MAX_PAYLOAD),
    }


@pytest.mark.parametrize("what", list(refused_messages()))
def test_policy_refuses(ca: CaChild, edkeys: EdKeys, what: str) -> None:
    message = refused_messages()[what]
    for kp in edkeys.all():
        assert ask(ca, kp, P.PPS_OP_EDDSA_SIGN, 0, message) == (P.PPS_ERR_POLICY, b""), kp.name


def test_policy_refusal_is_logged(ca: CaChild, edkeys: EdKeys) -> None:
    message = certificate_verify(os.urandom(32), CLIENT_CONTEXT)
    assert ask(ca, edkeys.ed25519, P.PPS_OP_EDDSA_SIGN, 0, message)[0] == P.PPS_ERR_POLICY
    ca.wait_for_log("neither a TLS 1.3 server CertificateVerify nor a TLS 1.2 ServerKeyExchange")


def test_policy_other_operations(ca: CaChild, edkeys: EdKeys) -> None:
    """An Ed key does nothing but EdDSA, with no argument; no other key
    does EdDSA."""
    good = certificate_verify(os.urandom(32))
    for kp in edkeys.all():
        for op, arg in ((P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE), (P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_PKCS1),
                        (P.PPS_OP_RSA_PRIV_DEC, P.PPS_PAD_PKCS1), (P.PPS_OP_ECDSA_SIGN, 0),
                        (P.PPS_OP_EDDSA_SIGN, 1)):
            assert ask(ca, kp, op, arg, good) == (P.PPS_ERR_OP, b""), (kp.name, op, arg)
    assert ask(ca, edkeys.p256, P.PPS_OP_EDDSA_SIGN, 0, good) == (P.PPS_ERR_OP, b"")
    assert ask(ca, edkeys.p256, P.PPS_OP_ECDSA_SIGN, 0, os.urandom(32))[0] == P.PPS_OK   # control


@st.composite
def eddsa_requests(draw: st.DrawFn) -> tuple[int, int, bytes]:
    """(op, arg, payload): mostly the two messages a TLS server signs, as
    they are or a little off, else anything."""
    shape = draw(st.integers(0, 9))
    if shape <= 3:
        payload = certificate_verify(draw(st.binary(min_size=1, max_size=64).filter(bool)
                                          if shape == 3 else st.sampled_from([b"a" * 32, b"b" * 48])))
    elif shape <= 7:
        group = draw(st.sampled_from(sorted(SKE_GROUP_SHARES) + ([0x1234] if shape == 7 else [])))
        length = SKE_GROUP_SHARES.get(group, 32)
        share = draw(st.binary(min_size=length, max_size=length))
        if length not in (32, 56):
            share = b"\x04" + share[1:]
        payload = server_key_exchange(group, share)
    elif shape == 8:
        payload = certificate_verify(draw(st.binary(max_size=48)), draw(st.sampled_from([CLIENT_CONTEXT,
                                                                                          SERVER_CONTEXT[:-1]])))
    else:
        payload = draw(st.binary(max_size=P.PPS_MAX_PAYLOAD))
    change = draw(st.integers(0, 7)) if payload else 7
    if change == 0:                                   # one byte changed
        i = draw(st.integers(0, len(payload) - 1))
        payload = payload[:i] + bytes([payload[i] ^ draw(st.integers(1, 255))]) + payload[i + 1:]
    elif change == 1:                                 # cut short
        payload = payload[:draw(st.integers(0, len(payload) - 1))]
    elif change == 2:                                 # more after it
        payload += draw(st.binary(min_size=1, max_size=8))
    op = P.PPS_OP_EDDSA_SIGN if draw(st.integers(0, 9)) else draw(st.sampled_from([1, 2, 3, 6, 255]))  # (4: a ping)
    arg = 0 if draw(st.integers(0, 9)) else draw(st.integers(1, 0xFFFF))
    return op, arg, payload


@FUZZ
@given(which=st.sampled_from(["ed25519", "ed448"]), request=eddsa_requests())
def test_policy_is_the_protocol_documents(ca: CaChild, edkeys: EdKeys, which: str,
                                          request: tuple[int, int, bytes]) -> None:
    """The ca signs exactly what docs/protocol.md allows (an oracle written
    from RFC 8446 and 8422, cawire.expected_status), and signs it right."""
    op, arg, payload = request
    kp: KeyPair = getattr(edkeys, which)
    want = expected_status(which, 0, op, arg, payload)
    event(f"status {want}")
    status, signature = ask(ca, kp, op, arg, payload)
    assert status == want, (op, arg, payload.hex())
    if status == P.PPS_OK:
        verify(kp, signature, payload)
    else:
        assert signature == b""


# -- configuration check -------------------------------------------------------


def test_check_accepts_eddsa_config(edkeys: EdKeys, tmp_path: Path) -> None:
    conf = tmp_path / "eddsa.conf"
    conf.write_text(DaemonConfig([RelaySpec("www", free_port(), free_port(), edkeys.all())], prefork=1).render())
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "configuration OK" in proc.stdout + proc.stderr


@pytest.mark.skipif(EDDSA, reason="this build serves Ed25519 and Ed448 certificates")
@pytest.mark.parametrize("which", ["ed25519", "ed448"])
def test_check_refuses_eddsa_where_it_cannot_be_served(tmp_path: Path, which: str) -> None:
    """LibreSSL: `pyprivsep -n` names the keypair's line and says why."""
    kp = make_keypair(tmp_path, which)
    conf = tmp_path / "eddsa.conf"
    text = DaemonConfig([RelaySpec("www", free_port(), free_port(), [kp])], prefork=1).render()
    conf.write_text(text)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if str(kp.cert_path) in t)
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{conf.name}:{line}:" in proc.stderr and "need OpenSSL 3" in proc.stderr, proc.stderr
