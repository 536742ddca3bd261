"""The relay <-> ca wire, written from the specs and independent of the ca's
C: an EMSA-PSS encoder from RFC 8017 9.1.1, raw relay <-> ca frames (any
header, even a lying one), key ids, and the reading of a ca's reply
(``parse_reply``, the test's own reading of docs/protocol.md).

Also here: ``expected_status``, the policy of docs/protocol.md written
again in Python from RFC 8017 (EMSA-PSS-VERIFY's structure checks), as an
oracle for the fuzz tests.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pyprivsep.native import P

PSS_HASH_NAMES: tuple[str, ...] = ("sha256", "sha384", "sha512")
FRAME_HDR_SIZE = 44  # struct pps_hdr: u8 version, u8 type, u16 arg, u32 id, u32 len, u8 key[32]
HDR_SIZE = FRAME_HDR_SIZE
MAX_PAYLOAD = 1024  # PPS_MAX_PAYLOAD: an RSA-8192 block
FRAME_MAX = HDR_SIZE + MAX_PAYLOAD
PROTO_VERSION = 1
OP_RSA_PRIV_ENC, OP_RSA_PRIV_DEC, OP_ECDSA_SIGN, OP_PING, OP_EDDSA_SIGN, OP_REPLY = 1, 2, 3, 4, 5, 128
PAD_PKCS1, PAD_NONE = 1, 3
OK, ERR_FRAME, ERR_VERSION, ERR_OP, ERR_NOKEY, ERR_POLICY, ERR_CRYPTO = range(7)
# the protocol's numbers, written down here, must be the product's
assert (P.PPS_MAX_PAYLOAD, P.PPS_PROTO_VERSION, P.PPS_OP_REPLY, P.PPS_ERR_CRYPTO, P.PPS_OP_EDDSA_SIGN) == (
    MAX_PAYLOAD, PROTO_VERSION, OP_REPLY, ERR_CRYPTO, OP_EDDSA_SIGN)


def hash_algorithm(name: str) -> hashes.HashAlgorithm:
    """The cryptography hash object for a hashlib name ("sha256", ...)."""
    algorithms: dict[str, hashes.HashAlgorithm] = {
        "sha1": hashes.SHA1(),
        "sha224": hashes.SHA224(),
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }
    return algorithms[name]


def ref_mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    """MGF1 (RFC 8017 B.2.1)."""
    out = b"".join(
        hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        for counter in range(-(-length // hashlib.new(hash_name).digest_size))
    )
    return out[:length]


def emsa_pss_encode(
    mhash: bytes,
    em_bits: int,
    hash_name: str = "sha256",
    *,
    salt: bytes | None = None,
    mgf_hash: str | None = None,
) -> bytes:
    """EMSA-PSS-ENCODE (RFC 8017 9.1.1) of the message hash ``mhash``.

    ``hash_name`` is the hash of step 6 (H = Hash(M')); ``mgf_hash`` the hash
    of MGF1 (default: the same); ``salt`` defaults to random bytes as long as
    the hash.  Returns EM, ceil(em_bits / 8) bytes.
    """
    hlen = hashlib.new(hash_name).digest_size
    if salt is None:
        salt = os.urandom(hlen)
    em_len = -(-em_bits // 8)
    if em_len < len(mhash) + len(salt) + 2:
        raise ValueError("encoding error: modulus too small for this hash and salt")
    h = hashlib.new(hash_name, b"\0" * 8 + mhash + salt).digest()
    db = b"\0" * (em_len - len(salt) - len(h) - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, ref_mgf1(h, len(db), mgf_hash or hash_name)))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    return bytes(masked) + h + b"\xbc"


def pss_block(
    mhash: bytes,
    mod_bits: int,
    hash_name: str = "sha256",
    *,
    salt: bytes | None = None,
    mgf_hash: str | None = None,
) -> bytes:
    """The modulus-sized block a TLS stack hands to the raw RSA private
    operation: EM for emBits = modBits - 1, with a leading zero byte when
    EM is one byte shorter than the modulus (modBits = 8k + 1)."""
    em = emsa_pss_encode(mhash, mod_bits - 1, hash_name, salt=salt, mgf_hash=mgf_hash)
    return em.rjust(-(-mod_bits // 8), b"\0")


def raw_frame(
    type: int,  # noqa: A002 (the protocol's name)
    arg: int,
    id: int,  # noqa: A002
    key: bytes,
    payload: bytes,
    *,
    version: int = 1,
    length: int | None = None,
) -> bytes:
    """A frame with any header: ``length`` None means the true payload length."""
    order: Literal["little", "big"] = sys.byteorder
    return (
        version.to_bytes(1, order)
        + type.to_bytes(1, order)
        + arg.to_bytes(2, order)
        + id.to_bytes(4, order)
        + (len(payload) if length is None else length).to_bytes(4, order)
        + key.ljust(32, b"\0")[:32]
        + payload
    )


@dataclass(frozen=True)
class RawHeader:
    version: int
    type: int
    arg: int
    id: int
    length: int
    key: bytes


def unpack_header(data: bytes) -> RawHeader:
    """The header fields of the first FRAME_HDR_SIZE bytes of data."""
    if len(data) < FRAME_HDR_SIZE:
        raise ValueError("short frame")
    order: Literal["little", "big"] = sys.byteorder
    return RawHeader(
        data[0],
        data[1],
        int.from_bytes(data[2:4], order),
        int.from_bytes(data[4:8], order),
        int.from_bytes(data[8:12], order),
        data[12:44],
    )


def spki_keyid(cert: x509.Certificate) -> bytes:
    """A key's id on the wire: SHA-256 of the DER SubjectPublicKeyInfo (an
    RSA-PSS key's as in the certificate: cryptography re-encodes it)."""
    from cryptography.x509.oid import PublicKeyAlgorithmOID

    from pyprivsep.keys import spki_der
    if cert.public_key_algorithm_oid == PublicKeyAlgorithmOID.RSASSA_PSS:
        return hashlib.sha256(spki_der(cert)).digest()
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


@dataclass(frozen=True)
class Reply:
    version: int
    type: int
    arg: int  # the status
    id: int
    key: bytes
    payload: bytes


def parse_reply(data: bytes) -> Reply:
    """A reply frame's fields; AssertionError unless it is a well-formed reply."""
    assert HDR_SIZE <= len(data) <= FRAME_MAX, f"reply of {len(data)} bytes"
    order: Literal["little", "big"] = sys.byteorder
    length = int.from_bytes(data[8:12], order)
    assert length == len(data) - HDR_SIZE, f"reply length field {length}, {len(data) - HDR_SIZE} bytes follow"
    reply = Reply(data[0], data[1], int.from_bytes(data[2:4], order), int.from_bytes(data[4:8], order),
                  data[12:44], data[HDR_SIZE:])
    assert (reply.version, reply.type) == (PROTO_VERSION, OP_REPLY), reply
    assert reply.arg == OK or reply.payload == b"", "a refusal carries nothing"
    return reply


# --------------------------------------------------------------------------
# The policy, as an oracle: what status a well-framed request must get
# --------------------------------------------------------------------------

DIGESTINFO_PREFIXES = {
    bytes.fromhex("3031300d060960864801650304020105000420"): 32,  # SHA-256
    bytes.fromhex("3041300d060960864801650304020205000430"): 48,  # SHA-384
    bytes.fromhex("3051300d060960864801650304020305000440"): 64,  # SHA-512
}


def pss_structure_ok(block: bytes, bits: int) -> bool:
    """Whether block is, for a bits-bit modulus, an EMSA-PSS encoding with
    SHA-256/384/512, MGF1 of the same hash and a salt as long as the hash:
    RFC 8017 9.1.2 steps 3-10, which need no message."""
    if len(block) != (bits + 7) // 8:
        return False
    em_bits = bits - 1
    em_len = (em_bits + 7) // 8
    if em_len < len(block):  # modBits = 8k + 1: a leading zero byte
        if block[0] != 0:
            return False
        block = block[1:]
    unused = 8 * em_len - em_bits
    if unused and block[0] >> (8 - unused):  # bits above emBits must be zero
        return False
    if block[-1] != 0xBC:
        return False
    for name in ("sha256", "sha384", "sha512"):
        hlen = hashlib.new(name).digest_size
        if em_len < 2 * hlen + 2:
            continue
        masked, h = block[: em_len - hlen - 1], block[em_len - hlen - 1 : -1]
        db = bytearray(a ^ b for a, b in zip(masked, ref_mgf1(h, len(masked), name)))
        db[0] &= 0xFF >> unused
        ps_len = len(db) - hlen - 1
        if not any(db[:ps_len]) and db[ps_len] == 1:
            return True
    return False


# RFC 8446 4.4.3: what a TLS 1.3 server's CertificateVerify signs, before the transcript hash
TLS13_SERVER_CV_PREFIX = b"\x20" * 64 + b"TLS 1.3, server CertificateVerify\x00"
# RFC 8422 5.4 / RFC 8446 4.2.7: named groups a TLS 1.2 ServerKeyExchange may
# name (the relay's), and the length of their public value (uncompressed
# points for the NIST curves)
SKE_GROUP_SHARES = {29: 32, 30: 56, 23: 65, 24: 97, 25: 133}


def eddsa_message_ok(payload: bytes) -> bool:
    """A TLS 1.3 server CertificateVerify content with a SHA-256 or SHA-384
    transcript hash, or a TLS 1.2 ServerKeyExchange's signed part: two
    randoms, ECParameters (named_curve, an allowed group), the ECPoint."""
    prefix = len(TLS13_SERVER_CV_PREFIX)
    if payload.startswith(TLS13_SERVER_CV_PREFIX) and len(payload) - prefix in (32, 48):
        return True
    if len(payload) < 68 or payload[64] != 3:
        return False
    group, share = int.from_bytes(payload[65:67], "big"), payload[68:]
    want = SKE_GROUP_SHARES.get(group)
    return want is not None and payload[67] == want == len(share) and (want in (32, 56) or share[0] == 4)


def expected_status(kind: str, bits: int, op: int, arg: int, payload: bytes) -> int:
    """The status of a well-framed request to a key of this kind ("rsa",
    "ec", "ed25519", "ed448") and size, as docs/protocol.md states the policy."""
    if kind in ("ed25519", "ed448") or op == OP_EDDSA_SIGN:
        if kind not in ("ed25519", "ed448") or op != OP_EDDSA_SIGN or arg != 0:
            return ERR_OP
        return OK if eddsa_message_ok(payload) else ERR_POLICY
    if kind == "rsa" and op == OP_RSA_PRIV_ENC:
        if arg == PAD_NONE:
            return OK if pss_structure_ok(payload, bits) else ERR_POLICY
        if arg == PAD_PKCS1:
            digest = DIGESTINFO_PREFIXES.get(payload[:19])
            return OK if digest is not None and len(payload) == 19 + digest else ERR_POLICY
        return ERR_OP
    if kind == "ec" and op == OP_ECDSA_SIGN:
        if arg != 0:
            return ERR_OP
        return OK if 20 <= len(payload) <= 64 else ERR_POLICY
    return ERR_OP
