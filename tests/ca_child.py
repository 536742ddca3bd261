"""A real ca process for the tests, and the relay's end of its channel.

``start_ca`` forks a child that runs ``pyprivsep.ca.main`` -- the ca's whole
life as the parent starts it: load the keys of a configuration, drop
privileges, harden, serve -- on one end of an AF_UNIX SOCK_SEQPACKET
socketpair, and hands the test the other end.  The test plays the relay:
``send_frame`` any bytes, ``recv_reply`` the ca's answer, which must itself
be a well-formed reply frame (``cawire.parse_reply``, the test's own reading
of docs/protocol.md, independent of the product's C).  The child logs (Python
and C) to a file, read with ``log`` or waited for with ``wait_for_log``.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import signal
import socket
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from cryptography import x509

from basics import wait_until
from cawire import FRAME_MAX, Reply, parse_reply, raw_frame, spki_keyid
from pyprivsep import ca, privsep
from pyprivsep.config import parse_config

REPLY_TIMEOUT = 20.0  # seconds; a ca that does not answer in time is wedged


def _run_ca_child(sock: socket.socket, cfg_path: Path, log_path: Path) -> NoReturn:
    """The forked child: log to a file, run the ca until it ends."""
    status = 1
    try:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        # the ca's request path (C) logs its refusals on stderr
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # as the parent's children
            signal.signal(sig, signal.SIG_DFL)
        cfg = parse_config(str(cfg_path))
        privsep.prepare_chroot(cfg)  # the parent's part
        status = ca.main(cfg, 1, sock, use_syslog=False, verbose=True)
        logging.getLogger("test").info("ca.main returned %d", status)
    except BaseException:
        with log_path.open("a") as f:
            f.write("CHILD EXCEPTION " + traceback.format_exc())
    finally:
        logging.shutdown()
        os._exit(status)


@dataclass
class CaChild:
    """A forked ca process and the relay's end of its socket."""

    pid: int
    sock: socket.socket
    log_path: Path
    wait_status: int | None = None
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def next_id(self) -> int:
        return next(self._ids)

    def gone(self) -> AssertionError:
        wait_until(lambda: not self.alive(), 5.0, "the ca, which closed its channel, to exit", interval=0.01)
        return AssertionError(f"the ca exited (wait status {self.wait_status}); log:\n{self.log()}")

    def send_frame(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except (BrokenPipeError, ConnectionResetError):
            raise self.gone() from None

    def recv_frame(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        """The next message from the ca, as it came."""
        if not select.select([self.sock], [], [], timeout)[0]:
            raise AssertionError(f"no reply from the ca in {timeout} s; log:\n{self.log()}")
        try:
            data = self.sock.recv(FRAME_MAX + 1)
        except ConnectionResetError:
            raise self.gone() from None
        if not data:
            raise self.gone()
        return data

    def recv_reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        return parse_reply(self.recv_frame(timeout))

    def replies_waiting(self) -> int:
        """Take every reply already there, without waiting; how many."""
        n = 0
        while True:
            try:
                data = self.sock.recv(FRAME_MAX + 1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return n
            parse_reply(data)
            n += 1

    def call(self, data: bytes) -> Reply:
        self.send_frame(data)
        return self.recv_reply()

    def ask(self, certificate: x509.Certificate, op: int, arg: int, data: bytes) -> tuple[int, bytes]:
        """One request for the key of ``certificate``: (status, payload),
        the reply checked to be this request's."""
        rid, keyid = self.next_id(), spki_keyid(certificate)
        reply = self.call(raw_frame(op, arg, rid, keyid, data))
        assert (reply.id, reply.key) == (rid, keyid)
        return reply.arg, reply.payload

    def alive(self) -> bool:
        if self.wait_status is not None:
            return False
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return True
        self.wait_status = status
        return False

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """The log, once it holds ``text`` (the ca writes after it answers)."""
        return wait_until(lambda: self.log() if text in self.log() else None, timeout,
                          lambda: f"{text!r} in the ca's log:\n{self.log()}", interval=0.01)

    def refusal_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if "refused request" in line]

    def stop(self) -> None:
        self.sock.close()  # the ca's recv sees the end of the channel
        try:
            wait_until(lambda: not self.alive(), 10.0, "the ca to exit after its channel closed", interval=0.01)
        finally:
            if self.wait_status is None:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)


def start_ca(cfg_path: Path, log_path: Path) -> CaChild:
    relay_end, ca_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        relay_end.close()
        _run_ca_child(ca_end, cfg_path, log_path)
    ca_end.close()
    return CaChild(pid, relay_end, log_path)
