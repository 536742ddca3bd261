"""The relay process: set the C engine up, drop privileges, run it.

Python is here only to hand the engine its configuration; from
engine_run() on, every connection is handled in C.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field

from pyprivsep import keys, native, privsep
from pyprivsep.config import MODES, Config, ConfigError
from pyprivsep.tables import Host


@dataclass
class RelaySetup:
    """What the parent gives each relay process (it forks them with it)."""

    cfg: Config
    certs: list[list[keys.Cert]]            # per relay block
    listeners: list[list[socket.socket]]    # per relay block
    hosts: list[Host]                       # every forward's, in id order
    down: set[int]                          # ids of the hosts down now
    ticket_keys: bytes
    use_syslog: bool
    verbose: bool
    # per relay block: the PEM of its `tls client ca`, or None
    client_cas: list[bytes | None] = field(default_factory=list)
    # `tls ticket keys "file"`: its keys (relay layout, sealing key
    # first), read by the parent; None: the parent generates and rotates
    file_tickets: list[bytes] | None = None


def configure(cfg: Config, certs: list[list[keys.Cert]], hosts: list[Host],
              listeners: list[list[socket.socket]], inprocess: bool,
              client_cas: list[bytes | None], down: set[int] | None = None) -> None:
    """Give the engine its relay blocks.  Anything it refuses (a cipher
    list, a certificate chain, a key that does not fit, an OCSP response,
    a client CA file) is a ConfigError naming the directive, so that
    `pyprivsep -n`, which runs this too, finds it before a relay process
    would."""
    for n, r in enumerate(cfg.relays):
        try:
            rid = native.relay_new(r.name, r.ciphers, r.keyop_timeout_ms,
                                   r.session_timeout, r.proxy_protocol,
                                   r.alpn)
            for f, fwd in enumerate(r.forwards):
                table = native.relay_table(rid, MODES[fwd.mode])
                for h in hosts:
                    if h.relay == r.name and h.forward == f:
                        native.relay_host(rid, table, h.id, h.address, h.port,
                                          not h.disabled and
                                          h.id not in (down or set()))
            for sock in listeners[n]:
                native.relay_listen(rid, sock.fileno())
        except native.NativeError as e:
            raise ConfigError(r.where.file, r.where.line,
                              f"relay {r.name}: {e}") from None
        ca_pem = client_cas[n]
        if r.client_ca is not None and ca_pem is not None:
            try:
                native.relay_client_ca(rid, ca_pem, r.client_ca.optional)
            except native.NativeError as e:
                w = r.client_ca.where
                raise ConfigError(w.file, w.line, f"relay {r.name}: tls client "
                                  f"ca {r.client_ca.path}: {e}") from None
        for cert in certs[n]:
            key = (keys.read_key(cert) if inprocess and cert.keypair.p11 is None
                   else None)
            kp = cert.keypair
            try:
                native.relay_keypair(rid, cert.chain_pem, cert.keyid, key)
            except native.NativeError as e:
                raise ConfigError(kp.where.file, kp.where.line,
                                  f"relay {r.name}: {kp.cert}: {e}") from None
            if cert.staple is None:
                continue
            try:
                native.relay_ocsp(rid, cert.staple.der, cert.staple.not_before,
                                  cert.staple.not_after)
            except native.NativeError as e:
                raise ConfigError(kp.where.file, kp.where.line,
                                  f"relay {r.name}: ocsp {kp.ocsp}: {e}") from None


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
    configure(cfg, setup.certs, setup.hosts, setup.listeners,
              cfg.keys_inprocess, setup.client_cas, setup.down)
    native.ticket_keys(setup.ticket_keys)
    privsep.drop_privileges(cfg, "relay")
    privsep.sandbox("relay")
    native.engine_run()
    return 0
