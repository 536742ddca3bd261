"""`make run`: a demo certificate, a small HTTP backend and the relay.

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
from cryptography.x509.oid import NameOID

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


def self_signed(key: "rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey",
                days: int = 365) -> x509.Certificate:
    """A self-signed certificate for localhost and 127.0.0.1 (the demo's,
    the benchmark's)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))


def key_pem(key: "rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey") -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_cert(directory: str, name: str = "server") -> None:
    """A self-signed RSA-2048 certificate for localhost and 127.0.0.1."""
    crt = os.path.join(directory, f"{name}.crt")
    key_path = os.path.join(directory, f"{name}.key")
    if os.path.exists(crt) and os.path.exists(key_path):
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem(key))
    with open(crt, "wb") as f:
        f.write(self_signed(key).public_bytes(serialization.Encoding.PEM))


def run_demo() -> int:
    make_cert(DEMO_DIR)
    conf = os.path.join(DEMO_DIR, "pyprivsep.conf")
    backend = subprocess.Popen([sys.executable, "-m", "pyprivsep.demo",
                                "backend", "8080"])
    print("""
pyprivsep demo: https://127.0.0.1:8443/ -> backend http://127.0.0.1:8080/
  curl --cacert demo/server.crt https://localhost:8443/
  curl --cacert demo/server.crt -o /dev/null https://localhost:8443/bytes/10485760
  openssl s_time -connect 127.0.0.1:8443 -new -time 10
  openssl s_time -connect 127.0.0.1:8443 -reuse -time 10
  ps -o pid,user,args -C python3 | grep pyprivsep   # parent, relays, cas
Ctrl-C stops everything.
""", flush=True)
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
