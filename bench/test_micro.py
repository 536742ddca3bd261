"""Microbenchmarks (pytest-benchmark), run by `make bench`, not by `make test`:

    .venv/bin/python -m pytest bench/test_micro.py

- one private-key operation through a real ca process: a child forked here
  serves one end of a SOCK_SEQPACKET socketpair with pyprivsep.ca's
  `Ca(...).serve(sock)`, as a ca does; the benchmark sends a real request
  frame (an RFC 8017 EMSA-PSS block for RSA-2048, a SHA-256 digest for
  P-256) and waits for the reply;
- the same operation with the private key in this process (cryptography,
  OpenSSL underneath): what the ca's process boundary adds;
- the framing: Frame.pack (what the parent sends its relays) and the
  relay's reply check in C (pps_reply_parse).

Every signature made is checked once against the public key.  The round
trip benchmarks also record the ca child's own CPU time per operation
(extra_info "ca_cpu_us_per_op").
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from pyprivsep.ca import Ca, HeldKey
from pyprivsep.native import FRAME_MAX, HDR_SIZE, CaKey, Frame, P, ffi, lib

MESSAGE = b"TLS 1.3, server CertificateVerify" + bytes(64)


def mgf1(seed: bytes, length: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:length]


def emsa_pss_encode(m_hash: bytes, mod_bits: int, salt: bytes) -> bytes:
    """RFC 8017 9.1.1 with SHA-256 and MGF1-SHA-256, returned as a block
    of the modulus's size (what OpenSSL hands an RSA_METHOD's priv_enc)."""
    h_len, s_len = len(m_hash), len(salt)
    em_bits = mod_bits - 1
    em_len = (em_bits + 7) // 8
    h = hashlib.sha256(bytes(8) + m_hash + salt).digest()
    ps = bytes(em_len - s_len - h_len - 2)
    db = ps + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, mgf1(h, em_len - h_len - 1)))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    em = bytes(masked) + h + b"\xbc"
    k = (mod_bits + 7) // 8
    return bytes(k - em_len) + em


@dataclass
class Key:
    name: str
    key_pem: bytes
    cert_pem: bytes
    private: object
    keyid: bytes
    op: int
    arg: int
    payload: bytes

    def verify(self, sig: bytes) -> None:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(sig, MESSAGE, padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                          hashes.SHA256())
        else:
            public.verify(sig, hashlib.sha256(MESSAGE).digest(),
                          ec.ECDSA(Prehashed(hashes.SHA256())))

    def sign_inprocess(self) -> bytes:
        """The same signature, the key in this process (as `keys inprocess`)."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(MESSAGE, padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                                     hashes.SHA256())
        return self.private.sign(hashlib.sha256(MESSAGE).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))


def make_key(name: str) -> Key:
    from pyprivsep.demo import leaf_certificate

    if name == "rsa2048":
        priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        priv = ec.generate_private_key(ec.SECP256R1())
    cert, _ = leaf_certificate(priv, days=30)
    spki = priv.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    m_hash = hashlib.sha256(MESSAGE).digest()
    if name == "rsa2048":
        op, arg = P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE
        payload = emsa_pss_encode(m_hash, 2048, os.urandom(32))
    else:
        op, arg, payload = P.PPS_OP_ECDSA_SIGN, 0, m_hash
    return Key(name,
               priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
               cert.public_bytes(serialization.Encoding.PEM), priv,
               hashlib.sha256(spki).digest(), op, arg, payload)


@pytest.fixture(scope="module", params=["rsa2048", "p256"])
def key(request: pytest.FixtureRequest) -> Key:
    return make_key(request.param)


class CaChild:
    """A forked child running Ca(...).serve on one end of a socketpair."""

    def __init__(self, key: Key) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        held = {key.keyid: HeldKey(CaKey(key.key_pem, key.cert_pem), key.name)}
        pid = os.fork()
        if pid == 0:                                    # the ca
            status = 1
            try:
                ours.close()
                Ca(1, held).serve(theirs)
                status = 0
            finally:
                os._exit(status)
        theirs.close()
        self.pid, self.sock = pid, ours

    def cpu(self) -> float:
        """Seconds on a CPU (the scheduler's own count, in ns)."""
        return int(Path(f"/proc/{self.pid}/schedstat").read_text().split()[0]) / 1e9

    def close(self) -> None:
        self.sock.close()                       # the ca's recv returns b"": it exits
        _, status = os.waitpid(self.pid, 0)
        assert status == 0


@pytest.fixture(scope="module")
def ca_child(key: Key):
    child = CaChild(key)
    yield child
    child.close()


def request_frame(key: Key, frame_id: int = 7) -> bytes:
    return Frame(key.op, key.arg, frame_id, key.keyid, key.payload).pack()


def reply_signature(data: bytes, key: Key, frame_id: int = 7) -> bytes:
    """The signature in the ca's reply, after the relay's own check of it."""
    hdr = ffi.new("struct pps_hdr *")
    payload = ffi.new("const uint8_t **")
    assert lib.pps_reply_parse(data, len(data), hdr, payload) == 0, "not a well-formed reply"
    assert hdr.arg == P.PPS_OK, hdr.arg
    assert hdr.id == frame_id and bytes(hdr.key) == key.keyid
    return data[HDR_SIZE:]


# ---- one private-key operation --------------------------------------------

def test_keyop_ca_roundtrip(benchmark, key: Key, ca_child: CaChild) -> None:
    """Request frame to a ca process and its reply back (what a relay waits for)."""
    benchmark.group = f"keyop {key.name}"
    frame = request_frame(key)
    sock = ca_child.sock
    sock.send(frame)
    key.verify(reply_signature(sock.recv(FRAME_MAX + 1), key))
    calls = 0

    def roundtrip() -> bytes:
        nonlocal calls
        calls += 1
        sock.send(frame)
        return sock.recv(FRAME_MAX + 1)

    cpu0 = ca_child.cpu()
    data = benchmark(roundtrip)
    benchmark.extra_info["ca_cpu_us_per_op"] = (ca_child.cpu() - cpu0) * 1e6 / max(1, calls)
    key.verify(reply_signature(data, key))


def test_keyop_sign_inprocess(benchmark, key: Key) -> None:
    """The signature with the key in this process: what `keys inprocess` costs."""
    benchmark.group = f"keyop {key.name}"
    key.verify(benchmark(key.sign_inprocess))


# ---- framing ------------------------------------------------------------------

@pytest.fixture(params=[32, 256])
def payload(request: pytest.FixtureRequest) -> bytes:
    return os.urandom(request.param)


def test_frame_pack(benchmark, payload: bytes) -> None:
    benchmark.group = "framing"
    keyid = bytes(range(32))
    frame = Frame(P.PPS_OP_REPLY, P.PPS_OK, 9, keyid, payload)
    assert len(benchmark(frame.pack)) == len(payload) + 44


def test_reply_parse(benchmark, payload: bytes) -> None:
    """The relay's check of a reply (pps_reply_parse, C)."""
    benchmark.group = "framing"
    data = Frame(P.PPS_OP_REPLY, P.PPS_OK, 9, bytes(range(32)), payload).pack()
    hdr = ffi.new("struct pps_hdr *")
    out = ffi.new("const uint8_t **")
    assert benchmark(lib.pps_reply_parse, data, len(data), hdr, out) == 0
    assert hdr.len == len(payload)
