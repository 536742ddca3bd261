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

The relays hold keys as name, HMAC, AES (protocol.h, struct ticket_key in
tls.c); wire_order() maps one onto the other.  No key byte is ever put in
a log line or an error message.
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
