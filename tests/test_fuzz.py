"""Property-based fuzzing of both ends of the relay <-> ca channel.

- The ca's frame handling: a real ca process (tests/ca_child.py, the
  product's pyprivsep.ca.main on a socketpair) gets arbitrary bytes and
  structured frames (fuzzed header fields and payloads, real key ids and
  near-valid PSS blocks / DigestInfos / digests mixed in) over its wire.  It
  always answers with a well-formed reply, keeps serving, and signs exactly
  the requests the policy allows (``expected_status``, the policy written
  again in Python from RFC 8017 and docs/protocol.md) -- and then the
  signature is right.
- The relay's reply check in C, ``pps_reply_parse``, through the FFI: it
  accepts exactly the well-formed replies, and its payload pointer is the
  byte after the header.

``PYPRIVSEP_FUZZ_EXAMPLES`` sets the number of examples per test (default 300,
for ``make test``; ``make fuzz`` sets a large number).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

from ca_child import CaChild, start_ca
from cawire import FRAME_MAX, HDR_SIZE, expected_status, hash_algorithm, pss_block, raw_frame, spki_keyid, unpack_header
from daemonctl import ca_config_text
from keypairs import Pki
from pyprivsep._rsaengine import ffi, lib
from pyprivsep.native import P

EXAMPLES = int(os.environ.get("PYPRIVSEP_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # RSA-4096 private operations on a loaded machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_PAYLOAD: int = P.PPS_MAX_PAYLOAD
KEY_NAMES = ("rsa2048", "rsa4096", "p256", "p384")
DIGESTINFO_PREFIXES = [
    bytes.fromhex("3031300d060960864801650304020105000420"),  # SHA-256
    bytes.fromhex("3041300d060960864801650304020205000430"),  # SHA-384
    bytes.fromhex("3051300d060960864801650304020305000440"),  # SHA-512
    bytes.fromhex("3021300906052b0e03021a05000414"),  # SHA-1
    bytes.fromhex("3020300c06082a864886f70d020505000410"),  # MD5
]
ECDSA_PREHASH = {20: "sha1", 28: "sha224", 32: "sha256", 48: "sha384", 64: "sha512"}
U32 = (1 << 32) - 1
T = TypeVar("T")


@dataclass(frozen=True)
class Held:
    """The ca under fuzz and, per key id, the public key to check its work."""

    ca: CaChild
    public: dict[bytes, rsa.RSAPublicKey | ec.EllipticCurvePublicKey]

    @property
    def ids(self) -> list[bytes]:
        return sorted(self.public)

    def kind(self, key_id: bytes) -> tuple[str, int]:
        """("rsa", modulus bits) or ("ec", curve bits)."""
        pub = self.public[key_id]
        if isinstance(pub, rsa.RSAPublicKey):
            return "rsa", pub.key_size
        return "ec", pub.curve.key_size

    def rsa_id(self, bits: int) -> bytes:
        return next(i for i in self.ids if self.kind(i) == ("rsa", bits))

    def ec_id(self, bits: int) -> bytes:
        return next(i for i in self.ids if self.kind(i) == ("ec", bits))


@pytest.fixture(scope="module")
def held(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Held]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    path = directory / "pyprivsep.conf"
    path.write_text(ca_config_text([pki[name] for name in KEY_NAMES]))
    public: dict[bytes, rsa.RSAPublicKey | ec.EllipticCurvePublicKey] = {}
    for name in KEY_NAMES:
        pub = pki[name].certificate.public_key()
        assert isinstance(pub, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey))
        public[spki_keyid(pki[name].certificate)] = pub
    ca = start_ca(path, directory / "ca.log")
    yield Held(ca, public)
    assert ca.alive(), f"the ca died under fuzzing; log:\n{ca.log()[-4000:]}"
    ca.stop()


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

# how long a payload is: anything up to past the maximum, with the edges likely
payload_sizes = st.one_of(
    st.integers(0, MAX_PAYLOAD + 16),
    st.sampled_from([0, 1, 19, 20, 32, 48, 51, 64, 65, 83, 255, 256, 257, 512, MAX_PAYLOAD - 1, MAX_PAYLOAD, MAX_PAYLOAD + 1]),
)
random_payloads = payload_sizes.flatmap(lambda n: st.binary(min_size=n, max_size=n))


def mostly(usual: st.SearchStrategy[T], other: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """usual three times out of four (and what shrinking goes to)."""
    return st.integers(0, 3).flatmap(lambda r: usual if r < 3 else other)


@st.composite
def pss_payloads(draw: st.DrawFn, bits: int) -> bytes:
    """PSS blocks for a bits-bit modulus, mostly right, else subtly wrong."""
    bits = draw(mostly(st.just(bits), st.sampled_from([2047, 2048, 2049, 4096])))
    hash_name = draw(mostly(st.sampled_from(["sha256", "sha384", "sha512"]), st.just("sha1")))
    hlen = hashlib.new(hash_name).digest_size
    mgf_hash = draw(mostly(st.just(hash_name), st.sampled_from(["sha1", "sha256", "sha384", "sha512"])))
    salt_len = draw(mostly(st.just(hlen), st.sampled_from([0, 1, hlen - 1, hlen + 1, 2 * hlen])))
    block = pss_block(
        draw(st.binary(min_size=hlen, max_size=hlen)),
        bits,
        hash_name,
        salt=draw(st.binary(min_size=salt_len, max_size=salt_len)),
        mgf_hash=mgf_hash,
    )
    if not draw(mostly(st.just(True), st.just(False))):
        index = draw(st.integers(0, len(block) - 1))
        flip = draw(st.integers(1, 255))
        block = block[:index] + bytes([block[index] ^ flip]) + block[index + 1 :]
    return block


@st.composite
def digestinfo_payloads(draw: st.DrawFn) -> bytes:
    prefix = draw(st.sampled_from(DIGESTINFO_PREFIXES))
    length = draw(mostly(st.just(prefix[-1]), st.integers(0, 80)))
    return prefix + draw(st.binary(min_size=length, max_size=length))


digests = st.integers(0, 70).flatmap(lambda n: st.binary(min_size=n, max_size=n))
any_payloads = st.one_of(random_payloads, pss_payloads(2048), digestinfo_payloads(), digests)


# another key type's operation, decryption, a reply or control type, anything
other_ops = st.one_of(
    st.sampled_from([P.PPS_OP_RSA_PRIV_ENC, P.PPS_OP_RSA_PRIV_DEC, P.PPS_OP_ECDSA_SIGN, P.PPS_OP_REPLY, P.PPS_CTL_TICKET_KEYS, 0]),
    st.integers(0, 255),
)
other_args = st.one_of(st.sampled_from([0, P.PPS_PAD_PKCS1, P.PPS_PAD_NONE, 2, 4, 6]), st.integers(0, 0xFFFF))


@st.composite
def requests(draw: st.DrawFn, held: Held) -> tuple[int, int, bytes, bytes]:
    """(op, arg, key id, payload): mostly what its key is for, else anything."""
    key = draw(mostly(st.sampled_from(held.ids), st.binary(min_size=32, max_size=32)))
    kind, bits = held.kind(key) if key in held.public else ("rsa", 2048)
    if kind == "rsa":
        op = draw(mostly(st.just(P.PPS_OP_RSA_PRIV_ENC), other_ops))
        arg = draw(mostly(st.sampled_from([P.PPS_PAD_NONE, P.PPS_PAD_PKCS1]), other_args))
        usual = pss_payloads(bits) if arg == P.PPS_PAD_NONE else digestinfo_payloads()
    else:
        op = draw(mostly(st.just(P.PPS_OP_ECDSA_SIGN), other_ops))
        arg = draw(mostly(st.just(0), other_args))
        usual = digests
    return op, arg, key, draw(mostly(usual, any_payloads))


@st.composite
def request_frames(draw: st.DrawFn, held: Held) -> bytes:
    """Requests in frames whose version and length field may lie."""
    op, arg, key, payload = draw(requests(held))
    true_len = len(payload)
    return raw_frame(
        op,
        arg,
        draw(st.integers(0, U32)),
        key,
        payload,
        version=draw(mostly(st.just(P.PPS_PROTO_VERSION), st.integers(0, 255))),
        length=draw(
            mostly(
                st.just(None),
                st.one_of(st.integers(-2, 2).map(lambda d: min(max(true_len + d, 0), U32)), st.integers(0, U32)),
            )
        ),
    )


arbitrary_frames = st.integers(0, FRAME_MAX + 64).flatmap(lambda n: st.binary(min_size=n, max_size=n))


# --------------------------------------------------------------------------
# The ca, over its wire
# --------------------------------------------------------------------------


def assert_signature_right(held: Held, key_id: bytes, op: int, arg: int, data: bytes, sig: bytes) -> None:
    pub = held.public[key_id]
    if isinstance(pub, rsa.RSAPublicKey):
        k = (pub.key_size + 7) // 8
        numbers = pub.public_numbers()
        recovered = pow(int.from_bytes(sig, "big"), numbers.e, numbers.n).to_bytes(k, "big")
        assert len(sig) == k
        if arg == P.PPS_PAD_NONE:
            assert recovered == data
        else:
            assert recovered == b"\x00\x01" + b"\xff" * (k - len(data) - 3) + b"\x00" + data
    else:
        r, s = decode_dss_signature(sig)
        assert 0 < r and 0 < s
        if len(data) in ECDSA_PREHASH:
            pub.verify(sig, data, ec.ECDSA(Prehashed(hash_algorithm(ECDSA_PREHASH[len(data)]))))


def assert_ca_answers_right(held: Held, data: bytes) -> None:
    """The reply to data is the one the protocol and the policy call for."""
    reply = held.ca.call(data)  # a well-formed reply frame (parse_reply checks)
    if currently_in_test_context():
        event(f"status {reply.arg}")
    if len(data) < HDR_SIZE:
        assert (reply.arg, reply.id, reply.payload) == (P.PPS_ERR_FRAME, 0, b"")
        return
    hdr = unpack_header(data)
    if len(data) > FRAME_MAX:  # too long, but the header says whose it is
        assert (reply.arg, reply.id, reply.payload) == (P.PPS_ERR_FRAME, hdr.id, b"")
        return
    payload = data[HDR_SIZE:]
    assert reply.id == hdr.id
    if hdr.length != len(payload):
        assert (reply.arg, reply.payload) == (P.PPS_ERR_FRAME, b"")
        return
    if hdr.version != P.PPS_PROTO_VERSION:
        assert (reply.arg, reply.payload) == (P.PPS_ERR_VERSION, b"")
        return
    assert reply.key == hdr.key
    if hdr.type == P.PPS_OP_PING and hdr.length == 0:  # whatever the key
        assert (reply.arg, reply.payload) == (P.PPS_OK, b"")
        return
    if hdr.key not in held.public:
        assert (reply.arg, reply.payload) == (P.PPS_ERR_NOKEY, b"")
        return
    status = expected_status(*held.kind(hdr.key), hdr.type, hdr.arg, payload)
    if status != P.PPS_OK:
        assert reply.arg == status, "a refused request got another answer"
        assert reply.payload == b""
        return
    assert reply.arg == P.PPS_OK, f"an allowed request failed: status {reply.arg}"
    assert_signature_right(held, hdr.key, hdr.type, hdr.arg, payload, reply.payload)


@FUZZ
@given(data=arbitrary_frames)
@example(data=b"")
@example(data=b"\x01" * (HDR_SIZE - 1))
@example(data=bytes(HDR_SIZE))
@example(data=b"\x01" * (FRAME_MAX + 1))
def test_ca_handles_arbitrary_bytes(held: Held, data: bytes) -> None:
    assert_ca_answers_right(held, data)


@FUZZ
@given(data=st.data())
def test_ca_handles_structured_frames(held: Held, data: st.DataObject) -> None:
    assert_ca_answers_right(held, data.draw(request_frames(held), label="frame"))


@FUZZ
@given(data=st.data())
def test_ca_handles_well_framed_requests(held: Held, data: st.DataObject) -> None:
    """Well-formed frames: the policy is what is fuzzed."""
    op, arg, key, payload = data.draw(requests(held), label="request")
    assert_ca_answers_right(held, raw_frame(op, arg, data.draw(st.integers(0, U32)), key, payload))


def test_ca_still_answers_after_fuzzing(held: Held) -> None:
    """Runs after the fuzz tests above (file order), on the same ca."""
    for bits, hash_name in ((2048, "sha256"), (4096, "sha512")):
        key_id = held.rsa_id(bits)
        pub = held.public[key_id]
        assert isinstance(pub, rsa.RSAPublicKey)
        message = os.urandom(64)
        block = pss_block(hashlib.new(hash_name, message).digest(), bits, hash_name)
        reply = held.ca.call(raw_frame(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, 42, key_id, block))
        assert (reply.type, reply.arg, reply.id, reply.key) == (P.PPS_OP_REPLY, P.PPS_OK, 42, key_id)
        algorithm = hash_algorithm(hash_name)
        pub.verify(reply.payload, message, padding.PSS(padding.MGF1(algorithm), algorithm.digest_size), algorithm)
    key_id = held.ec_id(256)
    ec_pub = held.public[key_id]
    assert isinstance(ec_pub, ec.EllipticCurvePublicKey)
    digest = os.urandom(32)
    reply = held.ca.call(raw_frame(P.PPS_OP_ECDSA_SIGN, 0, 43, key_id, digest))
    assert (reply.arg, reply.id) == (P.PPS_OK, 43)
    ec_pub.verify(reply.payload, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


# --------------------------------------------------------------------------
# The relay: pps_reply_parse (C)
# --------------------------------------------------------------------------


@st.composite
def reply_frames(draw: st.DrawFn) -> bytes:
    """Replies, their version, type and length field mostly right."""
    payload = draw(random_payloads)
    true_len = len(payload)
    return raw_frame(
        draw(mostly(st.just(P.PPS_OP_REPLY), st.integers(0, 255))),
        draw(st.integers(0, 0xFFFF)),
        draw(st.integers(0, U32)),
        draw(st.binary(min_size=32, max_size=32)),
        payload,
        version=draw(mostly(st.just(P.PPS_PROTO_VERSION), st.integers(0, 255))),
        length=draw(
            mostly(
                st.just(None),
                st.one_of(st.integers(-2, 2).map(lambda d: min(max(true_len + d, 0), U32)), st.integers(0, U32)),
            )
        ),
    )


def well_formed_reply(frame: bytes) -> bool:
    if not HDR_SIZE <= len(frame) <= FRAME_MAX:
        return False
    hdr = unpack_header(frame)
    return (hdr.version, hdr.type, hdr.length) == (P.PPS_PROTO_VERSION, P.PPS_OP_REPLY, len(frame) - HDR_SIZE)


def assert_reply_parse_right(frame: bytes) -> None:
    buf = ffi.new("uint8_t[]", max(len(frame), 1))  # the frame in a C array of its size
    ffi.memmove(buf, frame, len(frame))
    hdr = ffi.new("struct pps_hdr *")
    payload = ffi.new("const uint8_t **")
    ret = lib.pps_reply_parse(buf, len(frame), hdr, payload)
    if currently_in_test_context():
        event(f"returned {ret}")
    expected = well_formed_reply(frame)
    assert ret == (0 if expected else -1), f"pps_reply_parse returned {ret} for a frame of {len(frame)} bytes"
    if ret == 0:
        want = unpack_header(frame)
        assert (hdr.version, hdr.type, hdr.arg, hdr.id, hdr.len) == (want.version, want.type, want.arg, want.id, want.length)
        assert bytes(hdr.key) == want.key
        assert hdr.len <= MAX_PAYLOAD
        assert payload[0] == buf + HDR_SIZE
        assert bytes(ffi.buffer(payload[0], hdr.len)) == frame[HDR_SIZE:]


def exact_reply(payload_len: int, *, length: int | None = None, version: int = 1, type_: int = P.PPS_OP_REPLY) -> bytes:
    return raw_frame(type_, P.PPS_OK, 9, bytes(32), b"\xaa" * payload_len, version=version, length=length)


@FUZZ
@given(frame=st.integers(0, FRAME_MAX + 16).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
@example(frame=b"")
@example(frame=exact_reply(0)[:-1])
@example(frame=exact_reply(0))
@example(frame=exact_reply(MAX_PAYLOAD))
@example(frame=exact_reply(MAX_PAYLOAD + 1))
@example(frame=exact_reply(MAX_PAYLOAD + 16))
@example(frame=exact_reply(10, length=U32))
@example(frame=exact_reply(10, length=9))
@example(frame=exact_reply(10, length=11))
@example(frame=exact_reply(0, length=1))
@example(frame=exact_reply(MAX_PAYLOAD + 1, length=MAX_PAYLOAD))
@example(frame=exact_reply(10, version=2))
@example(frame=exact_reply(10, type_=P.PPS_OP_ECDSA_SIGN))
def test_reply_parse_arbitrary_bytes(frame: bytes) -> None:
    assert_reply_parse_right(frame)


@FUZZ
@given(frame=reply_frames())
def test_reply_parse_structured_frames(frame: bytes) -> None:
    assert_reply_parse_right(frame)


def test_reply_parse_accepts_the_cas_replies(held: Held) -> None:
    """What the ca sends, the relay takes: OK with a signature, and refusals."""
    rsa_id = held.rsa_id(2048)
    block = pss_block(os.urandom(32), 2048)
    for request in (
        raw_frame(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, 1, rsa_id, block),
        raw_frame(P.PPS_OP_RSA_PRIV_DEC, 0, 2, rsa_id, block),
        b"short",
    ):
        held.ca.send_frame(request)
        reply = held.ca.recv_frame()
        assert well_formed_reply(reply)
        assert_reply_parse_right(reply)
