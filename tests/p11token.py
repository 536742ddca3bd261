"""A SoftHSM2 token made for a test, and a p11-kit server in front of it.

``make_token`` makes a token directory of its own (SOFTHSM2_CONF names it:
the machine's /etc/softhsm and /var/lib/softhsm are never touched), puts
keys in it -- imported from a key the test made (``softhsm2-util
--import``: the test knows its primes, to scan memory for them) or
generated in the token as sensitive and not extractable (``pkcs11-tool
--keypairgen``: nobody knows them) -- and gives each a certificate from a
test issuer.  The token directory belongs to the cas' user, which opens it
after dropping privileges.
"""

from __future__ import annotations

import datetime
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from basics import LOCALHOST, wait_until
from keypairs import Issuer, KeyPair, key_secrets, make_issuer, new_private_key

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
P11KIT_CLIENT = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
CA_USER = "_pyprivsep_ca"  # the daemon's default `ca user`
TOKEN = "web"
PIN = "4711-0815"
SO_PIN = "12345678"


def missing_tools() -> str | None:
    """Why the PKCS#11 tests cannot run here, or None."""
    for path in (SOFTHSM_MODULE, P11KIT_CLIENT):
        if not path.exists():
            return f"{path} is missing (make testdeps: softhsm2, p11-kit-modules)"
    for tool in ("softhsm2-util", "pkcs11-tool", "p11-kit"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (make testdeps)"
    return None


@dataclass
class Token:
    directory: Path  # the token's own: conf, tokens/, PIN file
    conf: Path
    pin_file: Path
    issuer: Issuer
    keys: dict[str, KeyPair] = field(default_factory=dict)  # name -> keypair, key_path the URI

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def tool(self, *args: str, module: Path = SOFTHSM_MODULE) -> str:
        """pkcs11-tool on the token, logged in; its output."""
        proc = subprocess.run(
            ["pkcs11-tool", "--module", str(module), "--token-label", TOKEN, "--login", "--pin", PIN, *args],
            env=self.env(), capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"pkcs11-tool {args}: {proc.stdout}{proc.stderr}"
        return proc.stdout + proc.stderr

    def pkcs11_line(self, *, module: Path = SOFTHSM_MODULE, server: Path | None = None) -> str:
        line = f'pkcs11 module "{module}" pin "file:{self.pin_file}"'
        if server is not None:
            line += f' server "unix:path={server}"'
        return line

    def give_to_ca_user(self) -> None:
        """The token's files to the cas' user (after every change as root)."""
        if os.geteuid() != 0:
            return
        pw = pwd.getpwnam(CA_USER)
        tokens = self.directory / "tokens"
        for root, dirs, files in os.walk(tokens):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
        os.chown(tokens, pw.pw_uid, pw.pw_gid)


def _uri(name: str, key_id: int) -> str:
    return f"pkcs11:token={TOKEN};object={name};id=%{key_id:02x};type=private"


def _certificate(token: Token, name: str, public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> tuple[x509.Certificate, Path]:
    dns_name = f"{name}.test"
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName(dns_name), x509.DNSName("localhost"), x509.IPAddress(IPv4Address(LOCALHOST))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(token.issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(token.issuer.key, hashes.SHA256())
    )
    path = token.directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                     + token.issuer.certificate.public_bytes(serialization.Encoding.PEM))
    return cert, path


def import_key(token: Token, name: str, key_id: int, kind: str) -> KeyPair:
    """A key the test makes (kind: rsa2048, p256), imported into the token;
    the PEM the import read is deleted right after."""
    key = new_private_key(kind)
    pem = token.directory / f"{name}.import.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    proc = subprocess.run(
        ["softhsm2-util", "--import", str(pem), "--token", TOKEN, "--label", name,
         "--id", f"{key_id:02x}", "--pin", PIN],
        env=token.env(), capture_output=True, text=True, timeout=120, check=False)
    pem.unlink()
    assert proc.returncode == 0, f"softhsm2-util --import: {proc.stdout}{proc.stderr}"
    cert, cert_path = _certificate(token, name, key.public_key())
    kp = KeyPair(name, f"{name}.test", cert_path, Path(_uri(name, key_id)), cert, key_secrets(key))
    token.keys[name] = kp
    return kp


def generate_key(token: Token, name: str, key_id: int, key_type: str, *, always_auth: bool = False) -> KeyPair:
    """A key made in the token (key_type: rsa:2048, EC:prime256v1), sensitive
    and not extractable (with always_auth: CKA_ALWAYS_AUTHENTICATE, a PIN
    for each signature); its certificate is made for the public key read
    back from the token."""
    token.tool("--keypairgen", "--key-type", key_type, "--label", name, "--id", f"{key_id:02x}",
               "--usage-sign", "--sensitive", *(["--always-auth"] if always_auth else []))
    der = token.directory / f"{name}.pub.der"
    token.tool("--read-object", "--type", "pubkey", "--id", f"{key_id:02x}", "-o", str(der))
    public = serialization.load_der_public_key(der.read_bytes())
    assert isinstance(public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey))
    cert, cert_path = _certificate(token, name, public)
    kp = KeyPair(name, f"{name}.test", cert_path, Path(_uri(name, key_id)), cert, {})
    token.keys[name] = kp
    return kp


def make_token(directory: Path) -> Token:
    """An initialised token "web" in directory (mode 0755: the cas' user
    reaches its tokens/), with the PIN in a 0600 file."""
    directory.chmod(0o755)
    tokens = directory / "tokens"
    tokens.mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    pin_file = directory / "token.pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    token = Token(directory, conf, pin_file, make_issuer(directory, "p11"))
    proc = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN],
        env=token.env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"softhsm2-util --init-token: {proc.stdout}{proc.stderr}"
    return token


def token_directory() -> Path:
    """Under /tmp, not pytest's 0700 tmp tree: the cas' user must reach it."""
    return Path(tempfile.mkdtemp(prefix="pps-p11-", dir="/tmp"))


class P11KitServer:
    """``p11-kit server`` exporting the token on a UNIX socket, for the cas'
    user only; it forks a p11-kit-remote per connection, in its process
    group, so ``stop`` ends the lot (an outage, not a restart)."""

    def __init__(self, token: Token, socket_path: Path) -> None:
        self.token = token
        self.socket_path = socket_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> P11KitServer:
        self.socket_path.unlink(missing_ok=True)
        user = ["-u", CA_USER] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            ["p11-kit", "server", "--provider", str(SOFTHSM_MODULE), "-n", str(self.socket_path), *user,
             "-f", f"pkcs11:token={TOKEN}"],
            env=self.token.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: self.socket_path.exists() and self._accepts(), 30.0,
                   f"p11-kit server to listen on {self.socket_path}", interval=0.05)
        if os.geteuid() == 0:
            # p11-kit server makes its socket 0711 root: connect(2) needs write
            pw = pwd.getpwnam(CA_USER)
            os.chown(self.socket_path, pw.pw_uid, pw.pw_gid)
        return self

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """SIGKILL the server and every p11-kit-remote it forked."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        # the remotes (same process group) die with it; wait until none is left
        wait_until(lambda: not _group_alive(self.proc.pid), 30.0,
                   "p11-kit-remote processes to exit", interval=0.05)
        self.proc = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def iter_files(directory: Path) -> Iterator[Path]:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            yield Path(root, name)
