"""A fleet on one machine: pyprivsep instances each in a network namespace
the test makes, each with its own loopback and its own backend on it, all
reached behind one address by haproxy (mode tcp, balance roundrobin) in the
root namespace.

    root namespace                        namespace pps-fleet-PID-I
    127.0.0.1:P  haproxy --------veth----> 198.18.X.(4I+2):8443 pyprivsep
                 (tcp, roundrobin)         127.0.0.1:8080 backend "instance I"

Each namespace is joined to the root namespace by a veth pair of its own
(a /30 from 198.18.0.0/15, the range RFC 2544 sets aside for testing, the
third octet from the test's pid).  No traffic leaves the machine: the
only links are the pairs, and nothing routes between them.  ``Fleet`` is
a context manager; leaving it kills every process it started and deletes
every namespace and link it made, whatever happened.  UNIX sockets do not
care about network namespaces: every instance's control socket, and a
p11-kit server's socket, are reached through the file system as usual.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Self

from basics import LOCALHOST, free_port, wait_until
from daemonctl import Daemon, DaemonConfig, RelaySpec
from keypairs import KeyPair

HAPROXY = "/usr/sbin/haproxy"
RELAY_PORT = 8443         # the same in every namespace: each has its own ports
BACKEND_PORT = 8080
PAGE = "served by fleet instance {index}\n"


def missing() -> str | None:
    """Why a fleet cannot be made here; None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if not os.path.exists(HAPROXY):
        return "haproxy is not installed (make testdeps)"
    probe = f"pps-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Netns:
    """Namespace ``name`` joined to the root namespace by veth
    ``host_if`` (root side, ``host_addr``) -- ``ns_if`` (``addr``)."""

    index: int
    name: str
    host_if: str
    ns_if: str
    host_addr: str
    addr: str

    @classmethod
    def plan(cls, index: int) -> Netns:
        pid = os.getpid()
        net = f"198.18.{pid % 250}"
        return cls(index, f"pps-fleet-{pid}-{index}", f"ppsf{pid % 10**7}h{index}",
                   f"ppsf{pid % 10**7}n{index}", f"{net}.{4 * index + 1}", f"{net}.{4 * index + 2}")

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def create(self) -> None:
        ip("netns", "add", self.name)
        ip("-n", self.name, "link", "set", "lo", "up")
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        ip("link", "set", self.ns_if, "netns", self.name)
        ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        ip("-n", self.name, "addr", "add", f"{self.addr}/30", "dev", self.ns_if)
        ip("-n", self.name, "link", "set", self.ns_if, "up")

    def delete(self) -> list[str]:
        """Removes the link and the namespace; what could not be removed."""
        errors = []
        for args in (["link", "delete", self.host_if], ["netns", "delete", self.name]):
            proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
            if proc.returncode != 0 and "Cannot find" not in proc.stderr \
                    and "No such file" not in proc.stderr:
                errors.append(f"ip {' '.join(args)}: {proc.stderr.strip()}")
        return errors


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines() if ": " in line}


def tls_probe(host: str, port: int, name: str, timeout: float = 2.0) -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=name):
            return True
    except OSError:
        return False


def https_page(host: str, port: int, name: str, timeout: float = 5.0) -> str | None:
    """The body of GET / over TLS (no verification), None on failure."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    except OSError:
        return None
    return data.decode(errors="replace").partition("\r\n\r\n")[2]


class NetnsDaemon(Daemon):
    """A daemon run by ``ip netns exec``, probed at its namespace's address."""

    def __init__(self, workdir: Path, config: DaemonConfig, netns: Netns) -> None:
        super().__init__(workdir, config)
        self.netns = netns
        self.command_prefix = netns.exec_prefix

    def probe(self, port: int, name: str) -> bool:
        return tls_probe(self.netns.addr, port, name)


@dataclass
class Instance:
    netns: Netns
    daemon: NetnsDaemon
    relay: RelaySpec
    backend: subprocess.Popen[bytes]

    @property
    def index(self) -> int:
        return self.netns.index

    @property
    def ctl_socket(self) -> Path:
        return self.daemon.workdir / "ctl.sock"


@dataclass
class Fleet:
    """``count`` instances, each pyprivsep with ``keypairs`` (prefork 1,
    the extra global lines ``globals``), behind haproxy on 127.0.0.1:port.
    Start with ``with``."""

    workdir: Path
    keypairs: Sequence[KeyPair]
    count: int = 3
    globals: Sequence[str] = ()
    instances: list[Instance] = field(default_factory=list)
    port: int = 0
    _made: list[Netns] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _haproxy: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        try:
            for index in range(self.count):
                netns = Netns.plan(index)
                self._made.append(netns)
                netns.create()
            for netns in self._made:
                self.instances.append(self._start_instance(netns))
            self._start_haproxy()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        errors = self.close()
        if errors and exc is None:
            raise AssertionError("fleet teardown:\n" + "\n".join(errors))

    @property
    def server_name(self) -> str:
        return self.keypairs[0].dns_name

    def _popen(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append(proc)
        return proc

    def _start_instance(self, netns: Netns) -> Instance:
        home = self.workdir / f"instance{netns.index}"
        www = home / "www"
        www.mkdir(parents=True)
        (www / "index.html").write_text(PAGE.format(index=netns.index))
        backend = self._popen([*netns.exec_prefix, sys.executable, "-m", "http.server", "--bind",
                               LOCALHOST, "--directory", str(www), str(BACKEND_PORT)],
                              home / "backend.log")
        relay = RelaySpec("www", RELAY_PORT, BACKEND_PORT, self.keypairs, listen_host=netns.addr)
        daemon_dir = home / "daemon"
        daemon_dir.mkdir()
        daemon = NetnsDaemon(daemon_dir, DaemonConfig([relay], prefork=1, globals=self.globals),
                             netns)
        instance = Instance(netns, daemon, relay, backend)
        daemon.start()
        # the backend too: the instance's own page through its relay
        want = PAGE.format(index=netns.index)
        wait_until(lambda: https_page(netns.addr, RELAY_PORT, self.server_name) == want, 30,
                   lambda: f"instance {netns.index}'s page through its relay\n"
                           f"{(home / 'backend.log').read_text(errors='replace')}\n{daemon.describe()}")
        return instance

    def _start_haproxy(self) -> None:
        self.port = free_port()
        conf = self.workdir / "haproxy.cfg"
        servers = "".join(f"    server instance{i.index} {i.netns.addr}:{RELAY_PORT}\n"
                          for i in self.instances)
        conf.write_text(f"""\
global
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
listen fleet
    bind {LOCALHOST}:{self.port}
    balance roundrobin
{servers}""")
        log = self.workdir / "haproxy.log"
        self._haproxy = self._popen([HAPROXY, "-db", "-f", str(conf)], log)
        haproxy = self._haproxy
        wait_until(lambda: haproxy.poll() is None and tls_probe(LOCALHOST, self.port, self.server_name),
                   30, lambda: f"haproxy on {self.port}\n{log.read_text(errors='replace')}")

    def close(self) -> list[str]:
        """Everything started stopped, everything made removed; the errors."""
        errors: list[str] = []
        for instance in self.instances:
            with contextlib.suppress(Exception):
                instance.daemon.kill_all()
            # as conftest's start_daemon: a process its seccomp filter killed fails the test
            errors += [f"instance {instance.index}: killed by its seccomp filter: {line}"
                       for line in instance.daemon.seccomp_kills()]
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for netns in self._made:
            errors += netns.delete()
        self._made.clear()
        return errors

    def describe(self) -> str:
        return "\n".join(f"--- instance {i.index} ({i.netns.name}, {i.netns.addr}) ---\n"
                         f"{i.daemon.describe()}" for i in self.instances)


def with_key(keypair: KeyPair, uri: str) -> KeyPair:
    """The keypair with its key given as a PKCS#11 URI instead of a file."""
    return replace(keypair, key_path=Path(uri))
