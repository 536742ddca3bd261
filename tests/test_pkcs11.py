"""Keys in a PKCS#11 token (SoftHSM2), used by the ca processes only.

One token per module (tests/tokenkeys.py, on tests/softhsm.py): an
RSA-2048 and a P-256 key the test made and imported (their primes known,
for the memory scan), and an RSA-2048 and a P-256 key generated in the
token, sensitive and never extractable.  Through the relay: TLS 1.3 and 1.2 handshakes with each
(Python ssl, openssl s_client, curl), directly with SoftHSM in the ca and
through `p11-kit server` + p11-kit-client.so (`server "unix:path=..."`);
a hostile relay's frames refused by a token-backed ca as by any other; a
ca killed and restarted, a p11-kit server killed and restarted; `pyprivsep
-n` errors with file:line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends import HttpBackend
from basics import free_port, wait_until
from ca_child import CaChild, start_ca
from cawire import spki_keyid
from daemonctl import SANITIZED, Daemon, DaemonConfig, RelaySpec, StartDaemon, run_pyprivsep
from keypairs import key_patterns
from memscan import scan_process_memory
from softhsm import SOFTHSM_MODULE, P11KitServer, missing
from tokenkeys import TokenKeys, make_token_keys, token_directory
from tlsclients import TlsVersion, curl, s_client, tls_handshake

pytestmark = pytest.mark.skipif(missing(p11kit=True) is not None, reason=str(missing(p11kit=True)))

VERSIONS: tuple[TlsVersion, ...] = ("1.3", "1.2")
KEYS = ("imported-rsa", "imported-ec", "generated-rsa", "generated-ec")


@pytest.fixture(scope="module")
def token() -> Iterator[TokenKeys]:
    directory = token_directory()
    saved = os.environ.get("SOFTHSM2_CONF")
    try:
        token = make_token_keys(directory)
        os.environ["SOFTHSM2_CONF"] = str(token.hsm.conf)   # the daemon and ca children read it
        token.import_key("imported-rsa", 1, "rsa2048")
        token.import_key("imported-ec", 2, "p256")
        token.generate_key("generated-rsa", 3, "rsa2048")
        token.generate_key("generated-ec", 4, "p256")
        token.generate_key("always-auth", 5, "rsa2048", always_auth=True)
        token.give_to_ca_user()
        yield token
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def p11kit(token: TokenKeys) -> Iterator[P11KitServer]:
    server = token.p11kit_server(token.directory / "p11kit.sock").start()
    yield server
    server.stop()


def relay_of(token: TokenKeys, backend: HttpBackend, names: tuple[str, ...] = KEYS) -> RelaySpec:
    return RelaySpec("www", free_port(), backend.port, [token.keys[n] for n in names])


def start(start_daemon: StartDaemon, token: TokenKeys, backend: HttpBackend, *, remote: P11KitServer | None = None,
          prefork: int = 2) -> Daemon:
    line = token.hsm.pkcs11_line(remote)
    return start_daemon(DaemonConfig([relay_of(token, backend)], prefork=prefork, globals=[line]))


def assert_handshakes(daemon: Daemon, token: TokenKeys) -> None:
    """Each key signs a full handshake in TLS 1.3 and 1.2 (chosen by SNI),
    and the relay's certificate is that key's."""
    port = daemon.config.relays[0].listen_port
    for name in KEYS:
        kp = token.keys[name]
        for version in VERSIONS:
            info = tls_handshake(port, kp.dns_name, cafile=token.issuer.cert_path, version=version, timeout=20)
            assert info.peer_cert_der == kp.cert_der, f"{name} TLS {version}"
            assert info.version == f"TLSv{version}"


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_text(token: TokenKeys, relay_lines: list[str], pkcs11: str | None = None) -> str:
    pk = token.hsm.pkcs11_line() if pkcs11 is None else pkcs11
    # `make asan`: every child root, as daemonctl.Daemon makes them
    users = ['user "root"', 'ca user "root"'] if SANITIZED else []
    return "\n".join(["prefork 1", *users, pk, 'relay "www" {', "    listen on 127.0.0.1 port 8443 tls",
                      "    forward to 127.0.0.1 port 8080", *relay_lines, "}", ""])


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


# --------------------------------------------------------------------------
# the token itself: what the test put there
# --------------------------------------------------------------------------


def test_generated_keys_are_sensitive_and_never_extractable(token: TokenKeys) -> None:
    listing = token.hsm.tool("--list-objects", "--type", "privkey")
    blocks = listing.split("Private Key Object")[1:]
    access = {re.search(r"label:\s+(\S+)", b).group(1): re.search(r"Access:\s+(.*)", b).group(1)  # type: ignore[union-attr]
              for b in blocks}
    for name in ("generated-rsa", "generated-ec"):
        flags = [flag.strip() for flag in access[name].split(",")]
        # CKA_SENSITIVE true, CKA_EXTRACTABLE false (pkcs11-tool would list
        # "extractable"), and never was
        assert "sensitive" in flags and "never extractable" in flags, access
        assert "extractable" not in flags, access
    # an imported key was outside the token once: the listing tells them apart
    assert "never extractable" not in access["imported-rsa"], access
    # and no file of the test's but the token's own holds a private key
    for path in token.directory.rglob("*"):
        if path.is_file() and "tokens" not in path.parts:
            assert b"PRIVATE KEY" not in path.read_bytes(), path


# --------------------------------------------------------------------------
# pyprivsep -n
# --------------------------------------------------------------------------


def test_check_accepts_the_token_keys(token: TokenKeys, tmp_path: Path) -> None:
    conf = write_config(tmp_path / "p.conf", config_text(token, [
        f'    tls certificate "{token.keys[n].cert_path}" key "{token.keys[n].key_path}"' for n in KEYS]))
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stderr


def test_check_refuses_a_wrong_pin_naming_the_pkcs11_line(token: TokenKeys, tmp_path: Path) -> None:
    pin = tmp_path / "wrong.pin"
    pin.write_text("not-the-pin\n")
    pin.chmod(0o600)
    kp = token.keys["imported-rsa"]
    conf = write_config(tmp_path / "p.conf", config_text(
        token, [f'    tls certificate "{kp.cert_path}" key "{kp.key_path}"'],
        pkcs11=f'pkcs11 module "{SOFTHSM_MODULE}" pin "file:{pin}"'))
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 1
    assert f"{conf}:{line_of(conf, 'pkcs11 module')}: pkcs11 pin file {pin}" in proc.stderr, proc.stderr
    assert "CKR_PIN_INCORRECT" in proc.stderr
    assert "not-the-pin" not in proc.stderr


@pytest.mark.parametrize("uri, why", [
    ("pkcs11:token=web;object=nothere", "no such private key in the token"),
    ("pkcs11:token=elsewhere;object=imported-rsa", "CKR_TOKEN_NOT_PRESENT"),
], ids=["missing-object", "missing-token"])
def test_check_refuses_a_key_the_token_lacks_naming_its_line(
        token: TokenKeys, tmp_path: Path, uri: str, why: str) -> None:
    kp = token.keys["imported-rsa"]
    conf = write_config(tmp_path / "p.conf", config_text(
        token, [f'    tls certificate "{kp.cert_path}" key "{uri}"']))
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 1
    assert f"{conf}:{line_of(conf, uri)}: " in proc.stderr, proc.stderr
    assert why in proc.stderr, proc.stderr


def test_check_refuses_a_token_key_that_is_not_the_certificates(token: TokenKeys, tmp_path: Path) -> None:
    cert, other = token.keys["generated-ec"].cert_path, token.keys["imported-ec"].key_path
    conf = write_config(tmp_path / "p.conf", config_text(token, [f'    tls certificate "{cert}" key "{other}"']))
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 1
    assert f"{conf}:{line_of(conf, 'tls certificate')}:" in proc.stderr
    assert "does not match the certificate" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------
# handshakes through the relay, the module in the ca
# --------------------------------------------------------------------------


def test_handshakes_with_keys_in_the_token(start_daemon: StartDaemon, token: TokenKeys, http_backend: HttpBackend) -> None:
    daemon = start(start_daemon, token, http_backend)
    assert_handshakes(daemon, token)
    port = daemon.config.relays[0].listen_port
    for name, sigalgs in (("imported-rsa", "RSA-PSS+SHA256"), ("generated-rsa", "RSA+SHA256"),
                          ("generated-ec", "ECDSA+SHA256")):
        version: TlsVersion = "1.2" if sigalgs == "RSA+SHA256" else "1.3"
        result = s_client(port, servername=token.keys[name].dns_name, version=version,
                          extra=["-sigalgs", sigalgs, "-CAfile", str(token.issuer.cert_path), "-verify_return_error"])
        assert result.returncode == 0, result
        assert "Verify return code: 0 (ok)" in result.stdout
    for name in KEYS:
        proc = curl(port, token.keys[name].dns_name, cacert=token.issuer.cert_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == http_backend.page
    assert daemon.stop() == 0, daemon.describe()


def test_only_the_cas_load_the_module(start_daemon: StartDaemon, token: TokenKeys, http_backend: HttpBackend) -> None:
    daemon = start(start_daemon, token, http_backend)
    assert_handshakes(daemon, token)

    def loaded(pid: int) -> bool:
        return "libsofthsm2.so" in Path(f"/proc/{pid}/maps").read_text()

    assert all(loaded(pid) for pid in daemon.ca_pids().values())
    assert not any(loaded(pid) for pid in daemon.relay_pids().values())
    assert not loaded(daemon.parent_pid)


def test_a_killed_ca_is_restarted_and_signs_again(start_daemon: StartDaemon, token: TokenKeys,
                                                 http_backend: HttpBackend) -> None:
    daemon = start(start_daemon, token, http_backend, prefork=1)
    old = daemon.ca_pids()[1]
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: (lambda p: p if p not in (None, old) else None)(daemon.ca_pids().get(1)), 30,
                     lambda: f"a new ca 1\n{daemon.describe()}")
    assert new != old
    wait_until(lambda: _handshake_ok(daemon, token), 30, lambda: f"handshakes again\n{daemon.describe()}")
    assert_handshakes(daemon, token)


def _handshake_ok(daemon: Daemon, token: TokenKeys, name: str = "imported-rsa") -> bool:
    try:
        tls_handshake(daemon.config.relays[0].listen_port, token.keys[name].dns_name, version="1.3", timeout=20)
    except OSError:
        return False
    return True


@pytest.mark.skipif(SANITIZED, reason="memory scan skipped in an AddressSanitizer run")
@pytest.mark.skipif(os.geteuid() != 0, reason="reading the cas' memory needs root")
def test_memory_of_the_daemon_with_keys_in_the_token(start_daemon: StartDaemon, token: TokenKeys,
                                                     http_backend: HttpBackend, p11kit: P11KitServer) -> None:
    """No pyprivsep process holds the imported keys' primes or scalar, the
    cas included: through p11-kit server the key is only ever in another
    process; with SoftHSM loaded in the ca, SoftHSM decrypts the key for
    each signature and wipes it after (a module that kept it in the clear
    in the ca would fail this, see README)."""
    patterns = key_patterns([token.keys["imported-rsa"], token.keys["imported-ec"]])
    # the scan finds them where they are: in this process, which made them
    assert scan_process_memory(os.getpid(), patterns).found
    remote = start(start_daemon, token, http_backend, remote=p11kit)
    assert_handshakes(remote, token)
    pids = {"parent": remote.parent_pid} | {f"relay {i}": p for i, p in remote.relay_pids().items()} \
        | {f"ca {i}": p for i, p in remote.ca_pids().items()}
    found = {name: sorted(scan_process_memory(pid, patterns).found) for name, pid in pids.items()}
    assert found == {name: [] for name in pids}, "key material in a pyprivsep process"
    remote.kill_all()

    local = start(start_daemon, token, http_backend)
    assert_handshakes(local, token)
    # the PIN: only the cas read it (the parent and the relays never)
    pin = {"pin": token.hsm.pin.encode()}
    assert scan_process_memory(os.getpid(), pin).found
    for pid in [local.parent_pid, *local.relay_pids().values()]:
        assert not scan_process_memory(pid, pin).found, f"the PIN in pid {pid}"
    pids = {"parent": local.parent_pid} | {f"relay {i}": p for i, p in local.relay_pids().items()} \
        | {f"ca {i}": p for i, p in local.ca_pids().items()}
    found = {name: sorted(scan_process_memory(pid, patterns).found) for name, pid in pids.items()}
    assert found == {name: [] for name in pids}, "key material in a pyprivsep process"


# --------------------------------------------------------------------------
# a hostile relay against a token-backed ca
# --------------------------------------------------------------------------


@pytest.fixture
def token_ca(token: TokenKeys, tmp_path: Path) -> Iterator[CaChild]:
    conf = write_config(tmp_path / "ca.conf", config_text(token, [
        f'    tls certificate "{token.keys[n].cert_path}" key "{token.keys[n].key_path}"'
        for n in ("generated-rsa", "generated-ec")]))
    child = start_ca(conf, tmp_path / "ca.log")
    yield child
    child.stop()


def test_hostile_frames_to_a_token_backed_ca_are_refused(token: TokenKeys, token_ca: CaChild) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from test_ca_hostile import HOSTILE, Keys, assert_serves_valid_requests
    rsa_cert, ec_cert = token.keys["generated-rsa"].certificate, token.keys["generated-ec"].certificate
    rsa_pub, ec_pub = rsa_cert.public_key(), ec_cert.public_key()
    assert isinstance(rsa_pub, rsa.RSAPublicKey) and isinstance(ec_pub, ec.EllipticCurvePublicKey)
    keys = Keys(rsa_pub, spki_keyid(rsa_cert), ec_pub, spki_keyid(ec_cert))
    assert_serves_valid_requests(token_ca, keys)
    for hostile in HOSTILE:
        rid = token_ca.next_id() | 0xAB000000
        reply = token_ca.call(hostile.build(keys, rid))
        assert reply.arg == hostile.status, f"{hostile.name}: {reply.arg}\n{token_ca.log()[-2000:]}"
        assert reply.payload == b""
    assert_serves_valid_requests(token_ca, keys)


# --------------------------------------------------------------------------
# p11-kit server: the token in another process (a network HSM's shape)
# --------------------------------------------------------------------------


def test_handshakes_through_p11kit_server(start_daemon: StartDaemon, token: TokenKeys, http_backend: HttpBackend,
                                          p11kit: P11KitServer) -> None:
    daemon = start(start_daemon, token, http_backend, remote=p11kit)
    assert_handshakes(daemon, token)
    for pid in daemon.ca_pids().values():
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "p11-kit-client.so" in maps and "libsofthsm2.so" not in maps
    port = daemon.config.relays[0].listen_port
    proc = curl(port, token.keys["generated-rsa"].dns_name, cacert=token.issuer.cert_path, version="1.2")
    assert proc.returncode == 0 and proc.stdout == http_backend.page, proc.stderr
    assert daemon.stop() == 0, daemon.describe()


def test_a_p11kit_server_outage_fails_handshakes_not_the_cas(start_daemon: StartDaemon, token: TokenKeys,
                                                              http_backend: HttpBackend, p11kit: P11KitServer) -> None:
    daemon = start(start_daemon, token, http_backend, remote=p11kit, prefork=1)
    assert_handshakes(daemon, token)
    cas = daemon.ca_pids()
    p11kit.stop()
    port = daemon.config.relays[0].listen_port
    for name in ("imported-rsa", "generated-ec"):
        with pytest.raises(OSError):
            tls_handshake(port, token.keys[name].dns_name, version="1.3", timeout=20)
    assert daemon.ca_pids() == cas, daemon.describe()
    wait_until(lambda: "PKCS#11 token \"web\"" in daemon.stderr_text(), 20,
               lambda: f"the ca's refusal in the log\n{daemon.describe()}")
    p11kit.start()
    wait_until(lambda: _handshake_ok(daemon, token), 30, lambda: f"handshakes again\n{daemon.describe()}")
    assert_handshakes(daemon, token)
    assert daemon.ca_pids() == cas, "the cas were restarted, not reconnected"
    assert daemon.stop() == 0, daemon.describe()


# --------------------------------------------------------------------------
# a keyservice's cas take token keys too
# --------------------------------------------------------------------------


def test_a_keyservice_signs_with_token_keys(start_daemon: StartDaemon, token: TokenKeys) -> None:
    from daemonctl import KeyServiceSpec
    from test_keyservice import signs

    keypairs = [token.keys["imported-rsa"], token.keys["generated-ec"]]
    spec = KeyServiceSpec("tok", token.directory / "run" / "tok.sock", keypairs)
    daemon = start_daemon(DaemonConfig([], keyservices=[spec], globals=[token.hsm.pkcs11_line()]))
    for i, kp in enumerate(keypairs * 2):
        signs(spec.socket, kp, req_id=10 + i)
    assert len(daemon.keyservice_pids("tok")) == spec.cas
    assert daemon.stop() == 0, daemon.describe()


def test_a_token_gone_and_back_is_reopened_by_the_same_ca(start_daemon: StartDaemon, token: TokenKeys,
                                                         http_backend: HttpBackend) -> None:
    """SoftHSM's token directory taken away: signatures fail (the ca
    answers PPS_ERR_CRYPTO, the relay fails the handshake), the ca lives
    on, and once the token is back the same ca finalizes, initializes,
    logs in again under its sandbox and signs."""
    daemon = start(start_daemon, token, http_backend, prefork=1)
    assert_handshakes(daemon, token)
    cas = daemon.ca_pids()
    tokens, away = token.hsm.directory / "tokens", token.hsm.directory / "tokens.away"
    tokens.rename(away)
    try:
        with pytest.raises(OSError):
            tls_handshake(daemon.config.relays[0].listen_port, token.keys["generated-rsa"].dns_name,
                          version="1.3", timeout=20)
        assert daemon.ca_pids() == cas, daemon.describe()
    finally:
        away.rename(tokens)
    wait_until(lambda: _handshake_ok(daemon, token, "generated-rsa"), 30,
               lambda: f"handshakes again\n{daemon.describe()}")
    assert_handshakes(daemon, token)
    assert daemon.ca_pids() == cas, "the ca was restarted, not reopened"


def test_a_reload_checks_the_token_keys_in_a_child_and_the_parent_stays_clean(
        start_daemon: StartDaemon, token: TokenKeys, http_backend: HttpBackend) -> None:
    """SIGHUP: the parent checks every key in a throwaway child (which loads
    the module and logs in), then starts a new generation of cas and
    relays; the parent itself never maps the module."""
    daemon = start(start_daemon, token, http_backend)
    old = set(daemon.ca_pids().values())
    os.kill(daemon.parent_pid, signal.SIGHUP)
    wait_until(lambda: (lambda now: len(now) == 2 and not now & old)(set(daemon.ca_pids().values())), 30,
               lambda: f"a new generation of cas\n{daemon.describe()}")
    wait_until(lambda: _handshake_ok(daemon, token), 30, lambda: f"handshakes\n{daemon.describe()}")
    assert_handshakes(daemon, token)
    assert "libsofthsm2.so" not in Path(f"/proc/{daemon.parent_pid}/maps").read_text()


def test_a_key_that_wants_the_pin_for_each_signature(start_daemon: StartDaemon, token: TokenKeys,
                                                    http_backend: HttpBackend) -> None:
    """CKA_ALWAYS_AUTHENTICATE (smart cards, some HSM policies): the ca
    logs in for the context (CKU_CONTEXT_SPECIFIC) before each C_Sign."""
    assert "always authenticate" in token.hsm.tool("--list-objects", "--type", "privkey", "--label", "always-auth")
    daemon = start_daemon(DaemonConfig([relay_of(token, http_backend, ("always-auth",))], prefork=1,
                                       globals=[token.hsm.pkcs11_line()]))
    kp = token.keys["always-auth"]
    for version in VERSIONS:
        for _ in range(3):
            info = tls_handshake(daemon.config.relays[0].listen_port, kp.dns_name,
                                 cafile=token.issuer.cert_path, version=version, timeout=20)
            assert info.peer_cert_der == kp.cert_der


def test_check_through_a_p11kit_server_that_admits_the_ca_user_only(token: TokenKeys, tmp_path: Path,
                                                                     p11kit: P11KitServer) -> None:
    """-n signs with the token keys as `ca user`, as a ca will: the test's
    p11-kit server (-u _pyprivsep_ca) refuses root."""
    kp = token.keys["generated-ec"]
    line = token.hsm.pkcs11_line(p11kit)
    conf = write_config(tmp_path / "p.conf", config_text(
        token, [f'    tls certificate "{kp.cert_path}" key "{kp.key_path}"'], pkcs11=line))
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 0, proc.stderr
    other = token.keys["imported-ec"]
    conf = write_config(tmp_path / "q.conf", config_text(
        token, [f'    tls certificate "{kp.cert_path}" key "{other.key_path}"'], pkcs11=line))
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 1
    assert f"{conf}:{line_of(conf, 'tls certificate')}:" in proc.stderr
    assert "does not match the certificate" in proc.stderr, proc.stderr


def test_a_token_out_of_reach_is_a_crypto_error_reply_not_a_dead_ca(token: TokenKeys, token_ca: CaChild) -> None:
    """The relay's view: PPS_ERR_CRYPTO for a well-formed request while the
    token is away, a signature again once it is back, one ca throughout."""
    import hashlib

    from cawire import pss_block, raw_frame
    from pyprivsep.native import P

    cert = token.keys["generated-rsa"].certificate
    keyid, bits = spki_keyid(cert), cert.public_key().key_size  # type: ignore[union-attr]

    def request() -> int:
        block = pss_block(hashlib.sha256(os.urandom(16)).digest(), bits, "sha256")
        return token_ca.call(raw_frame(P.PPS_OP_RSA_PRIV_ENC, P.PPS_PAD_NONE, token_ca.next_id(), keyid,
                                       block)).arg

    assert request() == P.PPS_OK, token_ca.log()
    tokens, away = token.hsm.directory / "tokens", token.hsm.directory / "tokens.away"
    tokens.rename(away)
    try:
        assert request() == P.PPS_ERR_CRYPTO, token_ca.log()
        assert request() == P.PPS_ERR_CRYPTO
    finally:
        away.rename(tokens)
    assert request() == P.PPS_OK, token_ca.log()
    assert token_ca.alive()
    log = token_ca.log()
    assert "PKCS#11 token \"web\"" in log and "session reopened" in log, log
    assert token.hsm.pin not in log


# --------------------------------------------------------------------------
# the sandbox of a ca with a module: what it adds, and what it does not
# --------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or SANITIZED, reason="the users and the seccomp filter need root "
                    "(and not `make asan`, whose children stay unfiltered)")
def test_a_token_cas_filter_adds_files_and_unix_sockets_only(start_daemon: StartDaemon, token: TokenKeys,
                                                             http_backend: HttpBackend) -> None:
    """A process set up as a token-backed ca (tests/test_sandbox.py's
    attacker, with pkcs11=True: ca user, no chroot, the wider filter):
    it may open files and make AF_UNIX sockets, which the module needs,
    and still no IPv4 socket, exec, fork, signal to another process,
    ptrace or prlimit."""
    import subprocess
    import sys

    from basics import REPO_ROOT
    from daemonctl import pyprivsep_env
    from test_sandbox import ATTACKER, SIGSYS

    # (the open as a module opens: Python's open() also asks isatty(), an
    # ioctl no ca may make)
    script = (ATTACKER.replace("privsep.drop_privileges(cfg, role)", "privsep.drop_privileges(cfg, role, chroot=False)")
              .replace("privsep.sandbox(role)", "privsep.sandbox(role, pkcs11=True)")
              .replace('open("/etc/passwd", "rb").close()', 'os.close(os.open("/etc/passwd", os.O_RDONLY))'))
    assert script.count("pkcs11=True") == 1 and script.count("chroot=False") == 1 and "os.O_RDONLY" in script
    daemon = start(start_daemon, token, http_backend)
    relay = daemon.relay_pids()[1]

    def attack(role: str, action: str, target: int) -> str:
        proc = subprocess.run([sys.executable, "-c", script, str(daemon.conf_path), role, "1", action, str(target)],
                              cwd=REPO_ROOT, env=pyprivsep_env(), capture_output=True, text=True, timeout=30)
        if proc.returncode == SIGSYS:
            return "SIGSYS"
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout.splitlines()[-1].removeprefix("result ")

    expected = {
        ("ca", "open", 0): "ok",                 # SoftHSM's files
        ("ca", "socket_unix", 0): "ok",          # p11-kit-client's server
        ("ca", "socket_inet", 0): "EACCES",
        ("ca", "execve", 0): "SIGSYS",
        ("ca", "fork", 0): "SIGSYS",
        ("ca", "sigkill", relay): "SIGSYS",
        ("ca", "ptrace", relay): "SIGSYS",
        ("ca", "prlimit", relay): "SIGSYS",
        ("keyservice", "socket_inet", 0): "EACCES",
        ("keyservice", "execve", 0): "SIGSYS",
        ("keyservice", "sigkill", relay): "SIGSYS",
    }
    got = {key: attack(*key) for key in expected}
    assert got == expected
    assert daemon.relay_pids()[1] == relay and _handshake_ok(daemon, token)
