"""The relay <-> ca wire, written from the specs and independent of the ca's
C: an EMSA-PSS encoder from RFC 8017 9.1.1, raw relay <-> ca frames (any
header, even a lying one) and key ids."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

PSS_HASH_NAMES: tuple[str, ...] = ("sha256", "sha384", "sha512")
FRAME_HDR_SIZE = 44  # struct pps_hdr: u8 version, u8 type, u16 arg, u32 id, u32 len, u8 key[32]


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
    """A key's id on the wire: SHA-256 of the DER SubjectPublicKeyInfo."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()
