"""A real ca process for the tests, and the relay's end of its channel.

``start_ca`` forks a child that runs ``pyprivsep.ca.main`` -- the ca's whole
life as the parent starts it: load the keys of a configuration, drop
privileges, harden, serve -- on one end of an AF_UNIX SOCK_SEQPACKET
socketpair, and hands the test the other end.  The test plays the relay:
``send_frame`` any bytes, ``recv_reply`` the ca's answer, which must itself
be a well-formed reply frame (``parse_reply``, the test's own reading of
docs/protocol.md, independent of the product's C).  The child logs (Python
and C) to a file, read with ``log`` or waited for with ``wait_for_log``.

Also here: ``expected_status``, the policy of docs/protocol.md written
again in Python from RFC 8017 (EMSA-PSS-VERIFY's structure checks), as an
oracle for the fuzz tests.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn

from basics import wait_until
from cawire import FRAME_HDR_SIZE, ref_mgf1
from pyprivsep import ca, privsep
from pyprivsep.config import parse_config
from pyprivsep.native import P

HDR_SIZE = FRAME_HDR_SIZE
MAX_PAYLOAD = 1024  # PPS_MAX_PAYLOAD: an RSA-8192 block
FRAME_MAX = HDR_SIZE + MAX_PAYLOAD
REPLY_TIMEOUT = 20.0  # seconds; a ca that does not answer in time is wedged
PROTO_VERSION = 1
OP_RSA_PRIV_ENC, OP_RSA_PRIV_DEC, OP_ECDSA_SIGN, OP_PING, OP_REPLY = 1, 2, 3, 4, 128
PAD_PKCS1, PAD_NONE = 1, 3
OK, ERR_FRAME, ERR_VERSION, ERR_OP, ERR_NOKEY, ERR_POLICY, ERR_CRYPTO = range(7)
# the protocol's numbers, written down here, must be the product's
assert (P.PPS_MAX_PAYLOAD, P.PPS_PROTO_VERSION, P.PPS_OP_REPLY, P.PPS_ERR_CRYPTO) == (
    MAX_PAYLOAD, PROTO_VERSION, OP_REPLY, ERR_CRYPTO)


# --------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------


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
# The ca child
# --------------------------------------------------------------------------


def _run_ca_child(sock: socket.socket, cfg_path: Path, log_path: Path) -> NoReturn:
    """The forked child: log to a file, run the ca until it ends."""
    status = 1
    try:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        # the ca's request path (C) logs its refusals on stderr
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # as the parent's children
            signal.signal(sig, signal.SIG_DFL)
        cfg = parse_config(str(cfg_path))
        privsep.prepare_chroot(cfg)  # the parent's part
        status = ca.main(cfg, 1, sock, use_syslog=False, verbose=True)
        logging.getLogger("test").info("ca.main returned %d", status)
    except BaseException:
        with log_path.open("a") as f:
            f.write("CHILD EXCEPTION " + traceback.format_exc())
    finally:
        logging.shutdown()
        os._exit(status)


@dataclass
class CaChild:
    """A forked ca process and the relay's end of its socket."""

    pid: int
    sock: socket.socket
    log_path: Path
    wait_status: int | None = None
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def next_id(self) -> int:
        return next(self._ids)

    def gone(self) -> AssertionError:
        wait_until(lambda: not self.alive(), 5.0, "the ca, which closed its channel, to exit", interval=0.01)
        return AssertionError(f"the ca exited (wait status {self.wait_status}); log:\n{self.log()}")

    def send_frame(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except (BrokenPipeError, ConnectionResetError):
            raise self.gone() from None

    def recv_frame(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        """The next message from the ca, as it came."""
        if not select.select([self.sock], [], [], timeout)[0]:
            raise AssertionError(f"no reply from the ca in {timeout} s; log:\n{self.log()}")
        try:
            data = self.sock.recv(FRAME_MAX + 1)
        except ConnectionResetError:
            raise self.gone() from None
        if not data:
            raise self.gone()
        return data

    def recv_reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        return parse_reply(self.recv_frame(timeout))

    def replies_waiting(self) -> int:
        """Take every reply already there, without waiting; how many."""
        n = 0
        while True:
            try:
                data = self.sock.recv(FRAME_MAX + 1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return n
            parse_reply(data)
            n += 1

    def call(self, data: bytes) -> Reply:
        self.send_frame(data)
        return self.recv_reply()

    def alive(self) -> bool:
        if self.wait_status is not None:
            return False
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return True
        self.wait_status = status
        return False

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """The log, once it holds ``text`` (the ca writes after it answers)."""
        return wait_until(lambda: self.log() if text in self.log() else None, timeout,
                          lambda: f"{text!r} in the ca's log:\n{self.log()}", interval=0.01)

    def refusal_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if "refused request" in line]

    def stop(self) -> None:
        self.sock.close()  # the ca's recv sees the end of the channel
        try:
            wait_until(lambda: not self.alive(), 10.0, "the ca to exit after its channel closed", interval=0.01)
        finally:
            if self.wait_status is None:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)


def start_ca(cfg_path: Path, log_path: Path) -> CaChild:
    relay_end, ca_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        relay_end.close()
        _run_ca_child(ca_end, cfg_path, log_path)
    ca_end.close()
    return CaChild(pid, relay_end, log_path)


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


def expected_status(kind: str, bits: int, op: int, arg: int, payload: bytes) -> int:
    """The status of a well-framed request to a key of this kind ("rsa" or
    "ec") and size, as docs/protocol.md states the policy."""
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
