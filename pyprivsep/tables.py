"""The backends of the relay blocks: every host of every `forward to`,
numbered, with its numeric address (the relays cannot resolve names).

The parent numbers the hosts once per configuration (relay blocks in
order, then their forwards, then the hosts of each): the relays, the
health checks and `pyprivsep ctl show hosts` name a host by that id.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from pyprivsep.config import Config, ConfigError, Forward, Relay


@dataclass(frozen=True)
class Host:
    id: int
    relay: str              # relay block name
    forward: int            # 0: the first table, 1: its fallback
    table: str | None       # None: `forward to ADDRESS`
    name: str               # as written
    address: str            # numeric
    port: int
    disabled: bool          # of a disabled table: never used


def resolve(cfg: Config, name: str, fwd: Forward, relay: Relay) -> str:
    """A host's numeric address: the first getaddrinfo() gives.  An error
    names the line that wrote the name: the table's, or the forward's."""
    try:
        infos = socket.getaddrinfo(name, fwd.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if fwd.table is not None:
            where = cfg.tables[fwd.table].where
            what = f"table <{fwd.table}>"
        else:
            where, what = fwd.where, f"relay {relay.name}"
        raise ConfigError(where.file, where.line, f"{what}: cannot resolve "
                          f"{name}: {e.strerror}") from None
    return str(infos[0][4][0])


def hosts_of(cfg: Config) -> list[Host]:
    """Every host of every relay's forwards, resolved, in id order."""
    out: list[Host] = []
    for relay in cfg.relays:
        for n, fwd in enumerate(relay.forwards):
            for name in fwd.hosts:
                out.append(Host(len(out), relay.name, n, fwd.table, name,
                                resolve(cfg, name, fwd, relay),
                                fwd.port, fwd.disabled))
    return out
