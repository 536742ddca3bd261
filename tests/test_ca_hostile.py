"""A real ca process against a hostile relay.

The test forks a child that runs ``pyprivsep.ca.main`` on one end of a
SOCK_SEQPACKET socketpair, as the parent does (tests/ca_child.py), and plays
the relay on the other end -- holding only certificates, as an attacker who
owns a relay process does.  Every malformed or refused request must get the right error
reply (id echoed where the header could be read, no payload), and leave the ca
serving: after each one a well-formed RSA-PSS request still gets a signature
that verifies.  Refusals are logged, at most 10 a second.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from basics import wait_until
from ca_child import CaChild, start_ca
from cawire import FRAME_MAX, HDR_SIZE, pss_block, raw_frame, spki_keyid, unpack_header
from daemonctl import ca_config_text
from keypairs import KeyPair, Pki
from pyprivsep.native import P

BURST = 10  # refusals logged per second (REFUSALS_LOGGED in src/_rsaengine/ca.c)
REFUSED_RE = re.compile(r"refused request (?P<id>\d+) from relay 1, key (?P<key>.*?): (?P<reason>.*)$")

SHA256_DIGESTINFO = bytes.fromhex("3031300d060960864801650304020105000420")
SHA1_DIGESTINFO = bytes.fromhex("3021300906052b0e03021a05000414")
MD5_DIGESTINFO = bytes.fromhex("3020300c06082a864886f70d020505000410")


# --------------------------------------------------------------------------
# The ca child (tests/ca_child.py) and the hostile relay's view of it
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """What the hostile relay holds: certificates (public keys) and key ids."""

    rsa_pub: rsa.RSAPublicKey
    rsa_id: bytes
    ec_pub: ec.EllipticCurvePublicKey
    ec_id: bytes

    @property
    def k(self) -> int:
        return (self.rsa_pub.key_size + 7) // 8


@pytest.fixture(scope="module")
def keys(pki: Pki) -> Keys:
    rsa_pub, ec_pub = pki["rsa2048"].certificate.public_key(), pki["p256"].certificate.public_key()
    assert isinstance(rsa_pub, rsa.RSAPublicKey) and isinstance(ec_pub, ec.EllipticCurvePublicKey)
    return Keys(rsa_pub, spki_keyid(pki["rsa2048"].certificate), ec_pub, spki_keyid(pki["p256"].certificate))


@pytest.fixture(scope="module")
def ca_config(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "pyprivsep.conf"
    path.write_text(ca_config_text([pki["rsa2048"], pki["p256"]]))
    return path


@pytest.fixture
def start(ca_config: Path, tmp_path: Path) -> Iterator[Callable[[], CaChild]]:
    """Factory for fresh ca children, stopped at teardown."""
    children: list[CaChild] = []

    def start_one() -> CaChild:
        child = start_ca(ca_config, tmp_path / f"ca{len(children)}.log")
        children.append(child)
        return child

    yield start_one
    for child in children:
        child.stop()


@pytest.fixture(scope="module")
def rsa8192_keys(pki: Pki, rsa8192: KeyPair) -> Keys:
    rsa_pub, ec_pub = rsa8192.certificate.public_key(), pki["p256"].certificate.public_key()
    assert isinstance(rsa_pub, rsa.RSAPublicKey) and isinstance(ec_pub, ec.EllipticCurvePublicKey)
    return Keys(rsa_pub, spki_keyid(rsa8192.certificate), ec_pub, spki_keyid(pki["p256"].certificate))


@pytest.fixture
def start_rsa8192(pki: Pki, rsa8192: KeyPair, tmp_path: Path) -> Iterator[Callable[[], CaChild]]:
    """Factory for fresh ca children holding an RSA-8192 key and P-256."""
    config = tmp_path / "pyprivsep-8192.conf"
    config.write_text(ca_config_text([rsa8192, pki["p256"]]))
    children: list[CaChild] = []

    def start_one() -> CaChild:
        child = start_ca(config, tmp_path / f"ca8192-{len(children)}.log")
        children.append(child)
        return child

    yield start_one
    for child in children:
        child.stop()


@pytest.fixture(scope="module")
def shared_ca(ca_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaChild]:
    """One ca for the whole list of hostile requests: they accumulate."""
    child = start_ca(ca_config, tmp_path_factory.mktemp("ca-log") / "ca.log")
    yield child
    child.stop()


def assert_serves_valid_requests(ca: CaChild, keys: Keys) -> None:
    """A well-formed RSA-PSS and ECDSA request get a signature that verifies."""
    message = os.urandom(48)
    block = pss_block(hashlib.sha256(message).digest(), keys.rsa_pub.key_size, "sha256")
    rid = ca.next_id()
    reply = ca.call(raw_frame(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, rid, keys.rsa_id, block))
    assert (reply.arg, reply.id, reply.key) == (P.PPS_OK, rid, keys.rsa_id), f"log:\n{ca.log()}"
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    keys.rsa_pub.verify(reply.payload, message, pss, hashes.SHA256())

    digest = hashlib.sha256(message).digest()
    rid = ca.next_id()
    reply = ca.call(raw_frame(P.PPS_OP_ECDSA_SIGN, 0, rid, keys.ec_id, digest))
    assert (reply.arg, reply.id, reply.key) == (P.PPS_OK, rid, keys.ec_id)
    keys.ec_pub.verify(reply.payload, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert ca.alive()


# --------------------------------------------------------------------------
# Hostile requests: each gets its error reply, and the ca goes on serving
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    name: str
    build: Callable[[Keys, int], bytes]  # (keys, request id) -> the frame
    status: int
    id_readable: bool = True  # the reply echoes the id (else 0)
    key_echoed: bool = True  # the reply echoes the key (frame errors: zeros)


def rsa_req(arg: int, payload: Callable[[Keys], bytes], op: int = P.PPS_OP_RSA_PRIV_ENC) -> Callable[[Keys, int], bytes]:
    return lambda k, rid: raw_frame(op, arg, rid, k.rsa_id, payload(k))


def ec_req(payload: Callable[[Keys], bytes], op: int = P.PPS_OP_ECDSA_SIGN, arg: int = 0) -> Callable[[Keys, int], bytes]:
    return lambda k, rid: raw_frame(op, arg, rid, k.ec_id, payload(k))


def valid_pss(k: Keys) -> bytes:
    return pss_block(os.urandom(32), k.rsa_pub.key_size, "sha256")


def pss_with(hash_name: str, *, salt_len: int | None = None, mgf_hash: str | None = None) -> Callable[[Keys], bytes]:
    def build(k: Keys) -> bytes:
        hlen = hashlib.new(hash_name).digest_size
        salt = os.urandom(hlen if salt_len is None else salt_len)
        return pss_block(os.urandom(hlen), k.rsa_pub.key_size, hash_name, salt=salt, mgf_hash=mgf_hash)

    return build


def oaep_ciphertext(k: Keys) -> bytes:
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return k.rsa_pub.encrypt(os.urandom(48), oaep)


def pkcs1_ciphertext(k: Keys) -> bytes:
    return k.rsa_pub.encrypt(os.urandom(48), padding.PKCS1v15())


def valid_with_length(length: int) -> Callable[[Keys, int], bytes]:
    """A valid PSS request whose length field lies."""
    return lambda k, rid: raw_frame(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, rid, k.rsa_id, valid_pss(k), length=length)


def long_frame(size: int) -> Callable[[Keys, int], bytes]:
    """size bytes whose header's length field tells the truth."""
    return lambda k, rid: raw_frame(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, rid, k.rsa_id, os.urandom(size - HDR_SIZE))


POLICY, OP, FRAME = P.PPS_ERR_POLICY, P.PPS_ERR_OP, P.PPS_ERR_FRAME
HOSTILE: list[Hostile] = [
    # keys
    Hostile("unknown-key", lambda k, rid: raw_frame(1, P.PPS_PAD_NONE, rid, os.urandom(32), valid_pss(k)), P.PPS_ERR_NOKEY),
    Hostile("zero-key", lambda k, rid: raw_frame(3, 0, rid, bytes(32), os.urandom(32)), P.PPS_ERR_NOKEY),
    Hostile("rsa-id-with-one-bit-flipped", lambda k, rid: raw_frame(1, 3, rid, bytes([k.rsa_id[0] ^ 1]) + k.rsa_id[1:], valid_pss(k)), P.PPS_ERR_NOKEY),
    # the policy: raw RSA
    Hostile("random-block", rsa_req(P.PPS_PAD_NONE, lambda k: os.urandom(k.k)), POLICY),
    Hostile("oaep-ciphertext-as-block", rsa_req(P.PPS_PAD_NONE, oaep_ciphertext), POLICY),
    Hostile("pkcs1-ciphertext-as-block", rsa_req(P.PPS_PAD_NONE, pkcs1_ciphertext), POLICY),
    Hostile("oaep-ciphertext-as-digestinfo", rsa_req(P.PPS_PAD_PKCS1, oaep_ciphertext), POLICY),
    Hostile("ciphertext-decrypt", rsa_req(P.PPS_PAD_PKCS1, pkcs1_ciphertext, op=P.PPS_OP_RSA_PRIV_DEC), OP),
    Hostile("ciphertext-decrypt-nopad", rsa_req(P.PPS_PAD_NONE, oaep_ciphertext, op=P.PPS_OP_RSA_PRIV_DEC), OP),
    Hostile("valid-pss-as-decrypt", rsa_req(P.PPS_PAD_NONE, valid_pss, op=P.PPS_OP_RSA_PRIV_DEC), OP),
    Hostile("pss-salt-0", rsa_req(P.PPS_PAD_NONE, pss_with("sha256", salt_len=0)), POLICY),
    Hostile("pss-salt-33", rsa_req(P.PPS_PAD_NONE, pss_with("sha256", salt_len=33)), POLICY),
    Hostile("pss-sha1", rsa_req(P.PPS_PAD_NONE, pss_with("sha1")), POLICY),
    Hostile("pss-mgf-mismatch", rsa_req(P.PPS_PAD_NONE, pss_with("sha256", mgf_hash="sha384")), POLICY),
    Hostile("pss-wrong-trailer", rsa_req(P.PPS_PAD_NONE, lambda k: valid_pss(k)[:-1] + b"\xbd"), POLICY),
    Hostile("pss-top-bit-set", rsa_req(P.PPS_PAD_NONE, lambda k: bytes([valid_pss(k)[0] | 0x80]) + valid_pss(k)[1:]), POLICY),
    Hostile("pss-block-too-long", rsa_req(P.PPS_PAD_NONE, lambda k: b"\0" + valid_pss(k)), POLICY),
    Hostile("pss-block-too-short", rsa_req(P.PPS_PAD_NONE, lambda k: valid_pss(k)[1:]), POLICY),
    Hostile("pss-for-rsa4096", rsa_req(P.PPS_PAD_NONE, lambda k: pss_block(os.urandom(32), 4096)), POLICY),
    Hostile("unknown-padding-oaep", rsa_req(4, valid_pss), OP),
    # the policy: PKCS#1 v1.5
    Hostile("digestinfo-short-digest", rsa_req(P.PPS_PAD_PKCS1, lambda k: SHA256_DIGESTINFO + os.urandom(31)), POLICY),
    Hostile("digestinfo-long-digest", rsa_req(P.PPS_PAD_PKCS1, lambda k: SHA256_DIGESTINFO + os.urandom(33)), POLICY),
    Hostile("digestinfo-trailing-junk", rsa_req(P.PPS_PAD_PKCS1, lambda k: SHA256_DIGESTINFO + os.urandom(32) + b"junk"), POLICY),
    Hostile("digestinfo-sha1", rsa_req(P.PPS_PAD_PKCS1, lambda k: SHA1_DIGESTINFO + os.urandom(20)), POLICY),
    Hostile("digestinfo-md5", rsa_req(P.PPS_PAD_PKCS1, lambda k: MD5_DIGESTINFO + os.urandom(16)), POLICY),
    Hostile("digestinfo-bare-digest", rsa_req(P.PPS_PAD_PKCS1, lambda k: os.urandom(32)), POLICY),
    # the policy: ECDSA and key types
    Hostile("ecdsa-19", ec_req(lambda k: os.urandom(19)), POLICY),
    Hostile("ecdsa-65", ec_req(lambda k: os.urandom(65)), POLICY),
    Hostile("ecdsa-on-rsa-key", lambda k, rid: raw_frame(P.PPS_OP_ECDSA_SIGN, 0, rid, k.rsa_id, os.urandom(32)), OP),
    Hostile("rsa-on-ec-key", ec_req(lambda k: SHA256_DIGESTINFO + os.urandom(32), op=P.PPS_OP_RSA_PRIV_ENC, arg=1), OP),
    Hostile("rsa-raw-on-ec-key", ec_req(valid_pss, op=P.PPS_OP_RSA_PRIV_ENC, arg=3), OP),
    Hostile("decrypt-on-ec-key", ec_req(lambda k: os.urandom(32), op=P.PPS_OP_RSA_PRIV_DEC), OP),
    Hostile("unknown-op-99", rsa_req(P.PPS_PAD_NONE, valid_pss, op=99), OP),
    Hostile("unknown-op-99-ec", ec_req(lambda k: os.urandom(32), op=99), OP),
    Hostile("reply-type-sent-to-ca", rsa_req(P.PPS_OK, valid_pss, op=P.PPS_OP_REPLY), OP),
    Hostile("control-type-sent-to-ca", rsa_req(0, lambda k: os.urandom(80), op=P.PPS_CTL_TICKET_KEYS), OP),
    # zero-length payloads
    Hostile("empty-pss", rsa_req(P.PPS_PAD_NONE, lambda k: b""), POLICY),
    Hostile("empty-digestinfo", rsa_req(P.PPS_PAD_PKCS1, lambda k: b""), POLICY),
    Hostile("empty-ecdsa", ec_req(lambda k: b""), POLICY),
    Hostile("empty-decrypt", rsa_req(P.PPS_PAD_NONE, lambda k: b"", op=P.PPS_OP_RSA_PRIV_DEC), OP),
    Hostile("empty-unknown-op", rsa_req(0, lambda k: b"", op=0), OP),
    # frames
    Hostile("one-byte", lambda k, rid: b"\x01", FRAME, id_readable=False, key_echoed=False),
    Hostile("short-frame", lambda k, rid: raw_frame(1, 3, rid, k.rsa_id, b"")[: HDR_SIZE - 1], FRAME, id_readable=False, key_echoed=False),
    Hostile("longer-than-frame-max", long_frame(FRAME_MAX + 100), FRAME),
    Hostile("frame-max-plus-1", long_frame(FRAME_MAX + 1), FRAME),
    Hostile("frame-max-64k", long_frame(65536), FRAME),
    Hostile("frame-max-payload", long_frame(FRAME_MAX), POLICY),  # well-formed frame, 1024-byte block
    Hostile("length-field-plus-1", lambda k, rid: valid_with_length(k.k + 1)(k, rid), FRAME),
    Hostile("length-field-minus-1", lambda k, rid: valid_with_length(k.k - 1)(k, rid), FRAME),
    Hostile("length-field-zero", valid_with_length(0), FRAME),
    Hostile("length-field-max-payload", valid_with_length(1024), FRAME),
    Hostile("length-field-huge", valid_with_length(0xFFFFFFFF), FRAME),
    Hostile("length-field-2^31", valid_with_length(1 << 31), FRAME),
    Hostile("version-2", lambda k, rid: raw_frame(1, 3, rid, k.rsa_id, valid_pss(k), version=2), P.PPS_ERR_VERSION),
    Hostile("version-0", lambda k, rid: raw_frame(1, 3, rid, k.rsa_id, valid_pss(k), version=0), P.PPS_ERR_VERSION),
    Hostile("version-255", lambda k, rid: raw_frame(3, 0, rid, k.ec_id, os.urandom(32), version=255), P.PPS_ERR_VERSION),
]


def test_ca_serves_before_anything_hostile(shared_ca: CaChild, keys: Keys) -> None:
    assert_serves_valid_requests(shared_ca, keys)


@pytest.mark.parametrize("hostile", HOSTILE, ids=[h.name for h in HOSTILE])
def test_hostile_request_refused_and_ca_still_serves(shared_ca: CaChild, keys: Keys, hostile: Hostile) -> None:
    rid = shared_ca.next_id() | 0xAB000000  # a distinctive id, echoed where readable
    frame = hostile.build(keys, rid)
    reply = shared_ca.call(frame)
    assert reply.arg == hostile.status, f"{hostile.name}: status {reply.arg}, log:\n{shared_ca.log()[-2000:]}"
    assert reply.id == (rid if hostile.id_readable else 0)
    if hostile.key_echoed:
        assert reply.key == frame[12:44]
    assert reply.payload == b"", "a refusal carries nothing"
    assert_serves_valid_requests(shared_ca, keys)


def test_random_garbage_then_valid_request(start: Callable[[], CaChild], keys: Keys) -> None:
    ca = start()
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    for i in range(1000):
        size = rng.randint(1, FRAME_MAX + 64)
        data = rng.randbytes(size)
        if i % 4 == 0 and size >= HDR_SIZE:  # a believable header over garbage
            data = raw_frame(rng.choice((1, 2, 3, rng.randrange(256))), rng.randrange(4), rng.randrange(1 << 32),
                             rng.choice((keys.rsa_id, keys.ec_id, data[12:44])), data[HDR_SIZE:])
        reply = ca.call(data)
        if reply.arg == P.PPS_OK:  # only an ECDSA digest can be signable by chance
            hdr = unpack_header(data)
            signable = (hdr.version, hdr.type, hdr.key, hdr.length) == (1, P.PPS_OP_ECDSA_SIGN, keys.ec_id, size - HDR_SIZE)
            assert signable and 20 <= size - HDR_SIZE <= 64, f"garbage frame {i} (seed {seed}) was signed"
        else:
            assert reply.payload == b""
    assert ca.alive()
    assert_serves_valid_requests(ca, keys)
    assert ca.alive()  # os.waitpid(pid, WNOHANG)


def test_zero_length_message_does_not_stop_the_ca(start: Callable[[], CaChild], keys: Keys) -> None:
    # it once did: recv() returning nothing was taken for the end of the channel
    ca = start()
    assert_serves_valid_requests(ca, keys)
    reply = ca.call(b"")  # a SOCK_SEQPACKET message of 0 bytes: recv() returns b""
    assert (reply.arg, reply.id, reply.payload) == (FRAME, 0, b""), "a malformed frame, answered"
    assert_serves_valid_requests(ca, keys)


# --------------------------------------------------------------------------
# Refusals are logged, rate-limited
# --------------------------------------------------------------------------


def refused_id(line: str) -> int:
    match = REFUSED_RE.search(line)
    assert match is not None, line
    return int(match["id"])


def refusal_line(ca: CaChild, rid: int) -> re.Match[str]:
    """The refusal line of request rid, once the ca has written it."""

    def find() -> re.Match[str] | None:
        for line in ca.refusal_lines():
            match = REFUSED_RE.search(line)
            if match and int(match["id"]) == rid:
                assert line.startswith("ca 1: ")
                return match
        return None

    return wait_until(find, 30, lambda: f"a refusal line for request {rid} in:\n{ca.log()}", interval=0.01)


def test_refusal_is_logged_with_reason_and_key(start: Callable[[], CaChild], keys: Keys) -> None:
    ca = start()
    unknown = os.urandom(32)
    requests = {
        101: (raw_frame(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, 101, keys.rsa_id, os.urandom(keys.k)), "RSA-2048 CN=rsa2048.test", "not a PSS encoding"),
        102: (raw_frame(P.PPS_OP_RSA_PRIV_DEC, P.PPS_PAD_PKCS1, 102, keys.rsa_id, pkcs1_ciphertext(keys)), "RSA-2048 CN=rsa2048.test", "RSA decryption is never performed"),
        103: (raw_frame(P.PPS_OP_ECDSA_SIGN, 0, 103, keys.ec_id, os.urandom(19)), "EC-256 CN=p256.test", "ECDSA digest of 19 bytes"),
        104: (raw_frame(P.PPS_OP_ECDSA_SIGN, 0, 104, unknown, os.urandom(32)), unknown.hex()[:16], "unknown key"),
        105: (raw_frame(P.PPS_OP_ECDSA_SIGN, 0, 105, keys.ec_id, b"", version=2), None, "version 2"),
    }
    for rid, (frame, _, _) in requests.items():
        assert ca.call(frame).arg != P.PPS_OK
    for rid, (_, key, reason) in requests.items():
        match = refusal_line(ca, rid)
        if key is not None:
            assert match["key"] == key
        assert reason in match["reason"]
    assert_serves_valid_requests(ca, keys)
    assert len(ca.refusal_lines()) == len(requests)  # valid requests are not logged as refused


# The ca's rate limit counts time(NULL) seconds: the wall clock, read coarsely
# (glibc's time() lags clock_gettime by up to a clock tick), so the test keeps
# this far from a second's boundary on its own, finer clock.
CLOCK_MARGIN = 0.05


def flood_within_one_second(ca: CaChild, keys: Keys, count: int) -> int | None:
    """Send count refusals within one second of the ca's clock; the second,
    or None if they straddled a second boundary."""
    assert_serves_valid_requests(ca, keys)  # serving, and nothing refused yet
    wait_until(lambda: CLOCK_MARGIN < time.time() % 1 < 0.2, 2.0, "the start of a second", interval=0.002)
    second = int(time.time())
    for i in range(count):
        reply = ca.call(raw_frame(P.PPS_OP_RSA_PRIV_DEC, 0, 1000 + i, keys.rsa_id, os.urandom(keys.k)))
        assert reply.arg == P.PPS_ERR_OP
    return second if time.time() < second + 1 - CLOCK_MARGIN else None


def test_refusals_are_rate_limited(start: Callable[[], CaChild], keys: Keys) -> None:
    count = 3 * BURST
    for _ in range(3):  # a fresh ca per attempt: a loaded machine may straddle a second
        ca = start()
        second = flood_within_one_second(ca, keys, count)
        if second is not None:
            break
    else:
        pytest.fail("could not send 30 refusals within one second in 3 attempts")
    assert ca.alive()
    refusal_line(ca, 1000 + BURST - 1)  # the last one logged is there ...
    flood_lines = ca.refusal_lines()
    assert [refused_id(line) for line in flood_lines] == list(range(1000, 1000 + BURST))  # ... and no more
    assert "not logged" not in ca.log()
    # the next refusal, in a later second, logs itself and the summary (or
    # the summary came already, after a quiet second)
    wait_until(lambda: time.time() > second + 1 + CLOCK_MARGIN, 2.0, "the next second", interval=0.01)
    assert ca.call(raw_frame(99, 0, 2000, keys.rsa_id, b"")).arg == P.PPS_ERR_OP
    refusal_line(ca, 2000)
    lines = ca.wait_for_log(f"ca 1: {count - BURST} more refusals not logged").splitlines()
    summaries = [line for line in lines if "more refusals not logged" in line]
    assert summaries == [f"ca 1: {count - BURST} more refusals not logged"], ca.log()
    refusals = ca.refusal_lines()
    assert len(refusals) == BURST + 1
    assert refused_id(refusals[-1]) == 2000
    assert lines.index(summaries[0]) < lines.index(refusals[-1])
    assert_serves_valid_requests(ca, keys)


# --------------------------------------------------------------------------
# SIGTERM ends a ca in every state
# --------------------------------------------------------------------------

STOP_TIMEOUT = 10.0  # seconds: generous; a ca that lost its SIGTERM never exits


def proc_state(pid: int) -> str:
    """The scheduler's state letter of pid: R running, S sleeping, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]


def cpu_seconds(pid: int) -> float:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def assert_stops_on_sigterm(ca: CaChild) -> None:
    os.kill(ca.pid, signal.SIGTERM)
    try:
        wait_until(lambda: not ca.alive(), STOP_TIMEOUT, lambda: f"the ca to exit on SIGTERM; log:\n{ca.log()}",
                   interval=0.01)
    finally:
        if ca.alive():  # leave no ca behind, whatever the outcome
            os.kill(ca.pid, signal.SIGKILL)
    assert ca.wait_status is not None
    assert os.waitstatus_to_exitcode(ca.wait_status) == 0, ca.log()  # ca.main returned: a clean stop
    assert "ca.main returned 0" in ca.wait_for_log("ca.main returned")


def test_sigterm_stops_an_idle_ca(start: Callable[[], CaChild], keys: Keys) -> None:
    ca = start()
    assert_serves_valid_requests(ca, keys)  # now waiting for the next request
    wait_until(lambda: proc_state(ca.pid) == "S", 30, "the ca to wait for a request", interval=0.01)
    assert_stops_on_sigterm(ca)


def test_sigterm_stops_a_ca_blocked_sending_to_a_relay_that_does_not_read(
    start: Callable[[], CaChild], keys: Keys
) -> None:
    """The relay sends request after request and never reads a reply: the
    ca's replies fill the channel and it waits to send.  After a reload an
    old ca stayed so (its EINTR retried in C, the Python handler never ran)
    until the parent's SIGKILL 30 s later."""
    ca = start()
    assert_serves_valid_requests(ca, keys)
    frame = raw_frame(P.PPS_OP_ECDSA_SIGN, 0, 7, keys.ec_id, os.urandom(32))
    ca.sock.setblocking(False)
    sent = 0

    def blocked() -> bool:
        """Our requests fill the channel and the ca, asleep, takes no more."""
        nonlocal sent
        try:
            while True:
                ca.sock.send(frame)
                sent += 1
        except BlockingIOError:
            pass
        before = cpu_seconds(ca.pid)
        time.sleep(0.2)
        try:
            ca.sock.send(frame)
            sent += 1
            return False  # it took one more: still reading
        except BlockingIOError:
            return proc_state(ca.pid) == "S" and cpu_seconds(ca.pid) == before

    wait_until(blocked, 60.0, "the ca to block sending replies nobody reads", interval=0.01)
    assert sent > 100, sent  # requests the ca answered into the full channel, and the ones waiting
    assert_stops_on_sigterm(ca)


def test_sigterm_stops_a_ca_that_is_signing(start_rsa8192: Callable[[], CaChild], rsa8192_keys: Keys) -> None:
    """SIGTERM while the ca signs a batch: it once went by unnoticed (the
    signal interrupted no system call) and the ca went back to waiting."""
    ca = start_rsa8192()
    assert_serves_valid_requests(ca, rsa8192_keys)
    cpu = cpu_seconds(ca.pid)
    for rid in range(100, 132):  # ~1.2 s of work for the ca
        ca.send_frame(raw_frame(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, rid, rsa8192_keys.rsa_id, valid_pss(rsa8192_keys)))
    wait_until(lambda: cpu_seconds(ca.pid) - cpu > 0.02, 30, "the ca to be signing", interval=0.002)
    assert_stops_on_sigterm(ca)


# --------------------------------------------------------------------------
# Each reply goes out once its request is signed
# --------------------------------------------------------------------------


def test_each_reply_is_sent_as_soon_as_signed(start_rsa8192: Callable[[], CaChild], rsa8192_keys: Keys) -> None:
    """32 RSA-8192 requests at once (~40 ms of the ca's CPU each): the ca
    once signed them all before it answered any, so with the 1 s keyop
    timeout only the first few handshakes of 32 concurrent ones succeeded."""
    ca = start_rsa8192()
    keys = rsa8192_keys
    assert_serves_valid_requests(ca, keys)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    messages = {rid: os.urandom(48) for rid in range(200, 232)}
    # all 32 wait in the channel before the ca reads any: one batch
    os.kill(ca.pid, signal.SIGSTOP)
    try:
        for rid, message in messages.items():
            block = pss_block(hashlib.sha256(message).digest(), keys.rsa_pub.key_size, "sha256")
            ca.send_frame(raw_frame(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, rid, keys.rsa_id, block))
    finally:
        os.kill(ca.pid, signal.SIGCONT)
    replies = [ca.recv_reply()]
    os.kill(ca.pid, signal.SIGSTOP)  # what was sent with the first reply, and no more
    try:
        waiting = ca.replies_waiting()
    finally:
        os.kill(ca.pid, signal.SIGCONT)
    replies += [ca.recv_reply() for _ in range(len(messages) - 1 - waiting)]
    for reply in replies:
        assert reply.arg == P.PPS_OK, reply
        keys.rsa_pub.verify(reply.payload, messages[reply.id], pss, hashes.SHA256())
    # the old ca sent all 31 others with the first; the next one is ~40 ms of
    # CPU after it, the last over a second
    assert waiting < len(messages) - 1, f"{waiting} replies came with the first"
