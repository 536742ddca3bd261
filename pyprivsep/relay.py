"""The relay process: set the C engine up, drop privileges, run it.

Python is here only to hand the engine its configuration; from
engine_run() on, every connection is handled in C.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from pyprivsep import keys, native, privsep
from pyprivsep.config import Config, ConfigError


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


def configure(cfg: Config, certs: list[list[keys.Cert]], forward: list[str],
              listeners: list[list[socket.socket]], inprocess: bool) -> None:
    """Give the engine its relay blocks.  Anything it refuses (a cipher
    list, a certificate chain, a key that does not fit) is a ConfigError
    naming the directive, so that `pyprivsep -n`, which runs this too,
    finds it before a relay process would."""
    for n, r in enumerate(cfg.relays):
        try:
            rid = native.relay_new(r.name, forward[n], r.forward_port,
                                   r.ciphers, r.keyop_timeout_ms,
                                   r.session_timeout, r.proxy_protocol,
                                   r.alpn)
            for sock in listeners[n]:
                native.relay_listen(rid, sock.fileno())
        except native.NativeError as e:
            raise ConfigError(r.where.file, r.where.line,
                              f"relay {r.name}: {e}") from None
        for cert in certs[n]:
            key = keys.read_key(cert) if inprocess else None
            try:
                native.relay_keypair(rid, cert.chain_pem, cert.keyid, key)
            except native.NativeError as e:
                kp = cert.keypair
                raise ConfigError(kp.where.file, kp.where.line,
                                  f"relay {r.name}: {kp.cert}: {e}") from None


def keyops_async(cfg: Config) -> bool:
    """`keyops async` unless configured blocking or the library has no ASYNC
    (LibreSSL), where asking for it is a configuration error."""
    if cfg.keyops is None:
        return native.async_supported()
    if cfg.keyops == "async" and not native.async_supported():
        where = cfg.keyops_where
        raise ConfigError(where.file if where else cfg.path,
                          where.line if where else 0,
                          f"keyops async: {native.library_version()} has no "
                          "ASYNC support; use keyops blocking")
    return cfg.keyops == "async"


def main(setup: RelaySetup, index: int, ca_fd: int, ctl_fd: int) -> int:
    cfg = setup.cfg
    native.engine_init(id=index, ca_fd=ca_fd, ctl_fd=ctl_fd,
                       max_conns=cfg.max_connections,
                       handshake_timeout=cfg.handshake_timeout,
                       keyops_async=keyops_async(cfg),
                       log_conn="connection" in cfg.log,
                       log_errors="errors" in cfg.log,
                       ticket_lifetime=cfg.ticket_lifetime,
                       use_syslog=setup.use_syslog,
                       verbose=setup.verbose)
    configure(cfg, setup.certs, setup.forward, setup.listeners,
              cfg.keys_inprocess)
    native.ticket_keys(setup.ticket_keys)
    privsep.drop_privileges(cfg, "relay")
    privsep.sandbox("relay")
    native.engine_run()
    return 0
