"""OCSP stapling from a file (`tls certificate ... ocsp "file"`) and client
certificate verification (`tls client ca "file" [optional]`), against real
daemons with `openssl s_client -status` and `-cert`."""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backends import BACKEND_PAGE, HttpBackend
from basics import LOCALHOST, REPO_ROOT, free_port, wait_until
from daemonctl import Daemon, DaemonConfig, RelaySpec, StartDaemon, pyprivsep_env, run_pyprivsep
from keypairs import (
    Issuer,
    KeyPair,
    OcspStatus,
    Pki,
    make_issued_keypair,
    make_issuer,
    ocsp_response,
    ocsp_unsuccessful,
)
from pyprivsep import native
from pyprivsep.ctl import request as ctl_request
from tlsclients import HTTP_GET_ROOT, SClientResult, TlsVersion, s_client

VERSIONS: tuple[TlsVersion, ...] = ("1.2", "1.3")
NO_STAPLE = "OCSP response: no response sent"
STAPLED = "OCSP Response Status: successful"


@dataclass(frozen=True)
class TlsRelaySpec(RelaySpec):
    """A relay block whose keypairs may staple (keypair name -> response
    file) and which may verify client certificates."""

    ocsp: dict[str, Path] = field(default_factory=dict)
    client_ca: Path | None = None
    client_optional: bool = False

    def render(self) -> list[str]:
        lines = super().render()[:3]
        for kp in self.keypairs:
            line = f'    tls certificate "{kp.cert_path}" key "{kp.key_path}"'
            if kp.name in self.ocsp:
                line += f' ocsp "{self.ocsp[kp.name]}"'
            lines.append(line)
        if self.client_ca is not None:
            lines.append(f'    tls client ca "{self.client_ca}"' + (" optional" if self.client_optional else ""))
        return [*lines, "}"]


@dataclass(frozen=True)
class TlsConfig(DaemonConfig):
    """`log errors` on, and readiness probed on the first relay block only:
    a probe has no client certificate to give."""

    def render(self) -> str:
        return "log errors\n" + super().render()

    @property
    def probes(self) -> list[tuple[int, str]]:
        return super().probes[:1]


@dataclass(frozen=True)
class Certs:
    """A server CA with a leaf it issued (chain in the file), a second leaf,
    a client CA with a client certificate, and a client certificate from
    a CA nobody trusts."""

    directory: Path
    server_ca: Issuer
    www: KeyPair
    other: KeyPair
    client_ca: Issuer
    alice: KeyPair  # issued by client_ca
    stranger_ca: Issuer
    mallory: KeyPair  # issued by stranger_ca

    def ocsp_file(self, name: str, der: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(der)
        return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("ocspcc")
    server_ca, client_ca, stranger_ca = (make_issuer(d, n) for n in ("server", "client", "stranger"))
    return Certs(
        d,
        server_ca,
        make_issued_keypair(d, "www", server_ca),
        make_issued_keypair(d, "other", server_ca, key_name="p256"),
        client_ca,
        make_issued_keypair(d, "alice", client_ca, client=True, key_name="p256"),
        stranger_ca,
        make_issued_keypair(d, "mallory", stranger_ca, client=True, key_name="p256"),
    )


def with_cert(kp: KeyPair | None) -> list[str]:
    return [] if kp is None else ["-cert", str(kp.cert_path), "-key", str(kp.key_path)]


def status(port: int, name: str, version: TlsVersion | None = None) -> SClientResult:
    return s_client(port, servername=name, version=version, extra=["-status"])


def get(port: int, name: str, client: KeyPair | None, version: TlsVersion | None = None) -> SClientResult:
    """GET / through the relay, as `client` (None: no certificate)."""
    return s_client(port, servername=name, version=version, request=HTTP_GET_ROOT, extra=with_cert(client))


def served(result: SClientResult) -> bool:
    return "HTTP/1.0 200" in result.stdout and BACKEND_PAGE.decode() in result.stdout


def cert_status(result: SClientResult) -> str | None:
    match = re.search(r"^\s*Cert Status: (\w+)", result.stdout, re.M)
    return None if match is None else match[1]


def stapled_serial(result: SClientResult) -> int | None:
    match = re.search(r"^\s*Serial Number: ([0-9A-F]+)", result.stdout, re.M)
    return None if match is None else int(match[1], 16)


def conf_line(daemon: Daemon, needle: str) -> int:
    """The configuration line holding `needle`."""
    for n, line in enumerate(daemon.conf_path.read_text().splitlines(), 1):
        if needle in line:
            return n
    raise AssertionError(f"{needle!r} not in {daemon.conf_path}")


def reload(daemon: Daemon) -> None:
    """SIGHUP, then wait until no relay of the old generation is left."""
    old = {c.pid for c in daemon.processes("relay")}
    offset = len(daemon.stderr_text())
    os.kill(daemon.parent_pid, signal.SIGHUP)

    def replaced() -> bool:
        now = {c.pid for c in daemon.processes("relay")}
        return len(now) == daemon.config.expected_relays and not now & old

    wait_until(lambda: "reloaded: generation" in daemon.stderr_text()[offset:], 30,
               lambda: f"the reload\n{daemon.describe()}")
    wait_until(replaced, 30, lambda: f"the old relays to go\n{daemon.describe()}")


# -- one daemon: stapling and client certificates -------------------------


@dataclass(frozen=True)
class Env:
    daemon: Daemon
    plain: int  # self-signed rsa2048, nothing stapled, no client certificates
    staple: int  # www with its OCSP response, other without one
    required: int  # tls client ca (client CA)
    optional: int  # tls client ca ... optional


@pytest.fixture(scope="module")
def env(pki: Pki, certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    www_ocsp = certs.ocsp_file("www.ocsp", ocsp_response(certs.www.certificate, certs.server_ca))
    with HttpBackend() as http:
        relays = [
            TlsRelaySpec("plain", free_port(), http.port, [pki["rsa2048"]]),
            TlsRelaySpec("staple", free_port(), http.port, [certs.www, certs.other], ocsp={"www": www_ocsp}),
            TlsRelaySpec("required", free_port(), http.port, [certs.www], client_ca=certs.client_ca.cert_path),
            TlsRelaySpec("optional", free_port(), http.port, [certs.www], client_ca=certs.client_ca.cert_path,
                         client_optional=True),
        ]
        daemon = Daemon(tmp_path_factory.mktemp("ocspcc-daemon"), TlsConfig(relays, prefork=1))
        with daemon:
            daemon.start()
            yield Env(daemon, *(r.listen_port for r in relays))
            assert daemon.stop() == 0, daemon.describe()


@pytest.mark.parametrize("version", VERSIONS)
def test_staple_is_sent_when_the_client_asks(env: Env, certs: Certs, version: TlsVersion) -> None:
    result = status(env.staple, certs.www.dns_name, version)
    assert result.handshake_ok, result.describe()
    assert STAPLED in result.stdout, result.describe()
    assert cert_status(result) == "good", result.describe()
    assert stapled_serial(result) == certs.www.certificate.serial_number, result.describe()


@pytest.mark.parametrize("version", VERSIONS)
def test_no_staple_without_an_ocsp_file(env: Env, pki: Pki, certs: Certs, version: TlsVersion) -> None:
    # a relay with none, and a keypair with none beside one that staples
    # (chosen by SNI: the response is the certificate's, not the relay's)
    for port, name in ((env.plain, pki["rsa2048"].dns_name), (env.staple, certs.other.dns_name)):
        result = status(port, name, version)
        assert result.handshake_ok, result.describe()
        assert NO_STAPLE in result.stdout, result.describe()


@pytest.mark.parametrize("version", VERSIONS)
def test_required_client_certificate(env: Env, certs: Certs, version: TlsVersion) -> None:
    offset = len(env.daemon.stderr_text())
    trusted = get(env.required, certs.www.dns_name, certs.alice, version)
    assert served(trusted), trusted.describe()
    missing = get(env.required, certs.www.dns_name, None, version)
    assert not served(missing), missing.describe()
    untrusted = get(env.required, certs.www.dns_name, certs.mallory, version)
    assert not served(untrusted), untrusted.describe()
    # the relay says why (log errors), the verify error included (the
    # library's own reason differs: OpenSSL "certificate verify failed",
    # LibreSSL's TLS 1.2 "no certificate returned")
    untrusted_line = (r"relay required: .*handshake failed: .*\(client certificate: "
                      r"unable to get local issuer certificate\)")
    wait_until(lambda: re.search(untrusted_line, env.daemon.stderr_text()[offset:]), 10,
               lambda: env.daemon.describe())
    log = env.daemon.stderr_text()[offset:]
    assert re.search(r"relay required: .*handshake failed: .*peer did not return a certificate", log), log


@pytest.mark.parametrize("version", VERSIONS)
def test_optional_client_certificate(env: Env, certs: Certs, version: TlsVersion) -> None:
    without = get(env.optional, certs.www.dns_name, None, version)
    assert served(without), without.describe()
    trusted = get(env.optional, certs.www.dns_name, certs.alice, version)
    assert served(trusted), trusted.describe()
    # given, it is verified
    untrusted = get(env.optional, certs.www.dns_name, certs.mallory, version)
    assert not served(untrusted), untrusted.describe()


@pytest.mark.parametrize("version", [
    "1.2",
    pytest.param("1.3", marks=pytest.mark.skipif(
        native.library_version().startswith("LibreSSL"),
        reason="LibreSSL's TLS 1.3 server sends no certificate_authorities in its CertificateRequest")),
])
def test_client_ca_names_are_sent(env: Env, certs: Certs, version: TlsVersion) -> None:
    """The CertificateRequest names the configured CA, so a client with
    several certificates can pick; a relay without asks for none."""
    result = s_client(env.required, servername=certs.www.dns_name, version=version,
                      extra=with_cert(certs.alice))
    assert "Acceptable client certificate CA names" in result.stdout, result.describe()
    assert "CN = client test CA" in result.stdout, result.describe()
    plain = s_client(env.plain, servername="rsa2048.test", version=version)
    assert "No client certificate CA names sent" in plain.stdout, plain.describe()


def show_keys(daemon: Daemon) -> list[dict]:
    """`ctl show keys`: a dict per keypair of each relay."""
    keys = ctl_request(str(daemon.workdir / "ctl.sock"), ["show", "keys"])["keys"]
    assert isinstance(keys, list)
    return keys


def test_show_keys_says_what_is_stapled(env: Env, certs: Certs) -> None:
    keys = show_keys(env.daemon)
    www = [k for k in keys if k["relay"] == "staple" and k["subject"] == "CN=www.test"]
    assert len(www) == 1, keys
    ocsp = www[0]["ocsp"]
    assert ocsp["file"] == str(certs.directory / "www.ocsp") and ocsp["stapled"] is True, ocsp
    next_update = datetime.datetime.fromisoformat(ocsp["next_update"])
    assert abs((next_update - datetime.datetime.now(datetime.UTC)).total_seconds() - 24 * 3600) < 600, ocsp
    other = [k for k in keys if k["relay"] == "staple" and k["subject"] == "CN=other.test"]
    assert len(other) == 1 and other[0]["ocsp"] is None, keys
    human = run_pyprivsep("ctl", "-s", str(env.daemon.workdir / "ctl.sock"), "show", "keys")
    assert human.returncode == 0, human.stderr
    assert f"stapled until {ocsp['next_update']}" in human.stdout, human.stdout


# -- reload ------------------------------------------------------------------


def staple_daemon(start_daemon: StartDaemon, certs: Certs, http: HttpBackend, ocsp: Path) -> tuple[Daemon, int]:
    spec = TlsRelaySpec("www", free_port(), http.port, [certs.www], ocsp={"www": ocsp})
    return start_daemon(TlsConfig([spec], prefork=2)), spec.listen_port


def test_staple_is_replaced_after_the_file_changes_and_a_reload(
    start_daemon: StartDaemon, certs: Certs, http_backend: HttpBackend, tmp_path: Path
) -> None:
    ocsp = tmp_path / "www.ocsp"
    ocsp.write_bytes(ocsp_response(certs.www.certificate, certs.server_ca))
    daemon, port = staple_daemon(start_daemon, certs, http_backend, ocsp)
    assert cert_status(status(port, certs.www.dns_name)) == "good"
    ocsp.write_bytes(ocsp_response(certs.www.certificate, certs.server_ca, status=OcspStatus.REVOKED))
    # read at reload, not before
    assert cert_status(status(port, certs.www.dns_name)) == "good"
    reload(daemon)
    for _ in range(4):  # whichever relay takes the connection
        result = status(port, certs.www.dns_name)
        assert cert_status(result) == "revoked", result.describe()
    line = conf_line(daemon, 'ocsp "')
    assert f"{daemon.conf_path}:{line}: ocsp {ocsp}: the certificate is REVOKED" in daemon.stderr_text()


def test_reload_with_a_wrong_response_keeps_the_running_one(
    start_daemon: StartDaemon, certs: Certs, http_backend: HttpBackend, tmp_path: Path
) -> None:
    ocsp = tmp_path / "www.ocsp"
    ocsp.write_bytes(ocsp_response(certs.www.certificate, certs.server_ca))
    daemon, port = staple_daemon(start_daemon, certs, http_backend, ocsp)
    relays = {c.pid for c in daemon.processes("relay")}
    ocsp.write_bytes(ocsp_response(certs.other.certificate, certs.server_ca))  # another certificate's
    offset = len(daemon.stderr_text())
    os.kill(daemon.parent_pid, signal.SIGHUP)
    line = conf_line(daemon, 'ocsp "')
    wait_until(lambda: "reload failed" in daemon.stderr_text()[offset:], 30, daemon.describe)
    log = daemon.stderr_text()[offset:]
    assert f"{daemon.conf_path}:{line}: ocsp {ocsp}: not for certificate {certs.www.cert_path}" in log, log
    assert {c.pid for c in daemon.processes("relay")} == relays
    result = status(port, certs.www.dns_name)
    assert cert_status(result) == "good", result.describe()
    assert stapled_serial(result) == certs.www.certificate.serial_number, result.describe()


def test_client_ca_is_read_again_at_reload(
    start_daemon: StartDaemon, certs: Certs, http_backend: HttpBackend, tmp_path: Path
) -> None:
    ca_file = tmp_path / "clients.pem"
    ca_file.write_bytes(certs.client_ca.cert_path.read_bytes())
    spec = TlsRelaySpec("www", free_port(), http_backend.port, [certs.www], client_ca=ca_file)
    daemon = start_daemon(TlsConfig([spec], prefork=2))
    name, port = certs.www.dns_name, spec.listen_port
    assert served(get(port, name, certs.alice))
    assert not served(get(port, name, certs.mallory))
    # a session alice made resumes without her certificate, until ...
    session = tmp_path / "alice.session"
    first = s_client(port, servername=name, version="1.2", request=HTTP_GET_ROOT, sess_out=session,
                     extra=with_cert(certs.alice))
    assert served(first) and first.reused is False, first.describe()
    again = s_client(port, servername=name, version="1.2", request=HTTP_GET_ROOT, sess_in=session)
    assert served(again) and again.reused is True, again.describe()
    ca_file.write_bytes(certs.stranger_ca.cert_path.read_bytes())
    reload(daemon)
    for _ in range(3):
        result = get(port, name, certs.mallory)
        assert served(result), result.describe()
        result = get(port, name, certs.alice)
        assert not served(result), result.describe()
    # ... the CAs change: the same ticket keys open it, but it no longer resumes
    stale = s_client(port, servername=name, version="1.2", request=HTTP_GET_ROOT, sess_in=session)
    assert stale.reused is not True and not served(stale), stale.describe()


# -- out-of-date responses: logged, not stapled --------------------------------


def test_an_expired_response_is_not_stapled(
    start_daemon: StartDaemon, certs: Certs, http_backend: HttpBackend, tmp_path: Path
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ocsp = tmp_path / "www.ocsp"
    ocsp.write_bytes(ocsp_response(certs.www.certificate, certs.server_ca,
                                   this_update=now - datetime.timedelta(days=2),
                                   next_update=now - datetime.timedelta(days=1)))
    daemon, port = staple_daemon(start_daemon, certs, http_backend, ocsp)
    line = conf_line(daemon, 'ocsp "')
    assert f"{daemon.conf_path}:{line}: ocsp {ocsp}: expired at" in daemon.stderr_text(), daemon.describe()
    for version in VERSIONS:
        result = status(port, certs.www.dns_name, version)
        assert result.handshake_ok and NO_STAPLE in result.stdout, result.describe()
    [entry] = show_keys(daemon)
    assert entry["ocsp"]["stapled"] is False and entry["ocsp"]["file"] == str(ocsp), entry
    # -n says so too, and passes
    check = run_pyprivsep("-n", "-f", str(daemon.conf_path))
    assert check.returncode == 0, check.stderr
    assert f"{daemon.conf_path}:{line}: ocsp {ocsp}: expired at" in check.stderr


def test_a_response_is_not_stapled_past_its_next_update(
    start_daemon: StartDaemon, certs: Certs, http_backend: HttpBackend, tmp_path: Path
) -> None:
    until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=20)
    ocsp = tmp_path / "www.ocsp"
    ocsp.write_bytes(ocsp_response(certs.www.certificate, certs.server_ca, next_update=until))
    spec = TlsRelaySpec("www", free_port(), http_backend.port, [certs.www], ocsp={"www": ocsp})
    daemon = start_daemon(TlsConfig([spec], prefork=1))
    result = status(spec.listen_port, certs.www.dns_name)
    assert STAPLED in result.stdout, result.describe()
    time.sleep(max((until - datetime.datetime.now(datetime.UTC)).total_seconds() + 1, 0))
    result = status(spec.listen_port, certs.www.dns_name)
    assert result.handshake_ok and NO_STAPLE in result.stdout, result.describe()
    # logged by the relay when it first finds the response stale; on a
    # loaded machine that line can come a while after the handshake
    wait_until(lambda: "past its nextUpdate: not stapled" in daemon.stderr_text(), 30, daemon.describe)


# -- pyprivsep -n: what is refused, with the file and line --------------------


def check_conf(tmp_path: Path, relay_lines: Sequence[str]) -> tuple[Path, subprocess.CompletedProcess[str]]:
    conf = tmp_path / "check.conf"
    conf.write_text("\n".join([
        f'socket "{tmp_path / "ctl.sock"}"',
        'relay "www" {',
        f"    listen on {LOCALHOST} port {free_port()} tls",
        f"    forward to {LOCALHOST} port 8080",
        *relay_lines,
        "}",
    ]) + "\n")
    return conf, run_pyprivsep("-n", "-f", str(conf))


def test_check_accepts_a_good_response_and_client_ca(certs: Certs, tmp_path: Path) -> None:
    ocsp = certs.ocsp_file("good.ocsp", ocsp_response(certs.www.certificate, certs.server_ca))
    conf, proc = check_conf(tmp_path, [
        f'    tls certificate "{certs.www.cert_path}" key "{certs.www.key_path}" ocsp "{ocsp}"',
        f'    tls client ca "{certs.client_ca.cert_path}" optional',
    ])
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stderr


BAD_OCSP = {
    "garbage": (lambda c: b"not an OCSP response", "not a DER OCSP response"),
    "unsuccessful": (lambda c: ocsp_unsuccessful(), "response status try_later: nothing to staple"),
    "other-certificate": (lambda c: ocsp_response(c.other.certificate, c.server_ca), "not for certificate"),
    # the same serial from another CA: the issuer hashes differ
    "other-issuer": (lambda c: ocsp_response(c.www.certificate, c.stranger_ca), "not for certificate"),
    "too-big": (lambda c: b"\0" * 70000, "more than 65536 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_OCSP))
def test_check_refuses_a_wrong_response(certs: Certs, tmp_path: Path, case: str) -> None:
    make, message = BAD_OCSP[case]
    ocsp = tmp_path / "bad.ocsp"
    ocsp.write_bytes(make(certs))
    conf, proc = check_conf(tmp_path, [
        f'    tls certificate "{certs.www.cert_path}" key "{certs.www.key_path}" ocsp "{ocsp}"'])
    assert proc.returncode == 1, proc.stderr
    assert f"{conf}:5: ocsp {ocsp}: {message}" in proc.stderr, proc.stderr


def test_check_refuses_a_missing_response_file(certs: Certs, tmp_path: Path) -> None:
    conf, proc = check_conf(tmp_path, [
        f'    tls certificate "{certs.www.cert_path}" key "{certs.www.key_path}" ocsp "nope.ocsp"'])
    assert proc.returncode == 1, proc.stderr
    assert f"{conf}:5: ocsp {tmp_path / 'nope.ocsp'}: cannot read: No such file or directory" in proc.stderr


@pytest.mark.parametrize("content, message", [
    (None, "cannot read: No such file or directory"),
    (b"just text\n", "no PEM certificate in it"),
])
def test_check_refuses_a_bad_client_ca_file(
    certs: Certs, tmp_path: Path, content: bytes | None, message: str
) -> None:
    ca_file = tmp_path / "clients.pem"
    if content is not None:
        ca_file.write_bytes(content)
    conf, proc = check_conf(tmp_path, [
        f'    tls certificate "{certs.www.cert_path}" key "{certs.www.key_path}"',
        f'    tls client ca "{ca_file}"'])
    assert proc.returncode == 1, proc.stderr
    assert f"{conf}:6: tls client ca {ca_file}: {message}" in proc.stderr, proc.stderr


# The relay checks the response again in C (d2i_OCSP_RESPONSE and the cert
# id against the chain), whatever the parent passed: run in a child, since
# engine_init takes over SIGTERM.
C_CHECK = """
import sys
from pathlib import Path
from pyprivsep import native
chain, key, der = (Path(p).read_bytes() for p in sys.argv[1:4])
native.engine_init(id=0, ca_fd=-1, ctl_fd=-1, max_conns=10, handshake_timeout=5,
                   keyops_async=False, log_conn=False, log_errors=False, ticket_lifetime=7200,
                   use_syslog=False, verbose=False)
rid = native.relay_new("c", None, 1000, 60)
native.relay_keypair(rid, chain, bytes(32), key)
try:
    native.relay_ocsp(rid, der, 0, 0)
except native.NativeError as e:
    print(e)
    sys.exit(1)
print("accepted")
"""


@pytest.mark.parametrize("case, expected", [
    ("good", "accepted"),
    ("other-certificate", "not a response for this certificate"),
    ("other-issuer", "not a response for this certificate"),
    ("unsuccessful", "response status trylater: nothing to staple"),
    ("garbage", "not a DER OCSP response"),
])
def test_the_relay_checks_the_response_itself(certs: Certs, tmp_path: Path, case: str, expected: str) -> None:
    der = {
        "good": lambda: ocsp_response(certs.www.certificate, certs.server_ca),
        "other-certificate": lambda: ocsp_response(certs.other.certificate, certs.server_ca),
        "other-issuer": lambda: ocsp_response(certs.www.certificate, certs.stranger_ca),
        "unsuccessful": ocsp_unsuccessful,
        "garbage": lambda: b"not an OCSP response",
    }[case]()
    path = tmp_path / "r.ocsp"
    path.write_bytes(der)
    proc = subprocess.run(
        [sys.executable, "-c", C_CHECK, str(certs.www.cert_path), str(certs.www.key_path), str(path)],
        cwd=REPO_ROOT, env=pyprivsep_env(), capture_output=True, text=True, timeout=30,
    )
    assert expected in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == (0 if case == "good" else 1), proc.stdout + proc.stderr
