"""Test keys and self-signed certificates, and the secret components of a
private key as the memory scanner searches for them."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from basics import LOCALHOST

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
KEY_NAMES: tuple[str, ...] = ("rsa2048", "rsa4096", "p256", "p384")


@dataclass(frozen=True)
class Secret:
    """One secret integer of a private key and its byte width in memory."""

    value: int
    width: int

    def encodings(self) -> dict[str, bytes]:
        """Big- and little-endian fixed-width byte strings.

        OpenSSL BIGNUMs on x86_64 are little-endian arrays of 64-bit words,
        which is the little-endian encoding padded to a multiple of 8 bytes,
        so the ``le`` pattern also matches a BIGNUM's storage.
        """
        big = self.value.to_bytes(self.width, "big")
        return {"be": big, "le": big[::-1]}


@dataclass(frozen=True)
class KeyPair:
    name: str
    dns_name: str
    cert_path: Path
    key_path: Path
    certificate: x509.Certificate
    secrets: Mapping[str, Secret]  # RSA: "p", "q"; EC: "d" (the private scalar)

    @property
    def cert_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def is_rsa(self) -> bool:
        return "p" in self.secrets

    def components(self) -> set[str]:
        """Names of the secret components, e.g. {"rsa2048:p", "rsa2048:q"}."""
        return {f"{self.name}:{part}" for part in self.secrets}

    def patterns(self) -> dict[str, bytes]:
        """Scanner patterns named "<key>:<component>:<be|le>"."""
        return {
            f"{self.name}:{part}:{enc}": blob
            for part, secret in self.secrets.items()
            for enc, blob in secret.encodings().items()
        }


def found_components(found_patterns: Iterable[str]) -> set[str]:
    """Strip the encoding from pattern names: "rsa2048:p:le" -> "rsa2048:p"."""
    return {name.rsplit(":", 1)[0] for name in found_patterns}


def key_patterns(keypairs: Sequence[KeyPair]) -> dict[str, bytes]:
    patterns: dict[str, bytes] = {}
    for kp in keypairs:
        patterns.update(kp.patterns())
    return patterns


@dataclass(frozen=True)
class Pki:
    directory: Path
    keypairs: Mapping[str, KeyPair]
    mismatched_cert: Path  # certificate of one RSA-2048 key ...
    mismatched_key: Path  # ... and a different RSA-2048 key

    def __getitem__(self, name: str) -> KeyPair:
        return self.keypairs[name]


def new_private_key(name: str) -> PrivateKey:
    match name:
        case "rsa2048":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case "rsa4096":
            return rsa.generate_private_key(public_exponent=65537, key_size=4096)
        case "rsa8192":  # not in KEY_NAMES: only the tests that need one make it
            return rsa.generate_private_key(public_exponent=65537, key_size=8192)
        case "p256":
            return ec.generate_private_key(ec.SECP256R1())
        case "p384":
            return ec.generate_private_key(ec.SECP384R1())
        case "p521":  # not in KEY_NAMES: test_newkeys.py makes its own
            return ec.generate_private_key(ec.SECP521R1())
        case "ed25519":  # not in KEY_NAMES: test_eddsa.py makes its own
            return ed25519.Ed25519PrivateKey.generate()
        case "ed448":
            return ed448.Ed448PrivateKey.generate()
    raise ValueError(f"unknown key type {name!r}")


def key_secrets(key: PrivateKey) -> dict[str, Secret]:
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        return {
            "p": Secret(numbers.p, (numbers.p.bit_length() + 7) // 8),
            "q": Secret(numbers.q, (numbers.q.bit_length() + 7) // 8),
        }
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        seed = key.private_bytes_raw()      # 32 or 57 bytes: the whole key
        return {"seed": Secret(int.from_bytes(seed, "big"), len(seed))}
    scalar = key.private_numbers().private_value
    return {"d": Secret(scalar, (key.curve.key_size + 7) // 8)}


def self_signed_certificate(key: PrivateKey, dns_names: Sequence[str], ips: Sequence[str] = ()) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    now = datetime.datetime.now(datetime.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    san += [x509.IPAddress(IPv4Address(ip)) for ip in ips]
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))
              else hashes.SHA256())
    )


def write_key(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # created 0600: pyprivsep refuses a key others can read
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_keypair(directory: Path, name: str) -> KeyPair:
    key = new_private_key(name)
    dns_name = f"{name}.test"
    extra_dns, ips = (["localhost"], [LOCALHOST]) if name == "rsa2048" else ([], [])
    cert = self_signed_certificate(key, [dns_name, *extra_dns], ips)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    write_cert(cert_path, cert)
    write_key(key_path, key)
    return KeyPair(name, dns_name, cert_path, key_path, cert, key_secrets(key))


def generate_pki(directory: Path) -> Pki:
    keypairs = {name: make_keypair(directory, name) for name in KEY_NAMES}
    mismatched_key = directory / "mismatched.key"
    write_key(mismatched_key, new_private_key("rsa2048"))
    return Pki(directory, keypairs, keypairs["rsa2048"].cert_path, mismatched_key)


def load_private_key(kp: KeyPair) -> PrivateKey:
    key = serialization.load_pem_private_key(kp.key_path.read_bytes(), password=None)
    assert isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey))
    return key


# -- a CA, the certificates it issues, OCSP responses about them ------------


@dataclass(frozen=True)
class Issuer:
    """A CA of the tests' own: it issues server and client certificates
    and signs OCSP responses about them (as its own responder)."""

    name: str
    key: PrivateKey
    certificate: x509.Certificate
    cert_path: Path  # its certificate alone (PEM): a client CA file


def make_issuer(directory: Path, name: str) -> Issuer:
    key = new_private_key("p256")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(key, None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))
              else hashes.SHA256())
    )
    cert_path = directory / f"{name}-ca.crt"
    write_cert(cert_path, cert)
    return Issuer(name, key, cert, cert_path)


def make_issued_keypair(
    directory: Path, name: str, issuer: Issuer, *, key_name: str = "rsa2048",
    client: bool = False, chain: bool = True,
) -> KeyPair:
    """A leaf `issuer` signed: a server certificate for NAME.test (and
    localhost), or with `client` a client certificate (clientAuth).  With
    `chain` its file holds the issuer's certificate after it."""
    key = new_private_key(key_name)
    cert, cert_path = issue_certificate(directory, name, issuer, key.public_key(), client=client, chain=chain)
    key_path = directory / f"{name}.key"
    write_key(key_path, key)
    return KeyPair(name, f"{name}.test", cert_path, key_path, cert, key_secrets(key))


def issue_certificate(
    directory: Path, name: str, issuer: Issuer, public_key: CertificatePublicKeyTypes, *,
    client: bool = False, chain: bool = True,
) -> tuple[x509.Certificate, Path]:
    """`make_issued_keypair`'s certificate, for a public key made elsewhere
    (in a PKCS#11 token: tests/tokenkeys.py), written to NAME.crt."""
    dns_name = f"{name}.test"
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if not client:
        san = [x509.DNSName(dns_name), x509.DNSName("localhost"), x509.IPAddress(IPv4Address(LOCALHOST))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(issuer.key, hashes.SHA256())
    cert_path = directory / f"{name}.crt"
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if chain:
        pem += issuer.certificate.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    return cert, cert_path


OcspStatus = ocsp.OCSPCertStatus


def ocsp_response(
    leaf: x509.Certificate, issuer: Issuer, *, status: OcspStatus = OcspStatus.GOOD,
    this_update: datetime.datetime | None = None, next_update: datetime.datetime | None = None,
    hours: float = 24,
) -> bytes:
    """A DER OCSP response for `leaf` signed by its issuer, as a responder
    would give it (and hitch's ocsp-dir, haproxy's .ocsp hold): good by
    default, valid from an hour ago for `hours` unless told otherwise."""
    now = datetime.datetime.now(datetime.UTC)
    this_update = this_update or now - datetime.timedelta(hours=1)
    next_update = next_update or now + datetime.timedelta(hours=hours)
    revoked = status == OcspStatus.REVOKED
    response = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=leaf, issuer=issuer.certificate, algorithm=hashes.SHA1(), cert_status=status,
            this_update=this_update, next_update=next_update,
            revocation_time=this_update if revoked else None,
            revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.certificate)
        .sign(issuer.key, hashes.SHA256())
    )
    return response.public_bytes(serialization.Encoding.DER)


def ocsp_unsuccessful() -> bytes:
    """A well-formed OCSP response whose status is not "successful"."""
    return ocsp.OCSPResponseBuilder.build_unsuccessful(
        ocsp.OCSPResponseStatus.TRY_LATER).public_bytes(serialization.Encoding.DER)
