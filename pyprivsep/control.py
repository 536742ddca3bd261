"""The control socket: `pyprivsep ctl` talks to the parent through it.

A UNIX stream socket (mode 0600: root only when the daemon runs as root).
One command per connection: the client sends a JSON line
``{"cmd": ["show", "summary"]}``, the parent answers with one JSON line
and closes.  The parent serves it from its main loop; a client that does
not send its line within a second is dropped.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from typing import TYPE_CHECKING, Any, Callable

from pyprivsep import __version__, native

if TYPE_CHECKING:
    from pyprivsep.parent import Parent

log = logging.getLogger("pyprivsep")
MAX_REQUEST = 4096


def show_summary(parent: "Parent") -> dict[str, Any]:
    relays = parent.relay_stats()
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
    }


def show_keys(parent: "Parent") -> dict[str, Any]:
    held_by = ("the relays (keys inprocess)" if parent.cfg.keys_inprocess
               else f"ca 1-{parent.cfg.prefork}")
    return {"keys": [
        {"relay": r.name, "certificate": c.keypair.cert,
         "subject": c.subject, "type": f"{c.kind.upper()}-{c.bits}",
         "not_after": c.not_after, "key_id": c.keyid.hex()[:16],
         "held_by": held_by}
        for r, certs in zip(parent.cfg.relays, parent.setup.certs)
        for c in certs]}


def do_reload(parent: "Parent") -> dict[str, Any]:
    error = parent.reload()
    if error is not None:
        return {"error": f"reload failed, still running the previous "
                         f"configuration: {error}"}
    return {"ok": f"reloaded, generation {parent.generation}"}


def do_stop(parent: "Parent") -> dict[str, Any]:
    parent.stop()
    return {"ok": "stopping"}


def log_level(verbose: bool) -> Callable[["Parent"], dict[str, Any]]:
    def run(parent: "Parent") -> dict[str, Any]:
        parent.set_verbose(verbose)
        return {"ok": f"logging {'verbose' if verbose else 'brief'}"}
    return run


COMMANDS: dict[tuple[str, ...], Callable[["Parent"], dict[str, Any]]] = {
    ("show", "summary"): show_summary,
    ("show", "sessions"): lambda parent: {"sessions": parent.sessions()},
    ("show", "keys"): show_keys,
    ("reload",): do_reload,
    ("stop",): do_stop,
    ("log", "brief"): log_level(False),
    ("log", "verbose"): log_level(True),
}


class Server:
    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise OSError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise OSError(f"{path}: another pyprivsep is listening")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)         # a stale socket
            finally:
                probe.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(16)

    def serve_one(self, parent: "Parent") -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            try:
                line = read_line(conn)
                if not line:        # a probe (another daemon's start)
                    return
                conn.sendall(json.dumps(self.answer(parent, line)).encode()
                             + b"\n")
            except (OSError, ValueError) as e:
                log.warning("control: %s", e)

    @staticmethod
    def answer(parent: "Parent", line: bytes) -> dict[str, Any]:
        try:
            words = tuple(json.loads(line)["cmd"])
        except (ValueError, KeyError, TypeError):
            words = ()
        if not words or not all(isinstance(w, str) for w in words):
            return {"error": "malformed request"}
        command = COMMANDS.get(words)
        if command is None:
            return {"error": f"unknown command: {' '.join(map(str, words))}",
                    "commands": [" ".join(c) for c in COMMANDS]}
        log.info("control: %s", " ".join(words))
        return command(parent)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def read_line(conn: socket.socket, timeout: float = 1.0) -> bytes:
    """One request line, within `timeout` in all: a client that trickles
    its bytes cannot hold the parent's loop any longer."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise ValueError("request not sent in time")
        conn.settimeout(left)
        chunk = conn.recv(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data
