"""Key references for pyprivsep's OpenSSL provider (pyprivsep-provider.so).

``pyprivsep keyref [-8] -s SOCKET CERTFILE`` prints a PEM block that names a
key by its ca socket and key id and carries its public key; programs we did
not write (nginx, postfix, openssl s_server ...) load it as their private key
through the provider, which asks the ca to sign.  ``pyprivsep openssl-conf``
prints the OpenSSL configuration that activates the provider.

The format is in docs/protocol.md ("Key references").
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PEM_LABEL = "PYPRIVSEP KEY REFERENCE"
VERSION = 1
SOCKPATH_MAX = 107  # sun_path less its NUL
# 2.25.230940282644351790577104895185602875045.1: an OID from a UUID
# (ITU-T X.667), the PKCS#8 algorithm of the "BEGIN PRIVATE KEY" form
REF_OID = "2.25.230940282644351790577104895185602875045.1"
PROVIDER_FILE = "pyprivsep-provider.so"


def provider_path() -> Path:
    """The provider module installed with this package."""
    return Path(__file__).resolve().with_name(PROVIDER_FILE)


def provider_missing() -> str | None:
    """None when the provider module is installed with this package, else
    why it is not: LibreSSL has no providers, so setup.py does not build it
    there; with OpenSSL it is a build that left it out (``make asan`` builds
    the extension alone)."""
    module = provider_path()
    if module.exists():
        return None
    from pyprivsep import native  # keyref itself needs no TLS library
    library = native.library_version()
    if library.startswith("LibreSSL"):
        return (f"pyprivsep is built against {library}, which has no OpenSSL "
                f"providers: {PROVIDER_FILE} is not built (src/provider)")
    return (f"{module} is missing: this build of pyprivsep against {library} "
            f"did not make it (pip install does)")


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def reference_der(socket_path: str, spki: bytes) -> bytes:
    """PyprivsepKeyReference ::= SEQUENCE { version INTEGER (1),
    socket UTF8String, keyId OCTET STRING (SHA-256 of spki), publicKey
    SubjectPublicKeyInfo }"""
    path = socket_path.encode()
    if not path or len(path) > SOCKPATH_MAX or b"\0" in path:
        raise ValueError(f"socket path must be 1 to {SOCKPATH_MAX} bytes")
    return _der(0x30, _der(0x02, bytes([VERSION])) + _der(0x0C, path) +
                _der(0x04, hashlib.sha256(spki).digest()) + spki)


def pkcs8_der(reference: bytes) -> bytes:
    """PrivateKeyInfo { 0, { our OID }, OCTET STRING { reference } }"""
    return _der(0x30, _der(0x02, b"\0") + _der(0x30, _oid(REF_OID)) +
                _der(0x04, reference))


def pem(label: str, der: bytes) -> str:
    b64 = base64.b64encode(der).decode()
    body = "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def certificate_spki(certfile: str) -> bytes:
    """The DER SubjectPublicKeyInfo of the first certificate in a PEM file."""
    data = Path(certfile).read_bytes()
    cert = x509.load_pem_x509_certificate(data)
    key = cert.public_key()
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise ValueError(f"{certfile}: the provider signs with RSA and EC "
                         "keys only")
    return key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo)


def key_reference(socket_path: str, certfile: str, pkcs8: bool = False) -> str:
    ref = reference_der(socket_path, certificate_spki(certfile))
    return pem("PRIVATE KEY", pkcs8_der(ref)) if pkcs8 else pem(PEM_LABEL, ref)


def openssl_conf(module: Path | None = None) -> str:
    """An OpenSSL configuration activating the default provider, then
    ours; default_properties prefers the default provider for everything
    (key shares, digests) but what only ours has: keys in a ca."""
    module = module or provider_path()
    return f"""\
# pyprivsep: keys in a pyprivsep ca for OpenSSL 3 programs.
# Use as OPENSSL_CONF, or .include it and merge the sections into yours.
openssl_conf = pyprivsep_init

[pyprivsep_init]
providers = pyprivsep_providers
alg_section = pyprivsep_algorithms

[pyprivsep_providers]
default = pyprivsep_default
pyprivsep = pyprivsep_provider

[pyprivsep_default]
activate = 1

[pyprivsep_provider]
module = {module}
activate = 1
# how long one signature waits for the ca, in ms (1 to 60000; default 2000)
# timeout = 2000

[pyprivsep_algorithms]
default_properties = ?provider=default
"""


def keyref_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="pyprivsep keyref",
        usage="pyprivsep keyref [-8] -s socket certfile",
        description="print a key reference for pyprivsep's OpenSSL provider")
    ap.add_argument("-8", dest="pkcs8", action="store_true",
                    help='the PKCS#8 form ("BEGIN PRIVATE KEY"), for '
                    "readers that skip unknown PEM labels (postfix)")
    ap.add_argument("-s", dest="socket", required=True, metavar="socket",
                    help="the ca's socket (absolute path)")
    ap.add_argument("certfile", help="the key's certificate (PEM)")
    args = ap.parse_args(argv)
    if not os.path.isabs(args.socket):
        print("pyprivsep keyref: the socket path must be absolute",
              file=sys.stderr)
        return 1
    try:
        sys.stdout.write(key_reference(args.socket, args.certfile, args.pkcs8))
    except (OSError, ValueError) as e:
        print(f"pyprivsep keyref: {e}", file=sys.stderr)
        return 1
    return 0


def openssl_conf_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="pyprivsep openssl-conf", usage="pyprivsep openssl-conf",
        description="print an OpenSSL configuration that activates "
        "pyprivsep's provider")
    ap.parse_args(argv)
    why = provider_missing()
    if why is not None:
        print(f"pyprivsep openssl-conf: {why}", file=sys.stderr)
        return 1
    sys.stdout.write(openssl_conf(provider_path()))
    return 0
