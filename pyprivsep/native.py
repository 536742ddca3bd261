"""The thin Python face of the C extension (src/_rsaengine).

Protocol constants and the frame header come from the C header through
the FFI: ``P.PPS_OP_REPLY``, ``HDR_SIZE``.  Wrappers check their
arguments, call the C function, and turn a failure into NativeError with
the extension's message; nothing else.
"""
from __future__ import annotations

import re

from pyprivsep._rsaengine import ffi, lib

__all__ = ["ffi", "lib", "P", "HDR_SIZE", "FRAME_MAX"]


class LibraryMismatch(ImportError):
    """The extension runs with another TLS library than it was built for."""


def _release(number: int) -> tuple[int, int]:
    """(major, minor) of an OpenSSL 3+ (0xMNN00PP0L) or LibreSSL
    (0xMNNFF00fL) version number."""
    return number >> 28, (number >> 20) & 0xff


def check_library(built_openssl: int, built_libressl: int, built_text: str,
                  loaded_number: int, loaded_text: str) -> None:
    """Raise LibraryMismatch unless the TLS library loaded is the one the
    extension was compiled against: OpenSSL or LibreSSL the same, and the
    same release (major.minor), whose ABI and features the extension's
    #ifs were decided for.  A patch release differs only in fixes: a
    security update of the library must not stop the daemon.

    built_*: OPENSSL_VERSION_NUMBER, LIBRESSL_VERSION_NUMBER (0 for
    OpenSSL) and the version text, at compile time; loaded_*:
    OpenSSL_version_num() and OpenSSL_version(OPENSSL_VERSION) at run time.
    LibreSSL's OpenSSL_version_num() is always 0x20000000, so a LibreSSL's
    release comes from its text ("LibreSSL 4.3.2")."""
    loaded_libressl = loaded_text.startswith("LibreSSL")
    if built_libressl:
        m = re.match(r"LibreSSL (\d+)\.(\d+)\b", loaded_text)
        same = (loaded_libressl and m is not None and
                (int(m.group(1)), int(m.group(2))) == _release(built_libressl))
    else:
        same = (not loaded_libressl and
                _release(loaded_number) == _release(built_openssl))
    if not same:
        raise LibraryMismatch(
            f"pyprivsep._rsaengine was compiled against {built_text} but "
            f"runs with {loaded_text}: build it again "
            f"against the library it runs with (pip install, OPENSSL_PREFIX), "
            f"or run it with the one it was built for")


check_library(lib.PPS_BUILT_OPENSSL, lib.PPS_BUILT_LIBRESSL,
              ffi.string(lib.PPS_BUILT_TEXT).decode(),
              lib.OpenSSL_version_num(),
              ffi.string(lib.pps_library_version()).decode())

P = lib                                   # protocol constants: P.PPS_*
HDR_SIZE: int = ffi.sizeof("struct pps_hdr")
FRAME_MAX: int = HDR_SIZE + lib.PPS_MAX_PAYLOAD


class NativeError(Exception):
    """A call into the extension failed; the message is the extension's."""


def _check(ret: int) -> int:
    if ret < 0:
        raise NativeError(ffi.string(lib.pps_error()).decode())
    return ret


def library_version() -> str:
    return ffi.string(lib.pps_library_version()).decode()


def poller() -> str:
    """The event loop's poller the extension was built with: epoll or kqueue."""
    return ffi.string(lib.pps_poller()).decode()


SANDBOX_ROLES: dict[str, int] = {"relay": lib.PPS_SANDBOX_RELAY,
                                  "ca": lib.PPS_SANDBOX_CA,
                                  "keyservice": lib.PPS_SANDBOX_KEYSERVICE,
                                  "hce": lib.PPS_SANDBOX_HCE}


def sandbox(role: str, pkcs11: bool = False) -> None:
    """Confine this process to what `role` ("relay" or "ca") needs from
    now on: seccomp filter and no_new_privs on Linux, pledge on OpenBSD;
    a ca also loses core dumps and dumpability.  Irreversible.  pkcs11: a
    ca (or keyservice ca) whose PKCS#11 module may also open files and
    connect UNIX sockets (sandbox.c)."""
    _check(lib.pps_sandbox(SANDBOX_ROLES[role] |
                           (lib.PPS_SANDBOX_P11 if pkcs11 else 0)))


def leak_check() -> None:
    """Report leaks now in an AddressSanitizer build; nothing otherwise."""
    lib.pps_leak_check()


# ---- frames -------------------------------------------------------------

class Frame:
    """One frame: header fields and payload, parsed or to be sent."""

    __slots__ = ("version", "type", "arg", "id", "key", "payload")

    def __init__(self, type: int, arg: int, id: int, key: bytes,
                 payload: bytes, version: int = lib.PPS_PROTO_VERSION) -> None:
        self.version = version
        self.type = type
        self.arg = arg
        self.id = id
        self.key = key
        self.payload = payload

    def pack(self) -> bytes:
        hdr = ffi.new("struct pps_hdr *")
        hdr.version = self.version
        hdr.type = self.type
        hdr.arg = self.arg
        hdr.id = self.id
        hdr.len = len(self.payload)
        ffi.memmove(hdr.key, self.key[:lib.PPS_KEYID_LEN],
                    min(len(self.key), lib.PPS_KEYID_LEN))
        return bytes(ffi.buffer(hdr)) + self.payload


# ---- the ca's keys --------------------------------------------------------

class CaKey:
    """A private key held by a ca process, in OpenSSL's memory (loaded only
    if it matches the certificate)."""

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        ptr = lib.pps_cakey_load(key_pem, len(key_pem), cert_pem, len(cert_pem))
        if ptr == ffi.NULL:
            raise NativeError(ffi.string(lib.pps_error()).decode())
        self._ptr = ffi.gc(ptr, lib.pps_cakey_free)

    @property
    def ptr(self) -> object:
        return self._ptr


def p11_init(module: str, pin: bytes) -> None:
    """dlopen the PKCS#11 module (a ca, or `pyprivsep -n`'s check): only
    C_GetFunctionList; the token is opened at the first signature."""
    _check(lib.pps_p11_init(module.encode(), pin, len(pin)))


class P11Key(CaKey):
    """A private key in a PKCS#11 token, named by its token's label and its
    object's label and/or id; the certificate's public key stands for it
    in the policy."""

    def __init__(self, token: str, label: bytes | None, id: bytes | None,
                 cert_pem: bytes) -> None:
        ptr = lib.pps_cakey_load_p11(
            token.encode(), ffi.NULL if label is None else label,
            0 if label is None else len(label),
            ffi.NULL if id is None else id, 0 if id is None else len(id),
            cert_pem, len(cert_pem))
        if ptr == ffi.NULL:
            raise NativeError(ffi.string(lib.pps_error()).decode())
        self._ptr = ffi.gc(ptr, lib.pps_cakey_free)

    def check(self) -> None:
        """A test signature by the token, verified with the certificate."""
        _check(lib.pps_cakey_p11_check(self._ptr))


class CaCore:
    """The ca's request path in C: the keys it holds, the policy, the loop."""

    def __init__(self, index: int) -> None:
        ptr = lib.pps_ca_new(index)
        if ptr == ffi.NULL:
            raise NativeError(ffi.string(lib.pps_error()).decode())
        self._ptr = ffi.gc(ptr, lib.pps_ca_free)
        self._keys: list[CaKey] = []        # alive as long as the ca

    def add_key(self, keyid: bytes, key: CaKey, name: str) -> None:
        if len(keyid) != lib.PPS_KEYID_LEN:
            raise ValueError("key id must be 32 bytes")
        _check(lib.pps_ca_add_key(self._ptr, keyid, key.ptr, name.encode()))
        self._keys.append(key)

    def serve(self, fd: int) -> None:
        """Answer until the channel closes or SIGTERM comes: the C loop
        takes SIGTERM itself, so it stops whatever it waits for."""
        _check(lib.pps_ca_serve(self._ptr, fd))

    def serve_service(self, lfd: int, uids: list[int],
                      gids: list[int]) -> None:
        """A keyservice ca: accept clients on lfd, admit those whose
        SO_PEERCRED uid is in uids or gid in gids, answer each like a
        relay, until SIGTERM (SIGUSR1: stop accepting, end when the last
        client is gone)."""
        u = ffi.new("uint32_t[]", uids or [0])
        g = ffi.new("uint32_t[]", gids or [0])
        _check(lib.pps_ca_serve_service(self._ptr, lfd, u, len(uids),
                                        g, len(gids)))


def log_setup(prefix: str, use_syslog: bool, verbose: bool) -> None:
    lib.pps_log_setup(prefix.encode(), int(use_syslog), int(verbose))


# ---- the relay engine -----------------------------------------------------

def async_supported() -> bool:
    """Whether the TLS library has ASYNC jobs (OpenSSL yes, LibreSSL no)."""
    return bool(lib.pps_async_supported())


def engine_init(*, id: int, ca_fd: int, ctl_fd: int, max_conns: int,
                handshake_timeout: int, keyops_async: bool, use_syslog: bool,
                verbose: bool, log_conn: bool, log_errors: bool,
                ticket_lifetime: int) -> None:
    """Every value comes from the parsed configuration (config.py owns the
    defaults and ranges); the C engine takes them as they are."""
    conf = ffi.new("struct pps_engine_conf *")
    conf.keyops_async = int(keyops_async)
    conf.log_conn = int(log_conn)
    conf.log_errors = int(log_errors)
    conf.ticket_lifetime = ticket_lifetime
    conf.id = id
    conf.ca_fd = ca_fd
    conf.ctl_fd = ctl_fd
    conf.max_conns = max_conns
    conf.handshake_timeout = handshake_timeout
    conf.use_syslog = int(use_syslog)
    conf.verbose = int(verbose)
    _check(lib.pps_engine_init(conf))


def relay_new(name: str, ciphers: str | None, keyop_timeout_ms: int,
              idle_timeout: int, proxy_protocol: int = 0,
              alpn: list[str] | None = None) -> int:
    """proxy_protocol: 0, 1 or 2; alpn: the protocols to choose from, in
    the server's order of preference (none: no ALPN).  Its backends come
    next: relay_table(), relay_host()."""
    return _check(lib.pps_relay_new(
        name.encode(), ciphers.encode() if ciphers is not None else ffi.NULL,
        keyop_timeout_ms, idle_timeout, proxy_protocol,
        ",".join(alpn).encode() if alpn else ffi.NULL))


def relay_table(relay: int, mode: int) -> int:
    """A table of the relay (the first, then its fallback): its index."""
    return _check(lib.pps_relay_table(relay, mode))


def relay_host(relay: int, table: int, id: int, address: str, port: int,
               up: bool) -> None:
    _check(lib.pps_relay_host(relay, table, id, address.encode(), port,
                              int(up)))


def relay_listen(relay: int, fd: int) -> None:
    _check(lib.pps_relay_listen(relay, fd))


def relay_keypair(relay: int, chain_pem: bytes, keyid: bytes,
                  key_pem: bytes | None) -> None:
    if len(keyid) != lib.PPS_KEYID_LEN:
        raise ValueError("key id must be 32 bytes")
    _check(lib.pps_relay_keypair(
        relay, chain_pem, len(chain_pem), keyid,
        key_pem if key_pem is not None else ffi.NULL,
        len(key_pem) if key_pem is not None else 0))


def relay_client_ca(relay: int, pem: bytes, optional: bool) -> None:
    """Ask clients of `relay` for a certificate and verify it against the
    CA certificates in pem; without `optional` refuse a client with none.
    Before the relay's first keypair."""
    _check(lib.pps_relay_client_ca(relay, pem, len(pem), int(optional)))


def relay_ocsp(relay: int, der: bytes, not_before: int, not_after: int) -> None:
    """Staple the DER OCSP response der for the keypair added last, from
    not_before to not_after (Unix seconds; 0: no end)."""
    _check(lib.pps_relay_ocsp(relay, der, len(der), not_before, not_after))


def ticket_keys(keys: bytes) -> None:
    _check(lib.pps_ticket_keys(keys, len(keys)))


def engine_run() -> None:
    _check(lib.pps_engine_run())
