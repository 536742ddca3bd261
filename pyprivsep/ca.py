"""The ca process: holds the private keys, answers its relay's requests.

One ca per relay process.  It loads the keys of every relay block, then
is hardened (no core dumps, no ptrace, chroot, unprivileged) and serves
frames from its SOCK_SEQPACKET socket until the socket closes: parse and
check the frame, check the request against the policy, sign, answer.  A
request it cannot or will not perform gets an error reply and is logged
(rate-limited); nothing a relay sends stops the ca.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time

from pyprivsep import keys, privsep
from pyprivsep.config import Config
from pyprivsep.native import (FRAME_MAX, CaKey, Frame, FrameError, NativeError,
                              P, parse_frame)
from pyprivsep.policy import KeyPolicy, Refused, check

log = logging.getLogger("pyprivsep.ca")


class HeldKey:
    __slots__ = ("key", "policy", "name")

    def __init__(self, key: CaKey, policy: KeyPolicy, name: str) -> None:
        self.key = key
        self.policy = policy
        self.name = name


class RateLimit:
    """At most `burst` messages per second; the rest are counted."""

    def __init__(self, burst: int = 10) -> None:
        self.burst = burst
        self.second = 0
        self.count = 0

    def allow(self) -> bool:
        now = int(time.monotonic())
        if now != self.second:
            if self.count > self.burst:
                log.warning("%d more refusals not logged",
                            self.count - self.burst)
            self.second, self.count = now, 0
        self.count += 1
        return self.count <= self.burst


# Test only: make every operation this much slower, to show what a slow ca
# does to its relay (tests/test_async.py).
TEST_DELAY_ENV = "PYPRIVSEP_TEST_CA_DELAY_MS"
BATCH = 64


class Ca:
    def __init__(self, index: int, held: dict[bytes, HeldKey],
                 delay: float = 0.0) -> None:
        self.index = index
        self.held = held
        self.limit = RateLimit()
        self.delay = delay

    def refuse(self, frame_id: int, key: bytes, status: int,
               reason: str) -> bytes:
        if self.limit.allow():
            held = self.held.get(key)
            log.warning("ca %d: refused request %d from relay %d, key %s: %s",
                        self.index, frame_id, self.index,
                        held.name if held else key.hex()[:16], reason)
        return Frame(P.PPS_OP_REPLY, status, frame_id, key, b"").pack()

    def handle(self, data: bytes) -> bytes:
        """One request frame in, one reply frame out; never raises."""
        try:
            req = parse_frame(data)
        except FrameError as e:
            return self.refuse(e.id, b"", e.status, str(e))
        held = self.held.get(req.key)
        if held is None:
            return self.refuse(req.id, req.key, P.PPS_ERR_NOKEY, "unknown key")
        try:
            check(req.type, req.arg, req.payload, held.policy)
            if self.delay:
                time.sleep(self.delay)
            sig = held.key.sign(req.type, req.arg, req.payload)
        except Refused as e:
            return self.refuse(req.id, req.key, e.status, str(e))
        except NativeError as e:
            return self.refuse(req.id, req.key, P.PPS_ERR_CRYPTO, str(e))
        return Frame(P.PPS_OP_REPLY, P.PPS_OK, req.id, req.key, sig).pack()

    def serve(self, sock: socket.socket) -> None:
        """Answer until the channel closes.  Whatever requests are waiting
        are read at once (up to BATCH), then answered one by one, so that an
        async relay with many handshakes in flight can keep sending."""
        while True:
            batch: list[bytes] = []
            try:
                batch.append(sock.recv(FRAME_MAX + 1))
                while len(batch) < BATCH:
                    batch.append(sock.recv(FRAME_MAX + 1, socket.MSG_DONTWAIT))
            except BlockingIOError:
                pass
            except ConnectionResetError:
                return
            for data in batch:
                if not data:
                    return
                sock.send(self.handle(data))


def load_keys(cfg: Config) -> dict[bytes, HeldKey]:
    """Every keypair of every relay block, loaded and checked."""
    held: dict[bytes, HeldKey] = {}
    for relay in cfg.relays:
        for kp in relay.keypairs:
            cert = keys.load_cert(kp)
            if cert.keyid not in held:
                held[cert.keyid] = HeldKey(keys.load_key(cert),
                                           KeyPolicy(cert.kind, cert.bits),
                                           cert.describe())
    return held


class Stop(Exception):
    """SIGTERM: the parent stops us."""


def _stop(signo: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second one: at once
    raise Stop()


def main(cfg: Config, index: int, sock: socket.socket) -> int:
    """The ca process's life; returns its exit status."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent stops us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    try:
        held = load_keys(cfg)
        privsep.warm_up()
        privsep.drop_privileges(cfg)
        privsep.harden()
        log.debug("ca %d: serving %d keys", index, len(held))
        delay = int(os.environ.get(TEST_DELAY_ENV, "0")) / 1000
        if delay:
            log.warning("ca %d: %s: every operation delayed by %.3f s "
                        "(for tests only)", index, TEST_DELAY_ENV, delay)
        Ca(index, held, delay).serve(sock)
    except Stop:
        pass
    return 0
