"""The ca process: holds the private keys, answers its relay's requests.

One ca per relay process.  Python loads the keys of every relay block
(each checked against its certificate), drops privileges (chroot, its
own user cfg.ca_user, not the relays'), hands the keys to the C request
path (src/_rsaengine/ca.c) and sandboxes the process (no core dumps, no
ptrace, seccomp or pledge: privsep.sandbox); then the C request path
serves frames from the SOCK_SEQPACKET socket: check the frame, check the request against the
policy, sign, answer.  A request it cannot or will not perform gets an
error reply and is logged (rate-limited); nothing a relay sends stops it.
SIGTERM does, in any state: the C loop takes it itself.
"""
from __future__ import annotations

import logging
import resource
import signal
import socket

from pyprivsep import keys, native, privsep
from pyprivsep.config import Config, KeyService
from pyprivsep.native import CaCore, CaKey, P11Key

log = logging.getLogger("pyprivsep.ca")


class HeldKey:
    __slots__ = ("key", "name")

    def __init__(self, key: CaKey, name: str) -> None:
        self.key = key
        self.name = name


class Ca:
    """A ca's keys in its C request path (src/_rsaengine/ca.c): frame
    checks, the policy, signing and the rate-limited refusal log."""

    def __init__(self, index: int, held: dict[bytes, HeldKey]) -> None:
        self.index = index
        self.held = held
        self.core = CaCore(index)
        for keyid, h in held.items():
            self.core.add_key(keyid, h.key, h.name)

    def serve(self, sock: socket.socket) -> None:
        """Answer until the channel closes or SIGTERM comes."""
        self.core.serve(sock.fileno())


def load_keys(cfg: Config, check: bool = True) -> dict[bytes, HeldKey]:
    """Every keypair of every relay block, loaded and checked (keys in a
    PKCS#11 token: without `check`, only named, see keys.load_key)."""
    held: dict[bytes, HeldKey] = {}
    for relay in cfg.relays:
        for kp in relay.keypairs:
            cert = keys.load_cert(kp)
            if cert.keyid not in held:
                held[cert.keyid] = HeldKey(keys.load_key(cert, check),
                                           cert.describe())
    return held


def load_service_keys(ks: KeyService, check: bool = True) -> dict[bytes, HeldKey]:
    """A keyservice's keypairs, loaded and checked: its cas hold these and
    nothing else (a relay's ca holds no keyservice's key either)."""
    held: dict[bytes, HeldKey] = {}
    for kp in ks.keypairs:
        cert = keys.load_cert(kp)
        if cert.keyid not in held:
            held[cert.keyid] = HeldKey(keys.load_key(cert, check),
                                       cert.describe())
    return held


def check_keys(cfg: Config, files: bool = True) -> None:
    """Every key the cas will hold, checked as they will use it (in a
    throwaway child of reload or -n): key files read and matched as root;
    keys in a PKCS#11 token named, then, once this process has become
    `ca user` as a ca does, signed with once each (the PIN, the object, the
    match): a p11-kit server or the token's files may admit that user
    only.  files False: the token keys alone."""
    kps = [] if cfg.keys_inprocess else [kp for r in cfg.relays for kp in r.keypairs]
    kps += [kp for ks in cfg.keyservices for kp in ks.keypairs]
    if not files:
        kps = [kp for kp in kps if kp.p11 is not None]
    if keys.uses_pkcs11(kps):
        keys.pkcs11_setup(cfg)      # the PIN, as root
    token: list[tuple[keys.Cert, CaKey]] = []
    for kp in kps:
        cert = keys.load_cert(kp)
        key = keys.load_key(cert, check=False)
        if kp.p11 is not None:
            token.append((cert, key))
    if token:
        privsep.drop_privileges(cfg, "ca", chroot=False)
        for cert, key in token:
            keys.check_token_key(cert, key)


def open_tokens(held: dict[bytes, HeldKey]) -> None:
    """A ca with keys in a PKCS#11 token opens its session now, after the
    fork and the privilege drop, with a test signature per key; a token
    out of reach is only a warning: each signature tries again."""
    for h in held.values():
        if isinstance(h.key, P11Key):
            try:
                h.key.check()
            except native.NativeError as e:
                log.warning("%s: %s (each signature tries again)", h.name, e)


def service_main(cfg: Config, ks: KeyService, index: int,
                 sock: socket.socket, use_syslog: bool, verbose: bool) -> int:
    """A keyservice ca's life: hardened exactly like a relay's ca (its
    own keys only, chroot, `ca user`, not dumpable, sandboxed), then it
    accepts the service's clients on the inherited listening socket."""
    native.log_setup(f"keyservice {ks.name} ca {index}", use_syslog, verbose)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # C takes it when serving
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)   # drain: C takes it too
    p11 = keys.uses_pkcs11(ks.keypairs)
    if p11:
        keys.pkcs11_setup(cfg)
    held = load_service_keys(ks, check=False)
    # room for ca.c's 1024 clients (KS_MAX_CLIENTS) and a few more
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1024 + 64 if hard == resource.RLIM_INFINITY else min(hard, 1024 + 64)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    privsep.drop_privileges(cfg, "ca", chroot=not p11)
    log.debug("keyservice %s ca %d: serving %d keys on %s", ks.name, index,
              len(held), ks.socket)
    core = Ca(index, held)
    open_tokens(held)
    privsep.sandbox("keyservice", pkcs11=p11)
    core.core.serve_service(sock.fileno(), ks.uids, ks.gids)
    return 0


def main(cfg: Config, index: int, sock: socket.socket, use_syslog: bool,
         verbose: bool) -> int:
    """The ca process's life; returns its exit status."""
    native.log_setup(f"ca {index}", use_syslog, verbose)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent stops us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Until the C loop serves (it catches SIGTERM itself, in C: a Python
    # handler would run only once C returned, which a ca blocked sending to
    # a relay that stopped reading never does), SIGTERM simply ends us.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    p11 = keys.uses_pkcs11([kp for r in cfg.relays for kp in r.keypairs])
    if p11:
        keys.pkcs11_setup(cfg)      # the PIN is read as root, before chroot
    held = load_keys(cfg, check=False)
    privsep.drop_privileges(cfg, "ca", chroot=not p11)
    log.debug("ca %d: serving %d keys", index, len(held))
    core = Ca(index, held)
    open_tokens(held)
    privsep.sandbox("ca", pkcs11=p11)
    core.serve(sock)
    return 0
