"""`tls ticket keys "file"`: session-ticket keys shared by a fleet.

The file is haproxy's `tls-ticket-keys` format: one key per line, each
line the base64 (RFC 4648, padded) of 80 bytes laid out as haproxy's
struct tls_sess_key_256:

    bytes  0..15   key name (sent in clear at the head of each ticket)
    bytes 16..47   AES-256-CBC key
    bytes 48..79   HMAC-SHA256 key

Blank lines and lines starting with "#" are skipped.  Unlike haproxy,
which seals with the second-to-last line, the FIRST key seals new tickets
and every key opens them (the order nginx gives its
`ssl_session_ticket_key` files): prepend a new key to rotate, drop the
last one to retire it.

A file of exactly 80 bytes that is not text is nginx's
`ssl_session_ticket_key` file instead (`openssl rand 80 > file`): one key,
raw, laid out name, HMAC, AES.  nginx's 48-byte files hold an AES-128 key,
which the relays' AES-256 tickets cannot use: refused, saying so.

Several `tls ticket keys` lines (nginx's several `ssl_session_ticket_key`
lines) read their files in order: the first file's first key seals.

The relays hold keys as name, HMAC, AES (protocol.h, struct ticket_key in
tls.c); wire_order() maps haproxy's layout onto it.  No key byte is ever
put in a log line or an error message.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat

from pyprivsep.config import ConfigError, Where
from pyprivsep.keys import _user
from pyprivsep.native import P

KEY_LEN = 80
NAME, AES, HMAC = slice(0, 16), slice(16, 48), slice(48, 80)
NGINX_AES128_LEN = 48
TEXT = frozenset(range(0x20, 0x7f)) | frozenset(b"\t\r\n")


def wire_order(key: bytes) -> bytes:
    """haproxy's name|aes|hmac -> the relays' name|hmac|aes."""
    return key[NAME] + key[HMAC] + key[AES]


def read_ticket_keys(path: str, where: Where) -> list[bytes]:
    """The keys of `path`, first (sealing) key first, in the relays'
    layout; ConfigError at the directive's file:line, naming the key file
    (and its line) for anything wrong."""
    def refuse(msg: str, line: int = 0) -> ConfigError:
        at = f"{path}:{line}" if line else path
        return ConfigError(where.file, where.line, f"tls ticket keys {at}: {msg}")

    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())       # what was opened
            if not stat.S_ISREG(st.st_mode):
                raise refuse("not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise refuse(f"mode {mode:04o} lets group or others read or "
                             "write the ticket keys; chmod 600 it")
            me = os.geteuid()
            if st.st_uid not in (0, me):
                raise refuse(f"owned by {_user(st.st_uid)}, not by root or "
                             f"{_user(me)}, who runs pyprivsep")
            data = f.read(64 * 1024 + 1)
    except OSError as e:
        raise refuse(f"cannot read: {e.strerror}") from None
    if len(data) > 64 * 1024:
        raise refuse("larger than 64 KiB: not a ticket key file")
    if len(data) in (KEY_LEN, NGINX_AES128_LEN) and not set(data) <= TEXT:
        if len(data) == NGINX_AES128_LEN:
            raise refuse("nginx's 48-byte key (AES-128): the tickets here are "
                         "AES-256; make an 80-byte one (openssl rand 80)")
        return [data]       # nginx's raw key: already name, HMAC, AES
    keys: list[bytes] = []
    names: dict[bytes, int] = {}
    for n, raw in enumerate(data.split(b"\n"), 1):
        line = raw.strip(b" \t\r")
        if not line or line.startswith(b"#"):
            continue
        try:
            key = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise refuse("not a base64 line", n) from None
        if len(key) != KEY_LEN:
            raise refuse(f"a key of {len(key)} bytes, expected {KEY_LEN} "
                         "(16 name, 32 AES, 32 HMAC)", n)
        if key[NAME] in names:
            raise refuse(f"the same key name as line {names[key[NAME]]}", n)
        names[key[NAME]] = n
        keys.append(wire_order(key))
    if not keys:
        raise refuse("no key")
    if len(keys) > P.PPS_MAX_TICKET_KEYS:
        raise refuse(f"{len(keys)} keys, at most {P.PPS_MAX_TICKET_KEYS}")
    return keys


def read_ticket_key_files(files: list[tuple[str, Where]]) -> list[bytes]:
    """Every `tls ticket keys` file's keys, in the lines' order: the first
    file's first key seals.  Names must differ across the files too."""
    keys: list[bytes] = []
    seen: dict[bytes, str] = {}
    for path, where in files:
        for k in read_ticket_keys(path, where):
            if k[NAME] in seen:
                raise ConfigError(where.file, where.line,
                                  f"tls ticket keys {path}: a key named as one "
                                  f"in {seen[k[NAME]]}")
            seen[k[NAME]] = path
            keys.append(k)
    if len(keys) > P.PPS_MAX_TICKET_KEYS:
        path, where = files[-1]
        raise ConfigError(where.file, where.line,
                          f"tls ticket keys: {len(keys)} keys in all, at most "
                          f"{P.PPS_MAX_TICKET_KEYS}")
    return keys
