"""TLS towards the backends: relayd's `forward with tls`, and the `tls
backend` lines that say how a relay checks them.

The backends are Python ssl HTTP servers on loopback (threads of the test
process) with certificates of the tests' own CA; the clients are curl and
Python's ssl.  A backend records every handshake it made (the SNI it was
sent, whether the session was resumed) and every one that failed.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from backends import BackgroundServer, _BackendHandler, _HttpServer
from basics import LOCALHOST, MIB, free_port, pattern_bytes, sha256, wait_until
from daemonctl import Daemon, DaemonConfig, RelaySpec, run_pyprivsep
from hosts import HOST_A, HOST_B, PAGE, WHO, backend_port, get
from keypairs import Issuer, KeyPair, Pki, make_issued_keypair, make_issuer
from tlsclients import client_context, curl
from conftest import StartDaemon
from pyprivsep import native
from pyprivsep.ctl import request as ctl_request

BACKEND_NAME = "backend.test"
# LibreSSL's TLS 1.3 client resumes no session: every connection to a
# backend is a full handshake there
CLIENT_RESUMES = not native.library_version().startswith("LibreSSL")


def _said(log: str, what: str) -> bool:
    """what is in log, as either library words it ("self signed" or
    "self-signed", "Hostname" or "hostname")."""
    return what.lower() in log.lower().replace("self signed", "self-signed")


class _TlsHttpServer(_HttpServer):
    """The tests' HTTP backend behind TLS; with `proxy`, a PROXY v1 line
    is read in the clear before the handshake (and kept)."""

    def __init__(self, addr: tuple[str, int], kp: KeyPair, page: bytes, proxy: bool) -> None:
        super().__init__(addr, _BackendHandler)
        self.page = page
        self.proxy = proxy
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(kp.cert_path, kp.key_path)
        self.ctx.sni_callback = self._sni
        self.sni: list[str | None] = []
        self.reused: list[bool] = []
        self.failed: list[str] = []
        self.headers: list[bytes] = []
        self.clean: list[bool] = []     # per connection: close_notify both ways

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        self.sni.append(name)

    def finish_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        request.settimeout(30)
        if self.proxy:
            line = b""
            while not line.endswith(b"\r\n") and len(line) < 108:
                line += request.recv(1)      # a byte at a time: not the hello
            self.headers.append(line)
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            self.failed.append(str(e))
            return
        self.reused.append(tls.session_reused)
        try:
            super().finish_request(tls, client_address)
        finally:
            clean = False
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                tls.unwrap()              # close_notify, theirs awaited
                clean = True
            self.clean.append(clean)
            tls.close()

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@contextlib.contextmanager
def tls_backend(port: int, kp: KeyPair, host: str = LOCALHOST, page: bytes = PAGE[HOST_A],
                proxy: bool = False) -> Iterator[_TlsHttpServer]:
    server = _TlsHttpServer((host, port), kp, page, proxy)
    with BackgroundServer(server):
        yield server


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return make_issuer(tmp_path_factory.mktemp("fwdtls-ca"), "backends")


@pytest.fixture(scope="module")
def backend_kp(tmp_path_factory: pytest.TempPathFactory, issuer: Issuer) -> KeyPair:
    """backend.test (and localhost, 127.0.0.1), issued by the CA."""
    return make_issued_keypair(tmp_path_factory.mktemp("fwdtls-backend"), "backend", issuer,
                               key_name="p256")


def relay_config(pki: Pki, port: int, *, forward: str = LOCALHOST, forward_options: str = "",
                 options: Sequence[str] = (),
                 tables: Sequence[str] = ()) -> tuple[DaemonConfig, RelaySpec]:
    """One relay process (its session cache, its rotation), forwarding
    with tls."""
    relay = RelaySpec("web", free_port(), port, [pki["p256"]], forward_host=forward,
                      forward_options=forward_options, options=list(options),
                      forward_tls=True)
    return DaemonConfig([relay], prefork=1, globals=list(tables)), relay


def verify_lines(issuer: Issuer, name: str | None = BACKEND_NAME) -> list[str]:
    lines = [f'tls backend ca "{issuer.cert_path}"']
    if name is not None:
        lines.append(f'tls backend name "{name}"')
    return lines


def test_request_and_response_cross_tls_to_the_backend(start_daemon: StartDaemon, pki: Pki,
                                                      issuer: Issuer, backend_kp: KeyPair) -> None:
    port = free_port()
    cfg, relay = relay_config(pki, port, options=verify_lines(issuer))
    with tls_backend(port, backend_kp) as backend:
        start_daemon(cfg)
        pages = [curl(relay.listen_port, "p256.test", insecure=True) for _ in range(4)]
        for proc in pages:
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout == PAGE[HOST_A]
        # every request came over TLS (and the daemon's readiness probe),
        # with the name as SNI
        assert len(backend.reused) >= 4 and backend.failed == [], backend.failed
        assert backend.sni == [BACKEND_NAME] * len(backend.reused)
        # the relay keeps the backend's session: after one whole request,
        # the next ones resume (each with the ticket the last one got)
        if CLIENT_RESUMES:
            assert backend.reused[0] is False and backend.reused[-3:] == [True] * 3, \
                backend.reused
        else:
            assert not any(backend.reused), backend.reused
        # each connection ended with close_notify both ways (the backend's
        # unwrap() got the relay's)
        wait_until(lambda: len(backend.clean) == len(backend.reused), 10,
                   "the backend's connections to end")
        assert backend.clean[-4:] == [True] * 4, backend.clean


def test_large_download_and_upload_intact(start_daemon: StartDaemon, pki: Pki, issuer: Issuer,
                                          backend_kp: KeyPair, tmp_path: Path) -> None:
    port = free_port()
    cfg, relay = relay_config(pki, port, options=verify_lines(issuer))
    size = 5 * MIB + 12345
    with tls_backend(port, backend_kp):
        start_daemon(cfg)
        out = tmp_path / "down"
        proc = curl(relay.listen_port, "p256.test", f"/bytes/{size}", insecure=True, output=out)
        assert proc.returncode == 0, proc.stderr
        assert sha256(out.read_bytes()) == sha256(pattern_bytes(size))
        up = tmp_path / "up"
        up.write_bytes(pattern_bytes(3 * MIB + 7)[::-1])
        back = tmp_path / "back"
        proc = curl(relay.listen_port, "p256.test", "/echo", insecure=True, data_file=up,
                    output=back)
        assert proc.returncode == 0, proc.stderr
        assert sha256(back.read_bytes()) == sha256(up.read_bytes())


def _refused(relay: RelaySpec) -> bytes:
    """What a client gets through the relay: nothing, the connection is
    closed (after the relay's close_notify)."""
    ctx = client_context()
    data = b""
    with socket.create_connection((LOCALHOST, relay.listen_port), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname="p256.test") as tls:
        tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(ssl.SSLEOFError, ConnectionResetError):
            while chunk := tls.recv(65536):
                data += chunk
    return data


@pytest.mark.parametrize("case", ["other-ca", "other-name"])
def test_backend_certificate_is_verified(start_daemon: StartDaemon, pki: Pki, issuer: Issuer,
                                         backend_kp: KeyPair, tmp_path: Path, case: str) -> None:
    """other-ca: a certificate the configured CA did not issue; other-name:
    one it issued, for another name than `tls backend name`.  The client
    sees its connection closed; the log says why; the backend saw the
    relay give up in its handshake."""
    port = free_port()
    if case == "other-ca":
        wrong = make_issued_keypair(tmp_path, "backend", make_issuer(tmp_path, "rogue"),
                                    key_name="p256")
    else:
        wrong = make_issued_keypair(tmp_path, "elsewhere", issuer, key_name="p256")
    cfg, relay = relay_config(pki, port, options=verify_lines(issuer))
    with tls_backend(port, wrong) as backend:
        daemon = start_daemon(cfg)
        assert _refused(relay) == b""
        wait_until(lambda: backend.failed, 10, "the backend's failed handshake")
        assert backend.reused == []
    log = daemon.stderr_text()
    expected = ("self-signed certificate in certificate chain" if case == "other-ca"
                else "hostname mismatch")
    assert _said(log, f"backend: TLS handshake: certificate: {expected}"), log
    assert f"(host {LOCALHOST}:{port})" in log


def test_no_verify_takes_any_certificate(start_daemon: StartDaemon, pki: Pki, tmp_path: Path) -> None:
    """`tls backend no verify` (relayd's default, written out): a
    certificate of nobody's is taken; the same name is still sent."""
    port = free_port()
    rogue = make_issued_keypair(tmp_path, "backend", make_issuer(tmp_path, "rogue"),
                                key_name="p256")
    cfg, relay = relay_config(pki, port, options=["tls backend no verify",
                                                  f'tls backend name "{BACKEND_NAME}"'])
    with tls_backend(port, rogue) as backend:
        start_daemon(cfg)
        proc = curl(relay.listen_port, "p256.test", insecure=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == PAGE[HOST_A]
        assert backend.sni and set(backend.sni) == {BACKEND_NAME}


def test_two_tls_backends_alternate(start_daemon: StartDaemon, pki: Pki, issuer: Issuer,
                                    backend_kp: KeyPair) -> None:
    port = backend_port()
    cfg, relay = relay_config(pki, port, forward="<web>", options=verify_lines(issuer),
                              tables=[f"table <web> {{ {HOST_A}, {HOST_B} }}"])
    with tls_backend(port, backend_kp, HOST_A, PAGE[HOST_A]) as a, \
            tls_backend(port, backend_kp, HOST_B, PAGE[HOST_B]) as b:
        start_daemon(cfg)
        seen = [get(relay.listen_port, "p256.test") for _ in range(6)]
        assert seen in ([HOST_A, HOST_B] * 3, [HOST_B, HOST_A] * 3), seen
        # a session per host: each resumed its own after its first
        assert a.reused[0] is False and b.reused[0] is False, (a.reused, b.reused)
        if CLIENT_RESUMES:
            assert a.reused[-2:] == [True, True] and b.reused[-2:] == [True, True], \
                (a.reused, b.reused)


def test_plain_backend_fails_the_handshake_and_the_next_host_serves(
        start_daemon: StartDaemon, pki: Pki, issuer: Issuer, backend_kp: KeyPair) -> None:
    """A: a plain HTTP server, which answers the ClientHello with an HTTP
    error.  That is a backend failure, retried on B like a refused connect:
    every request is served by B."""
    from backends import http_backend_on

    port = backend_port()
    cfg, relay = relay_config(pki, port, forward="<web>", options=verify_lines(issuer),
                              tables=[f"table <web> {{ {HOST_A}, {HOST_B} }}"])
    with http_backend_on(port, PAGE[HOST_A], host=HOST_A), \
            tls_backend(port, backend_kp, HOST_B, PAGE[HOST_B]):
        daemon = start_daemon(cfg)
        seen = [get(relay.listen_port, "p256.test") for _ in range(4)]
    assert seen == [HOST_B] * 4, seen
    log = daemon.stderr_text()
    assert f"backend: TLS handshake: " in log and f"(host {HOST_A}:{port})" in log, log


def test_silent_backend_times_out_and_the_next_host_serves(
        start_daemon: StartDaemon, pki: Pki, issuer: Issuer, backend_kp: KeyPair) -> None:
    """A accepts TCP (its listen queue does) and never answers the
    ClientHello: after the connect timeout (5 s, which covers the
    handshake), B serves."""
    port = backend_port()
    cfg, relay = relay_config(pki, port, forward="<web>", options=verify_lines(issuer),
                              tables=[f"table <web> {{ {HOST_A}, {HOST_B} }}"])
    with socket.socket() as silent:
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind((HOST_A, port))
        silent.listen(64)
        with tls_backend(port, backend_kp, HOST_B, PAGE[HOST_B]):
            daemon = start_daemon(cfg)
            seen = [get(relay.listen_port, "p256.test", timeout=30) for _ in range(2)]
    assert seen == [HOST_B] * 2, seen
    assert f"backend: Connection timed out (host {HOST_A}:{port})" in daemon.stderr_text()


def test_plain_backend_alone_closes_the_client(start_daemon: StartDaemon, pki: Pki,
                                               issuer: Issuer) -> None:
    from backends import http_backend_on

    port = free_port()
    cfg, relay = relay_config(pki, port, options=verify_lines(issuer))
    with http_backend_on(port, PAGE[HOST_A]):
        daemon = start_daemon(cfg)
        # the readiness probe's connection failed so too: once it is counted,
        # each client's is (before its connection is closed)
        wait_until(lambda: _fail_backend(daemon) >= 1, 10, "the probe's backend failure")
        before = _fail_backend(daemon)
        assert _refused(relay) == b""
        assert _refused(relay) == b""      # and the relay goes on
        assert _fail_backend(daemon) == before + 2
    log = daemon.stderr_text()
    assert "backend: TLS handshake: " in log, log
    assert "no other backend host up" in log, log


def _fail_backend(daemon: Daemon) -> int:
    summary = ctl_request(str(daemon.workdir / "ctl.sock"), ["show", "summary"])
    return int(summary["totals"].get("fail_backend", 0))


def test_proxy_header_goes_before_the_client_hello(start_daemon: StartDaemon, pki: Pki,
                                                   issuer: Issuer, backend_kp: KeyPair) -> None:
    port = free_port()
    cfg, relay = relay_config(pki, port, forward_options="proxy protocol v1",
                              options=verify_lines(issuer))
    with tls_backend(port, backend_kp, proxy=True) as backend:
        start_daemon(cfg)
        ctx = client_context()
        with socket.create_connection((LOCALHOST, relay.listen_port), timeout=20) as raw, \
                ctx.wrap_socket(raw, server_hostname="p256.test") as tls:
            me = tls.getsockname()
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            with contextlib.suppress(ssl.SSLEOFError, ConnectionResetError):
                while chunk := tls.recv(65536):
                    data += chunk
        assert data.endswith(PAGE[HOST_A]), data
        assert backend.headers[-1:] == [f"PROXY TCP4 {me[0]} {LOCALHOST} {me[1]} "
                                   f"{relay.listen_port}\r\n".encode()]


def test_tls_and_plain_tables_fall_back(start_daemon: StartDaemon, pki: Pki, issuer: Issuer) -> None:
    """`forward with tls to <web>` and a plain fallback: with every TLS host
    refusing, the fallback serves over plain TCP (relayd: `with tls` is per
    forward)."""
    from backends import http_backend_on
    from hosts import HOST_C

    port = backend_port()
    cfg, relay = relay_config(pki, port, forward="<web>",
                              options=[*verify_lines(issuer), f"forward to <backup> port {port}"],
                              tables=[f"table <web> {{ {HOST_A} }}", f"table <backup> {{ {HOST_C} }}"])
    with http_backend_on(port, PAGE[HOST_C], host=HOST_C):
        start_daemon(cfg)
        assert [get(relay.listen_port, "p256.test") for _ in range(2)] == [HOST_C] * 2


# -- configuration: `pyprivsep -n` names the file and line ------------------

def _check(tmp_path: Path, pki: Pki, block: Sequence[str]) -> subprocess.CompletedProcess[str]:
    kp = pki["p256"]
    lines = ['relay "web" {', f"    listen on {LOCALHOST} port {free_port()} tls",
             *(f"    {line}" for line in block),
             f'    tls certificate "{kp.cert_path}" key "{kp.key_path}"', "}"]
    conf = tmp_path / "fwd.conf"
    conf.write_text("\n".join(lines) + "\n")
    return run_pyprivsep("-n", "-f", str(conf))


@pytest.mark.parametrize("block, line, message", [
    (["forward with tls to 127.0.0.1 port 443"], 3,
     '"forward with tls" needs tls backend ca "FILE"'),
    (["forward with to 127.0.0.1 port 443"], 3, '"tls"'),
    (["forward to 127.0.0.1 port 443", 'tls backend ca "/etc/hostname"'], 4,
     '"tls backend" but no "forward with tls"'),
    (["forward with tls to 127.0.0.1 port 443", 'tls backend ca "/nonexistent/ca.pem"'], 4,
     "tls backend ca /nonexistent/ca.pem: cannot read"),
    (["forward with tls to 127.0.0.1 port 443", 'tls backend ca "/etc/hostname"'], 4,
     "no PEM certificate in it"),
    (["forward with tls to 127.0.0.1 port 443", "tls backend no verify",
      'tls backend ca "/etc/hostname"'], 5, "one or the other"),
    (["forward with tls to 127.0.0.1 port 443", "tls backend no verify",
      'tls backend name "bad name!"'], 5, "not a host name or address"),
    (["forward with tls to 127.0.0.1 port 443", "tls backend verify"], 4,
     'unknown directive "tls backend verify"'),
    (["forward with tls to 127.0.0.1 port 443", "tls backend no verify",
      "tls backend no verify"], 5, 'more than one "tls backend no verify"'),
    (["forward with tls to 127.0.0.1 port 443", 'tls backend ca "/etc/hostname"',
      'tls backend ca "/etc/hostname"'], 5, 'more than one "tls backend ca"'),
])
def test_bad_lines_name_file_and_line(tmp_path: Path, pki: Pki, block: list[str], line: int,
                                      message: str) -> None:
    proc = _check(tmp_path, pki, block)
    assert proc.returncode != 0
    assert f"{tmp_path / 'fwd.conf'}:{line}:" in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr


def test_tls_backend_is_refused_outside_a_relay(tmp_path: Path, pki: Pki) -> None:
    conf = tmp_path / "g.conf"
    conf.write_text('tls backend no verify\n')
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode != 0 and f"{conf}:1:" in proc.stderr, proc.stderr


def test_good_lines_pass(tmp_path: Path, pki: Pki, issuer: Issuer) -> None:
    proc = _check(tmp_path, pki, [
        "forward with tls to 127.0.0.1 port 443 proxy protocol v2",
        f'tls backend ca "{issuer.cert_path}"', 'tls backend name "127.0.0.1"'])
    assert proc.returncode == 0, proc.stderr
