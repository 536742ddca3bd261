"""End to end: programs we did not write keep their keys in pyprivsep's ca.

The real daemon runs a ``keyservice`` block (its cas hold the keys); the
real Debian nginx, postfix (smtpd), dovecot (imap-login) and haproxy
(tests/servers.py) are given, instead of their key file, a key reference
(``pyprivsep keyref``) and, as OPENSSL_CONF, ``pyprivsep openssl-conf``'s
output, which loads the real provider (pyprivsep-provider.so).  Handshakes
are made by the system's openssl s_client and curl, without the provider.

Where things live: the keyservice socket, the OPENSSL_CONF file and the
references are in a 0755 directory under /tmp, since the programs' own
unprivileged users (nobody, postfix, dovenull, haproxy) connect to the ca
and may read their configuration themselves.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from basics import LOCALHOST, wait_until
from daemonctl import SANITIZED, Daemon, DaemonConfig, KeyServiceSpec, StartDaemon
from keypairs import KeyPair, Pki, found_components, key_patterns
from memscan import scan_process_memory
from procs import Freezer, pid_alive
from pyprivsep import keyref, native
from pyprivsep.ctl import request as ctl_request
from servers import (
    DovecotServer,
    NginxServer,
    PostfixServer,
    StartServer,
    TlsServer,
    scan_processes,
)
from tlsclients import SClientResult, TlsVersion, curl, s_client


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root (the programs' users, SO_PEERCRED, memory scans)"
    why = keyref.provider_missing()
    if why is not None:
        return why
    tool = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    ours = native.library_version()
    if ours.split()[:2] != tool.split()[:2]:
        return f"the provider is built against {ours}, the system's programs use {tool}"
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))

WAIT = 30.0  # seconds: generous, for a loaded machine
# A chrooted program (Debian's smtpd, dovecot's imap-login) connects to the
# ca after its chroot: the service's socket is made inside the chroot, and
# the reference names it as seen from there.
CHROOTED_SOCKET = Path("/pyprivsep/keys.sock")
KEYS = ("rsa2048", "p256")


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------


@dataclass
class Setup:
    """A directory every user can traverse, holding the keyservice socket
    (the parent makes ``run/``), OPENSSL_CONF files and key references."""

    top: Path

    @property
    def socket(self) -> Path:
        return self.top / "run" / "keys.sock"

    def openssl_conf(self, timeout_ms: int | None = None) -> Path:
        """``pyprivsep openssl-conf``'s output, its timeout set if asked."""
        out = pyprivsep_cli("openssl-conf")
        text = out.stdout
        name = "openssl.cnf"
        if timeout_ms is not None:
            assert "# timeout = 2000\n" in text
            text = text.replace("# timeout = 2000\n", f"timeout = {timeout_ms}\n")
            name = f"openssl-{timeout_ms}.cnf"
        path = self.top / name
        path.write_text(text)
        path.chmod(0o644)
        return path

    def ref(self, kp: KeyPair, *, pkcs8: bool = False, socket: Path | None = None) -> Path:
        """``pyprivsep keyref [-8] -s SOCKET CERT`` (SOCKET: ours, unless
        another path is given, e.g. as seen from inside a chroot)."""
        sock = self.socket if socket is None else socket
        out = pyprivsep_cli("keyref", *(["-8"] if pkcs8 else []), "-s", str(sock), str(kp.cert_path))
        path = self.top / f"{kp.name}{'.p8' if pkcs8 else ''}{'' if socket is None else '.other'}.ref.pem"
        path.write_text(out.stdout)
        path.chmod(0o644)  # nothing secret in it
        return path

    def service(self, pki: Pki, users: Sequence[str], *, socket: Path | None = None) -> KeyServiceSpec:
        sock = self.socket if socket is None else socket
        return KeyServiceSpec("progs", sock, [pki[k] for k in KEYS], users=tuple(users))


def pyprivsep_cli(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "pyprivsep", *args], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0 and out.stdout, out.stderr
    return out


@pytest.fixture
def setup() -> Iterator[Setup]:
    top = Path(tempfile.mkdtemp(prefix="pps-kp-", dir="/tmp"))
    top.chmod(0o755)
    yield Setup(top)
    shutil.rmtree(top, ignore_errors=True)


def start_keyservice(start_daemon: StartDaemon, svc: KeyServiceSpec) -> Daemon:
    return start_daemon(DaemonConfig([], keyservices=[svc]))


def ca_pids(daemon: Daemon) -> list[int]:
    return sorted(daemon.keyservice_pids("progs").values())


def client_env() -> dict[str, str]:
    """The clients (s_client, curl) run without the provider."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSSL")}
    env["OPENSSL_CONF"] = "/dev/null"
    return env


def attempt(server: TlsServer, kp: KeyPair, version: TlsVersion = "1.3", *, sigalgs: str | None = None,
            starttls: bool = False) -> SClientResult:
    """One ``openssl s_client`` handshake (STARTTLS for postfix, and for
    dovecot's imap port when asked); not checked."""
    if isinstance(server, PostfixServer):
        port, extra = server.port, ["-starttls", "smtp"]
    elif isinstance(server, DovecotServer) and starttls:
        port, extra = server.starttls_port, ["-starttls", "imap"]
    else:
        port, extra = server.port, []
    if sigalgs is not None:
        extra = [*extra, "-sigalgs", sigalgs]
    return s_client(port, servername=kp.dns_name, version=version, extra=extra, timeout=WAIT)


def handshake(server: TlsServer, kp: KeyPair, version: TlsVersion = "1.3", *, sigalgs: str | None = None,
              starttls: bool = False, signature: str | None = None) -> SClientResult:
    """A handshake that must succeed, with kp's certificate, at ``version``
    (and with the peer signature type ``signature``, as s_client names it)."""
    result = attempt(server, kp, version, sigalgs=sigalgs, starttls=starttls)
    assert result.handshake_ok, f"{server.name}\n{result.describe()}\n{server.log_text()}"
    assert result.protocol == f"TLSv{version}", result.describe()
    assert result.peer_certificate == kp.certificate, result.describe()
    if signature is not None:
        assert result.peer_signature_type == signature, result.describe()
    return result


def succeeds(server: TlsServer, kp: KeyPair) -> bool:
    return attempt(server, kp).handshake_ok


def assert_no_secret_in(server: TlsServer, kps: Sequence[KeyPair]) -> dict[int, frozenset[str]]:
    """Scan every process of the server: no prime, no private scalar."""
    by_pid = scan_processes(server, key_patterns(kps))
    assert by_pid, f"{server.name}: no process to scan"
    assert all(not found for found in by_pid.values()), f"{server.name} holds secrets: {by_pid}"
    return by_pid


def assert_secrets_in_cas(daemon: Daemon, kps: Sequence[KeyPair]) -> None:
    """The positive control: the same scan finds every secret in the service's cas."""
    if SANITIZED:  # as in test_keyservice: no scans of the daemon in an AddressSanitizer run
        return
    patterns = key_patterns(kps)
    found: set[str] = set()
    for pid in ca_pids(daemon):
        found |= found_components(scan_process_memory(pid, patterns).found)
    assert found == {c for kp in kps for c in kp.components()}, found


def signing_digest(result: SClientResult) -> str | None:
    m = re.search(r"^Peer signing digest: (\S+)$", result.stdout, re.M)
    return None if m is None else m[1]


def program_env(conf: Path) -> dict[str, str]:
    return {"OPENSSL_CONF": str(conf)}


def ctl(daemon: Daemon, *words: str) -> dict[str, object]:
    return ctl_request(str(daemon.workdir / "ctl.sock"), list(words))


# --------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------

# (s_client -sigalgs, expected peer signature type, digest): TLS 1.2, where
# the client chooses the signature scheme
NGINX_RSA_TLS12 = [
    ("rsa_pss_rsae_sha256", "RSA-PSS", "SHA256"),
    ("RSA+SHA256", "RSA", "SHA256"),
    ("RSA+SHA384", "RSA", "SHA384"),
]


def test_nginx_signs_through_the_ca(pki: Pki, setup: Setup, start_daemon: StartDaemon, start_server: StartServer,
                                    freezer: Freezer) -> None:
    """nginx (workers as nobody) with references as ssl_certificate_key:
    200 sequential curl requests over TLS 1.3, TLS 1.2 handshakes with
    RSA-PSS and PKCS#1 SHA-256/384 and with ECDSA P-256; neither the master
    nor a worker holds a prime or the EC scalar, the service's cas do; a
    reload's new workers sign; a SIGKILL to the cas while a handshake waits
    on them fails at most that one, and the next ones succeed."""
    daemon = start_keyservice(start_daemon, setup.service(pki, ["nobody"]))
    conf = setup.openssl_conf(timeout_ms=10000)
    rsa, ec = pki["rsa2048"], pki["p256"]
    server = start_server("nginx", rsa.cert_path, setup.ref(rsa), program_env(conf))
    ec_server = start_server("nginx", ec.cert_path, setup.ref(ec), program_env(conf))
    assert isinstance(server, NginxServer) and isinstance(ec_server, NginxServer)

    for i in range(200):
        got = curl(server.port, rsa.dns_name, cacert=rsa.cert_path, version="1.3", timeout=WAIT)
        assert got.returncode == 0 and got.stdout == b"ok\n", (i, got, server.log_text())
    handshake(server, rsa, "1.3", signature="RSA-PSS")
    for sigalgs, sigtype, digest in NGINX_RSA_TLS12:
        result = handshake(server, rsa, "1.2", sigalgs=sigalgs, signature=sigtype)
        assert signing_digest(result) == digest, result.describe()
    result = handshake(ec_server, ec, "1.2", sigalgs="ECDSA+SHA256", signature="ECDSA")
    assert signing_digest(result) == "SHA256", result.describe()
    handshake(ec_server, ec, "1.3", signature="ECDSA")
    got = curl(ec_server.port, ec.dns_name, cacert=ec.cert_path, version="1.3", timeout=WAIT)
    assert got.returncode == 0 and got.stdout == b"ok\n", got

    # the keys: in the cas, nowhere in nginx
    assert_no_secret_in(server, [rsa, ec])
    assert_no_secret_in(ec_server, [rsa, ec])
    assert_secrets_in_cas(daemon, [rsa, ec])

    # nginx -s reload: new workers, same master, and they sign
    old_workers = server.worker_pids()
    new_workers = server.reload()
    assert not set(old_workers) & set(new_workers)
    for _ in range(10):
        handshake(server, rsa, "1.3")
    assert_no_secret_in(server, [rsa, ec])

    # SIGKILL to the cas while a handshake waits on them (frozen, so that
    # it does): that one may fail; once the parent restarted them, every
    # handshake succeeds, on the workers' reconnections
    old_cas = ca_pids(daemon)
    for pid in old_cas:
        freezer.freeze(pid)
    waiting = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"{LOCALHOST}:{server.port}", "-tls1_3", "-servername", rsa.dns_name],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env())
    try:
        wait_until(lambda: any(in_poll(pid) for pid in server.worker_pids()), WAIT,
                   lambda: f"an nginx worker waiting for the ca\n{server.log_text()}")
        for pid in old_cas:
            os.kill(pid, signal.SIGKILL)
        freezer.thaw()
        # that handshake's signature met a closed connection: the provider
        # retried once on a new one, which the restarted ca may answer in
        # time (it did, when this was written) or not; either is allowed
        waiting.communicate(timeout=WAIT)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    new_cas = wait_until(lambda: (now := ca_pids(daemon)) and len(now) == 2 and not set(now) & set(old_cas) and now,
                         WAIT, lambda: "the cas to be restarted\n" + daemon.describe())
    assert all(pid_alive(p) for p in new_cas)
    for _ in range(20):
        handshake(server, rsa, "1.3")
    handshake(ec_server, ec, "1.3")
    assert server.worker_pids() == new_workers


def in_poll(pid: int) -> bool:
    """The process is blocked in poll(2): an nginx worker waiting for the
    ca's reply in the provider (its own event loop waits in epoll_wait)."""
    try:
        call = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return False
    return call in POLL_SYSCALLS


POLL_SYSCALLS = {"x86_64": ("7", "271"), "aarch64": ("73",)}.get(os.uname().machine, ("7", "271"))


# --------------------------------------------------------------------------
# postfix, dovecot, haproxy
# --------------------------------------------------------------------------


def test_postfix_signs_through_the_ca(pki: Pki, setup: Setup, start_daemon: StartDaemon,
                                      start_server: StartServer) -> None:
    """smtpd (as postfix) with smtpd_tls_cert_file and the reference as
    smtpd_tls_key_file, then with smtpd_tls_chain_files and the PKCS#8
    form, then chrooted (Debian's master.cf) with the service's socket in
    queue_directory: STARTTLS completes TLS 1.3 and 1.2; no postfix
    process holds a prime, the cas do."""
    daemon = start_keyservice(start_daemon, setup.service(pki, ["postfix"]))
    conf = setup.openssl_conf(timeout_ms=10000)
    kp = pki["rsa2048"]
    for key, chain_files in ((setup.ref(kp), False), (setup.ref(kp, pkcs8=True), True)):
        server = start_server("postfix", kp.cert_path, key, program_env(conf), chain_files=chain_files)
        assert isinstance(server, PostfixServer)
        main_cf = (server.config_dir / "main.cf").read_text()
        assert (f"smtpd_tls_chain_files = {key}" if chain_files else f"smtpd_tls_key_file = {key}") in main_cf
        for version in ("1.3", "1.2"):
            handshake(server, kp, version)
        handshake(server, kp, "1.2", sigalgs="RSA+SHA256", signature="RSA")
        assert server.handshake_pids(), f"no smtpd among {server.pids()}"
        assert_no_secret_in(server, [kp])
        server.stop()
    assert_secrets_in_cas(daemon, [kp])

    server = start_server("postfix", kp.cert_path, setup.ref(kp, socket=CHROOTED_SOCKET), program_env(conf),
                          smtpd_chroot=True)
    queue = server.workdir / "queue"
    chrooted = start_keyservice(start_daemon, setup.service(pki, ["postfix"],
                                                            socket=queue / CHROOTED_SOCKET.relative_to("/")))
    for version in ("1.3", "1.2"):
        handshake(server, kp, version)
    smtpds = server.handshake_pids()
    assert smtpds and all(Path(f"/proc/{p}/root").resolve() == queue.resolve() for p in smtpds), smtpds
    assert_no_secret_in(server, [kp])
    assert_secrets_in_cas(chrooted, [kp])


def test_dovecot_signs_through_the_ca(pki: Pki, setup: Setup, start_daemon: StartDaemon,
                                      start_server: StartServer) -> None:
    """imap-login (as dovenull) with the reference as ssl_key: imaps and
    STARTTLS complete TLS 1.3 and 1.2.  imap-login chroots to
    base_dir/login: either its chroot is off (``chroot =``), or the
    service's socket is made inside that directory and the reference names
    it as seen from there; before that socket exists, handshakes fail
    saying so.  No dovecot process holds a secret, the cas do."""
    daemon = start_keyservice(start_daemon, setup.service(pki, ["dovenull"]))
    conf = setup.openssl_conf(timeout_ms=10000)
    rsa, ec = pki["rsa2048"], pki["p256"]
    server = start_server("dovecot", rsa.cert_path, setup.ref(rsa), program_env(conf), login_chroot=False)
    for version in ("1.3", "1.2"):
        handshake(server, rsa, version)
        handshake(server, rsa, version, starttls=True)
    assert_no_secret_in(server, [rsa, ec])
    assert_secrets_in_cas(daemon, [rsa])
    server.stop()

    server = start_server("dovecot", ec.cert_path, setup.ref(ec, socket=CHROOTED_SOCKET), program_env(conf))
    assert isinstance(server, DovecotServer)
    login_dir = server.workdir / "run" / "login"
    # a login process chroots just after it starts: a loaded machine can
    # show one that has not yet
    wait_until(lambda: all(Path(f"/proc/{p}/root").resolve() == login_dir.resolve()
                           for p in server.login_pids()), WAIT, server.login_pids)
    logins = server.login_pids()
    assert not attempt(server, ec).handshake_ok
    wait_until(lambda: f"pyprivsep ca unreachable: {CHROOTED_SOCKET}: No such file" in server.log_text(), WAIT,
               server.log_text)
    chrooted = start_keyservice(start_daemon, setup.service(pki, ["dovenull"],
                                                            socket=login_dir / CHROOTED_SOCKET.relative_to("/")))
    for version in ("1.3", "1.2"):
        handshake(server, ec, version)
        handshake(server, ec, version, starttls=True)
    assert server.login_pids() == logins
    assert_no_secret_in(server, [rsa, ec])
    assert_secrets_in_cas(chrooted, [ec])


def test_haproxy_signs_through_the_ca(pki: Pki, setup: Setup, start_daemon: StartDaemon,
                                      start_server: StartServer) -> None:
    """haproxy (2 threads, as haproxy) with ``crt site.pem`` and the
    reference as site.pem.key beside it: TLS 1.3 and 1.2 with RSA and
    ECDSA keys, curl gets its answer; haproxy holds no secret."""
    daemon = start_keyservice(start_daemon, setup.service(pki, ["haproxy"]))
    conf = setup.openssl_conf(timeout_ms=10000)
    rsa, ec = pki["rsa2048"], pki["p256"]
    for kp, tls12 in ((rsa, ("rsa_pss_rsae_sha256", "RSA-PSS")), (ec, ("ECDSA+SHA256", "ECDSA"))):
        server = start_server("haproxy", kp.cert_path, setup.ref(kp), program_env(conf))
        assert os.readlink(server.workdir / "site.pem.key") == str(setup.ref(kp))
        handshake(server, kp, "1.3")
        handshake(server, kp, "1.2", sigalgs=tls12[0], signature=tls12[1])
        for version in ("1.3", "1.2"):
            got = curl(server.port, kp.dns_name, cacert=kp.cert_path, version=version, timeout=WAIT)
            assert got.returncode == 0 and got.stdout == b"ok\n", got
        assert_no_secret_in(server, [rsa, ec])
        server.stop()
    assert_secrets_in_cas(daemon, [rsa, ec])


# --------------------------------------------------------------------------
# Who may sign; the ca down
# --------------------------------------------------------------------------


def test_worker_user_not_allowed_is_refused_until_allowed(pki: Pki, setup: Setup, start_daemon: StartDaemon,
                                                          start_server: StartServer) -> None:
    """A keyservice allowing postfix, not nobody: nginx's workers are
    refused (the ca logs their uid), their handshakes fail, nginx stays up;
    after a reload allowing nobody, the same workers sign."""
    svc = setup.service(pki, ["postfix"])
    daemon = start_keyservice(start_daemon, svc)
    conf = setup.openssl_conf(timeout_ms=10000)
    kp = pki["rsa2048"]
    server = start_server("nginx", kp.cert_path, setup.ref(kp), program_env(conf))
    assert isinstance(server, NginxServer)
    workers = server.worker_pids()
    nobody = pwd.getpwnam("nobody")
    for _ in range(3):
        result = attempt(server, kp)
        assert not result.handshake_ok, result.describe()
    wait_until(lambda: f"refused connection from uid {nobody.pw_uid} gid {nobody.pw_gid}" in daemon.stderr_text(),
               WAIT, lambda: "the refusal in the daemon's log\n" + daemon.describe())
    wait_until(lambda: "pyprivsep ca unreachable" in server.log_text(), WAIT, server.log_text)
    assert server.worker_pids() == workers

    allowed = setup.service(pki, ["postfix", "nobody"])
    head = daemon.conf_path.read_text().split("keyservice", 1)[0]
    daemon.conf_path.write_text(head + "\n".join(allowed.render()) + "\n")
    answer = ctl(daemon, "reload")
    assert "ok" in answer, answer
    # the new generation serves nobody; the old cas end (no clients)
    wait_until(lambda: succeeds(server, kp), WAIT, lambda: "a handshake after the reload\n" + daemon.describe())
    for _ in range(5):
        handshake(server, kp, "1.3")
    assert server.worker_pids() == workers


def test_ca_frozen_then_thawed(pki: Pki, setup: Setup, start_daemon: StartDaemon, start_server: StartServer,
                               freezer: Freezer) -> None:
    """The service's cas up but not answering (frozen): nginx's handshakes
    fail after the provider's default 2 s timeout, nginx stays up with the
    same workers; thawed, the next handshake succeeds, nginx untouched."""
    daemon = start_keyservice(start_daemon, setup.service(pki, ["nobody"]))
    conf = setup.openssl_conf()  # the default timeout, 2000 ms
    kp = pki["p256"]
    server = start_server("nginx", kp.cert_path, setup.ref(kp), program_env(conf))
    assert isinstance(server, NginxServer)
    for _ in range(4):
        handshake(server, kp)
    pids = server.pids()
    cas = ca_pids(daemon)
    for pid in cas:
        freezer.freeze(pid)
    for _ in range(2):
        result = attempt(server, kp)
        assert not result.handshake_ok, result.describe()
    wait_until(lambda: "pyprivsep ca did not answer in time" in server.log_text(), WAIT, server.log_text)
    assert " in 2000 ms" in server.log_text()
    assert server.pids() == pids and ca_pids(daemon) == cas
    freezer.thaw()
    # the late replies to the timed-out requests are dropped by their ids
    # (were one taken, every later handshake would get its predecessor's);
    # the first waits for the thawed cas to run (2 s, on a loaded machine)
    wait_until(lambda: succeeds(server, kp), WAIT, lambda: "a handshake after the thaw\n" + server.log_text())
    for _ in range(10):
        handshake(server, kp)
    assert server.pids() == pids and ca_pids(daemon) == cas


def test_daemon_stopped_then_started_again(pki: Pki, setup: Setup, start_daemon: StartDaemon,
                                           start_server: StartServer) -> None:
    """The whole daemon stopped (its socket removed): haproxy's and nginx's
    handshakes fail, both stay up; a daemon started again on the same
    socket serves their next handshakes, neither restarted."""
    svc = setup.service(pki, ["nobody", "haproxy"])
    daemon = start_keyservice(start_daemon, svc)
    conf = setup.openssl_conf(timeout_ms=10000)
    kp = pki["rsa2048"]
    servers = [start_server(name, kp.cert_path, setup.ref(kp), program_env(conf)) for name in ("nginx", "haproxy")]
    for server in servers:
        handshake(server, kp)
    pids = [server.pids() for server in servers]
    assert daemon.stop() == 0
    assert not setup.socket.exists()
    for server in servers:
        result = attempt(server, kp)
        assert not result.handshake_ok, result.describe()
    # (haproxy, with no log target, says nothing)
    wait_until(lambda: "pyprivsep ca unreachable" in servers[0].log_text(), WAIT, servers[0].log_text)
    assert [server.pids() for server in servers] == pids
    start_keyservice(start_daemon, svc)
    for server in servers:
        for _ in range(5):
            handshake(server, kp)
    assert [server.pids() for server in servers] == pids
