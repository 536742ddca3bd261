"""`make run`: a demo certificate, a small HTTP backend and the relay.

The certificate (demo/server.crt, its key demo/server.key) is a leaf
signed by a CA made for it whose key is thrown away; demo/ca.crt is what
clients trust.

    python -m pyprivsep.demo            # what `make run` does
    python -m pyprivsep.demo backend PORT

The backend serves `/` (a short page), `/bytes/N` (N bytes, for
downloads) and echoes a POST to `/echo`.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "demo")
CHUNK = 65536


class Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pyprivsep-demo-backend"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_body(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_GET(self) -> None:
        if self.path.startswith("/bytes/") and self.path[7:].isdigit():
            n = int(self.path[7:])
            self.send_body(n)
            block = b"x" * CHUNK
            while n > 0:
                self.wfile.write(block[:min(n, CHUNK)])
                n -= CHUNK
            return
        body = b"hello from the pyprivsep demo backend\n"
        self.send_body(len(body))
        self.wfile.write(body)

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        self.send_body(n)
        while n > 0:
            data = self.rfile.read(min(n, CHUNK))
            if not data:
                break
            self.wfile.write(data)
            n -= len(data)


def serve_backend(port: int) -> None:
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Backend).serve_forever()


# What users are told to trust (`curl --cacert demo/ca.crt`): the demo CA,
# never the server's own certificate.
CA_FILE = "ca.crt"


def _no_usage_but(**usage: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(("digital_signature", "content_commitment",
                           "key_encipherment", "data_encipherment",
                           "key_agreement", "key_cert_sign", "crl_sign",
                           "encipher_only", "decipher_only"), False)
    flags.update(usage)
    return x509.KeyUsage(**flags)


def leaf_certificate(key: "rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey",
                     days: int = 365) -> tuple[x509.Certificate, x509.Certificate]:
    """A server certificate for localhost and 127.0.0.1 (the demo's, the
    benchmark's) and the CA certificate that signed it: (leaf, ca).

    The leaf is no CA (CA:FALSE, digitalSignature, serverAuth), because the
    relays' key operations can be made to sign what a client chooses: were
    the server key a CA key, that would mint certificates.  The CA's key
    exists only inside this call, so nothing can sign under the CA again;
    whoever trusts ca.crt trusts this one leaf."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pyprivsep demo"),
        x509.NameAttribute(NameOID.COMMON_NAME,
                           f"pyprivsep demo CA {os.urandom(4).hex()}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
          .add_extension(_no_usage_but(key_cert_sign=True, crl_sign=True), True)
          .add_extension(ca_ski, False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(_no_usage_but(digital_signature=True), True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                key.public_key()), False)
            .add_extension(x509.AuthorityKeyIdentifier
                           .from_issuer_subject_key_identifier(ca_ski), False)
            .sign(ca_key, hashes.SHA256()))
    return leaf, ca


def key_pem(key: "rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey") -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_key(path: str, key: "rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey") -> None:
    """The key file, 0600 from its creation: pyprivsep refuses any other."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)    # an older file keeps its mode
        f.write(key_pem(key))


def _is_leaf(crt: str) -> bool:
    """Whether crt is a certificate of this demo's kind (an older demo made
    a self-signed CA certificate, which pyprivsep now refuses)."""
    try:
        with open(crt, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        return not cert.extensions.get_extension_for_class(
            x509.BasicConstraints).value.ca
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False


def make_cert(directory: str, name: str = "server") -> None:
    """An RSA-2048 server certificate for localhost and 127.0.0.1 (NAME.crt,
    NAME.key) and the CA that signed it (ca.crt), unless they exist."""
    crt = os.path.join(directory, f"{name}.crt")
    key_path = os.path.join(directory, f"{name}.key")
    ca_path = os.path.join(directory, CA_FILE)
    if os.path.exists(key_path) and os.path.exists(ca_path) and _is_leaf(crt):
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf, ca = leaf_certificate(key)
    write_key(key_path, key)
    with open(crt, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(ca_path, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))


def run_demo() -> int:
    make_cert(DEMO_DIR)
    conf = os.path.join(DEMO_DIR, "pyprivsep.conf")
    backend = subprocess.Popen([sys.executable, "-m", "pyprivsep.demo",
                                "backend", "8080"])
    print("""
pyprivsep demo: https://127.0.0.1:8443/ -> backend http://127.0.0.1:8080/
  curl --cacert demo/ca.crt https://localhost:8443/
  curl --cacert demo/ca.crt -o /dev/null https://localhost:8443/bytes/10485760
  openssl s_time -connect 127.0.0.1:8443 -new -time 10
  openssl s_time -connect 127.0.0.1:8443 -reuse -time 10
  ps -eo pid,user:14,args | grep '[p]yprivsep:'     # parent, relays, cas
Ctrl-C stops everything.
""", flush=True)
    # SIGTERM and SIGHUP (a closed terminal, `timeout make run`) stop
    # everything as Ctrl-C does, rather than orphaning the daemon
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    relay = subprocess.Popen([sys.executable, "-m", "pyprivsep", "-d", "-f", conf])
    try:
        return relay.wait()
    except KeyboardInterrupt:
        relay.send_signal(signal.SIGINT)
        return relay.wait()
    finally:
        backend.terminate()
        backend.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["backend"]:
        try:
            serve_backend(int(sys.argv[2]))
        except KeyboardInterrupt:
            pass
    else:
        sys.exit(run_demo())
