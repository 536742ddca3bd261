"""Key types beyond RSA (rsaEncryption) and P-256/P-384 (issue 13): P-521
ECDSA certificates and RSASSA-PSS (id-RSASSA-PSS) keys through the ca.

For each: handshakes over TLS 1.3 and 1.2 (openssl s_client and Python's
ssl), the relays and the parent hold no part of the key (memory scan), and
the ca's policy, asked over the real wire by a real ca child, signs what
TLS signs with that key and refuses what it does not.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from backends import BACKEND_PAGE, HttpBackend
from basics import free_port
from ca_child import CaChild, start_ca
from cawire import pss_block
from daemonctl import SANITIZED, Daemon, DaemonConfig, RelaySpec, StartDaemon, ca_config_text
from keypairs import KeyPair, key_secrets, make_keypair
from memscan import assert_keys_only_in_cas
from pyprivsep import native
from pyprivsep.native import P
from tlsclients import HTTP_GET_ROOT, TlsVersion, s_client, tls_handshake

VERSIONS: tuple[TlsVersion, ...] = ("1.2", "1.3")
# RSA-PSS keys go through OpenSSL 3's EVP_PKEY_RSA_PSS: with LibreSSL the ca
# and the relay refuse them at load (naming the line), so those tests skip
RSA_PSS = not native.library_version().startswith("LibreSSL")
needs_rsa_pss = pytest.mark.skipif(
    not RSA_PSS, reason=f"RSA-PSS keys need OpenSSL 3; pyprivsep is built against {native.library_version()}")


@dataclass(frozen=True)
class NewKeys:
    directory: Path
    p521: KeyPair
    rsapss: KeyPair          # id-RSASSA-PSS, no parameter restrictions
    rsapss256: KeyPair       # restricted: SHA-256, MGF1-SHA-256, salt >= 32

    def all(self) -> list[KeyPair]:
        """The keys this build takes (LibreSSL: P-521 only)."""
        return [self.p521, self.rsapss, self.rsapss256] if RSA_PSS else [self.p521]


def rsa_pss_keypair(directory: Path, name: str, *pkeyopts: str) -> KeyPair:
    """An RSA-PSS key and a self-signed certificate made by openssl (which
    cryptography cannot make: it writes rsaEncryption keys)."""
    key_path, cert_path, dns_name = directory / f"{name}.key", directory / f"{name}.crt", f"{name}.test"
    opts = [a for o in ("rsa_keygen_bits:2048", *pkeyopts) for a in ("-pkeyopt", o)]
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA-PSS", *opts, "-out", str(key_path)],
                   check=True, capture_output=True)
    key_path.chmod(0o600)
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", str(key_path), "-subj", f"/CN={dns_name}",
                    "-addext", f"subjectAltName=DNS:{dns_name}", "-addext", "basicConstraints=critical,CA:FALSE",
                    "-days", "30", "-out", str(cert_path)], check=True, capture_output=True)
    private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return KeyPair(name, dns_name, cert_path, key_path, cert, key_secrets(private))


@pytest.fixture(scope="module")
def newkeys(tmp_path_factory: pytest.TempPathFactory) -> NewKeys:
    directory = tmp_path_factory.mktemp("newkeys")
    return NewKeys(
        directory, make_keypair(directory, "p521"), rsa_pss_keypair(directory, "rsapss"),
        rsa_pss_keypair(directory, "rsapss256", "rsa_pss_keygen_md:sha256", "rsa_pss_keygen_mgf1_md:sha256",
                        "rsa_pss_keygen_saltlen:32"))


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
    return ca.ask(kp.certificate, op, arg, data)


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
    assert_keys_only_in_cas(env.daemon, newkeys.all(), relays=2)


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


# -- RSASSA-PSS (id-RSASSA-PSS) keys -------------------------------------------


@needs_rsa_pss
@pytest.mark.parametrize("sigalg", ["rsa_pss_pss_sha256", "rsa_pss_pss_sha384", "rsa_pss_pss_sha512"])
@pytest.mark.parametrize("version", VERSIONS)
def test_rsapss_handshake_s_client(env: Env, newkeys: NewKeys, version: TlsVersion, sigalg: str) -> None:
    kp = newkeys.rsapss
    result = s_client(env.port, servername=kp.dns_name, version=version, request=HTTP_GET_ROOT,
                      extra=["-sigalgs", sigalg])
    assert result.handshake_ok, result.describe()
    assert result.protocol == f"TLSv{version}", result.describe()
    assert result.peer_certificate == kp.certificate, result.describe()
    assert result.peer_signature_type == "RSA-PSS", result.describe()
    assert BACKEND_PAGE.decode() in result.stdout, result.describe()


@needs_rsa_pss
@pytest.mark.parametrize("version", VERSIONS)
def test_rsapss_restricted_key_signs_its_hash_only(env: Env, newkeys: NewKeys, version: TlsVersion) -> None:
    """A key restricted to SHA-256: libssl offers rsa_pss_pss_sha256 only."""
    kp = newkeys.rsapss256
    ok = s_client(env.port, servername=kp.dns_name, version=version, request=HTTP_GET_ROOT,
                  extra=["-sigalgs", "rsa_pss_pss_sha256"])
    assert ok.handshake_ok and ok.peer_certificate == kp.certificate, ok.describe()
    assert BACKEND_PAGE.decode() in ok.stdout, ok.describe()
    other = s_client(env.port, servername=kp.dns_name, version=version, extra=["-sigalgs", "rsa_pss_pss_sha384"])
    assert not (other.handshake_ok and other.peer_certificate == kp.certificate), other.describe()


@needs_rsa_pss
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("which", ["rsapss", "rsapss256"])
def test_rsapss_handshake_python_ssl(env: Env, newkeys: NewKeys, version: TlsVersion, which: str) -> None:
    kp = getattr(newkeys, which)
    info = tls_handshake(env.port, kp.dns_name, cafile=kp.cert_path, version=version)
    assert info.peer_cert_der == kp.cert_der


def pss_request(kp: KeyPair, hash_name: str, salt_len: int | None = None) -> tuple[bytes, bytes]:
    """(message, the PSS block of its hash) for kp's modulus."""
    message = os.urandom(100)
    mhash = hashlib.new(hash_name, message).digest()
    salt = None if salt_len is None else os.urandom(salt_len)
    public = kp.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    return message, pss_block(mhash, public.key_size, hash_name, salt=salt)


@needs_rsa_pss
@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_rsapss_policy_signs_pss_blocks(ca: CaChild, newkeys: NewKeys, hash_name: str) -> None:
    kp = newkeys.rsapss
    message, block = pss_request(kp, hash_name)
    status, signature = ask(ca, kp, P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, block)
    assert status == P.PPS_OK, ca.log()[-2000:]
    public = kp.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    algorithm = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[hash_name]
    public.verify(signature, message, padding.PSS(padding.MGF1(algorithm), algorithm.digest_size), algorithm)


@needs_rsa_pss
def test_rsapss_policy_keeps_the_key_restrictions(ca: CaChild, newkeys: NewKeys) -> None:
    kp = newkeys.rsapss256
    _, block = pss_request(kp, "sha256")
    assert ask(ca, kp, P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, block)[0] == P.PPS_OK, ca.log()[-2000:]
    for hash_name in ("sha384", "sha512"):
        _, block = pss_request(kp, hash_name)
        assert ask(ca, kp, P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, block) == (P.PPS_ERR_POLICY, b""), hash_name


@needs_rsa_pss
@pytest.mark.parametrize("which", ["rsapss", "rsapss256"])
def test_rsapss_policy_refusals(ca: CaChild, newkeys: NewKeys, which: str) -> None:
    """No PKCS#1 v1.5 (TLS never uses it with an RSA-PSS key), no
    decryption, no ECDSA, no random block, no salt other than the hash's."""
    kp = getattr(newkeys, which)
    digestinfo = bytes.fromhex("3031300d060960864801650304020105000420") + os.urandom(32)
    assert ask(ca, kp, P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_PKCS1, digestinfo)[0] == P.PPS_ERR_OP
    assert ask(ca, kp, P.PPS_OP_RSA_PRIV_DEC, P.PPS_PAD_PKCS1, os.urandom(256))[0] == P.PPS_ERR_OP
    assert ask(ca, kp, P.PPS_OP_ECDSA_SIGN, 0, os.urandom(32))[0] == P.PPS_ERR_OP
    assert ask(ca, kp, P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, os.urandom(256))[0] == P.PPS_ERR_POLICY
    _, block = pss_request(kp, "sha256", salt_len=64)
    assert ask(ca, kp, P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, block)[0] == P.PPS_ERR_POLICY
    _, block = pss_request(kp, "sha256")
    assert ask(ca, kp, P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, block[:-1])[0] == P.PPS_ERR_POLICY


@pytest.mark.parametrize("version", VERSIONS)
def test_new_keys_with_keys_inprocess(start_daemon: StartDaemon, newkeys: NewKeys, version: TlsVersion) -> None:
    """`keys inprocess`: the relay's own OpenSSL signs with the new keys."""
    with HttpBackend() as http:
        relay = RelaySpec("www", free_port(), http.port, newkeys.all())
        daemon = start_daemon(DaemonConfig([relay], prefork=1, keys_inprocess=True))
        for kp in newkeys.all():
            info = tls_handshake(relay.listen_port, kp.dns_name, cafile=kp.cert_path, version=version)
            assert info.peer_cert_der == kp.cert_der, kp.name
        assert daemon.stop() == 0, daemon.describe()
