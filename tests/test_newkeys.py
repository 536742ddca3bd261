"""Key types beyond RSA (rsaEncryption) and P-256/P-384 (issue 13): P-521
ECDSA certificates through the ca.

For each: handshakes over TLS 1.3 and 1.2 (openssl s_client and Python's
ssl), the relays and the parent hold no part of the key (memory scan), and
the ca's policy, asked over the real wire by a real ca child, signs what
TLS signs with that key and refuses what it does not.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from backends import BACKEND_PAGE, HttpBackend
from basics import free_port
from ca_child import CaChild, start_ca
from cawire import raw_frame, spki_keyid
from daemonctl import SANITIZED, Daemon, DaemonConfig, RelaySpec, ca_config_text
from keypairs import KeyPair, key_patterns, make_keypair
from memscan import scan_process_memory
from pyprivsep.native import P
from tlsclients import HTTP_GET_ROOT, TlsVersion, s_client, tls_handshake

VERSIONS: tuple[TlsVersion, ...] = ("1.2", "1.3")
_ids = itertools.count(1)


@dataclass(frozen=True)
class NewKeys:
    directory: Path
    p521: KeyPair

    def all(self) -> list[KeyPair]:
        return [self.p521]


@pytest.fixture(scope="module")
def newkeys(tmp_path_factory: pytest.TempPathFactory) -> NewKeys:
    directory = tmp_path_factory.mktemp("newkeys")
    return NewKeys(directory, make_keypair(directory, "p521"))


@dataclass(frozen=True)
class Env:
    daemon: Daemon
    port: int


@pytest.fixture(scope="module")
def env(newkeys: NewKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with HttpBackend() as http:
        relay = RelaySpec("www", free_port(), http.port, newkeys.all())
        daemon = Daemon(tmp_path_factory.mktemp("newkeys-daemon"), DaemonConfig([relay], prefork=2))
        with daemon:
            daemon.start()
            yield Env(daemon, relay.listen_port)
            assert daemon.stop() == 0, daemon.describe()


@pytest.fixture(scope="module")
def ca(newkeys: NewKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaChild]:
    """A real ca holding the new keys (the product's pyprivsep.ca.main)."""
    directory = tmp_path_factory.mktemp("newkeys-ca")
    config = directory / "pyprivsep.conf"
    config.write_text(ca_config_text(newkeys.all()))
    child = start_ca(config, directory / "ca.log")
    yield child
    child.stop()


def ask(ca: CaChild, kp: KeyPair, op: int, arg: int, data: bytes) -> tuple[int, bytes]:
    rid, keyid = next(_ids), spki_keyid(kp.certificate)
    reply = ca.call(raw_frame(op, arg, rid, keyid, data))
    assert (reply.id, reply.key) == (rid, keyid)
    return reply.arg, reply.payload


# -- P-521 ---------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_p521_handshake_s_client(env: Env, newkeys: NewKeys, version: TlsVersion) -> None:
    kp = newkeys.p521
    extra = ["-sigalgs", "ecdsa_secp521r1_sha512"] if version == "1.3" else []
    result = s_client(env.port, servername=kp.dns_name, version=version, request=HTTP_GET_ROOT, extra=extra)
    assert result.handshake_ok, result.describe()
    assert result.protocol == f"TLSv{version}", result.describe()
    assert result.peer_certificate == kp.certificate, result.describe()
    assert (result.peer_signature_type or "").startswith("ECDSA"), result.describe()
    assert BACKEND_PAGE.decode() in result.stdout, result.describe()


@pytest.mark.parametrize("sigalg", ["ECDSA+SHA256", "ECDSA+SHA384", "ECDSA+SHA512"])
def test_p521_tls12_with_each_sha2(env: Env, newkeys: NewKeys, sigalg: str) -> None:
    """TLS 1.2 does not tie the hash to the curve: a P-521 key signs
    SHA-256 and SHA-384 digests there too."""
    kp = newkeys.p521
    result = s_client(env.port, servername=kp.dns_name, version="1.2", request=HTTP_GET_ROOT,
                      extra=["-sigalgs", sigalg])
    assert result.handshake_ok, result.describe()
    assert BACKEND_PAGE.decode() in result.stdout, result.describe()


@pytest.mark.parametrize("version", VERSIONS)
def test_p521_handshake_python_ssl(env: Env, newkeys: NewKeys, version: TlsVersion) -> None:
    kp = newkeys.p521
    info = tls_handshake(env.port, kp.dns_name, cafile=kp.cert_path, version=version)
    assert info.peer_cert_der == kp.cert_der


@pytest.mark.skipif(SANITIZED, reason="memory scan skipped in an AddressSanitizer run")
def test_new_keys_not_in_relays_or_parent(env: Env, newkeys: NewKeys) -> None:
    for kp, version, _ in itertools.product(newkeys.all(), VERSIONS, range(2)):
        tls_handshake(env.port, kp.dns_name, cafile=kp.cert_path, version=version)
    patterns = key_patterns(newkeys.all())
    targets = {f"relay {i}": pid for i, pid in env.daemon.relay_pids().items()}
    targets["parent"] = env.daemon.parent_pid
    assert len(targets) == 3, env.daemon.describe()
    leaks = {name: sorted(scan_process_memory(pid, patterns).found) for name, pid in targets.items()}
    assert leaks == {name: [] for name in targets}, "private key material outside the ca processes"
    cas = env.daemon.ca_pids()
    assert cas, env.daemon.describe()
    for index, pid in cas.items():   # control: the scan finds what is there
        found = scan_process_memory(pid, patterns).found
        assert {n.rsplit(":", 1)[0] for n in found} == {c for kp in newkeys.all() for c in kp.components()}, index


@pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()], ids=lambda a: a.name)
def test_p521_policy_signs_sha2_digests(ca: CaChild, newkeys: NewKeys, algorithm: hashes.HashAlgorithm) -> None:
    kp = newkeys.p521
    message = os.urandom(100)
    h = hashes.Hash(algorithm)
    h.update(message)
    digest = h.finalize()
    status, signature = ask(ca, kp, P.PPS_OP_ECDSA_SIGN, 0, digest)
    assert status == P.PPS_OK, ca.log()[-2000:]
    assert len(signature) <= 139
    public = kp.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, message, ec.ECDSA(algorithm))
    public.verify(signature, digest, ec.ECDSA(Prehashed(algorithm)))


def test_p521_policy_refuses_wrong_length_digests(ca: CaChild, newkeys: NewKeys) -> None:
    kp = newkeys.p521
    for length in (0, 1, 19, 65, 66, 128, 1024):
        status, payload = ask(ca, kp, P.PPS_OP_ECDSA_SIGN, 0, os.urandom(length))
        assert (status, payload) == (P.PPS_ERR_POLICY, b""), length
    for op, arg in ((P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE), (P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_PKCS1),
                    (P.PPS_OP_RSA_PRIV_DEC, P.PPS_PAD_PKCS1)):
        status, _ = ask(ca, kp, op, arg, os.urandom(64))
        assert status == P.PPS_ERR_OP, (op, arg)
