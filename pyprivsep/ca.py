"""The ca process: holds the private keys, answers its relay's requests.

One ca per relay process.  Python loads the keys of every relay block
(each checked against its certificate), drops privileges (chroot, its
own user cfg.ca_user, not the relays'), hands the keys to the C request
path (src/_rsaengine/ca.c) and sandboxes the process (no core dumps, no
ptrace, seccomp or pledge: privsep.sandbox); then the C request path
serves frames from the SOCK_SEQPACKET socket: check the frame, check the request against the
policy, sign, answer.  A request it cannot or will not perform gets an
error reply and is logged (rate-limited); nothing a relay sends stops it.
"""
from __future__ import annotations

import logging
import os
import signal
import socket

from pyprivsep import keys, native, privsep
from pyprivsep.config import Config
from pyprivsep.native import CaCore, CaKey
from pyprivsep.policy import KeyPolicy

log = logging.getLogger("pyprivsep.ca")


class HeldKey:
    __slots__ = ("key", "policy", "name")

    def __init__(self, key: CaKey, policy: KeyPolicy, name: str) -> None:
        self.key = key
        self.policy = policy
        self.name = name


# Test only: make every operation this much slower, to show what a slow ca
# does to its relay (tests/test_async.py).
TEST_DELAY_ENV = "PYPRIVSEP_TEST_CA_DELAY_MS"


class Ca:
    """A ca's keys in its C request path (src/_rsaengine/ca.c): frame
    checks, the policy, signing and the rate-limited refusal log."""

    def __init__(self, index: int, held: dict[bytes, HeldKey],
                 delay: float = 0.0) -> None:
        self.index = index
        self.held = held
        self.core = CaCore(index, int(delay * 1000))
        for keyid, h in held.items():
            self.core.add_key(keyid, h.key, h.name, h.policy.allow_sha1)

    def handle(self, data: bytes) -> bytes:
        """One request frame in, one reply frame out; never raises."""
        return self.core.handle(data)

    def serve(self, sock: socket.socket) -> None:
        """Answer until the channel closes; Python runs only when a signal
        interrupts (SIGTERM raises Stop from its handler)."""
        while self.core.serve(sock.fileno()):
            pass


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


def main(cfg: Config, index: int, sock: socket.socket, use_syslog: bool,
         verbose: bool) -> int:
    """The ca process's life; returns its exit status."""
    native.log_setup(f"ca {index}", use_syslog, verbose)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent stops us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    try:
        held = load_keys(cfg)
        privsep.warm_up()
        privsep.drop_privileges(cfg, "ca")
        log.debug("ca %d: serving %d keys", index, len(held))
        delay = int(os.environ.get(TEST_DELAY_ENV, "0")) / 1000
        if delay:
            log.warning("ca %d: %s: every operation delayed by %.3f s "
                        "(for tests only)", index, TEST_DELAY_ENV, delay)
        core = Ca(index, held, delay)
        privsep.sandbox("ca")
        core.serve(sock)
    except Stop:
        pass
    return 0
