"""What a ca agrees to do with a key: the only requests TLS needs.

A relay may be in an attacker's hands, so the ca is not a general RSA
oracle.  It performs:
- RSA raw private operations only on a block that is a well-formed
  RSA-PSS encoding (EMSA-PSS, RFC 8017 9.1) for the key's modulus, with
  SHA-256/384/512, MGF1 of the same hash and a salt as long as the hash
  (what TLS 1.3 and OpenSSL's TLS 1.2 use).  A ciphertext to decrypt or an
  arbitrary block to sign is refused.
- RSA PKCS#1 v1.5 signatures only over a DigestInfo of SHA-256/384/512
  (SHA-1 only when allowed) with a digest of exactly that length.
- ECDSA only over a digest of 20 to 64 bytes.
Everything else, RSA decryption included, is refused.  Each check needs
the public key's size only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pyprivsep.native import P

# DER DigestInfo prefixes (RFC 8017 9.2 note 1), digest appended.
DIGESTINFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
DIGESTINFO_SHA1 = bytes.fromhex("3021300906052b0e03021a05000414")
PSS_HASHES = ("sha256", "sha384", "sha512")
_HASH = {name: (getattr(hashlib, name), getattr(hashlib, name)().digest_size)
         for name in ("sha1", "sha256", "sha384", "sha512")}
ECDSA_DIGEST = (20, 64)


@dataclass(frozen=True)
class KeyPolicy:
    kind: str               # "rsa" or "ec"
    bits: int               # RSA modulus bits / curve bits
    allow_sha1: bool = False


class Refused(Exception):
    """A request the ca will not perform; .status is the PPS_ERR_* reply."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def check(op: int, arg: int, data: bytes, key: KeyPolicy) -> None:
    """Raise Refused unless the request is one TLS needs of this key."""
    if op == P.PPS_OP_RSA_PRIV_ENC and key.kind == "rsa":
        if arg == P.PPS_PAD_NONE:
            return _check_pss(data, key.bits)
        if arg == P.PPS_PAD_PKCS1:
            return _check_digestinfo(data, key)
        raise Refused(P.PPS_ERR_OP, f"RSA padding {arg} not allowed")
    if op == P.PPS_OP_ECDSA_SIGN and key.kind == "ec":
        if not ECDSA_DIGEST[0] <= len(data) <= ECDSA_DIGEST[1]:
            raise Refused(P.PPS_ERR_POLICY,
                          f"ECDSA digest of {len(data)} bytes")
        return None
    if op == P.PPS_OP_RSA_PRIV_DEC:
        raise Refused(P.PPS_ERR_OP, "RSA decryption is never performed")
    raise Refused(P.PPS_ERR_OP, f"operation {op} not allowed on an "
                  f"{key.kind.upper()} key")


def _check_digestinfo(data: bytes, key: KeyPolicy) -> None:
    prefixes = list(DIGESTINFO.values())
    if key.allow_sha1:
        prefixes.append(DIGESTINFO_SHA1)
    for prefix in prefixes:
        # the last prefix byte is the digest's length
        if data.startswith(prefix) and len(data) == len(prefix) + prefix[-1]:
            return None
    raise Refused(P.PPS_ERR_POLICY, "PKCS#1 block is not a DigestInfo of an "
                  "allowed hash")


def mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    new, size = _HASH[hash_name]
    return b"".join(new(seed + i.to_bytes(4, "big")).digest()
                    for i in range(-(-length // size)))[:length]


def _check_pss(block: bytes, mod_bits: int) -> None:
    k = (mod_bits + 7) // 8
    if len(block) != k:
        raise Refused(P.PPS_ERR_POLICY,
                      f"raw RSA block of {len(block)} bytes, modulus is {k}")
    em_bits = mod_bits - 1
    top = em_bits % 8           # bits used in EM's first byte (0: all 8)
    if top == 0:                # EM is one byte shorter than the modulus
        if block[0] != 0:
            raise Refused(P.PPS_ERR_POLICY, "not a PSS encoding (leading byte)")
        em = block[1:]
    else:
        em = block
    if top and em[0] >> top:
        raise Refused(P.PPS_ERR_POLICY, "not a PSS encoding (top bits set)")
    if em[-1] != 0xBC:
        raise Refused(P.PPS_ERR_POLICY, "not a PSS encoding (trailer)")
    for name in PSS_HASHES:
        if _pss_db_ok(em, top, name):
            return None
    raise Refused(P.PPS_ERR_POLICY, "not a PSS encoding with SHA-2 and "
                  "a digest-length salt")


def _pss_db_ok(em: bytes, top: int, hash_name: str) -> bool:
    """DB = MGF1(H) xor maskedDB must be 00..00 01 || salt, the salt as
    long as the hash: as a number, DB (its unused top bits cleared) shifted
    right past the salt is exactly 1."""
    hlen = _HASH[hash_name][1]
    db_len = len(em) - hlen - 1
    if db_len < hlen + 1:       # room for 0x01 and a salt of hlen bytes
        return False
    h = em[db_len:-1]
    db = int.from_bytes(em[:db_len], "big") ^ \
        int.from_bytes(mgf1(h, db_len, hash_name), "big")
    if top:
        db &= (1 << (8 * (db_len - 1) + top)) - 1
    return db >> (8 * hlen) == 1
