"""TLS clients to talk to the relays: Python ssl (handshakes, HTTPS GET,
echo round trips), ``openssl s_client`` / ``s_time`` and curl."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509

from basics import LOCALHOST
from pyprivsep import native

HTTP_GET_ROOT = b"GET / HTTP/1.0\r\n\r\n"

TlsVersion = Literal["1.2", "1.3"]

# LibreSSL's TLS 1.3 server sends no NewSessionTicket (LibreSSL has no TLS 1.3
# resumption): there only TLS 1.2 sessions resume.
TLS13_RESUMES = not native.library_version().startswith("LibreSSL")
NO_TLS13_RESUMPTION = "LibreSSL's TLS 1.3 server issues no session tickets, so TLS 1.3 sessions never resume"


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
