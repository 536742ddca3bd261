"""A backend that expects a PROXY protocol header (v1 or v2) first, parses
it strictly, and tells its client what it found.

Written from HAProxy's proxy-protocol.txt, independently of the relay's C
(src/_rsaengine/proxy.c), so that the two check each other.  Per
connection: the header, then one line of the client's; the answer is one
JSON line, ``{"version": 2, "src": [addr, port], "dst": [addr, port],
"tlvs": {...}, "line": "..."}``, and the connection closes; after the
line ``ECHO`` it echoes every byte that follows instead, until EOF.  A header that
breaks any rule of the format is answered ``ERROR <why>`` and closed;
every result (a dict or the error string) is kept in ``results``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import socketserver
import struct
import threading
from typing import Any

from backends import BackgroundServer
from basics import LOCALHOST

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the whole line, CRLF included
LINE_MAX = 4096  # the client's line after the header

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01

_PORT = re.compile(r"(0|[1-9][0-9]{0,4})\Z")


class Malformed(Exception):
    pass


class _Reader:
    """Exact reads from a socket; what is read past the header stays here."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Malformed("connection closed inside the header")
        self.buf += chunk

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def line(self, limit: int) -> bytes:
        """Up to and including CRLF (or LF for the client's line)."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                if end + 1 > limit:
                    raise Malformed(f"line longer than {limit} bytes")
                data, self.buf = self.buf[: end + 1], self.buf[end + 1 :]
                return data
            if len(self.buf) >= limit:
                raise Malformed(f"no end of line in {limit} bytes")
            self.fill()


def _port(text: str) -> int:
    if not _PORT.match(text) or int(text) > 65535:
        raise Malformed(f"bad port {text!r}")
    return int(text)


def _address(text: str, family: str) -> str:
    try:
        addr = ipaddress.IPv4Address(text) if family == "TCP4" else ipaddress.IPv6Address(text)
    except ValueError:
        raise Malformed(f"bad {family} address {text!r}") from None
    if family == "TCP4" and str(addr) != text:  # no leading zeros and the like
        raise Malformed(f"non-canonical address {text!r}")
    return str(addr)


def parse_v1(reader: _Reader) -> dict[str, Any]:
    raw = reader.line(V1_MAX)
    if not raw.endswith(b"\r\n"):
        raise Malformed("v1 line does not end in CRLF")
    try:
        line = raw[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise Malformed("v1 line is not ASCII") from None
    fields = line.split(" ")
    if fields[0] != "PROXY" or len(fields) < 2:
        raise Malformed(f"not a v1 header: {line!r}")
    if fields[1] == "UNKNOWN":
        return {"version": 1, "family": "UNKNOWN"}
    if fields[1] not in ("TCP4", "TCP6") or len(fields) != 6:
        raise Malformed(f"bad v1 header: {line!r}")
    family = fields[1]
    return {
        "version": 1,
        "family": family,
        "src": [_address(fields[2], family), _port(fields[4])],
        "dst": [_address(fields[3], family), _port(fields[5])],
    }


def _tlvs(data: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off < len(data):
        if len(data) - off < 3:
            raise Malformed("truncated TLV header")
        kind, length = data[off], struct.unpack_from("!H", data, off + 1)[0]
        if len(data) - off - 3 < length:
            raise Malformed(f"TLV 0x{kind:02x} of {length} bytes overruns the header")
        out.append((kind, data[off + 3 : off + 3 + length]))
        off += 3 + length
    return out


def _ssl_tlv(value: bytes) -> dict[str, Any]:
    if len(value) < 5:
        raise Malformed("PP2_TYPE_SSL shorter than 5 bytes")
    client, verify = value[0], struct.unpack_from("!I", value, 1)[0]
    ssl: dict[str, Any] = {"client": client, "verify": verify}
    for kind, sub in _tlvs(value[5:]):
        name = {PP2_SUBTYPE_SSL_VERSION: "version", PP2_SUBTYPE_SSL_CIPHER: "cipher"}.get(kind)
        if name is None:
            raise Malformed(f"unknown PP2_TYPE_SSL sub-TLV 0x{kind:02x}")
        if name in ssl:
            raise Malformed(f"PP2_TYPE_SSL sub-TLV {name} twice")
        ssl[name] = sub.decode("ascii")
    return ssl


def parse_v2(reader: _Reader) -> dict[str, Any]:
    head = reader.exact(16)
    if head[:12] != V2_SIGNATURE:
        raise Malformed("bad v2 signature")
    ver_cmd, fam, length = head[12], head[13], struct.unpack_from("!H", head, 14)[0]
    if ver_cmd >> 4 != 2:
        raise Malformed(f"v2 version {ver_cmd >> 4}")
    if ver_cmd & 0xF not in (0, 1):
        raise Malformed(f"v2 command {ver_cmd & 0xF}")
    body = reader.exact(length)
    result: dict[str, Any] = {"version": 2, "command": "PROXY" if ver_cmd & 0xF else "LOCAL"}
    if fam == 0x11:
        if length < 12:
            raise Malformed("v2 TCP4 shorter than its addresses")
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack_from("!HH", body, 8)
        result.update(family="TCP4", src=[str(src), sport], dst=[str(dst), dport])
        rest = body[12:]
    elif fam == 0x21:
        if length < 36:
            raise Malformed("v2 TCP6 shorter than its addresses")
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack_from("!HH", body, 32)
        result.update(family="TCP6", src=[str(src), sport], dst=[str(dst), dport])
        rest = body[36:]
    elif fam == 0x00:
        result.update(family="UNSPEC")
        rest = body
    else:
        raise Malformed(f"v2 family/transport 0x{fam:02x}")
    tlvs: dict[str, Any] = {}
    for kind, value in _tlvs(rest):
        if kind == PP2_TYPE_ALPN:
            name: str = "alpn"
            parsed: Any = value.decode("ascii")
            if not parsed:
                raise Malformed("empty ALPN TLV")
        elif kind == PP2_TYPE_AUTHORITY:
            name, parsed = "authority", value.decode("ascii")
        elif kind == PP2_TYPE_SSL:
            name, parsed = "ssl", _ssl_tlv(value)
        else:
            name, parsed = f"0x{kind:02x}", value.hex()
        if name in tlvs:
            raise Malformed(f"TLV {name} twice")
        tlvs[name] = parsed
    result["tlvs"] = tlvs
    return result


def parse_header(reader: _Reader) -> dict[str, Any]:
    while not reader.buf:
        reader.fill()
    if reader.buf[:1] == b"P":
        return parse_v1(reader)
    if reader.buf[:1] == b"\r":
        return parse_v2(reader)
    raise Malformed(f"no PROXY header: starts with {reader.buf[:16]!r}")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        self.results: list[dict[str, Any] | str] = []
        self.lock = threading.Lock()
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        reader = _Reader(self.request)
        try:
            result: dict[str, Any] | str = parse_header(reader)
            line = reader.line(LINE_MAX).decode(errors="replace").rstrip("\r\n")
            assert isinstance(result, dict)
            result["line"] = line
            answer = json.dumps(result) + "\n"
        except Malformed as e:
            result = f"ERROR {e}"
            answer = result + "\n"
        except OSError:
            return
        with self.server.lock:
            self.server.results.append(result)
        try:
            self.request.sendall(answer.encode())
            if isinstance(result, dict) and result["line"] == "ECHO":
                if reader.buf:
                    self.request.sendall(reader.buf)
                while chunk := self.request.recv(256 * 1024):
                    self.request.sendall(chunk)
        except OSError:
            pass


class ProxyBackend(BackgroundServer):
    """The PROXY-parsing backend on loopback (host "::1" for IPv6)."""

    def __init__(self, host: str = LOCALHOST) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._srv = _Server((host, 0), family)
        super().__init__(self._srv)

    @property
    def results(self) -> list[dict[str, Any] | str]:
        with self._srv.lock:
            return list(self._srv.results)
