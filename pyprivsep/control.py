"""The control socket: `pyprivsep ctl` talks to the parent through it.

A UNIX stream socket (mode 0600: root only when the daemon runs as root).
One command per connection: the client sends a JSON line
``{"cmd": ["show", "summary"]}``, the parent answers with one JSON line
and closes.  The parent serves it from its main loop, never blocking: a
bounded number of connections, each a state machine (netserve); a client
that does not send its line within two seconds is dropped; commands that
need the relays (show summary, show sessions, reload) answer once every
relay answered or its deadline passed.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import stat
import time
from typing import TYPE_CHECKING, Any, Callable

from pyprivsep import __version__, keys, native, netserve

if TYPE_CHECKING:
    from pyprivsep.parent import Parent

log = logging.getLogger("pyprivsep")
MAX_REQUEST = 4096
MAX_CONNS = 16

Answer = dict[str, Any]
Respond = Callable[[Answer], None]


class InUse(OSError):
    """Another daemon listens on the control socket."""


def show_summary(parent: "Parent", respond: Respond) -> None:
    parent.relay_stats(lambda relays: respond(summary(parent, relays)))


def summary(parent: "Parent", relays: list[dict[str, Any]]) -> Answer:
    totals: dict[str, int] = {}
    for r in relays:
        for name, value in r.get("stats", {}).items():
            if isinstance(value, int):
                totals[name] = totals.get(name, 0) + value
    return {
        "version": __version__, "library": native.library_version(),
        "generation": parent.generation, "prefork": parent.cfg.prefork,
        "keys": "inprocess" if parent.cfg.keys_inprocess else "ca",
        "relays": relays, "totals": totals,
        "listeners": [{"relay": r.name, "listen": f"{ln.host}:{ln.port}",
                       "forward": f"{r.forward_host}:{r.forward_port}"}
                      for r in parent.cfg.relays for ln in r.listens],
        "keyservices": keyservices(parent),
    }


def keyservices(parent: "Parent") -> list[dict[str, Any]]:
    """Each keyservice: its socket, who it admits, its cas (the current
    generation's and those still draining) and how often they restarted.
    From the parent's own records: a ca has no control channel to ask."""
    out = []
    for svc in parent.services:
        ks = svc.ks
        cas = [{"ca": c.index, "generation": c.generation,
                "pid": c.pids.get("ca"), "draining": c.draining}
               for c in parent.kscas + parent.draining
               if getattr(c, "service", None) is not None
               and c.service.ks.name == ks.name]
        out.append({"name": ks.name, "socket": ks.socket,
                    "allow_users": ks.allow_users,
                    "allow_groups": ks.allow_groups, "prefork": ks.prefork,
                    "cas_up": sum(1 for c in cas if c["pid"] is not None
                                  and not c["draining"]),
                    "restarts": svc.restarts, "cas": cas})
    return out


def ocsp_state(cert: keys.Cert) -> dict[str, Any] | None:
    """What a keypair staples: its response file, the response's
    nextUpdate, and whether the relays staple it now (not when it was out
    of date at the last start or reload, nor past its nextUpdate)."""
    if cert.keypair.ocsp is None:
        return None
    staple = cert.staple
    until = None if staple is None or staple.not_after == 0 else \
        datetime.datetime.fromtimestamp(staple.not_after, datetime.timezone.utc)
    now = time.time()
    return {"file": cert.keypair.ocsp,
            "next_update": None if until is None else until.isoformat(),
            "stapled": staple is not None and staple.not_before <= now
            and (staple.not_after == 0 or now < staple.not_after)}


def show_keys(parent: "Parent") -> dict[str, Any]:
    held_by = ("the relays (keys inprocess)" if parent.cfg.keys_inprocess
               else f"ca 1-{parent.cfg.prefork}")
    return {"keys": [
        {"relay": r.name, "certificate": c.keypair.cert,
         "subject": c.subject, "type": c.type_name(),
         "not_after": c.not_after, "key_id": c.keyid.hex()[:16],
         "held_by": held_by, "ocsp": ocsp_state(c)}
        for r, certs in zip(parent.cfg.relays, parent.setup.certs)
        for c in certs] + [
        {"keyservice": svc.ks.name, "socket": svc.ks.socket,
         "certificate": c.keypair.cert, "subject": c.subject,
         "type": c.type_name(), "not_after": c.not_after,
         "key_id": c.keyid.hex()[:16],
         "held_by": f"keyservice {svc.ks.name} ca 1-{svc.ks.prefork}",
         "ca_pids": [sca.pids.get("ca") for sca in parent.kscas
                     if sca.service is svc]}
        for svc in parent.services for c in svc.certs]}


def show_hosts(parent: "Parent") -> dict[str, Any]:
    """Every host of every forward, with its health (the parent's own
    record of what the hce reported)."""
    return {"hosts": parent.hosts.show(),
            "hce_pid": parent.hce.pids.get("hce") if parent.hce else None}


def show_sessions(parent: "Parent", respond: Respond) -> None:
    parent.sessions(lambda sessions: respond({"sessions": sessions}))


def do_reload(parent: "Parent", respond: Respond) -> None:
    def done(error: str | None) -> None:
        if error is not None:
            respond({"error": f"reload failed, still running the previous "
                              f"configuration: {error}"})
        else:
            respond({"ok": f"reloaded, generation {parent.generation}"})
    parent.reload(done)


def do_stop(parent: "Parent") -> dict[str, Any]:
    parent.stop()
    return {"ok": "stopping"}


def log_level(verbose: bool) -> Callable[["Parent"], dict[str, Any]]:
    def run(parent: "Parent") -> dict[str, Any]:
        parent.set_verbose(verbose)
        return {"ok": f"logging {'verbose' if verbose else 'brief'}"}
    return run


def now(command: Callable[["Parent"], Answer]) \
        -> Callable[["Parent", Respond], None]:
    """A command answered at once, from the parent's own state."""
    def run(parent: "Parent", respond: Respond) -> None:
        respond(command(parent))
    return run


COMMANDS: dict[tuple[str, ...], Callable[["Parent", Respond], None]] = {
    ("show", "summary"): show_summary,
    ("show", "sessions"): show_sessions,
    ("show", "keys"): now(show_keys),
    ("show", "hosts"): now(show_hosts),
    ("reload",): do_reload,
    ("stop",): now(do_stop),
    ("log", "brief"): now(log_level(False)),
    ("log", "verbose"): now(log_level(True)),
}


def bind(path: str) -> socket.socket:
    """The listening control socket; InUse if a daemon already answers on
    it (checked before anything else is bound or forked)."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise InUse(f"control socket {path}: another pyprivsep is "
                        "listening on it")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)         # a stale socket
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(MAX_CONNS)
    return sock


class Server(netserve.Server):
    def __init__(self, path: str) -> None:
        super().__init__(bind(path), "control", max_conns=MAX_CONNS,
                         max_request=MAX_REQUEST, read_timeout=2.0)
        self.path = path
        self.parent: "Parent | None" = None

    def complete(self, data: bytes) -> bool:
        return data.endswith(b"\n")

    def handle(self, request: bytes, reply: netserve.Reply) -> None:
        def respond(answer: Answer) -> None:
            reply(json.dumps(answer).encode() + b"\n")
        assert self.parent is not None
        try:
            self.answer(self.parent, request, respond)
        except Exception as e:      # a bug must not take the parent down
            log.error("control: %s", e)
            respond({"error": f"internal error: {e}"})

    @staticmethod
    def answer(parent: "Parent", line: bytes, respond: Respond) -> None:
        try:
            words = tuple(json.loads(line)["cmd"])
        except (ValueError, KeyError, TypeError):
            words = ()
        if not words or not all(isinstance(w, str) for w in words):
            respond({"error": "malformed request"})
            return
        command = COMMANDS.get(words)
        if command is None:
            respond({"error": f"unknown command: {' '.join(map(str, words))}",
                     "commands": [" ".join(c) for c in COMMANDS]})
            return
        log.info("control: %s", " ".join(words))
        command(parent, respond)

    def close(self) -> None:
        super().close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
