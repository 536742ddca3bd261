"""The ca's policy with real keys and real signatures, over the real wire.

A relay may be in an attacker's hands: the ca must sign what TLS needs (RSA-PSS
encodings with SHA-2 and a digest-length salt, SHA-2 DigestInfos, ECDSA
digests) and nothing else -- in particular not decrypt a recorded ciphertext
or sign an arbitrary block.  One real ca process (tests/ca_child.py: the
product's pyprivsep.ca.main on a socketpair) holds every key under test; each
request is a frame sent to it, and its reply says what it decided.  Accepted
requests come back signed and are verified with cryptography, so these tests
also prove that what the ca produces is a valid signature.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ca_child import CaChild, start_ca
from cawire import PSS_HASH_NAMES, emsa_pss_encode, hash_algorithm, pss_block, raw_frame, spki_keyid
from daemonctl import ca_config_text
from keypairs import KeyPair, Pki, key_secrets, load_private_key, self_signed_certificate, write_cert, write_key
from pyprivsep.native import P

E = 65537

DIGESTINFO_PREFIX = {
    "md5": bytes.fromhex("3020300c06082a864886f70d020505000410"),
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha224": bytes.fromhex("302d300d06096086480165030204050004" "1c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
# SHA-256 AlgorithmIdentifier without the NULL parameters (also valid DER)
DIGESTINFO_SHA256_NO_NULL = bytes.fromhex("302f300b06096086480165030402010420")

# RSA keys under test: the pki's 2048 and 4096 (top EM byte has 7 bits), an
# 8k+1-bit modulus (EM one byte shorter than the modulus: leading zero byte)
# and an 8k+4-bit one (3 bits used in EM's first byte).
RSA_NAMES = ("rsa2048", "rsa4096", "rsa2049", "rsa2052")
EC_NAMES = ("p256", "p384")
ECDSA_PREHASH = {20: "sha1", 28: "sha224", 32: "sha256", 48: "sha384", 64: "sha512"}


_ids = itertools.count(1)


@dataclass(frozen=True)
class KeyUnderTest:
    """A key the ca holds, and the relay's way to ask it."""

    name: str
    keypair: KeyPair
    ca: CaChild

    @property
    def keyid(self) -> bytes:
        return spki_keyid(self.keypair.certificate)

    def ask(self, op: int, arg: int, data: bytes) -> tuple[int, bytes]:
        """(status, signature) of the ca's reply to this request."""
        rid = next(_ids)
        reply = self.ca.call(raw_frame(op, arg, rid, self.keyid, data))
        assert (reply.id, reply.key) == (rid, self.keyid)
        return reply.arg, reply.payload


@dataclass(frozen=True)
class RsaUnderTest(KeyUnderTest):
    private: rsa.RSAPrivateKey

    @property
    def public(self) -> rsa.RSAPublicKey:
        return self.private.public_key()

    @property
    def bits(self) -> int:
        return self.private.key_size

    @property
    def k(self) -> int:
        return (self.bits + 7) // 8

    def raw_public(self, block: bytes) -> bytes:
        """block^e mod n: what a signature "decrypts" to."""
        n = self.public.public_numbers().n
        return pow(int.from_bytes(block, "big"), E, n).to_bytes(self.k, "big")


@dataclass(frozen=True)
class EcUnderTest(KeyUnderTest):
    private: ec.EllipticCurvePrivateKey


def rsa_key_of_exactly(bits: int) -> rsa.RSAPrivateKey:
    """An RSA key whose modulus has exactly ``bits`` bits.

    OpenSSL 3 rounds odd sizes of 2048 bits and more down to even, so an odd
    size is assembled from a prime of a (bits+1)-bit key and one of a
    (bits-1)-bit key: FIPS 186 primes are >= sqrt(2) * 2^(len-1), so their
    product has exactly bits bits.
    """
    key = rsa.generate_private_key(public_exponent=E, key_size=bits)
    if key.key_size == bits:
        return key
    p = rsa.generate_private_key(public_exponent=E, key_size=bits + 1).private_numbers().p
    q = rsa.generate_private_key(public_exponent=E, key_size=bits - 1).private_numbers().q
    assert (p * q).bit_length() == bits
    d = pow(E, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p,
        q,
        d,
        rsa.rsa_crt_dmp1(d, p),
        rsa.rsa_crt_dmq1(d, q),
        rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(E, p * q),
    )
    return numbers.private_key()


def keypair_of(directory: Path, name: str, key: rsa.RSAPrivateKey) -> KeyPair:
    """A keypair on disk, for a key made here (the pki has no odd sizes)."""
    cert = self_signed_certificate(key, [f"{name}.test"])
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    write_cert(cert_path, cert)
    write_key(key_path, key)
    return KeyPair(name, f"{name}.test", cert_path, key_path, cert, key_secrets(key))


@pytest.fixture(scope="module")
def keypairs(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    directory = tmp_path_factory.mktemp("policy-keys")
    pairs = {name: pki[name] for name in ("rsa2048", "rsa4096", *EC_NAMES)}
    for name, bits in (("rsa2049", 2049), ("rsa2052", 2052)):
        pairs[name] = keypair_of(directory, name, rsa_key_of_exactly(bits))
    return pairs


@pytest.fixture(scope="module")
def ca(keypairs: dict[str, KeyPair], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaChild]:
    """One real ca holding every key under test, for the whole module."""
    directory = tmp_path_factory.mktemp("policy-ca")
    config = directory / "pyprivsep.conf"
    config.write_text(ca_config_text(list(keypairs.values())))
    child = start_ca(config, directory / "ca.log")
    yield child
    child.stop()


@pytest.fixture(scope="module")
def rsa_keys(keypairs: dict[str, KeyPair], ca: CaChild) -> dict[str, RsaUnderTest]:
    keys: dict[str, RsaUnderTest] = {}
    for name in ("rsa2048", "rsa4096", "rsa2049", "rsa2052"):
        private = load_private_key(keypairs[name])
        assert isinstance(private, rsa.RSAPrivateKey)
        keys[name] = RsaUnderTest(name, keypairs[name], ca, private)
    for name, key in keys.items():
        assert f"rsa{key.bits}" == name
    return keys


@pytest.fixture(scope="module")
def ec_keys(keypairs: dict[str, KeyPair], ca: CaChild) -> dict[str, EcUnderTest]:
    keys: dict[str, EcUnderTest] = {}
    for name in EC_NAMES:
        private = load_private_key(keypairs[name])
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        keys[name] = EcUnderTest(name, keypairs[name], ca, private)
    return keys


@pytest.fixture(params=RSA_NAMES)
def rsa_key(request: pytest.FixtureRequest, rsa_keys: dict[str, RsaUnderTest]) -> RsaUnderTest:
    return rsa_keys[request.param]


@pytest.fixture(params=EC_NAMES)
def ec_key(request: pytest.FixtureRequest, ec_keys: dict[str, EcUnderTest]) -> EcUnderTest:
    return ec_keys[request.param]


def check(op: int, arg: int, data: bytes, key: KeyUnderTest) -> bytes:
    """The ca performs the request: its signature."""
    status, signature = key.ask(op, arg, data)
    assert status == P.PPS_OK, f"refused with status {status}; log:\n{key.ca.log()[-2000:]}"
    return signature


def refusal(op: int, arg: int, data: bytes, key: KeyUnderTest) -> int:
    """The ca refuses the request: its status (the reply carries nothing)."""
    status, payload = key.ask(op, arg, data)
    assert status != P.PPS_OK, "performed"
    assert payload == b""
    return status


def assert_policy_refuses_pss(block: bytes, key: RsaUnderTest) -> None:
    assert refusal(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, block, key) == P.PPS_ERR_POLICY


def message_and_hash(hash_name: str) -> tuple[bytes, bytes]:
    message = os.urandom(64)
    return message, hashlib.new(hash_name, message).digest()


# --------------------------------------------------------------------------
# RSA-PSS: accepted, and the ca's raw operation is a valid PSS signature
# --------------------------------------------------------------------------


@pytest.mark.parametrize("hash_name", PSS_HASH_NAMES)
def test_pss_encoding_accepted_and_signature_verifies(rsa_key: RsaUnderTest, hash_name: str) -> None:
    message, mhash = message_and_hash(hash_name)
    block = pss_block(mhash, rsa_key.bits, hash_name)
    assert len(block) == rsa_key.k
    if rsa_key.bits % 8 == 1:  # the case this key is here for
        assert block[0] == 0
    signature = check(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, block, rsa_key)
    assert len(signature) == rsa_key.k
    algorithm = hash_algorithm(hash_name)
    rsa_key.public.verify(
        signature,
        message,
        padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size),
        algorithm,
    )


@pytest.mark.parametrize("hash_name", PSS_HASH_NAMES)
def test_pss_encoding_made_by_openssl_is_accepted(rsa_key: RsaUnderTest, hash_name: str) -> None:
    """What OpenSSL's TLS stack hands to the key (salt = digest length) passes."""
    algorithm = hash_algorithm(hash_name)
    signature = rsa_key.private.sign(
        os.urandom(100), padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.DIGEST_LENGTH), algorithm
    )
    block = rsa_key.raw_public(signature)
    check(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, block, rsa_key)


def test_pss_with_openssl_max_salt_refused(rsa_key: RsaUnderTest) -> None:
    """OpenSSL's default PSS salt (as long as fits) is not the TLS one."""
    algorithm = hashes.SHA256()
    signature = rsa_key.private.sign(
        os.urandom(100), padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.MAX_LENGTH), algorithm
    )
    assert_policy_refuses_pss(rsa_key.raw_public(signature), rsa_key)


# --------------------------------------------------------------------------
# RSA raw operation: everything that is not such a PSS encoding is refused
# --------------------------------------------------------------------------


def test_random_blocks_refused(rsa_key: RsaUnderTest) -> None:
    for _ in range(100):
        assert_policy_refuses_pss(os.urandom(rsa_key.k), rsa_key)


def plausible(block: bytes, key: RsaUnderTest) -> bool:
    """Passes the cheap checks: below 2^emBits and the 0xbc trailer."""
    return int.from_bytes(block, "big") < 1 << (key.bits - 1) and block[-1] == 0xBC


def test_random_blocks_with_plausible_top_and_trailer_refused(rsa_key: RsaUnderTest) -> None:
    """The DB structure (zero padding, 0x01, salt length) is really checked."""
    for _ in range(100):
        block = bytearray(os.urandom(rsa_key.k))
        block[-1] = 0xBC
        block[0] &= 0x00 if rsa_key.bits % 8 == 1 else 0xFF >> (8 - (rsa_key.bits - 1) % 8)
        assert plausible(bytes(block), rsa_key)
        assert_policy_refuses_pss(bytes(block), rsa_key)


def ciphertexts(key: RsaUnderTest) -> Iterator[tuple[str, bytes]]:
    """What a recorded TLS 1.2 RSA key exchange would hold: an encrypted
    48-byte premaster secret, PKCS#1 v1.5 and OAEP."""
    premaster = b"\x03\x03" + os.urandom(46)
    yield "pkcs1v15", key.public.encrypt(premaster, padding.PKCS1v15())
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    yield "oaep", key.public.encrypt(premaster, oaep)


def test_real_ciphertexts_are_not_decrypted(rsa_key: RsaUnderTest) -> None:
    for what, ciphertext in ciphertexts(rsa_key):
        assert len(ciphertext) == rsa_key.k, what
        assert_policy_refuses_pss(ciphertext, rsa_key)
        status = refusal(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_PKCS1, ciphertext, rsa_key)
        assert status == P.PPS_ERR_POLICY, what
        assert refusal(P.PPS_OP_RSA_PRIV_DEC, P.PPS_PAD_NONE, ciphertext, rsa_key) == P.PPS_ERR_OP


def test_blinded_ciphertext_passing_cheap_checks_refused(rsa_key: RsaUnderTest) -> None:
    """An attacker blinds a ciphertext (c * r^e mod n: its "signature" would
    give c^d * r) until it has a clear top and the 0xbc trailer: refused."""
    _, ciphertext = next(ciphertexts(rsa_key))
    n = rsa_key.public.public_numbers().n
    c = int.from_bytes(ciphertext, "big")
    for _ in range(100_000):
        r = int.from_bytes(os.urandom(rsa_key.k), "big") % n
        block = (c * pow(r, E, n) % n).to_bytes(rsa_key.k, "big")
        if plausible(block, rsa_key):
            break
    else:
        pytest.fail("no plausible blinded block found")
    assert_policy_refuses_pss(block, rsa_key)


@pytest.mark.parametrize("hash_name", PSS_HASH_NAMES)
def test_pss_salt_length_other_than_hash_length_refused(rsa_key: RsaUnderTest, hash_name: str) -> None:
    hlen = hashlib.new(hash_name).digest_size
    _, mhash = message_and_hash(hash_name)
    for salt_len in (0, 1, hlen - 1, hlen + 1, 2 * hlen, rsa_key.k - hlen - 3):
        block = pss_block(mhash, rsa_key.bits, hash_name, salt=os.urandom(salt_len))
        assert_policy_refuses_pss(block, rsa_key)


def test_pss_with_sha1_refused(rsa_key: RsaUnderTest) -> None:
    _, mhash = message_and_hash("sha1")
    assert_policy_refuses_pss(pss_block(mhash, rsa_key.bits, "sha1"), rsa_key)


@pytest.mark.parametrize(
    ("hash_name", "mgf_hash"),
    [(h, m) for h in PSS_HASH_NAMES for m in ("sha1", *PSS_HASH_NAMES) if m != h],
)
def test_pss_with_mgf1_hash_other_than_message_hash_refused(
    rsa_key: RsaUnderTest, hash_name: str, mgf_hash: str
) -> None:
    _, mhash = message_and_hash(hash_name)
    # salt as long as either hash: neither reading may be accepted
    for salt_len in {hashlib.new(hash_name).digest_size, hashlib.new(mgf_hash).digest_size}:
        block = pss_block(mhash, rsa_key.bits, hash_name, mgf_hash=mgf_hash, salt=os.urandom(salt_len))
        assert_policy_refuses_pss(block, rsa_key)


def valid_block(key: RsaUnderTest, hash_name: str = "sha256") -> bytes:
    block = pss_block(message_and_hash(hash_name)[1], key.bits, hash_name)
    check(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, block, key)  # the control: valid as is
    return block


def test_pss_wrong_trailer_refused(rsa_key: RsaUnderTest) -> None:
    block = valid_block(rsa_key)
    for trailer in (0x00, 0xBD, 0xCC, 0x3C, 0xFF):
        assert_policy_refuses_pss(block[:-1] + bytes([trailer]), rsa_key)


def test_pss_top_bits_set_refused(rsa_key: RsaUnderTest) -> None:
    """Bits above emBits must be zero; the DB check alone masks them off."""
    block = valid_block(rsa_key)
    if rsa_key.bits % 8 == 1:
        first_byte_bits = [0x01, 0x80, 0xFF]  # the leading byte must be zero
    else:
        top = (rsa_key.bits - 1) % 8
        first_byte_bits = [1 << b for b in range(top, 8)] + [0xFF & ~((1 << top) - 1)]
    for bits in first_byte_bits:
        assert_policy_refuses_pss(bytes([block[0] | bits]) + block[1:], rsa_key)


def test_pss_block_of_wrong_length_refused(rsa_key: RsaUnderTest, rsa_keys: dict[str, RsaUnderTest]) -> None:
    block = valid_block(rsa_key)
    assert_policy_refuses_pss(b"\0" + block, rsa_key)
    assert_policy_refuses_pss(block[1:], rsa_key)
    assert_policy_refuses_pss(emsa_pss_encode(message_and_hash("sha256")[1], rsa_key.bits - 9), rsa_key)
    assert_policy_refuses_pss(b"", rsa_key)
    for other in rsa_keys.values():
        if other.k != rsa_key.k:
            assert_policy_refuses_pss(valid_block(other), rsa_key)


# --------------------------------------------------------------------------
# RSA PKCS#1 v1.5: SHA-2 DigestInfos of exact length only
# --------------------------------------------------------------------------


@pytest.mark.parametrize("hash_name", PSS_HASH_NAMES)
def test_pkcs1_digestinfo_accepted_and_signature_verifies(rsa_key: RsaUnderTest, hash_name: str) -> None:
    message, mhash = message_and_hash(hash_name)
    digest_info = DIGESTINFO_PREFIX[hash_name] + mhash
    signature = check(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_PKCS1, digest_info, rsa_key)
    rsa_key.public.verify(signature, message, padding.PKCS1v15(), hash_algorithm(hash_name))


def assert_policy_refuses_pkcs1(data: bytes, key: RsaUnderTest) -> None:
    assert refusal(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_PKCS1, data, key) == P.PPS_ERR_POLICY


@pytest.mark.parametrize("hash_name", PSS_HASH_NAMES)
def test_pkcs1_digestinfo_with_wrong_digest_length_or_junk_refused(
    hash_name: str, rsa_keys: dict[str, RsaUnderTest]
) -> None:
    policy = rsa_keys["rsa2048"]
    prefix = DIGESTINFO_PREFIX[hash_name]
    hlen = hashlib.new(hash_name).digest_size
    for length in (0, 1, hlen - 1, hlen + 1, 2 * hlen):
        assert_policy_refuses_pkcs1(prefix + os.urandom(length), policy)
    digest = os.urandom(hlen)
    assert_policy_refuses_pkcs1(prefix + digest + b"\0", policy)
    assert_policy_refuses_pkcs1(prefix + digest + os.urandom(50), policy)
    assert_policy_refuses_pkcs1(b"\0" + prefix + digest, policy)
    assert_policy_refuses_pkcs1(prefix[:-1] + digest, policy)
    assert_policy_refuses_pkcs1(digest, policy)  # a bare digest is no DigestInfo


def test_pkcs1_other_digestinfos_refused(rsa_keys: dict[str, RsaUnderTest]) -> None:
    policy = rsa_keys["rsa2048"]
    for hash_name in ("md5", "sha1", "sha224"):
        assert_policy_refuses_pkcs1(DIGESTINFO_PREFIX[hash_name] + message_and_hash(hash_name)[1], policy)
    assert_policy_refuses_pkcs1(DIGESTINFO_SHA256_NO_NULL + os.urandom(32), policy)
    assert_policy_refuses_pkcs1(b"", policy)
    assert_policy_refuses_pkcs1(os.urandom(256), policy)


def test_pkcs1_sha1_digestinfo_always_refused(rsa_key: RsaUnderTest) -> None:
    """TLS 1.2 and 1.3 never ask for a SHA-1 signature with a server key."""
    _, mhash = message_and_hash("sha1")
    assert_policy_refuses_pkcs1(DIGESTINFO_PREFIX["sha1"] + mhash, rsa_key)
    assert_policy_refuses_pkcs1(DIGESTINFO_PREFIX["sha1"] + os.urandom(21), rsa_key)
    assert_policy_refuses_pss(pss_block(mhash, rsa_key.bits, "sha1"), rsa_key)


# --------------------------------------------------------------------------
# ECDSA: digests of 20 to 64 bytes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("length", sorted(ECDSA_PREHASH))
def test_ecdsa_digest_accepted_and_signature_verifies(ec_key: EcUnderTest, length: int) -> None:
    message, digest = message_and_hash(ECDSA_PREHASH[length])
    assert len(digest) == length
    signature = check(P.PPS_OP_ECDSA_SIGN, 0, digest, ec_key)
    algorithm = hash_algorithm(ECDSA_PREHASH[length])
    ec_key.private.public_key().verify(signature, digest, ec.ECDSA(Prehashed(algorithm)))
    ec_key.private.public_key().verify(signature, message, ec.ECDSA(algorithm))


def test_ecdsa_digest_length_bounds(ec_key: EcUnderTest) -> None:
    for length in (20, 21, 63, 64):
        check(P.PPS_OP_ECDSA_SIGN, 0, os.urandom(length), ec_key)
    for length in (0, 1, 19, 65, 128, 1024):
        status = refusal(P.PPS_OP_ECDSA_SIGN, 0, os.urandom(length), ec_key)
        assert status == P.PPS_ERR_POLICY, length


# --------------------------------------------------------------------------
# Operations: the wrong key type, decryption, unknown ops and paddings
# --------------------------------------------------------------------------


def test_ecdsa_on_rsa_key_refused(rsa_key: RsaUnderTest) -> None:
    for length in (20, 32, 48, 64):
        assert refusal(P.PPS_OP_ECDSA_SIGN, 0, os.urandom(length), rsa_key) == P.PPS_ERR_OP


def test_rsa_on_ec_key_refused(ec_key: EcUnderTest, rsa_keys: dict[str, RsaUnderTest]) -> None:
    digest_info = DIGESTINFO_PREFIX["sha256"] + os.urandom(32)
    requests = [
        (P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_PKCS1, digest_info),
        (P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, valid_block(rsa_keys["rsa2048"])),
        (P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, os.urandom(32)),
        (P.PPS_OP_RSA_PRIV_DEC, P.PPS_PAD_NONE, os.urandom(32)),
    ]
    for op, arg, data in requests:
        assert refusal(op, arg, data, ec_key) == P.PPS_ERR_OP, (op, arg)


def test_rsa_decryption_always_refused(rsa_key: RsaUnderTest) -> None:
    """Whatever the payload and padding, even one that would be signed."""
    payloads = [valid_block(rsa_key), DIGESTINFO_PREFIX["sha256"] + os.urandom(32), os.urandom(rsa_key.k), b""]
    for payload in payloads:
        for arg in (0, P.PPS_PAD_PKCS1, P.PPS_PAD_NONE, 4, 0xFFFF):
            status = refusal(P.PPS_OP_RSA_PRIV_DEC, arg, payload, rsa_key)
            assert status == P.PPS_ERR_OP, (arg, len(payload))


UNKNOWN_OPS = (0, 4, 5, 63, P.PPS_CTL_TICKET_KEYS, 99, 127, P.PPS_OP_REPLY, 129, 255)


def test_unknown_ops_refused(rsa_keys: dict[str, RsaUnderTest], ec_keys: dict[str, EcUnderTest]) -> None:
    rsa_key, ec_key = rsa_keys["rsa2048"], ec_keys["p256"]
    payloads = [valid_block(rsa_key), DIGESTINFO_PREFIX["sha256"] + os.urandom(32), os.urandom(32), b""]
    key: KeyUnderTest
    for key in (rsa_key, ec_key):
        for op in UNKNOWN_OPS:
            for payload in payloads:
                for arg in (0, P.PPS_PAD_PKCS1, P.PPS_PAD_NONE):
                    if (op, payload) == (P.PPS_OP_PING, b""):  # a ping, whatever the key: answered
                        assert key.ask(op, arg, payload) == (P.PPS_OK, b"")
                        continue
                    assert refusal(op, arg, payload, key) == P.PPS_ERR_OP, (key.name, op, arg)


def test_unknown_rsa_padding_refused(rsa_key: RsaUnderTest) -> None:
    """Only PPS_PAD_PKCS1 and PPS_PAD_NONE: not OAEP (4), X9.31 (5), PSS (6)..."""
    payloads = [valid_block(rsa_key), DIGESTINFO_PREFIX["sha256"] + os.urandom(32)]
    for arg in (0, 2, 4, 5, 6, 7, 0x103, 0xFFFF):
        for payload in payloads:
            assert refusal(P.PPS_OP_RSA_PRIV_ENC, arg, payload, rsa_key) == P.PPS_ERR_OP, arg
