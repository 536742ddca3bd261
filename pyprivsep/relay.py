"""The relay process: set the C engine up, drop privileges, run it.

Python is here only to hand the engine its configuration; from
engine_run() on, every connection is handled in C.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from pyprivsep import keys, native, privsep
from pyprivsep.config import Config


@dataclass
class RelaySetup:
    """What the parent gives each relay process (it forks them with it)."""

    cfg: Config
    certs: list[list[keys.Cert]]            # per relay block
    listeners: list[list[socket.socket]]    # per relay block
    forward: list[str]                      # numeric backend address per block
    ticket_keys: bytes
    use_syslog: bool
    verbose: bool


def main(setup: RelaySetup, index: int, ca_fd: int, ctl_fd: int) -> int:
    cfg = setup.cfg
    native.engine_init(id=index, ca_fd=ca_fd, ctl_fd=ctl_fd, max_conns=0,
                       handshake_timeout=0, use_syslog=setup.use_syslog,
                       verbose=setup.verbose)
    for n, relay in enumerate(cfg.relays):
        rid = native.relay_new(relay.name, setup.forward[n],
                               relay.forward_port, relay.ciphers,
                               relay.keyop_timeout_ms, relay.session_timeout)
        for sock in setup.listeners[n]:
            native.relay_listen(rid, sock.fileno())
        for cert in setup.certs[n]:
            key = keys.read_key(cert) if cfg.keys_inprocess else None
            native.relay_keypair(rid, cert.chain_pem, cert.keyid, key)
    native.ticket_keys(setup.ticket_keys)
    privsep.drop_privileges(cfg)
    native.engine_run()
    return 0
