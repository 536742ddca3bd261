"""What a ca agrees to do with a key: the only requests TLS needs.

The policy itself is C (src/_rsaengine/ca.c, pps_policy_check), on the
ca's request path; this is its Python face, for tests and tools:
- RSA raw private operations only on a well-formed RSA-PSS encoding for
  the key's modulus (SHA-256/384/512, MGF1 of the same hash, a salt as long
  as the hash), so a relay cannot decrypt or sign arbitrary blocks;
- RSA PKCS#1 v1.5 only over a DigestInfo of SHA-256/384/512 (SHA-1 only
  when allowed) with a digest of exactly that length;
- ECDSA only over a digest of 20 to 64 bytes;
- everything else, RSA decryption always, refused.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyprivsep.native import P, ffi, lib


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
    status = lib.pps_policy_check(key.kind == "rsa", key.bits,
                                  int(key.allow_sha1), op, arg, data, len(data))
    if status != P.PPS_OK:
        raise Refused(status, ffi.string(lib.pps_error()).decode())
