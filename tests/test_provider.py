"""pyprivsep's OpenSSL provider (src/provider, pyprivsep-provider.so):
unmodified ``openssl s_server`` serving with a key *reference* while the
private key stays in a real ca.

The key service daemon (the ``keyservice`` block) is built elsewhere, so
the ca end here is a small fixture, ``CaListener``: a forked process that
listens on an AF_UNIX SOCK_SEQPACKET path and, for each connection, forks a
real ca (``ca_child``'s machinery: ``pyprivsep.ca.main`` with the keys of a
configuration, privileges dropped, sandboxed) on the accepted socket.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from basics import LOCALHOST, free_port, wait_until
from ca_child import _run_ca_child
from daemonctl import ca_config_text
from keypairs import KeyPair, Pki, found_components, key_patterns
from memscan import scan_process_memory
from procs import child_pids
from pyprivsep import keyref, native

def _openssl_tool() -> str:
    out = subprocess.run(["openssl", "version"], capture_output=True, text=True)
    return out.stdout.strip()


def _why_skip() -> str | None:
    why = keyref.provider_missing()
    if why is not None:
        return why
    # the provider must be loaded by the libcrypto it was built against;
    # the clients here (openssl, Python's ssl) are the system's
    ours, tool = native.library_version(), _openssl_tool()
    if ours.split()[:2] != tool.split()[:2]:
        return f"the provider is built against {ours}, the openssl tool is {tool}"
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))

KEYS = ("rsa2048", "p256")
WAIT = 30.0  # seconds: generous, for a loaded machine


# --------------------------------------------------------------------------
# The ca end: a listener forking a real ca per connection
# --------------------------------------------------------------------------


def _listener_main(listener: socket.socket, cfg_path: Path, log_dir: Path) -> NoReturn:
    """The forked listener: accept, fork a real ca on the connection."""
    cas: list[int] = []

    def stop(signum: int, frame: object) -> None:
        for pid in cas:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(0)

    try:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # cas are reaped at once
        n = 0
        while True:
            conn, _ = listener.accept()
            n += 1
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                listener.close()
                _run_ca_child(conn, cfg_path, log_dir / f"ca{n}.log")
            cas.append(pid)
            conn.close()
    finally:
        os._exit(1)


@dataclass
class CaListener:
    path: Path
    cfg_path: Path
    log_dir: Path
    pid: int | None = None

    def start(self) -> None:
        if self.path.exists():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o666)  # the ca may run as another user; so may its clients
        sock.listen(16)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            _listener_main(sock, self.cfg_path, self.log_dir)
        sock.close()
        self.pid = pid

    def ca_pids(self) -> list[int]:
        assert self.pid is not None
        return child_pids(self.pid)

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.log_dir.glob("ca*.log")))

    def stop(self) -> None:
        """The listener and every ca it started: gone."""
        if self.pid is None:
            return
        cas = self.ca_pids()
        os.kill(self.pid, signal.SIGTERM)
        os.waitpid(self.pid, 0)
        self.pid = None
        self.path.unlink(missing_ok=True)
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}/stat") and
                                   _state(p) not in ("Z", "X") for p in cas),
                   WAIT, "the cas to exit")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


@pytest.fixture(scope="module")
def ca_config(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("provider-ca") / "pyprivsep.conf"
    path.write_text(ca_config_text([pki[k] for k in (*KEYS, "rsa4096", "p384")]))
    return path


@pytest.fixture(scope="module")
def ca_socket(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # short: sun_path holds 107 bytes; tmp_path may be long
    d = Path(tmp_path_factory.mktemp("s"))
    os.chmod(d, 0o755)
    return d / "ca.sock"


@pytest.fixture
def ca(ca_config: Path, ca_socket: Path, tmp_path: Path) -> Iterator[CaListener]:
    listener = CaListener(ca_socket, ca_config, tmp_path)
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


# --------------------------------------------------------------------------
# The provider's side: CLI output, openssl s_server
# --------------------------------------------------------------------------


def pyprivsep_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyprivsep", *args], capture_output=True,
                          text=True, timeout=WAIT)


def conf_with_timeout(directory: Path, timeout_ms: int) -> Path:
    """``pyprivsep openssl-conf``, its commented-out timeout set."""
    out = pyprivsep_cli("openssl-conf")
    assert out.returncode == 0, out.stderr
    assert "# timeout = 2000\n" in out.stdout
    path = directory / f"openssl-{timeout_ms}.cnf"
    path.write_text(out.stdout.replace("# timeout = 2000\n", f"timeout = {timeout_ms}\n"))
    return path


@pytest.fixture(scope="module")
def openssl_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # generous: a ca forked for a new connection loads its keys before it
    # answers, which on a loaded machine may take longer than the 2 s default
    return conf_with_timeout(tmp_path_factory.mktemp("conf"), 20000)


def write_ref(kp: KeyPair, sock: Path, directory: Path, pkcs8: bool = False) -> Path:
    out = pyprivsep_cli("keyref", *(["-8"] if pkcs8 else []), "-s", str(sock), str(kp.cert_path))
    assert out.returncode == 0, out.stderr
    path = directory / f"{kp.name}{'-p8' if pkcs8 else ''}.ref.pem"
    path.write_text(out.stdout)
    return path


def provider_env(conf: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSSL")}
    env["OPENSSL_CONF"] = str(conf)
    return env


def client_env() -> dict[str, str]:
    """The clients run with no provider: nothing of ours helps them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSSL")}
    env["OPENSSL_CONF"] = "/dev/null"
    return env


@dataclass
class SServer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def s_server(openssl_conf: Path, tmp_path: Path) -> Iterator[object]:
    servers: list[SServer] = []

    def start(kp: KeyPair, key: Path) -> SServer:
        port = free_port()
        log = tmp_path / f"s_server-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["openssl", "s_server", "-accept", f"{LOCALHOST}:{port}", "-cert", str(kp.cert_path),
                 "-key", str(key), "-www", "-no_ticket"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=provider_env(openssl_conf))
        server = SServer(proc, port, log)
        servers.append(server)

        def listening() -> bool:
            if not server.alive():
                raise AssertionError(f"s_server exited {proc.returncode}:\n{server.output()}")
            try:
                socket.create_connection((LOCALHOST, port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(listening, WAIT, lambda: f"s_server on {port}:\n{server.output()}")
        return server

    yield start
    for server in servers:
        server.proc.kill()
        server.proc.wait(timeout=WAIT)


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"{LOCALHOST}:{port}", "-brief", *args],
        input="", capture_output=True, text=True, timeout=WAIT, env=client_env())


def handshake(port: int, *args: str) -> dict[str, str]:
    """s_client's -brief summary ("Protocol version", "Signature type", "Hash used"...)
    of a handshake that must succeed."""
    out = s_client(port, *args)
    assert out.returncode == 0 and "CONNECTION ESTABLISHED" in out.stderr, out.stderr
    summary = {}
    for line in out.stderr.splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            summary[name.strip()] = value.strip()
    return summary


def served_cert_der(port: int) -> bytes:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"{LOCALHOST}:{port}"], input="", capture_output=True,
        text=True, timeout=WAIT, env=client_env())
    pem = out.stdout[out.stdout.index("-----BEGIN CERTIFICATE-----"):]
    pem = pem[:pem.index("-----END CERTIFICATE-----") + 25]
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


# (key, s_client arguments, expected protocol, signature type, digest)
MATRIX = [
    ("rsa2048", ["-tls1_3"], "TLSv1.3", "RSA-PSS", "SHA256"),
    ("rsa2048", ["-tls1_2", "-sigalgs", "rsa_pss_rsae_sha256"], "TLSv1.2", "RSA-PSS", "SHA256"),
    ("rsa2048", ["-tls1_2", "-sigalgs", "RSA+SHA256"], "TLSv1.2", "RSA", "SHA256"),
    ("rsa2048", ["-tls1_2", "-sigalgs", "RSA+SHA384"], "TLSv1.2", "RSA", "SHA384"),
    ("p256", ["-tls1_3"], "TLSv1.3", "ECDSA", "SHA256"),
    ("p256", ["-tls1_2", "-sigalgs", "ECDSA+SHA256"], "TLSv1.2", "ECDSA", "SHA256"),
    ("rsa4096", ["-tls1_3"], "TLSv1.3", "RSA-PSS", "SHA256"),
    ("rsa4096", ["-tls1_2", "-sigalgs", "RSA+SHA512"], "TLSv1.2", "RSA", "SHA512"),
    ("p384", ["-tls1_3"], "TLSv1.3", "ECDSA", "SHA384"),
]


@pytest.mark.parametrize(("key", "args", "protocol", "sigtype", "digest"), MATRIX,
                         ids=[f"{m[0]}-{' '.join(m[1])}" for m in MATRIX])
def test_s_server_handshakes_through_the_ca(pki: Pki, ca: CaListener, s_server, tmp_path: Path,
                                            key: str, args: list[str], protocol: str, sigtype: str,
                                            digest: str) -> None:
    kp = pki[key]
    server = s_server(kp, write_ref(kp, ca.path, tmp_path))
    summary = handshake(server.port, *args)
    assert summary.get("Protocol version") == protocol, summary
    assert summary.get("Signature type") == sigtype, summary
    assert summary.get("Hash used") == digest, summary
    assert served_cert_der(server.port) == kp.cert_der
    # the ca signed: a ca was started for s_server's connection
    assert ca.ca_pids(), "no ca was connected"


@pytest.mark.parametrize("key", KEYS)
def test_curl_through_the_ca(pki: Pki, ca: CaListener, s_server, tmp_path: Path, key: str) -> None:
    kp = pki[key]
    server = s_server(kp, write_ref(kp, ca.path, tmp_path))
    out = subprocess.run(
        ["curl", "-sS", "--max-time", str(int(WAIT)), "--cacert", str(kp.cert_path),
         "--resolve", f"{kp.dns_name}:{server.port}:{LOCALHOST}", f"https://{kp.dns_name}:{server.port}/"],
        capture_output=True, text=True, timeout=WAIT + 5, env=client_env())
    assert out.returncode == 0, out.stderr
    assert "s_server" in out.stdout


@pytest.mark.parametrize("key", KEYS)
def test_pkcs8_form_loads(pki: Pki, ca: CaListener, s_server, tmp_path: Path, key: str) -> None:
    kp = pki[key]
    ref = write_ref(kp, ca.path, tmp_path, pkcs8=True)
    assert ref.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    server = s_server(kp, ref)
    assert handshake(server.port, "-tls1_3").get("Protocol version") == "TLSv1.3"


def test_normal_pkcs8_key_still_goes_to_the_default_provider(pki: Pki, s_server) -> None:
    kp = pki["rsa2048"]
    server = s_server(kp, kp.key_path)  # no ca at all: the key is in the file
    assert handshake(server.port, "-tls1_3").get("Protocol version") == "TLSv1.3"


def test_server_holds_no_secret_while_the_ca_does(pki: Pki, ca: CaListener, s_server, tmp_path: Path) -> None:
    keypairs = [pki[k] for k in KEYS]
    servers = [s_server(kp, write_ref(kp, ca.path, tmp_path)) for kp in keypairs]
    for server in servers:
        handshake(server.port, "-tls1_3")
    patterns = key_patterns(keypairs)
    for server in servers:
        result = scan_process_memory(server.proc.pid, patterns)
        assert result.bytes_scanned > 0
        assert found_components(result.found) == set(), f"s_server {server.proc.pid} holds {result.found}"
    # the positive control: the same scan finds every secret in the cas
    found: set[str] = set()
    for pid in ca.ca_pids():
        found |= found_components(scan_process_memory(pid, patterns).found)
    assert found == {c for kp in keypairs for c in kp.components()}


def test_ca_gone_fails_cleanly_and_recovers(pki: Pki, ca: CaListener, s_server, tmp_path: Path) -> None:
    kp = pki["rsa2048"]
    server = s_server(kp, write_ref(kp, ca.path, tmp_path))
    handshake(server.port, "-tls1_3")
    ca.stop()  # the ca goes away, with the connection s_server had
    for _ in range(2):
        out = s_client(server.port, "-tls1_3")
        assert "CONNECTION ESTABLISHED" not in out.stderr, out.stderr
        assert server.alive(), server.output()
    assert "pyprivsep ca unreachable" in server.output()
    ca.start()  # the ca is back (a restart): the next handshake reconnects
    assert handshake(server.port, "-tls1_3").get("Protocol version") == "TLSv1.3"
    ca.stop()
    ca.start()  # restarted again while s_server still holds the old connection
    assert handshake(server.port, "-tls1_3").get("Protocol version") == "TLSv1.3"
    assert server.alive()


def dgst_sign(conf: Path, ref: Path, data: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", "dgst", *args, "-sign", str(ref), str(data)], capture_output=True,
                          timeout=WAIT, env=provider_env(conf))


def test_provider_refuses_sha1(pki: Pki, ca: CaListener, openssl_conf: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"to be signed\n")
    for name in KEYS:
        kp = pki[name]
        ref = write_ref(kp, ca.path, tmp_path)
        public = kp.certificate.public_key()
        # SHA-256 signs, through the ca, and verifies with the certificate
        ok = dgst_sign(openssl_conf, ref, data, "-sha256")
        assert ok.returncode == 0, ok.stderr
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(ok.stdout, data.read_bytes(), padding.PKCS1v15(), hashes.SHA256())
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            public.verify(ok.stdout, data.read_bytes(), ec.ECDSA(hashes.SHA256()))
        # SHA-1 is refused by the provider itself, at init (a request the
        # ca refused would fail with "pyprivsep ca refused the operation")
        bad = dgst_sign(openssl_conf, ref, data, "-sha1")
        assert bad.returncode != 0 and not bad.stdout
        assert b"digest not supported" in bad.stderr, bad.stderr
        assert b"pyprivsep ca" not in bad.stderr, bad.stderr


def test_pss_signature_by_the_provider_verifies(pki: Pki, ca: CaListener, openssl_conf: Path,
                                                tmp_path: Path) -> None:
    kp = pki["rsa2048"]
    data = tmp_path / "data"
    data.write_bytes(b"pss\n")
    for md, h in (("-sha256", hashes.SHA256()), ("-sha384", hashes.SHA384()), ("-sha512", hashes.SHA512())):
        out = dgst_sign(openssl_conf, write_ref(kp, ca.path, tmp_path), data, md,
                        "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest")
        assert out.returncode == 0, out.stderr
        public = kp.certificate.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(out.stdout, data.read_bytes(),
                      padding.PSS(padding.MGF1(h), h.digest_size), h)


def test_keyref_rejects_a_relative_socket(pki: Pki) -> None:
    out = pyprivsep_cli("keyref", "-s", "ca.sock", str(pki["rsa2048"].cert_path))
    assert out.returncode != 0 and not out.stdout


def test_openssl_conf_names_the_installed_module() -> None:
    out = pyprivsep_cli("openssl-conf")
    assert out.returncode == 0
    module = keyref.provider_path()
    assert f"module = {module}" in out.stdout
    assert module.is_absolute() and module.exists()
    assert out.stdout.index("default = ") < out.stdout.index("pyprivsep = ")
    assert native.library_version().startswith("OpenSSL")


def test_ca_not_answering_times_out_one_handshake(pki: Pki, ca: CaListener, tmp_path: Path) -> None:
    """The provider's timeout (here 2 s, from the configuration): one
    handshake fails, the server stays up, the late reply is dropped."""
    kp = pki["p256"]
    conf = conf_with_timeout(tmp_path, 2000)
    port = free_port()
    log = tmp_path / "s_server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"{LOCALHOST}:{port}", "-cert", str(kp.cert_path),
             "-key", str(write_ref(kp, ca.path, tmp_path)), "-www", "-no_ticket"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=provider_env(conf))
    server = SServer(proc, port, log)

    def handshake_ok() -> bool:
        assert server.alive(), server.output()
        return "CONNECTION ESTABLISHED" in s_client(port, "-tls1_3").stderr

    try:
        # the first one waits for the ca forked for the connection: retried
        wait_until(handshake_ok, WAIT, lambda: f"a first handshake:\n{server.output()}")
        [ca_pid] = ca.ca_pids()
        os.kill(ca_pid, signal.SIGSTOP)  # connected, but answers nothing
        try:
            out = s_client(port, "-tls1_3")
            assert "CONNECTION ESTABLISHED" not in out.stderr, out.stderr
            wait_until(lambda: "pyprivsep ca did not answer in time" in server.output(), WAIT,
                       lambda: f"the timeout in s_server's output:\n{server.output()}")
            assert " in 2000 ms" in server.output()
            assert server.alive()
        finally:
            os.kill(ca_pid, signal.SIGCONT)
        # the ca answers the timed-out request late; that reply is dropped by
        # its id and the next handshake gets its own, on the same connection
        # (were it taken, every later handshake would get its predecessor's)
        wait_until(handshake_ok, WAIT, lambda: f"a handshake after the ca woke:\n{server.output()}")
        assert ca.ca_pids() == [ca_pid]
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)


FORKING_SERVER = r"""
import os, socket, ssl, sys
cert, key = sys.argv[1], sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(8)
print(ls.getsockname()[1], flush=True)

def serve_one():
    conn, _ = ls.accept()
    with ctx.wrap_socket(conn, server_side=True) as tls:
        tls.sendall(b"pid %d\n" % os.getpid())

serve_one()  # the parent signs first: its connection to the ca exists
pid = os.fork()
if pid == 0:
    serve_one()  # the child must sign on a connection of its own
    os._exit(0)
os.waitpid(pid, 0)
serve_one()  # and the parent still on its own
print("done", flush=True)
"""


def test_key_loaded_before_fork_signs_in_the_child(pki: Pki, ca: CaListener, openssl_conf: Path,
                                                   tmp_path: Path) -> None:
    """As nginx: the key is loaded (and used) before fork(); the child
    connects to the ca anew instead of sharing its parent's connection."""
    kp = pki["rsa2048"]
    ref = write_ref(kp, ca.path, tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", FORKING_SERVER, str(kp.cert_path), str(ref)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=provider_env(openssl_conf))
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        pids = []
        for _ in range(3):
            out = s_client(port, "-tls1_3", "-ign_eof")  # read until the server closes
            assert "CONNECTION ESTABLISHED" in out.stderr, out.stderr
            pids.append(out.stdout.strip())
        assert proc.stdout.readline().strip() == "done"
        assert pids[0] == pids[2] != pids[1], pids
        # one ca connection for the parent, one for the child
        assert len(list(ca.log_dir.glob("ca*.log"))) == 2
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)


# postfix reads PEM itself (skipping labels it does not know) and hands
# the DER of a "PRIVATE KEY" block to libcrypto: the same route through
# ctypes, naming the provider that ends up holding the key.
D2I_PRIVATE_KEY = r"""
import base64, ctypes, sys
text = open(sys.argv[1]).read()
body = text.split("-----BEGIN PRIVATE KEY-----")[1].split("-----END PRIVATE KEY-----")[0]
der = base64.b64decode("".join(body.split()))
lib = ctypes.CDLL("libcrypto.so.3")
lib.d2i_AutoPrivateKey.restype = ctypes.c_void_p
lib.d2i_AutoPrivateKey.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]
lib.EVP_PKEY_get0_provider.restype = ctypes.c_void_p
lib.EVP_PKEY_get0_provider.argtypes = [ctypes.c_void_p]
lib.OSSL_PROVIDER_get0_name.restype = ctypes.c_char_p
lib.OSSL_PROVIDER_get0_name.argtypes = [ctypes.c_void_p]
p = ctypes.c_char_p(der)
key = lib.d2i_AutoPrivateKey(None, ctypes.byref(p), len(der))
print(lib.OSSL_PROVIDER_get0_name(lib.EVP_PKEY_get0_provider(key)).decode() if key else "none")
"""


@pytest.mark.parametrize("key", KEYS)
def test_pkcs8_der_route_as_postfix(pki: Pki, openssl_conf: Path, tmp_path: Path, key: str) -> None:
    kp = pki[key]
    ref = write_ref(kp, Path("/nonexistent/ca.sock"), tmp_path, pkcs8=True)  # loading connects to nothing

    def holder(path: Path) -> str:
        out = subprocess.run([sys.executable, "-c", D2I_PRIVATE_KEY, str(path)], capture_output=True,
                             text=True, timeout=WAIT, env=provider_env(openssl_conf))
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert holder(ref) == "pyprivsep"
    assert holder(kp.key_path) == "default"  # an ordinary PKCS#8 key is not ours


def test_pkcs8_form_through_ssl_ctx_use_privatekey_file(pki: Pki, ca: CaListener, openssl_conf: Path,
                                                         tmp_path: Path) -> None:
    """Python's ssl: SSL_CTX_use_PrivateKey_file, as nginx and dovecot."""
    kp = pki["p256"]
    code = FORKING_SERVER.split("serve_one()  # the parent")[0] + "serve_one()\n"
    proc = subprocess.Popen([sys.executable, "-c", code, str(kp.cert_path),
                             str(write_ref(kp, ca.path, tmp_path, pkcs8=True))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=provider_env(openssl_conf))
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        out = s_client(port, "-tls1_2", "-ign_eof")
        assert "CONNECTION ESTABLISHED" in out.stderr, out.stderr
        assert "Signature type: ECDSA" in out.stderr
    finally:
        proc.kill()
        proc.communicate(timeout=WAIT)


THREADED_SERVER = r"""
import socket, ssl, sys, threading
cert, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(64)
print(ls.getsockname()[1], flush=True)
results = []

def serve():
    conn, _ = ls.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"ok\n")
        results.append("ok")
    except Exception as e:
        results.append(repr(e))

threads = [threading.Thread(target=serve) for _ in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(" ".join(results), flush=True)
"""


def test_threads_share_one_key(pki: Pki, ca: CaListener, openssl_conf: Path, tmp_path: Path) -> None:
    """As haproxy: threads of one process sign with one key at once; the
    connection's mutex keeps each reply with its request."""
    n = 8
    kp = pki["p256"]
    proc = subprocess.Popen([sys.executable, "-c", THREADED_SERVER, str(kp.cert_path),
                             str(write_ref(kp, ca.path, tmp_path)), str(n)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=provider_env(openssl_conf))
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        clients = [subprocess.Popen(
            ["openssl", "s_client", "-connect", f"{LOCALHOST}:{port}", "-brief", "-tls1_3", "-ign_eof"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=client_env()) for _ in range(n)]
        for client in clients:
            out, err = client.communicate(timeout=WAIT)
            assert "CONNECTION ESTABLISHED" in err and out == "ok\n", err
        assert proc.stdout.readline().split() == ["ok"] * n
        assert len(list(ca.log_dir.glob("ca*.log"))) == 1  # one connection, shared
    finally:
        proc.kill()
        proc.communicate(timeout=WAIT)


def test_corrupt_reference_is_refused_with_a_reason(pki: Pki, openssl_conf: Path, s_server,
                                                    tmp_path: Path) -> None:
    """A reference whose key id is not its public key's (another
    certificate's key id) does not load."""
    kp, other = pki["rsa2048"], pki["p256"]
    spki = kp.certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    other_spki = other.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    good = keyref.reference_der("/nonexistent/ca.sock", spki)
    bad = good[:-len(spki) - 32] + hashlib.sha256(other_spki).digest() + spki
    assert len(bad) == len(good) and bad != good
    ref = tmp_path / "bad.ref.pem"
    ref.write_text(keyref.pem(keyref.PEM_LABEL, bad))
    out = subprocess.run(["openssl", "pkey", "-in", str(ref), "-pubout"], capture_output=True, text=True,
                         timeout=WAIT, env=provider_env(openssl_conf))
    # (the OSSL_STORE route keeps only its own error, "unsupported")
    assert out.returncode != 0 and "BEGIN PUBLIC KEY" not in out.stdout
    ref.write_text(keyref.pem(keyref.PEM_LABEL, good))  # the control: the same, intact, loads
    out = subprocess.run(["openssl", "pkey", "-in", str(ref), "-pubout"], capture_output=True, text=True,
                         timeout=WAIT, env=provider_env(openssl_conf))
    assert out.returncode == 0, out.stderr
    assert serialization.load_pem_public_key(out.stdout.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == spki


def test_keyref_refuses_a_key_the_provider_cannot_sign_with(tmp_path: Path) -> None:
    import datetime

    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(1)
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(key, None))
    cert = tmp_path / "ed25519.crt"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    out = pyprivsep_cli("keyref", "-s", "/run/ca.sock", str(cert))
    assert out.returncode != 0 and not out.stdout
    assert "RSA and EC keys only" in out.stderr
