"""Certificates and keys as the parent, the relays and the cas see them.

The parent and the relays read certificates only (public).  Private keys
are read by the ca processes (and by the relays with ``keys inprocess``),
and by ``pyprivsep -n`` to check that each key matches its certificate.
A key is named on the wire by its key id: SHA-256 of the certificate's
DER SubjectPublicKeyInfo, as relayd names keys by a hash of the public key.
"""
from __future__ import annotations

import hashlib
import os
import pwd
import stat
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pyprivsep.config import ConfigError, Keypair
from pyprivsep.native import CaKey, NativeError

EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
RSA_BITS = (2048, 8192)


@dataclass(frozen=True)
class Cert:
    """A keypair's certificate chain and what the ca's policy needs of it."""

    keypair: Keypair
    chain_pem: bytes
    keyid: bytes
    kind: str               # "rsa" or "ec"
    bits: int               # RSA modulus bits, or the curve's bits
    subject: str
    not_after: str          # ISO 8601, UTC

    def describe(self) -> str:
        return f"{self.kind.upper()}-{self.bits} {self.subject}"


def _read(path: str, what: str, kp: Keypair) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(kp.where.file, kp.where.line,
                          f"cannot read {what} {path}: {e.strerror}") from None


def refuse_ca_certificate(leaf: x509.Certificate, kp: Keypair) -> None:
    """A relay's key signs what its ca lets through, and a client chooses
    much of that: were the key also a CA's, those signatures could become
    certificates.  So the keypair must be a leaf that may sign (TLS) and
    may not issue (as OpenSSL judges it: CA:TRUE, or, without
    basicConstraints, keyCertSign or a version 1 self-signed certificate)."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(kp.where.file, kp.where.line,
                           f"{kp.cert}: {why}: a TLS server key must not be "
                           "able to sign certificates; use a leaf certificate "
                           "(basicConstraints CA:FALSE)")

    if leaf.version == x509.Version.v1 and leaf.issuer == leaf.subject:
        raise refuse("a version 1 self-signed certificate, which OpenSSL "
                     "accepts as a CA")
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise refuse("a CA certificate (basicConstraints CA:TRUE)")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.digital_signature:
        raise ConfigError(kp.where.file, kp.where.line,
                          f"{kp.cert}: keyUsage without digitalSignature: "
                          "the key may not sign TLS handshakes")
    if usage.key_cert_sign:
        raise refuse("keyUsage keyCertSign")


def load_cert(kp: Keypair) -> Cert:
    pem = _read(kp.cert, "certificate", kp)
    try:
        leaf = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise ConfigError(kp.where.file, kp.where.line,
                          f"{kp.cert}: not a PEM certificate ({e})") from None
    refuse_ca_certificate(leaf, kp)
    pub = leaf.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        kind, bits = "rsa", pub.key_size
        if not RSA_BITS[0] <= bits <= RSA_BITS[1]:
            raise ConfigError(kp.where.file, kp.where.line,
                              f"{kp.cert}: RSA-{bits} not supported "
                              f"({RSA_BITS[0]} to {RSA_BITS[1]} bits)")
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in EC_CURVES:
            raise ConfigError(kp.where.file, kp.where.line,
                              f"{kp.cert}: curve {pub.curve.name} not "
                              f"supported ({', '.join(EC_CURVES.values())})")
        kind, bits = "ec", pub.curve.key_size
    else:
        raise ConfigError(kp.where.file, kp.where.line,
                          f"{kp.cert}: only RSA and ECDSA keys are supported")
    spki = pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return Cert(kp, pem, hashlib.sha256(spki).digest(), kind, bits,
                leaf.subject.rfc4514_string(),
                leaf.not_valid_after_utc.isoformat())


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_key_file(st: os.stat_result, path: str, kp: Keypair) -> None:
    """Refuse a key file others could read or replace, as sshd refuses a
    private key: no group or world bits, owned by root or by the user
    reading it (the daemon's user: a ca reads its keys before it drops
    privileges)."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(kp.where.file, kp.where.line,
                          f"key {path}: mode {mode:04o} lets group or others "
                          "read or write the private key; chmod 600 it")
    me = os.geteuid()
    if st.st_uid not in (0, me):
        raise ConfigError(kp.where.file, kp.where.line,
                          f"key {path}: owned by {_user(st.st_uid)}, not "
                          f"by root or {_user(me)}, who runs pyprivsep")


def read_key(cert: Cert) -> bytes:
    """The private key PEM of a keypair (ca processes, keys inprocess, -n,
    reload's check), from a file only root or our user can touch."""
    kp = cert.keypair
    try:
        with open(kp.key, "rb") as f:
            # fstat what was opened: the path may change under us
            check_key_file(os.fstat(f.fileno()), kp.key, kp)
            return f.read()
    except OSError as e:
        raise ConfigError(kp.where.file, kp.where.line,
                          f"cannot read key {kp.key}: {e.strerror}") from None


def load_key(cert: Cert) -> CaKey:
    """Load the private key into OpenSSL and check it matches the certificate."""
    kp = cert.keypair
    try:
        return CaKey(read_key(cert), cert.chain_pem)
    except NativeError as e:
        raise ConfigError(kp.where.file, kp.where.line,
                          f"{kp.key}: {e}") from None
