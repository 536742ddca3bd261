"""The parent's view of the hosts' health: what the hce reported, the log
lines it makes (relayd's "host X, check ..., state A -> B"), and the
state of every host for the relays and `pyprivsep ctl show hosts`."""
from __future__ import annotations

import logging
import struct
import time
from typing import Any

from pyprivsep.config import Config
from pyprivsep.checks import Target
from pyprivsep.hce import targets
from pyprivsep.tables import Host

log = logging.getLogger("pyprivsep")

HOST_STATE = struct.Struct("=II")       # protocol.h struct pps_host_state


def host_state_payload(host_id: int, up: bool) -> bytes:
    """A PPS_CTL_HOST payload."""
    return HOST_STATE.pack(host_id, int(up))


class HostStates:
    """Hosts without a check are up; checked ones are unknown until their
    first result (and used meanwhile: the relays retry another host on a
    refused connect); a disabled table's are down."""

    def __init__(self, cfg: Config, hosts: list[Host]) -> None:
        self.hosts = hosts
        self.checked: dict[int, Target] = {t.host.id: t for t in targets(cfg, hosts)}
        self.up: dict[int, bool] = {}
        self.reason: dict[int, str] = {}
        self.since: dict[int, float] = {}

    def state(self, host: Host) -> str:
        if host.disabled:
            return "disabled"
        if host.id not in self.checked:
            return "up (no check)"
        up = self.up.get(host.id)
        return "unknown" if up is None else "up" if up else "down"

    def down(self) -> set[int]:
        """Ids of the hosts the relays must not use now."""
        return {h for h, up in self.up.items() if not up}

    def report(self, host_id: int, up: bool, ms: int, reason: str) -> bool:
        """A result from the hce; True if the host's state changed.
        ValueError for a host the hce has no business reporting."""
        target = self.checked.get(host_id)
        if target is None:
            raise ValueError(f"no checked host {host_id}")
        h = target.host
        old = self.state(h)
        self.reason[host_id] = reason
        if self.up.get(host_id) == up:
            return False
        self.up[host_id] = up
        self.since[host_id] = time.time()
        where = f"relay {h.relay}, table <{h.table}>" if h.table else f"relay {h.relay}"
        log.info("%s: host %s, check %s (%dms,%s), state %s -> %s", where,
                 h.name, target.check.describe(), ms, reason, old,
                 "up" if up else "down")
        return True

    def show(self) -> list[dict[str, Any]]:
        out = []
        for h in self.hosts:
            t = self.checked.get(h.id)
            out.append({"id": h.id, "relay": h.relay,
                        "table": f"<{h.table}>" if h.table else "",
                        "fallback": h.forward > 0, "host": h.name,
                        "address": h.address, "port": h.port,
                        "check": t.check.describe() if t else "",
                        "state": self.state(h),
                        "reason": self.reason.get(h.id, ""),
                        "since": self.since.get(h.id)})
        return out
