"""Helpers shared by the pyprivsep end-to-end tests.

Everything here is plain functions and small classes so that every test module
(and conftest.py) can import it with ``from util import ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import os
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pyprivsep import native

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
HTTP_GET_ROOT = b"GET / HTTP/1.0\r\n\r\n"
BACKEND_PAGE = b"hello from backend\n"
MIB = 1024 * 1024

TlsVersion = Literal["1.2", "1.3"]
T = TypeVar("T")

# LibreSSL's TLS 1.3 server sends no NewSessionTicket (LibreSSL has no TLS 1.3
# resumption): there only TLS 1.2 sessions resume.
TLS13_RESUMES = not native.library_version().startswith("LibreSSL")
NO_TLS13_RESUMPTION = "LibreSSL's TLS 1.3 server issues no session tickets, so TLS 1.3 sessions never resume"


# --------------------------------------------------------------------------
# Polling and ports
# --------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
) -> T:
    """Call ``predicate`` until it returns a truthy value and return that value.

    Raises AssertionError naming ``what`` (a string, or a callable producing
    one lazily, e.g. with the daemon's stderr) when ``timeout`` expires.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            description = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {description}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def pattern_bytes(n: int) -> bytes:
    """Deterministic pseudo-random bytes served by the HTTP backend's /bytes/N."""
    return hashlib.shake_256(b"pyprivsep backend bytes").digest(n)


# --------------------------------------------------------------------------
# Keys and certificates
# --------------------------------------------------------------------------

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
KEY_NAMES: tuple[str, ...] = ("rsa2048", "rsa4096", "p256", "p384")


@dataclass(frozen=True)
class Secret:
    """One secret integer of a private key and its byte width in memory."""

    value: int
    width: int

    def encodings(self) -> dict[str, bytes]:
        """Big- and little-endian fixed-width byte strings.

        OpenSSL BIGNUMs on x86_64 are little-endian arrays of 64-bit words,
        which is the little-endian encoding padded to a multiple of 8 bytes,
        so the ``le`` pattern also matches a BIGNUM's storage.
        """
        big = self.value.to_bytes(self.width, "big")
        return {"be": big, "le": big[::-1]}


@dataclass(frozen=True)
class KeyPair:
    name: str
    dns_name: str
    cert_path: Path
    key_path: Path
    certificate: x509.Certificate
    secrets: Mapping[str, Secret]  # RSA: "p", "q"; EC: "d" (the private scalar)

    @property
    def cert_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def is_rsa(self) -> bool:
        return "p" in self.secrets

    def components(self) -> set[str]:
        """Names of the secret components, e.g. {"rsa2048:p", "rsa2048:q"}."""
        return {f"{self.name}:{part}" for part in self.secrets}

    def patterns(self) -> dict[str, bytes]:
        """Scanner patterns named "<key>:<component>:<be|le>"."""
        return {
            f"{self.name}:{part}:{enc}": blob
            for part, secret in self.secrets.items()
            for enc, blob in secret.encodings().items()
        }


def found_components(found_patterns: Iterable[str]) -> set[str]:
    """Strip the encoding from pattern names: "rsa2048:p:le" -> "rsa2048:p"."""
    return {name.rsplit(":", 1)[0] for name in found_patterns}


def key_patterns(keypairs: Sequence[KeyPair]) -> dict[str, bytes]:
    patterns: dict[str, bytes] = {}
    for kp in keypairs:
        patterns.update(kp.patterns())
    return patterns


@dataclass(frozen=True)
class Pki:
    directory: Path
    keypairs: Mapping[str, KeyPair]
    mismatched_cert: Path  # certificate of one RSA-2048 key ...
    mismatched_key: Path  # ... and a different RSA-2048 key

    def __getitem__(self, name: str) -> KeyPair:
        return self.keypairs[name]


def new_private_key(name: str) -> PrivateKey:
    match name:
        case "rsa2048":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case "rsa4096":
            return rsa.generate_private_key(public_exponent=65537, key_size=4096)
        case "rsa8192":  # not in KEY_NAMES: only the tests that need one make it
            return rsa.generate_private_key(public_exponent=65537, key_size=8192)
        case "p256":
            return ec.generate_private_key(ec.SECP256R1())
        case "p384":
            return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"unknown key type {name!r}")


def key_secrets(key: PrivateKey) -> dict[str, Secret]:
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        return {
            "p": Secret(numbers.p, (numbers.p.bit_length() + 7) // 8),
            "q": Secret(numbers.q, (numbers.q.bit_length() + 7) // 8),
        }
    scalar = key.private_numbers().private_value
    return {"d": Secret(scalar, (key.curve.key_size + 7) // 8)}


def self_signed_certificate(key: PrivateKey, dns_names: Sequence[str], ips: Sequence[str] = ()) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    now = datetime.datetime.now(datetime.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    san += [x509.IPAddress(IPv4Address(ip)) for ip in ips]
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def write_key(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # created 0600: pyprivsep refuses a key others can read
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_keypair(directory: Path, name: str) -> KeyPair:
    key = new_private_key(name)
    dns_name = f"{name}.test"
    extra_dns, ips = (["localhost"], [LOCALHOST]) if name == "rsa2048" else ([], [])
    cert = self_signed_certificate(key, [dns_name, *extra_dns], ips)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    write_cert(cert_path, cert)
    write_key(key_path, key)
    return KeyPair(name, dns_name, cert_path, key_path, cert, key_secrets(key))


def generate_pki(directory: Path) -> Pki:
    keypairs = {name: make_keypair(directory, name) for name in KEY_NAMES}
    mismatched_key = directory / "mismatched.key"
    write_key(mismatched_key, new_private_key("rsa2048"))
    return Pki(directory, keypairs, keypairs["rsa2048"].cert_path, mismatched_key)


# --------------------------------------------------------------------------
# Backends (threads in the test process)
# --------------------------------------------------------------------------


class BackgroundServer:
    """A socketserver served from a daemon thread; use as a context manager."""

    def __init__(self, server: socketserver.TCPServer) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.request.recv(256 * 1024):
                self.request.sendall(chunk)


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class EchoServer(BackgroundServer):
    """Raw TCP echo backend."""

    def __init__(self) -> None:
        super().__init__(_ThreadingTCPServer((LOCALHOST, 0), _EchoHandler))


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    page: bytes = BACKEND_PAGE


class _BackendHandler(BaseHTTPRequestHandler):
    server: _HttpServer

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path == "/":
            self._reply(self.server.page, "text/plain")
        elif match := re.fullmatch(r"/bytes/(\d+)", self.path):
            self._reply(pattern_bytes(int(match[1])), "application/octet-stream")
        else:
            self.send_error(404)

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/echo":
            self.send_error(404)
            return
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if len(body) != length:
            self.send_error(400, "short body")
            return
        self._reply(body, "application/octet-stream")

    def _reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class HttpBackend(BackgroundServer):
    """HTTP/1.0 backend: GET / -> page, GET /bytes/N -> N bytes, POST /echo -> body."""

    def __init__(self, page: bytes = BACKEND_PAGE) -> None:
        server = _HttpServer((LOCALHOST, 0), _BackendHandler)
        server.page = page
        super().__init__(server)
        self.page = page


# --------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------

TITLE_RE = re.compile(r"^pyprivsep: (?P<role>parent|relay|ca)(?: (?P<index>\d+))?(?=\s|$)")


def _read_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) from /proc/PID/stat, or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    stat = _read_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def child_pids(ppid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None and stat[1] == ppid and stat[0] not in ("Z", "X"):
                children.append(int(entry))
    return sorted(children)


def proc_title(pid: int) -> str | None:
    """The process title as shown by ps (cmdline with NULs as spaces)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def proc_status(pid: int) -> dict[str, str]:
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return status


@dataclass(frozen=True)
class ChildProcess:
    pid: int
    role: str  # "relay" or "ca"
    index: int


# --------------------------------------------------------------------------
# The daemon
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RelaySpec:
    name: str
    listen_port: int
    forward_port: int
    keypairs: Sequence[KeyPair]
    listen_host: str = LOCALHOST  # rendered verbatim, so "$macro" works

    def render(self) -> list[str]:
        lines = [
            f'relay "{self.name}" {{',
            f"    listen on {self.listen_host} port {self.listen_port} tls",
            f"    forward to {LOCALHOST} port {self.forward_port}",
        ]
        lines += [f'    tls certificate "{kp.cert_path}" key "{kp.key_path}"' for kp in self.keypairs]
        lines.append("}")
        return lines


@dataclass(frozen=True)
class DaemonConfig:
    relays: Sequence[RelaySpec]
    prefork: int = 2
    keys_inprocess: bool = False
    chroot: Path | None = None
    user: str | None = None  # the relays' (None: the default, _pyprivsep)
    ca_user: str | None = None  # the cas' (None: the default, _pyprivsep_ca)
    timeout: int | None = 600

    def render(self) -> str:
        lines = [f"prefork {self.prefork}"]
        if self.timeout is not None:
            lines.append(f"timeout {self.timeout}")
        if self.chroot is not None:
            lines.append(f'chroot "{self.chroot}"')
        if self.user is not None:
            lines.append(f'user "{self.user}"')
        if self.ca_user is not None:
            lines.append(f'ca user "{self.ca_user}"')
        if self.keys_inprocess:
            lines.append("keys inprocess")
        for relay in self.relays:
            lines += ["", *relay.render()]
        return "\n".join(lines) + "\n"

    @property
    def expected_cas(self) -> int:
        return 0 if self.keys_inprocess else self.prefork

    @property
    def probes(self) -> list[tuple[int, str]]:
        """(port, SNI name) per relay block, used to detect readiness."""
        return [(relay.listen_port, relay.keypairs[0].dns_name) for relay in self.relays]


def simple_relay(
    pki: Pki, backend_port: int, key_names: Sequence[str] = ("rsa2048", "p256"), name: str = "www"
) -> RelaySpec:
    """One relay block on a fresh port forwarding to ``backend_port``."""
    return RelaySpec(name, free_port(), backend_port, [pki[key] for key in key_names])


# `make asan`: the daemon runs with the AddressSanitizer runtime preloaded.
SANITIZED = bool(os.environ.get("PYPRIVSEP_DAEMON_PRELOAD"))


def pyprivsep_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # `make asan`: the daemon alone runs with the sanitizer's runtime
    preload = os.environ.get("PYPRIVSEP_DAEMON_PRELOAD")
    if preload:
        env["LD_PRELOAD"] = preload
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pyprivsep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyprivsep", *args]


def run_pyprivsep(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``python3 -m pyprivsep ARGS`` to completion (e.g. ``-n -f conf``)."""
    proc = subprocess.run(
        pyprivsep_command(*args),
        cwd=REPO_ROOT,
        env=pyprivsep_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    keep_asan_report(proc.stderr, f"run.{os.getpid()}.{time.monotonic_ns()}")
    return proc


def keep_asan_report(stderr: str, name: str) -> None:
    """`make asan`: sanitizer reports go to the daemon's stderr (its children
    are chrooted and cannot open a log file); keep that for the judge,
    tests/asan_report.py."""
    directory = os.environ.get("PYPRIVSEP_ASAN_REPORTS")
    if directory and "Sanitizer" in stderr:
        Path(directory, f"asan.{name}").write_text(stderr)


class Daemon:
    """``python3 -m pyprivsep -d -f CONF`` running in its own process group."""

    def __init__(
        self,
        workdir: Path,
        config: DaemonConfig,
        *,
        args: Sequence[str] = (),
    ) -> None:
        self.chroot: Path = config.chroot or workdir / "empty"
        self.chroot.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.workdir = workdir
        self.config = replace(config, chroot=self.chroot)
        if SANITIZED:
            # LeakSanitizer needs /proc and a dumpable process: children stay
            # root (setuid would clear "dumpable") in chroot "/".
            self.config = replace(self.config, chroot=Path("/"), user="root", ca_user="root")
        self.conf_path = workdir / "pyprivsep.conf"
        # each daemon its own control socket (a test may name another)
        self.conf_path.write_text(f'socket "{workdir / "ctl.sock"}"\n'
                                  + self.config.render())
        self.stderr_path = workdir / "daemon.stderr"
        self.args = list(args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._seen_pids: set[int] = set()
        self.started_at = 0.0  # CLOCK_MONOTONIC, the kernel log's clock

    # -- lifecycle ---------------------------------------------------------

    def start(self, ready_timeout: float = 20.0) -> Self:
        self.started_at = time.monotonic()
        with self.stderr_path.open("wb") as stderr, (self.workdir / "daemon.stdout").open("wb") as out:
            self._proc = subprocess.Popen(
                pyprivsep_command("-d", "-f", str(self.conf_path), *self.args),
                cwd=REPO_ROOT,
                env=pyprivsep_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=stderr,
                start_new_session=True,
            )
        self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every relay/ca process is up and each listen port handshakes."""

        def ready() -> bool:
            self._check_running()
            if len(self.processes("relay")) != self.config.prefork:
                return False
            if len(self.processes("ca")) != self.config.expected_cas:
                return False
            return all(handshake_succeeds(port, name, timeout=2.0) for port, name in self.config.probes)

        wait_until(ready, timeout, lambda: f"daemon to become ready\n{self.describe()}", interval=0.1)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the parent and return its exit code."""
        proc = self.proc
        self._remember_children()
        proc.send_signal(sig)
        return proc.wait(timeout)

    def kill_all(self) -> None:
        """Teardown: stop the parent as an operator would (SIGTERM), then
        SIGKILL the parent, its process group and any child seen."""
        if self._proc is None:
            return
        self._remember_children()
        if self._proc.poll() is None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
        if self._proc.poll() is None:
            self._proc.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        for pid in self._seen_pids:
            title = proc_title(pid) or ""
            if pid_alive(pid) and title.startswith("pyprivsep:"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._proc.wait(timeout=10)
        keep_asan_report(self.stderr_text(), f"daemon.{self._proc.pid}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill_all()

    # -- introspection -----------------------------------------------------

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("daemon not started")
        return self._proc

    @property
    def parent_pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        """Diagnostics for assertion messages: exit status, processes, stderr."""
        code = self._proc.poll() if self._proc else None
        children = [(pid, proc_title(pid)) for pid in child_pids(self._proc.pid)] if self._proc else []
        stderr = self.stderr_text()
        if len(stderr) > 8000:
            stderr = "...\n" + stderr[-8000:]
        return f"exit code: {code}\nchildren: {children}\n--- daemon stderr ---\n{stderr}"

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited prematurely\n{self.describe()}")

    def _remember_children(self) -> None:
        if self._proc is not None:
            self._seen_pids.update(child_pids(self._proc.pid))

    def children(self) -> list[ChildProcess]:
        """Live relay and ca processes (direct children titled by role)."""
        found = []
        for pid in child_pids(self.parent_pid):
            self._seen_pids.add(pid)
            match = TITLE_RE.match(proc_title(pid) or "")
            if match and match["role"] != "parent" and match["index"]:
                found.append(ChildProcess(pid, match["role"], int(match["index"])))
        return found

    def seccomp_kills(self) -> list[str]:
        """Children of this daemon that its seccomp filter killed: the
        parent's "killed by signal 31" lines, and the kernel's audit lines
        (type=1326, sig=31) for any pid it ever had, which also catch a
        child that died during shutdown, when the parent logs no deaths.
        The kernel log needs root; without it only the daemon's log counts."""
        self._remember_children()
        found = [line for line in self.stderr_text().splitlines()
                 if f"killed by signal {int(signal.SIGSYS)}" in line]
        pids = self._seen_pids | ({self._proc.pid} if self._proc else set())
        return found + [line for line in kernel_seccomp_kills(self.started_at - 1.0)
                        if int(line.split(" pid=")[1].split()[0]) in pids]

    def processes(self, role: str) -> list[ChildProcess]:
        return [child for child in self.children() if child.role == role]

    def relay_pids(self) -> dict[int, int]:
        """index -> pid of the relay processes."""
        return {child.index: child.pid for child in self.processes("relay")}

    def ca_pids(self) -> dict[int, int]:
        """index -> pid of the ca processes."""
        return {child.index: child.pid for child in self.processes("ca")}


_AUDIT_SECCOMP = re.compile(r"^\[\s*(?P<t>\d+\.\d+)\].*type=1326 .* pid=\d+ .*\bsig=31\b")


def kernel_seccomp_kills(since: float) -> list[str]:
    """Kernel log lines of processes a seccomp filter killed (SIGSYS) from
    `since` on (CLOCK_MONOTONIC seconds, what dmesg's stamps count); empty
    when the kernel log cannot be read (not root, dmesg_restrict)."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in out.splitlines()
            if (m := _AUDIT_SECCOMP.match(line)) and float(m["t"]) >= since]


# Signature of the conftest ``start_daemon`` fixture:
# start_daemon(config, *, args=(), ready_timeout=20.0) -> Daemon
StartDaemon = Callable[..., Daemon]


# --------------------------------------------------------------------------
# Python TLS clients
# --------------------------------------------------------------------------

_SSL_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def client_context(*, cafile: Path | None = None, version: TlsVersion | None = None) -> ssl.SSLContext:
    """Client context; verifies against ``cafile`` if given, otherwise verifies nothing."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is not None:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = _SSL_VERSIONS[version]
    return ctx


@dataclass(frozen=True)
class HandshakeInfo:
    version: str
    cipher: str
    peer_cert_der: bytes


def tls_handshake(
    port: int,
    server_name: str,
    *,
    cafile: Path | None = None,
    version: TlsVersion | None = None,
    timeout: float = 5.0,
) -> HandshakeInfo:
    """One full handshake (no resumption); raises OSError/ssl.SSLError on failure."""
    ctx = client_context(cafile=cafile, version=version)
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            version_name, cipher = tls.version(), tls.cipher()
            der = tls.getpeercert(binary_form=True)
            assert version_name and cipher and der
            return HandshakeInfo(version_name, cipher[0], der)


def handshake_succeeds(
    port: int,
    server_name: str,
    *,
    cafile: Path | None = None,
    version: TlsVersion | None = None,
    timeout: float = 5.0,
) -> bool:
    try:
        tls_handshake(port, server_name, cafile=cafile, version=version, timeout=timeout)
    except OSError:  # includes ssl.SSLError and socket timeouts
        return False
    return True


def https_get(
    port: int,
    server_name: str,
    path: str = "/",
    *,
    cafile: Path | None = None,
    timeout: float = 10.0,
) -> bytes:
    """HTTP/1.0 GET through the relay; returns the response body."""
    ctx = client_context(cafile=cafile)
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(f"GET {path} HTTP/1.0\r\nHost: {server_name}\r\n\r\n".encode())
            chunks = []
            with contextlib.suppress(ssl.SSLEOFError, ConnectionResetError):
                while chunk := tls.recv(65536):
                    chunks.append(chunk)
    response = b"".join(chunks)
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
        raise AssertionError(f"bad HTTP response: {response[:200]!r}")
    return body


def tls_echo_roundtrip(
    port: int,
    server_name: str,
    payload: bytes,
    *,
    cafile: Path | None = None,
    version: TlsVersion | None = None,
    timeout: float = 60.0,
) -> bytes:
    """Send ``payload`` while concurrently reading the same number of bytes back.

    Uses asyncio (a sender task and the reader) rather than two threads on one
    SSLSocket: OpenSSL does not allow one SSL object to be used from two
    threads at once.
    """

    async def run() -> bytes:
        reader, writer = await asyncio.open_connection(
            LOCALHOST, port, ssl=client_context(cafile=cafile, version=version), server_hostname=server_name
        )

        async def send() -> None:
            view = memoryview(payload)
            for offset in range(0, len(payload), 256 * 1024):
                writer.write(view[offset : offset + 256 * 1024])
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            received = await reader.readexactly(len(payload))
            await sender
        finally:
            sender.cancel()
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)
        return received

    async def bounded() -> bytes:
        return await asyncio.wait_for(run(), timeout)

    return asyncio.run(bounded())


# --------------------------------------------------------------------------
# openssl s_client / s_time, curl
# --------------------------------------------------------------------------

_PEM_CERT_RE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _tls_version_flag(version: TlsVersion | None) -> list[str]:
    return [] if version is None else ["-tls1_2" if version == "1.2" else "-tls1_3"]


def _truncate(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more chars)"


@dataclass(frozen=True)
class SClientResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def _line(self, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.stdout, re.M)

    @property
    def _session_line(self) -> re.Match[str] | None:
        # "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384" / "Reused, TLSv1.2, Cipher is ..."
        return self._line(r"^(New|Reused), (\S+), Cipher is (\S+)")

    @property
    def reused(self) -> bool | None:
        line = self._session_line
        return None if line is None else line[1] == "Reused"

    @property
    def protocol(self) -> str | None:
        line = self._session_line
        return None if line is None else line[2]

    @property
    def cipher(self) -> str | None:
        line = self._session_line
        return None if line is None else line[3]

    @property
    def server_temp_key(self) -> str | None:
        line = self._line(r"^Server Temp Key: (.+)$")
        return None if line is None else line[1].strip()

    @property
    def peer_signature_type(self) -> str | None:
        line = self._line(r"^Peer signature type: (.+)$")
        return None if line is None else line[1].strip()

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        pem = _PEM_CERT_RE.search(self.stdout)
        return None if pem is None else x509.load_pem_x509_certificate(pem[0].encode())

    @property
    def handshake_ok(self) -> bool:
        return self.returncode == 0 and self.cipher not in (None, "(NONE)")

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.args)}\nexit code {self.returncode}\n"
            f"--- stdout ---\n{_truncate(self.stdout)}\n--- stderr ---\n{_truncate(self.stderr)}"
        )


def s_client(
    port: int,
    *,
    servername: str | None = None,
    version: TlsVersion | None = None,
    cipher: str | None = None,
    sess_out: Path | None = None,
    sess_in: Path | None = None,
    request: bytes | None = None,
    extra: Sequence[str] = (),
    timeout: float = 20.0,
) -> SClientResult:
    """Run ``openssl s_client``.

    With ``request`` the bytes are written to stdin and ``-ign_eof`` keeps the
    connection open until the server closes it (so TLS 1.3 session tickets
    arrive before -sess_out is written); without it stdin is empty and s_client
    closes right after the handshake.
    """
    args = ["openssl", "s_client", "-connect", f"{LOCALHOST}:{port}", *_tls_version_flag(version)]
    if servername is not None:
        args += ["-servername", servername]
    if cipher is not None:
        args += ["-cipher", cipher]
    if sess_out is not None:
        args += ["-sess_out", str(sess_out)]
    if sess_in is not None:
        args += ["-sess_in", str(sess_in)]
    if request is not None:
        args.append("-ign_eof")
    args += extra
    proc = subprocess.run(args, input=request or b"", capture_output=True, timeout=timeout)
    return SClientResult(
        args, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )


@dataclass(frozen=True)
class STimeResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def _summary(self) -> re.Match[str] | None:
        # "1234 connections in 4 real seconds, 172 bytes read per connection"
        return re.search(r"(\d+) connections in (\d+) real seconds, (\d+) bytes read per connection", self.stdout)

    @property
    def connections(self) -> int | None:
        summary = self._summary
        return None if summary is None else int(summary[1])

    @property
    def bytes_per_connection(self) -> int | None:
        summary = self._summary
        return None if summary is None else int(summary[3])

    @property
    def progress(self) -> str:
        """The per-connection progress characters: 'r' = resumed, '*' = full handshake."""
        return "".join(re.findall(r"^[r*t3]+$", self.stdout, re.M))

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.args)}\nexit code {self.returncode}\n"
            f"--- stdout ---\n{_truncate(self.stdout)}\n--- stderr ---\n{_truncate(self.stderr)}"
        )


def s_time(
    port: int,
    mode: Literal["new", "reuse"],
    *,
    seconds: int = 3,
    www: str | None = "/",
    version: TlsVersion | None = None,
) -> STimeResult:
    args = ["openssl", "s_time", "-connect", f"{LOCALHOST}:{port}", f"-{mode}", "-time", str(seconds)]
    args += _tls_version_flag(version)
    if www is not None:
        args += ["-www", www]
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=seconds + 30)
    return STimeResult(args, proc.returncode, proc.stdout, proc.stderr)


def curl(
    port: int,
    host: str,
    path: str = "/",
    *,
    cacert: Path | None = None,
    insecure: bool = False,
    data_file: Path | None = None,
    output: Path | None = None,
    version: TlsVersion | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[bytes]:
    """curl https://HOST:PORT/PATH with HOST resolved to 127.0.0.1."""
    args = ["curl", "-sS", "--fail", "--noproxy", "*", "--max-time", str(int(timeout))]
    args += ["--resolve", f"{host}:{port}:{LOCALHOST}"]
    if cacert is not None:
        args += ["--cacert", str(cacert)]
    if insecure:
        args.append("-k")
    if version is not None:
        args += [f"--tlsv{version}", "--tls-max", version]
    if data_file is not None:
        args += ["--data-binary", f"@{data_file}", "-H", "Expect:", "-H", "Content-Type: application/octet-stream"]
    if output is not None:
        args += ["-o", str(output)]
    args.append(f"https://{host}:{port}{path}")
    return subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout + 10)


# --------------------------------------------------------------------------
# Process memory scanner
# --------------------------------------------------------------------------

SKIPPED_REGIONS = frozenset({"[vvar]", "[vvar_vclock]", "[vsyscall]"})


@dataclass(frozen=True)
class MemoryRegion:
    start: int
    end: int
    perms: str
    path: str

    @property
    def readable(self) -> bool:
        return self.perms.startswith("r")


def memory_regions(pid: int) -> list[MemoryRegion]:
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in parts[0].split("-"))
        regions.append(MemoryRegion(start, end, parts[1], parts[5] if len(parts) > 5 else ""))
    return regions


@dataclass(frozen=True)
class ScanResult:
    found: frozenset[str]
    bytes_scanned: int
    regions_scanned: int
    regions_failed: int


def scan_process_memory(pid: int, patterns: Mapping[str, bytes], *, chunk_size: int = 8 * MIB) -> ScanResult:
    """Search the readable memory of ``pid`` for each pattern.

    Raises PermissionError if /proc/PID/mem cannot be opened at all (e.g. a
    non-dumpable process and no CAP_SYS_PTRACE); read errors of individual
    regions are counted and otherwise ignored.
    """
    if not patterns or any(not p for p in patterns.values()):
        raise ValueError("patterns must be non-empty byte strings")
    overlap = max(len(p) for p in patterns.values()) - 1
    remaining = dict(patterns)
    found: set[str] = set()
    scanned = regions_scanned = regions_failed = 0
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        tail, tail_end = b"", -1
        for region in memory_regions(pid):
            if not region.readable or region.path in SKIPPED_REGIONS:
                continue
            if region.start != tail_end:
                tail = b""  # only carry bytes across contiguous mappings
            address = region.start
            try:
                while address < region.end:
                    data = os.pread(fd, min(chunk_size, region.end - address), address)
                    if not data:
                        break
                    window = tail + data
                    for name, pattern in list(remaining.items()):
                        if pattern in window:
                            found.add(name)
                            del remaining[name]
                    tail = window[-overlap:] if overlap else b""
                    address += len(data)
                    scanned += len(data)
            except (OSError, OverflowError):
                regions_failed += 1
                tail = b""
            else:
                regions_scanned += 1
            tail_end = address
    finally:
        os.close(fd)
    return ScanResult(frozenset(found), scanned, regions_scanned, regions_failed)


@contextlib.contextmanager
def python_process(code: str, *args: str, ready_line: bytes = b"ready") -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python3 -c CODE ARGS`` until it prints ``ready_line``; kill it on exit."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != ready_line:
            raise AssertionError(f"helper process did not get ready: {line!r}, exit code {proc.poll()}")
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


# --- failure tests ---


@dataclass(frozen=True)
class TunedConfig(DaemonConfig):
    """DaemonConfig plus the global directives the failure/client tests tune
    (None: the directive is left out and the daemon's default applies)."""

    keyop_timeout_ms: int | None = None  # tls keyop timeout MS
    handshake_timeout: int | None = None  # tls handshake timeout S
    max_connections: int | None = None  # max connections N

    def render(self) -> str:
        extra = []
        if self.keyop_timeout_ms is not None:
            extra.append(f"tls keyop timeout {self.keyop_timeout_ms}")
        if self.handshake_timeout is not None:
            extra.append(f"tls handshake timeout {self.handshake_timeout}")
        if self.max_connections is not None:
            extra.append(f"max connections {self.max_connections}")
        return "".join(line + "\n" for line in extra) + super().render()


def http_backend_on(port: int, page: bytes = BACKEND_PAGE) -> BackgroundServer:
    """An HttpBackend bound to a given port (e.g. one a relay already forwards to)."""
    server = _HttpServer((LOCALHOST, port), _BackendHandler)
    server.page = page
    return BackgroundServer(server)


def vm_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (VmRSS of /proc/PID/status)."""
    value, unit = proc_status(pid)["VmRSS"].split()
    assert unit == "kB", unit
    return int(value) * 1024


def open_fds(pid: int) -> dict[int, str]:
    """fd -> readlink target of every open descriptor of ``pid``."""
    fds = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            fds[int(entry)] = os.readlink(f"/proc/{pid}/fd/{entry}")
    return fds


# --- ca tests ---
# Shared by test_policy.py, test_ca_hostile.py and test_fuzz.py: an EMSA-PSS
# encoder written from RFC 8017 9.1.1 (independent of the ca's C), raw
# relay <-> ca frames (any header, even a lying one) and key ids.

PSS_HASH_NAMES: tuple[str, ...] = ("sha256", "sha384", "sha512")
FRAME_HDR_SIZE = 44  # struct pps_hdr: u8 version, u8 type, u16 arg, u32 id, u32 len, u8 key[32]


def hash_algorithm(name: str) -> hashes.HashAlgorithm:
    """The cryptography hash object for a hashlib name ("sha256", ...)."""
    algorithms: dict[str, hashes.HashAlgorithm] = {
        "sha1": hashes.SHA1(),
        "sha224": hashes.SHA224(),
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }
    return algorithms[name]


def ref_mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    """MGF1 (RFC 8017 B.2.1)."""
    out = b"".join(
        hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        for counter in range(-(-length // hashlib.new(hash_name).digest_size))
    )
    return out[:length]


def emsa_pss_encode(
    mhash: bytes,
    em_bits: int,
    hash_name: str = "sha256",
    *,
    salt: bytes | None = None,
    mgf_hash: str | None = None,
) -> bytes:
    """EMSA-PSS-ENCODE (RFC 8017 9.1.1) of the message hash ``mhash``.

    ``hash_name`` is the hash of step 6 (H = Hash(M')); ``mgf_hash`` the hash
    of MGF1 (default: the same); ``salt`` defaults to random bytes as long as
    the hash.  Returns EM, ceil(em_bits / 8) bytes.
    """
    hlen = hashlib.new(hash_name).digest_size
    if salt is None:
        salt = os.urandom(hlen)
    em_len = -(-em_bits // 8)
    if em_len < len(mhash) + len(salt) + 2:
        raise ValueError("encoding error: modulus too small for this hash and salt")
    h = hashlib.new(hash_name, b"\0" * 8 + mhash + salt).digest()
    db = b"\0" * (em_len - len(salt) - len(h) - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, ref_mgf1(h, len(db), mgf_hash or hash_name)))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    return bytes(masked) + h + b"\xbc"


def pss_block(
    mhash: bytes,
    mod_bits: int,
    hash_name: str = "sha256",
    *,
    salt: bytes | None = None,
    mgf_hash: str | None = None,
) -> bytes:
    """The modulus-sized block a TLS stack hands to the raw RSA private
    operation: EM for emBits = modBits - 1, with a leading zero byte when
    EM is one byte shorter than the modulus (modBits = 8k + 1)."""
    em = emsa_pss_encode(mhash, mod_bits - 1, hash_name, salt=salt, mgf_hash=mgf_hash)
    return em.rjust(-(-mod_bits // 8), b"\0")


def raw_frame(
    type: int,  # noqa: A002 (the protocol's name)
    arg: int,
    id: int,  # noqa: A002
    key: bytes,
    payload: bytes,
    *,
    version: int = 1,
    length: int | None = None,
) -> bytes:
    """A frame with any header: ``length`` None means the true payload length."""
    order: Literal["little", "big"] = sys.byteorder
    return (
        version.to_bytes(1, order)
        + type.to_bytes(1, order)
        + arg.to_bytes(2, order)
        + id.to_bytes(4, order)
        + (len(payload) if length is None else length).to_bytes(4, order)
        + key.ljust(32, b"\0")[:32]
        + payload
    )


@dataclass(frozen=True)
class RawHeader:
    version: int
    type: int
    arg: int
    id: int
    length: int
    key: bytes


def unpack_header(data: bytes) -> RawHeader:
    """The header fields of the first FRAME_HDR_SIZE bytes of data."""
    if len(data) < FRAME_HDR_SIZE:
        raise ValueError("short frame")
    order: Literal["little", "big"] = sys.byteorder
    return RawHeader(
        data[0],
        data[1],
        int.from_bytes(data[2:4], order),
        int.from_bytes(data[4:8], order),
        int.from_bytes(data[8:12], order),
        data[12:44],
    )


def spki_keyid(cert: x509.Certificate) -> bytes:
    """A key's id on the wire: SHA-256 of the DER SubjectPublicKeyInfo."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def load_private_key(kp: KeyPair) -> PrivateKey:
    key = serialization.load_pem_private_key(kp.key_path.read_bytes(), password=None)
    assert isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey))
    return key


def ca_config_text(keypairs: Sequence[KeyPair]) -> str:
    """A daemon configuration whose one relay block names ``keypairs``
    (for pyprivsep.ca.load_keys; nothing listens on its ports)."""
    return DaemonConfig([RelaySpec("ca-test", 8443, 8080, list(keypairs))], prefork=1).render()


# --- pausing a process without its parent seeing it stopped ---
# SIGSTOP shows in the parent's waitpid(WUNTRACED), and the parent kills and
# replaces a stopped child.  A task in a frozen cgroup (v1 freezer) is paused
# just the same, but nothing tells its parent: the way to make a child that
# simply stops answering.

FREEZER_ROOT = Path("/sys/fs/cgroup/freezer")


def freezer_unavailable() -> str | None:
    """Why the cgroup v1 freezer cannot be used here, or None."""
    if not (FREEZER_ROOT / "tasks").exists():
        return f"no cgroup v1 freezer mounted at {FREEZER_ROOT}"
    if not os.access(FREEZER_ROOT, os.W_OK):
        return f"{FREEZER_ROOT} is not writable (needs root)"
    return None


class Freezer:
    """Freezes processes in a cgroup of its own; close() thaws them all and
    removes the cgroup (teardown, whatever happened)."""

    _count = 0

    def __init__(self) -> None:
        Freezer._count += 1
        self.path = FREEZER_ROOT / f"pyprivsep-test-{os.getpid()}-{Freezer._count}"
        self.pids: list[int] = []

    def _state(self, state: str) -> None:
        (self.path / "freezer.state").write_text(state)
        wait_until(lambda: (self.path / "freezer.state").read_text().strip() == state, 10.0, f"cgroup {state}")

    def freeze(self, pid: int) -> None:
        """Pause `pid` (it stays in the cgroup until thaw or close)."""
        reason = freezer_unavailable()
        if reason is not None:
            import pytest

            pytest.skip(reason)
        self.path.mkdir(exist_ok=True)
        (self.path / "cgroup.procs").write_text(str(pid))
        self.pids.append(pid)
        self._state("FROZEN")

    def thaw(self, pid: int | None = None) -> None:
        """Let the cgroup's processes run again; `pid` (or all) leave it."""
        if not self.path.exists():
            return
        self._state("THAWED")
        for p in self.pids if pid is None else [pid]:
            with contextlib.suppress(OSError):  # it may have died meanwhile
                (FREEZER_ROOT / "cgroup.procs").write_text(str(p))
        self.pids = [] if pid is None else [p for p in self.pids if p != pid]
        if self.pids:
            self._state("FROZEN")

    def close(self) -> None:
        if not self.path.exists():
            return
        self.thaw()
        wait_until(lambda: not (self.path / "cgroup.procs").read_text().strip(), 10.0, "frozen processes to leave")
        self.path.rmdir()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """`pid` frozen for the block (see Freezer)."""
    with Freezer() as freezer:
        freezer.freeze(pid)
        yield
