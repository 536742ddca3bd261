"""Certificates and keys as the parent, the relays and the cas see them.

The parent and the relays read certificates only (public).  Private keys
are read by the ca processes (and by the relays with ``keys inprocess``),
and by ``pyprivsep -n`` to check that each key matches its certificate.
A key is named on the wire by its key id: SHA-256 of the certificate's
DER SubjectPublicKeyInfo, as relayd names keys by a hash of the public key.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import pwd
import stat
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import PublicKeyAlgorithmOID

from pyprivsep import native
from pyprivsep.config import ClientCa, Config, ConfigError, Keypair, Pkcs11
from pyprivsep.native import P, CaKey, NativeError, P11Key

EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
RSA_BITS = (2048, 8192)
# An OCSP response is a few KiB at most (one response, maybe a responder
# certificate); the relay copies it for every handshake that asks.  Bigger
# is not an OCSP response file.  The C side enforces the same bound.
OCSP_MAX = P.PPS_OCSP_MAX
# A CA file for client certificates: bundles of hundreds of CAs stay far
# below this.
CLIENT_CA_MAX = P.PPS_CLIENT_CA_MAX
# thisUpdate may be this far ahead of our clock (the responder's clock).
OCSP_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Staple:
    """An OCSP response to staple: DER, checked to be a successful response
    for its certificate; stapled from not_before to not_after (Unix
    seconds; not_after 0: the response has no nextUpdate)."""

    der: bytes
    not_before: int
    not_after: int


@dataclass(frozen=True)
class Cert:
    """A keypair's certificate chain and what the ca's policy needs of it."""

    keypair: Keypair
    chain_pem: bytes
    keyid: bytes
    kind: str               # "rsa", "rsa-pss" (id-RSASSA-PSS) or "ec"
    bits: int               # RSA modulus bits, or the curve's bits
    subject: str
    not_after: str          # ISO 8601, UTC
    staple: Staple | None = None   # the parent's load_staple(), relays only

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


def _der_items(der: bytes) -> list[bytes]:
    """The elements (whole TLVs) of the DER SEQUENCE `der`."""
    def tlv(buf: bytes, i: int) -> int:    # the end of the TLV at i
        n = buf[i + 1]
        if n < 0x80:
            return i + 2 + n
        k = n & 0x7F
        return i + 2 + k + int.from_bytes(buf[i + 2:i + 2 + k], "big")
    if der[1] < 0x80:
        start = 2
    else:
        start = 2 + (der[1] & 0x7F)
    end, items, i = tlv(der, 0), [], start
    while i < end:
        j = tlv(der, i)
        items.append(der[i:j])
        i = j
    return items


def spki_der(leaf: x509.Certificate) -> bytes:
    """The certificate's SubjectPublicKeyInfo as it is in the certificate.
    cryptography re-encodes an id-RSASSA-PSS key as rsaEncryption (losing
    its PSS restrictions), so it is cut out of the TBSCertificate."""
    items = _der_items(leaf.tbs_certificate_bytes)
    if items[0][0] == 0xA0:                 # [0] version
        items = items[1:]
    return items[5]     # serial, signature, issuer, validity, subject, spki


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
        pss = leaf.public_key_algorithm_oid == PublicKeyAlgorithmOID.RSASSA_PSS
        kind, bits = "rsa-pss" if pss else "rsa", pub.key_size
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
                          f"{kp.cert}: only RSA, RSA-PSS and ECDSA keys are "
                          "supported")
    if kind == "rsa-pss":
        spki = spki_der(leaf)
    else:
        spki = pub.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return Cert(kp, pem, hashlib.sha256(spki).digest(), kind, bits,
                leaf.subject.rfc4514_string(),
                leaf.not_valid_after_utc.isoformat())


def _issuer(leaf: x509.Certificate, pem: bytes) -> x509.Certificate | None:
    """The leaf's issuer, if the chain file holds it (a self-issued leaf is
    its own)."""
    if leaf.issuer == leaf.subject:
        return leaf
    try:
        chain = x509.load_pem_x509_certificates(pem)[1:]
    except ValueError:
        return None
    for c in chain:
        if c.subject == leaf.issuer:
            return c
    return None


def _unix(t: datetime.datetime) -> int:
    return int(t.timestamp())


def load_staple(cert: Cert, now: datetime.datetime | None = None
                ) -> tuple[Cert, str | None]:
    """Read the keypair's OCSP response (the parent, before any chroot, at
    start, reload and -n) and check it is one to staple for this
    certificate.  Returns the Cert with its staple, and a warning or None.

    Refused (ConfigError: nothing about it will change without the
    operator): a file that cannot be read, is not a DER OCSP response, or
    whose status is not "successful", or no single response of which is
    for this certificate (serial and issuer name hash; the issuer key hash
    too when the chain holds the issuer).  Not stapled, with a warning:
    a response past its nextUpdate, or not valid yet: a late fetcher must
    not stop the daemon from starting or reloading, and a client is better
    served by no staple than by a stale one.  Revoked: stapled (it is the
    truth), with a warning."""
    kp = cert.keypair
    if kp.ocsp is None:
        return cert, None
    path = kp.ocsp

    def refuse(why: str) -> ConfigError:
        return ConfigError(kp.where.file, kp.where.line, f"ocsp {path}: {why}")
    try:
        with open(path, "rb") as f:
            der = f.read(OCSP_MAX + 1)
    except OSError as e:
        raise refuse(f"cannot read: {e.strerror}") from None
    if len(der) > OCSP_MAX:
        raise refuse(f"more than {OCSP_MAX} bytes: not an OCSP response")
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as e:
        raise refuse(f"not a DER OCSP response ({e})") from None
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise refuse(f"response status {resp.response_status.name.lower()}: "
                     "nothing to staple")
    leaf = x509.load_pem_x509_certificate(cert.chain_pem)
    issuer = _issuer(leaf, cert.chain_pem)
    try:
        singles = list(resp.responses)
    except ValueError as e:
        raise refuse(f"unreadable single responses ({e})") from None
    single = None
    for one in singles:
        alg = one.hash_algorithm
        if one.serial_number != leaf.serial_number:
            continue
        name_hash = hashlib.new(alg.name, leaf.issuer.public_bytes()).digest()
        if one.issuer_name_hash != name_hash:
            continue
        if issuer is not None:
            req = ocsp.OCSPRequestBuilder().add_certificate(
                leaf, issuer, alg).build()
            if one.issuer_key_hash != req.issuer_key_hash:
                continue
        single = one
        break
    if single is None:
        serials = ", ".join(f"{s.serial_number:x}" for s in singles)
        raise refuse(f"not for certificate {kp.cert} (serial "
                     f"{leaf.serial_number:x}, issuer {leaf.issuer.rfc4514_string()}"
                     f"{'' if issuer is not None else ', not in the chain: issuer key not compared'}); "
                     f"it answers for serial {serials or 'nothing'}")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    this_update, next_update = single.this_update_utc, single.next_update_utc
    where = f"{kp.where}: ocsp {path}"
    if next_update is not None and next_update <= now:
        return cert, (f"{where}: expired at {next_update.isoformat()} "
                      "(nextUpdate): not stapled until a fresh one is "
                      "installed and pyprivsep reloaded")
    if this_update > now + OCSP_SKEW:
        return cert, (f"{where}: not valid before {this_update.isoformat()} "
                      "(thisUpdate): not stapled")
    warning = None
    if single.certificate_status == ocsp.OCSPCertStatus.REVOKED:
        warning = f"{where}: the certificate is REVOKED; stapling that answer"
    elif single.certificate_status == ocsp.OCSPCertStatus.UNKNOWN:
        warning = f"{where}: the responder does not know the certificate (status unknown)"
    staple = Staple(der, _unix(this_update - OCSP_SKEW),
                    0 if next_update is None else _unix(next_update))
    return replace(cert, staple=staple), warning


def load_client_ca(ca: ClientCa) -> bytes:
    """The PEM of `tls client ca`, read by the parent (before any chroot)
    and checked to hold certificates only."""
    def refuse(why: str) -> ConfigError:
        return ConfigError(ca.where.file, ca.where.line,
                           f"tls client ca {ca.path}: {why}")
    try:
        with open(ca.path, "rb") as f:
            pem = f.read(CLIENT_CA_MAX + 1)
    except OSError as e:
        raise refuse(f"cannot read: {e.strerror}") from None
    if len(pem) > CLIENT_CA_MAX:
        raise refuse(f"more than {CLIENT_CA_MAX} bytes")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certs = []
    if not certs:
        raise refuse("no PEM certificate in it")
    return pem


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_key_file(st: os.stat_result, path: str, kp: Keypair | Pkcs11) -> None:
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


def load_key(cert: Cert, check: bool = True) -> CaKey:
    """Load the private key into OpenSSL and check it matches the
    certificate.  A key in a PKCS#11 token (pkcs11_setup() first): named,
    and with `check` a test signature by the token verified with the
    certificate (the PIN, the object, the match); without, nothing touches
    the token yet (a ca opens it when it signs)."""
    kp = cert.keypair
    try:
        if kp.p11 is not None:
            key = P11Key(kp.p11.token, kp.p11.object, kp.p11.id,
                         cert.chain_pem)
            if check:
                check_token_key(cert, key)
            return key
        return CaKey(read_key(cert), cert.chain_pem)
    except NativeError as e:
        raise ConfigError(kp.where.file, kp.where.line,
                          f"{kp.key}: {e}") from None


def check_token_key(cert: Cert, key: CaKey) -> None:
    """A test signature by the token, verified with the certificate: a
    ConfigError at the key's line, or at the pkcs11 line for the PIN."""
    kp = cert.keypair
    assert isinstance(key, P11Key)
    try:
        key.check()
    except NativeError as e:
        if _pkcs11_line is not None and "CKR_PIN_" in str(e):
            p11 = _pkcs11_line     # the PIN is the pkcs11 line's
            raise ConfigError(p11.where.file, p11.where.line,
                              f"pkcs11 pin file {p11.pin_file}: refused for "
                              f"key {kp.key} ({kp.where}): {e}") from None
        raise ConfigError(kp.where.file, kp.where.line,
                          f"{kp.key}: {e}") from None


# The `pkcs11` line this process loaded the module of (pkcs11_setup).
_pkcs11_line: Pkcs11 | None = None


def uses_pkcs11(keypairs: list[Keypair]) -> bool:
    return any(kp.p11 is not None for kp in keypairs)


def read_pin(p11: Pkcs11) -> bytes:
    """The PIN from `pin "file:..."`, read as root before any chroot, from
    a file only root or our user can touch; its trailing newline dropped.
    No message says anything of what the file holds."""
    try:
        with open(p11.pin_file, "rb") as f:
            check_key_file(os.fstat(f.fileno()), p11.pin_file, p11)
            pin = f.read(4096)
    except OSError as e:
        raise ConfigError(p11.where.file, p11.where.line,
                          f"pkcs11 pin file {p11.pin_file}: cannot read: "
                          f"{e.strerror}") from None
    pin = pin.rstrip(b"\r\n")
    if not pin or b"\n" in pin:
        raise ConfigError(p11.where.file, p11.where.line,
                          f"pkcs11 pin file {p11.pin_file}: expected one "
                          "line holding the PIN")
    return pin


def pkcs11_setup(cfg: Config) -> None:
    """Load the `pkcs11` line's module into this process: a ca, reload's
    throwaway check child, or `pyprivsep -n` (which exits right after);
    never the daemon's parent or a relay.  p11-kit-client finds its
    server in P11_KIT_SERVER_ADDRESS."""
    p11 = cfg.pkcs11
    if p11 is None:
        return
    pin = read_pin(p11)
    if p11.server is not None:
        os.environ["P11_KIT_SERVER_ADDRESS"] = p11.server
    try:
        native.p11_init(p11.module, pin)
    except NativeError as e:
        raise ConfigError(p11.where.file, p11.where.line, str(e)) from None
    global _pkcs11_line
    _pkcs11_line = p11
