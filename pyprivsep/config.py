"""Configuration file parser: a subset of relayd.conf(5).

The lexer follows relayd's parse.y: ``#`` comments, double-quoted strings,
``{`` ``}`` ``=`` and newlines as tokens, backslash-newline continuation and
``$name`` macro expansion of whole tokens.  Parsing stops at the first error,
which is raised as a ConfigError naming the file and line.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
from dataclasses import dataclass, field

SSL_DIR = "/etc/ssl"

PREFORK_RANGE = (1, 64)
TIMEOUT_RANGE = (1, 86400)            # `session timeout`, seconds
# Health checks (relayd): global `interval` seconds (default 10) and
# `timeout` milliseconds (default 200), each overridable per forward.
INTERVAL_RANGE = (1, 3600)
CHECK_TIMEOUT_RANGE = (1, 3600000)
DEFAULT_INTERVAL = 10
DEFAULT_CHECK_TIMEOUT = 200
DEFAULT_SESSION_TIMEOUT = 600         # relayd's RELAY_TIMEOUT
CHECK_CODE_RANGE = (100, 999)
CHECK_MAX_DATA = 1024                 # `check send ... expect ...` strings
KEYOP_TIMEOUT_RANGE = (10, 60000)
PORT_RANGE = (1, 65535)
MAX_CONNECTIONS_RANGE = (1, 1000000)
HANDSHAKE_TIMEOUT_RANGE = (1, 3600)
TICKET_LIFETIME_RANGE = (4, 604800)
# A keyservice's cas (its `prefork`): two by default, so that while one is
# restarted (or busy with a slow RSA-8192 signature) the other accepts and
# serves, and two cores sign at once; more only for a busy service.
KEYSERVICE_PREFORK_RANGE = (1, 64)
KEYSERVICE_PREFORK = 2
# The control socket when the configuration names none; `pyprivsep ctl`
# looks there by default too.
DEFAULT_SOCKET = "/var/run/pyprivsep.sock"
# `forward to ... proxy protocol v1|v2`: the PROXY protocol header the relay
# sends its backend first (off when not written).
PROXY_PROTOCOLS = {"v1": 1, "v2": 2}
# `tls alpn "h2,http/1.1"`: protocol names of 1 to 255 bytes (RFC 7301's
# limit), printable ASCII without space or comma, at most ALPN_MAX_NAMES.
ALPN_MAX_NAMES = 16
_ALPN_NAME = re.compile(r"[!-+\--~]{1,255}\Z")
# `forward to <table> port N mode M` (relayd's relay modes); the values
# are protocol.h's PPS_MODE_*.
MODES = {"roundrobin": 0, "loadbalance": 1, "hash": 2, "source-hash": 3,
         "random": 4, "least-states": 5}
DEFAULT_MODE = "roundrobin"
TABLE_MAX_HOSTS = 64            # protocol.h PPS_MAX_HOSTS
MAX_FORWARDS = 2                # protocol.h PPS_MAX_TABLES: a table, its fallback
_TABLE_NAME = re.compile(r"<([A-Za-z0-9_.-]{1,63})>\Z")

KEYWORDS = frozenset({
    "ca", "certificate", "changes", "check", "chroot", "ciphers", "client", "code",
    "connection", "connections", "allow", "alpn", "disable", "errors", "expect", "forward",
    "group", "handshake", "include", "inprocess", "interval", "key", "keyop", "keyops",
    "keypair", "keys", "keyservice", "lifetime", "listen", "log", "max", "metrics", "mode",
    "ocsp", "on", "optional", "port", "prefork", "protocol", "proxy", "relay", "session",
    "socket", "state", "table", "ticket", "pkcs11", "module", "pin", "server",
    "timeout", "tls", "to", "user",
})
_GLOBAL_ONLY = frozenset({
    "ca", "chroot", "include", "keyops", "keys", "log", "max", "metrics", "prefork", "pkcs11",
    "interval", "socket", "table", "timeout", "user",
})
# Debian/OpenBSD style system users, one per role (`make users` creates them).
DEFAULT_USER = "_pyprivsep"
DEFAULT_CA_USER = "_pyprivsep_ca"

_RELAY_ONLY = frozenset({"forward", "listen", "session"})
_RELAY_ONLY_TLS = frozenset({"alpn", "certificate", "ciphers", "client", "keypair", "ocsp"})

_MACRO_NAME = re.compile(r"[A-Za-z0-9_]+\Z")
_NUMBER = re.compile(r"[0-9]+\Z")
_DOTTED_NUMERIC = re.compile(r"[0-9.]+\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,254}}\Z){_LABEL}(?:\.{_LABEL})*\.?\Z")
_SPACE = " \t\r\f\v"
_NOT_IN_WORD = frozenset(_SPACE + '\n{}=#"')


class ConfigError(Exception):
    """A configuration error at file:line (line 0: the file as a whole)."""

    def __init__(self, file: str, line: int, msg: str) -> None:
        self.file = file
        self.line = line
        self.msg = msg
        super().__init__(f"{file}:{line}: {msg}" if line else f"{file}: {msg}")


@dataclass(frozen=True)
class Where:
    """Where a directive was written."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


# `pkcs11 module "FILE" pin "file:FILE" [server "unix:path=SOCKET"]`: the
# PIN is read from a file only; a key URI (RFC 7512) names the token by its
# label and the object by its label and/or id, nothing else.
PKCS11_PIN_PREFIX = "file:"
PKCS11_SERVER_PREFIX = "unix:path="
PKCS11_URI_ATTRS = frozenset({"token", "object", "id", "type"})
PKCS11_LABEL_MAX = 32            # CK_TOKEN_INFO.label
PKCS11_ATTR_MAX = 256            # p11.c P11_ATTR_MAX
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class Pkcs11Uri:
    """A private key in a PKCS#11 token: `key "pkcs11:token=T;object=O"`."""

    token: str
    object: bytes | None        # CKA_LABEL, decoded
    id: bytes | None            # CKA_ID, decoded


@dataclass(frozen=True)
class Pkcs11:
    """The one `pkcs11` line: the module the cas load, the PIN file, and
    p11-kit's remote address (P11_KIT_SERVER_ADDRESS) or None."""

    module: str                 # absolute path
    pin_file: str               # absolute path
    server: str | None
    where: Where


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """`pkcs11:token=web;object=www;type=private` (RFC 7512, path part):
    token (required), object and/or id, type (private only).  Anything
    else, a query (pin-value, module-path: those are on the pkcs11 line)
    or a repeated attribute is a ValueError saying what."""
    if not uri.startswith("pkcs11:"):
        raise ValueError("not a pkcs11: URI")
    path = uri[len("pkcs11:"):]
    if "?" in path:
        raise ValueError("query attributes (after ?) are not accepted: the "
                         "module and the PIN are on the pkcs11 line")
    attrs: dict[str, bytes] = {}
    for part in path.split(";") if path else []:
        name, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f'"{part}" is not attribute=value')
        if name not in PKCS11_URI_ATTRS:
            raise ValueError(f'attribute "{name}" not supported (token, '
                             "object, id, type=private)")
        if name in attrs:
            raise ValueError(f'attribute "{name}" given twice')
        attrs[name] = re.sub(rb"%([0-9A-Fa-f]{2})",
                             lambda m: bytes([int(m.group(1), 16)]),
                             value.encode())
        if value.count("%") != len(_PCT.findall(value)):
            raise ValueError(f'bad percent-encoding in "{part}"')
        if not attrs[name]:
            raise ValueError(f'empty attribute "{name}"')
        if len(attrs[name]) > PKCS11_ATTR_MAX:
            raise ValueError(f'attribute "{name}" longer than '
                             f"{PKCS11_ATTR_MAX} bytes")
    if attrs.get("type", b"private") != b"private":
        raise ValueError(f'type={attrs["type"].decode(errors="replace")}: '
                         "only type=private names a signing key")
    if "token" not in attrs:
        raise ValueError("no token=LABEL")
    try:
        token = attrs["token"].decode()
    except UnicodeDecodeError:
        raise ValueError("token label is not UTF-8") from None
    if len(attrs["token"]) > PKCS11_LABEL_MAX:
        raise ValueError(f"token label longer than {PKCS11_LABEL_MAX} bytes")
    if "object" not in attrs and "id" not in attrs:
        raise ValueError("neither object=LABEL nor id=ID names the key")
    return Pkcs11Uri(token, attrs.get("object"), attrs.get("id"))


@dataclass
class Keypair:
    cert: str  # absolute path of the certificate chain PEM
    key: str  # absolute path of the private key PEM
    where: Where
    # absolute path of a DER OCSP response to staple (`ocsp "file"` on the
    # keypair's line: a response is for one certificate); None: none
    ocsp: str | None = None
    # `key "pkcs11:..."`: the key is in the token of the `pkcs11` line
    # (key is then the URI as written)
    p11: Pkcs11Uri | None = None


@dataclass
class ClientCa:
    """`tls client ca "file" [optional]`: verify client certificates
    against the CA certificates in file (PEM); without `optional` a client
    that sends none is refused."""

    path: str  # absolute
    optional: bool
    where: Where


@dataclass
class Listen:
    host: str  # as written ("*" for any); the parent resolves it
    port: int
    tls: bool
    where: Where


@dataclass
class Table:
    """`table <name> [disable] { host, ... }`: hosts as written (addresses
    or names, resolved when the configuration is loaded)."""

    name: str
    hosts: list[str]
    disabled: bool
    where: Where


@dataclass(frozen=True)
class Check:
    """A health check of a table's hosts (relayd's `check ...`)."""

    kind: str                       # "tcp", "tls", "http", "https", "send"
    path: str = ""                  # http, https: the path to GET
    code: int = 0                   # http, https: the status expected
    send: str = ""                  # send: the bytes sent ("": none)
    expect: str = ""                # send: an fnmatch(3) pattern
    tls: bool = False               # send ... tls; https; tls

    def describe(self) -> str:
        if self.kind in ("http", "https"):
            return f'{self.kind} "{self.path}" code {self.code}'
        if self.kind == "send":
            return (f'send "{self.send}" expect "{self.expect}"'
                    + (" tls" if self.tls else ""))
        return self.kind


@dataclass
class Forward:
    """A `forward to` line: a table's hosts, or one address (table None)."""

    table: str | None
    hosts: list[str]
    port: int
    where: Where
    mode: str = DEFAULT_MODE
    disabled: bool = False          # `table <x> disable`: no host is used
    check: Check | None = None      # None: every host is up
    timeout_ms: int = DEFAULT_CHECK_TIMEOUT  # resolved: own or global
    interval: int = DEFAULT_INTERVAL         # resolved: own or global


@dataclass
class Relay:
    name: str
    listens: list[Listen]
    forwards: list[Forward]         # the first; then its fallback, if any
    keypairs: list[Keypair]
    ciphers: str | None
    keyop_timeout_ms: int  # resolved: relay override or global
    session_timeout: int  # resolved: relay override or global timeout
    where: Where
    proxy_protocol: int = 0  # PROXY protocol version to the backend; 0: none
    alpn: list[str] = field(default_factory=list)  # server's preference order
    client_ca: ClientCa | None = None  # None: no client certificates asked for

    @property
    def forward_host(self) -> str:
        """The first forward's first host (as written)."""
        return self.forwards[0].hosts[0]

    @property
    def forward_port(self) -> int:
        return self.forwards[0].port


@dataclass
class KeyService:
    """A key service: the cas of `prefork` serve programs we did not write
    on a SOCK_SEQPACKET socket, to the peers `allow` admits."""

    name: str
    socket: str                   # absolute path; the parent creates it
    allow_users: list[str]        # as written
    allow_groups: list[str]
    uids: list[int]               # admitted uids: allow user, group members
    gids: list[int]               # admitted gids: allow group
    keypairs: list[Keypair]
    prefork: int
    where: Where


@dataclass
class Config:
    path: str
    prefork: int = 3
    # Relays and cas run as two users of their own: a relay someone owns
    # can then signal, trace or limit neither a ca nor another daemon.
    user: str = DEFAULT_USER               # the relays
    user_where: Where | None = None
    ca_user: str = DEFAULT_CA_USER         # the cas
    ca_user_where: Where | None = None
    chroot: str = "/var/empty"
    timeout: int = DEFAULT_CHECK_TIMEOUT  # ms: health checks (relayd)
    timeout_where: Where | None = None
    interval: int = DEFAULT_INTERVAL       # s: health checks (relayd)
    keys_inprocess: bool = False
    keyop_timeout_ms: int = 1000
    max_connections: int = 10000      # per relay process
    handshake_timeout: int = 30       # seconds
    keyops: str | None = None         # "async", "blocking"; None: the library's best
    keyops_where: Where | None = None
    ticket_lifetime: int = 7200       # seconds; keys rotate every quarter
    # `tls ticket keys "file"`: the keys read from it (tickets.py), at
    # start and on every reload, instead of generated and rotated ones
    ticket_keys_file: str | None = None
    ticket_keys_where: Where | None = None
    socket: str = DEFAULT_SOCKET
    metrics: Listen | None = None     # Prometheus endpoint, off by default
    log: set[str] = field(default_factory=set)
    relays: list[Relay] = field(default_factory=list)
    keyservices: list[KeyService] = field(default_factory=list)
    tables: dict[str, Table] = field(default_factory=dict)
    pkcs11: Pkcs11 | None = None      # the `pkcs11` line


def parse_config(path: str, macros: dict[str, str] | None = None) -> Config:
    """Parse the configuration file at path.

    macros are command line (-D) definitions; they take precedence over
    definitions of the same name in the file.
    """
    return _Parser(path, macros or {}).parse()


def parse_macro_arg(arg: str) -> tuple[str, str]:
    """Split a ``-D name=value`` argument into (name, value)."""
    name, sep, value = arg.partition("=")
    if not sep:
        raise ValueError(f'invalid macro definition "{arg}": expected name=value')
    problem = _macro_name_problem(name)
    if problem:
        raise ValueError(problem)
    return name, value


def _macro_name_problem(name: str) -> str | None:
    if not _MACRO_NAME.match(name):
        return f'invalid macro name "{name}" (use letters, digits and "_")'
    if name in KEYWORDS:
        return f'invalid macro name "{name}": it is a keyword'
    return None


# --- lexer -----------------------------------------------------------------

_WORD, _STRING, _NL, _EOF = "word", "string", "end of line", "end of file"


@dataclass(frozen=True)
class _Token:
    kind: str  # _WORD, _STRING, _NL, _EOF, "{", "}" or "="
    value: str
    line: int

    @property
    def is_arg(self) -> bool:
        return self.kind in (_WORD, _STRING)

    @property
    def ends_statement(self) -> bool:
        return self.kind in (_NL, _EOF, "}")

    def is_word(self, value: str) -> bool:
        return self.kind == _WORD and self.value == value

    def describe(self) -> str:
        return self.kind if self.kind in (_NL, _EOF) else f'"{self.value}"'


class _Lexer:
    def __init__(self, text: str, file: str, macros: dict[str, str]) -> None:
        self._text = text
        self._file = file
        self._macros = macros  # live: definitions made while parsing apply
        self._pos = 0
        self._line = 1
        self._pushed: _Token | None = None

    def next(self) -> _Token:
        if self._pushed is not None:
            tok, self._pushed = self._pushed, None
            return tok
        return self._lex()

    def peek(self) -> _Token:
        if self._pushed is None:
            self._pushed = self._lex()
        return self._pushed

    def push(self, tok: _Token) -> None:
        assert self._pushed is None
        self._pushed = tok

    def _continuation(self, pos: int) -> int:
        """Length of a backslash-newline at pos, or 0."""
        for seq in ("\\\n", "\\\r\n"):
            if self._text.startswith(seq, pos):
                return len(seq)
        return 0

    def _lex(self) -> _Token:
        text = self._text
        while self._pos < len(text):
            c = text[self._pos]
            if c in _SPACE:
                self._pos += 1
            elif n := self._continuation(self._pos):
                self._pos += n
                self._line += 1
            elif c == "#":
                end = text.find("\n", self._pos)
                self._pos = len(text) if end < 0 else end
            elif c == "\n":
                self._pos += 1
                self._line += 1
                return _Token(_NL, "", self._line - 1)
            elif c in "{}=":
                self._pos += 1
                return _Token(c, c, self._line)
            elif c == '"':
                return self._string()
            else:
                return self._word()
        line = self._line - 1 if text.endswith("\n") else self._line
        return _Token(_EOF, "", max(line, 1))

    def _string(self) -> _Token:
        text, start = self._text, self._line
        self._pos += 1
        out: list[str] = []
        while True:
            if self._pos >= len(text) or text[self._pos] == "\n":
                raise ConfigError(self._file, start, "unterminated string")
            c = text[self._pos]
            if c == '"':
                self._pos += 1
                return _Token(_STRING, "".join(out), start)
            if c == "\\":
                if n := self._continuation(self._pos):
                    self._pos += n
                    self._line += 1
                    continue
                if text[self._pos + 1:self._pos + 2] in ('"', "\\"):
                    self._pos += 1
                    c = text[self._pos]
            out.append(c)
            self._pos += 1

    def _word(self) -> _Token:
        text, start = self._text, self._pos
        while (self._pos < len(text) and text[self._pos] not in _NOT_IN_WORD
               and not self._continuation(self._pos)):
            self._pos += 1
        word = text[start:self._pos]
        if not word.startswith("$"):
            return _Token(_WORD, word, self._line)
        name = word[1:]
        if not _MACRO_NAME.match(name):
            raise ConfigError(self._file, self._line, f'invalid macro reference "{word}"')
        if name not in self._macros:
            raise ConfigError(self._file, self._line, f'undefined macro "{name}"')
        value = self._macros[name]
        # Like relayd's re-lexing: a value that is a single bare word acts
        # as one (keyword or number); anything else is one string token.
        bare = value != "" and not any(ch in _NOT_IN_WORD for ch in value)
        return _Token(_WORD if bare else _STRING, value, self._line)


# --- parser ----------------------------------------------------------------

@dataclass
class _RelayBuilder:
    name: str
    where: Where
    listens: list[Listen] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)
    proxy_where: int = 0            # the line that set proxy_protocol
    # per forward: its own check timeout and interval (and where), if written
    own: list[tuple[int | None, int | None, Where]] = field(default_factory=list)
    keypairs: list[Keypair] = field(default_factory=list)
    ciphers: str | None = None
    keyop_timeout_ms: int | None = None
    session_timeout: int | None = None
    proxy_protocol: int = 0
    alpn: list[str] | None = None
    client_ca: ClientCa | None = None

    def build(self, config: Config) -> Relay:
        assert self.forwards
        for fwd, (timeout, interval, where) in zip(self.forwards, self.own):
            fwd.timeout_ms = config.timeout if timeout is None else timeout
            fwd.interval = config.interval if interval is None else interval
            if fwd.interval % config.interval:
                # relayd: a table's checks run every n-th round of the global ones
                raise ConfigError(where.file, where.line,
                                  f"interval {fwd.interval}: a table's interval must "
                                  f"be a multiple of the global interval "
                                  f"({config.interval})")
        keyop = self.keyop_timeout_ms
        session = self.session_timeout
        return Relay(
            name=self.name,
            listens=self.listens,
            forwards=self.forwards,
            keypairs=self.keypairs,
            ciphers=self.ciphers,
            keyop_timeout_ms=config.keyop_timeout_ms if keyop is None else keyop,
            session_timeout=DEFAULT_SESSION_TIMEOUT if session is None else session,
            where=self.where,
            proxy_protocol=self.proxy_protocol,
            alpn=list(self.alpn or []),
            client_ca=self.client_ca,
        )


@dataclass
class _ServiceBuilder:
    name: str
    where: Where
    socket: str | None = None
    allow_users: list[str] = field(default_factory=list)
    allow_groups: list[str] = field(default_factory=list)
    uids: list[int] = field(default_factory=list)
    gids: list[int] = field(default_factory=list)
    keypairs: list[Keypair] = field(default_factory=list)
    prefork: int = KEYSERVICE_PREFORK

    def build(self) -> KeyService:
        assert self.socket is not None
        return KeyService(self.name, self.socket, self.allow_users,
                          self.allow_groups, sorted(set(self.uids)),
                          sorted(set(self.gids)), self.keypairs, self.prefork,
                          self.where)


def _lookup_user(name: str) -> int | None:
    """A user's uid, by name or number; None if there is no such user."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return int(name) if _NUMBER.match(name) and len(name) < 11 else None


def _lookup_group(name: str) -> tuple[int, list[int]] | None:
    """A group's gid and its members' uids (the users it lists, and those
    whose primary group it is), by name or number; None if there is none."""
    try:
        g = grp.getgrnam(name)
    except KeyError:
        if not (_NUMBER.match(name) and len(name) < 11):
            return None
        try:
            g = grp.getgrgid(int(name))
        except KeyError:
            return int(name), []
    members = [uid for uid in map(_lookup_user, g.gr_mem) if uid is not None]
    members += [pw.pw_uid for pw in pwd.getpwall() if pw.pw_gid == g.gr_gid]
    return g.gr_gid, members


def _valid_host(host: str, allow_any: bool) -> bool:
    if host == "*":
        return allow_any
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return not _DOTTED_NUMERIC.match(host) and bool(_HOSTNAME.match(host))


def _host_key(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


class _Parser:
    def __init__(self, path: str, macros: dict[str, str]) -> None:
        self.config = Config(path=path)
        self.cli_macros = dict(macros)
        self.macros = dict(macros)
        self.relays: list[_RelayBuilder] = []
        self.services: list[_ServiceBuilder] = []
        self.sockets: dict[str, Where] = {}     # keyservice sockets
        self.listens: dict[tuple[str, int], Where] = {}
        self.active: list[str] = []  # real paths of files being parsed
        self.last_user_where: Where | None = None  # "user" or "ca user"
        self.file = path
        self.lex = _Lexer("", path, self.macros)

    def parse(self) -> Config:
        self._parse_file(self.config.path, None)
        self._check_users()
        self._check_timeout()
        self._check_pkcs11()
        self.config.relays = [r.build(self.config) for r in self.relays]
        self.config.keyservices = [k.build() for k in self.services]
        for k in self.config.keyservices:
            if k.socket == self.config.socket:
                raise ConfigError(k.where.file, k.where.line,
                                  f'keyservice "{k.name}": socket {k.socket} '
                                  "is the control socket")
        return self.config

    def _check_users(self) -> None:
        """Relays and cas may not share a uid: a relay someone owns could
        then signal, trace or limit its ca.  root for both is the one
        exception (`make asan`: LeakSanitizer needs dumpable children)."""
        cfg = self.config
        if cfg.user != cfg.ca_user or cfg.user == "root":
            return
        # blame the directive that made them equal: the last one written
        where = self.last_user_where or Where(cfg.path, 0)
        raise ConfigError(where.file, where.line,
                          f'ca user "{cfg.ca_user}" is the relays\' user too: '
                          "the cas need a user of their own")

    def _check_timeout(self) -> None:
        """The global `timeout` is relayd's: the health checks' timeout in
        milliseconds.  pyprivsep used to read it as the idle timeout of
        sessions in seconds (relayd's `session timeout`): an old file that
        still says `timeout 600` must not silently get 600 ms checks of
        nothing.  So `timeout` without any `check` to time is refused,
        naming what the old meaning is called now."""
        where = self.config.timeout_where
        if where is None or any(f.check for r in self.relays for f in r.forwards):
            return
        raise ConfigError(where.file, where.line,
                          f"timeout {self.config.timeout}: the global \"timeout\" "
                          "is the health check timeout in milliseconds (as in "
                          "relayd.conf(5)), and no \"forward to\" has a \"check\"; "
                          "for the idle timeout of sessions in seconds (what "
                          "\"timeout\" meant before), write \"session timeout "
                          f"{self.config.timeout}\" in each relay block")

    def _check_pkcs11(self) -> None:
        """A key in a token needs the `pkcs11` line, and a ca to use it:
        not `keys inprocess`, whose relays never load the module."""
        kps = [kp for b in [*self.relays, *self.services] for kp in b.keypairs
               if kp.p11 is not None]
        for kp in kps:
            if self.config.pkcs11 is None:
                raise ConfigError(kp.where.file, kp.where.line,
                                  f'key "{kp.key}": no "pkcs11 module" line '
                                  "names the module to reach the token with")
            if self.config.keys_inprocess and any(
                    kp in r.keypairs for r in self.relays):
                raise ConfigError(kp.where.file, kp.where.line,
                                  f'key "{kp.key}": "keys inprocess" relays '
                                  "cannot use a key in a PKCS#11 token")

    def _pkcs11(self, tok: _Token) -> None:
        """`pkcs11 module "FILE" pin "file:FILE" [server "unix:path=S"]`"""
        if self.config.pkcs11 is not None:
            raise self._err(tok.line, 'more than one "pkcs11" line (first at '
                            f"{self.config.pkcs11.where}): one module only")
        self._expect("pkcs11", tok, "module")
        module = self._arg("pkcs11 module", tok)
        if not os.path.isabs(module.value):
            raise self._err(module.line, f'pkcs11 module "{module.value}" is '
                            "not an absolute path")
        self._expect("pkcs11 module", tok, "pin")
        pin = self._arg("pkcs11 pin", tok)
        if not pin.value.startswith(PKCS11_PIN_PREFIX) or \
                not os.path.isabs(pin.value[len(PKCS11_PIN_PREFIX):]):
            raise self._err(pin.line, 'pkcs11 pin: "file:/absolute/path" of '
                            "a file holding the PIN (the PIN itself is never "
                            "written in the configuration)")
        server = None
        if self.lex.peek().is_word("server"):
            self.lex.next()
            arg = self._arg("pkcs11 server", tok)
            if not arg.value.startswith(PKCS11_SERVER_PREFIX) or \
                    not os.path.isabs(arg.value[len(PKCS11_SERVER_PREFIX):]):
                raise self._err(arg.line, f'pkcs11 server "{arg.value}": '
                                'expected "unix:path=/absolute/socket" (p11-kit '
                                "server's address)")
            server = arg.value
        self._eol("pkcs11")
        self.config.pkcs11 = Pkcs11(module.value,
                                    pin.value[len(PKCS11_PIN_PREFIX):], server,
                                    Where(self.file, tok.line))

    def _err(self, line: int, msg: str) -> ConfigError:
        return ConfigError(self.file, line, msg)

    # files

    def _parse_file(self, path: str, included_at: Where | None) -> None:
        def fail(what: str, reason: str) -> ConfigError:
            if included_at is None:
                return ConfigError(path, 0, f"{what}: {reason}")
            return ConfigError(included_at.file, included_at.line,
                               f'{what} "{path}": {reason}')

        real = os.path.realpath(path)
        if included_at is not None and real in self.active:
            raise ConfigError(included_at.file, included_at.line, f'include loop: "{path}"')
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise fail("cannot open", e.strerror or str(e)) from None
        except UnicodeDecodeError as e:
            raise fail("cannot read", e.reason) from None
        saved = self.file, self.lex
        self.file, self.lex = path, _Lexer(text, path, self.macros)
        self.active.append(real)
        try:
            self._statements()
        finally:
            self.active.pop()
            self.file, self.lex = saved

    def _statements(self) -> None:
        block: _RelayBuilder | _ServiceBuilder | None = None
        while True:
            tok = self.lex.next()
            if tok.kind == _EOF:
                if block is not None:
                    what = "relay" if isinstance(block, _RelayBuilder) else "keyservice"
                    raise self._err(tok.line, f'missing "}}" ({what} "{block.name}" '
                                    f"opened at line {block.where.line})")
                return
            if tok.kind == _NL:
                continue
            if tok.kind == "}":
                if block is None:
                    raise self._err(tok.line, 'unexpected "}"')
                if isinstance(block, _RelayBuilder):
                    self._close_relay(block)
                else:
                    self._close_service(block)
                block = None
                self._eol("}")
            elif block is None:
                block = self._toplevel(tok)
            elif isinstance(block, _RelayBuilder):
                self._relay_option(block, tok)
            else:
                self._service_option(block, tok)

    # token helpers

    def _arg(self, what: str, start: _Token) -> _Token:
        tok = self.lex.next()
        if tok.is_arg:
            return tok
        if tok.ends_statement:
            raise self._err(start.line, f'missing argument for "{what}"')
        raise self._err(tok.line, f'unexpected {tok.describe()} in "{what}"')

    def _expect(self, what: str, start: _Token, word: str) -> None:
        tok = self.lex.next()
        if tok.is_word(word):
            return
        if tok.ends_statement:
            raise self._err(start.line, f'missing "{word}" in "{what}"')
        raise self._err(tok.line, f'expected "{word}" in "{what}", got {tok.describe()}')

    def _eol(self, what: str) -> None:
        tok = self.lex.next()
        if tok.kind in (_EOF, "}"):
            self.lex.push(tok)
        elif tok.kind != _NL:
            raise self._err(tok.line, f'extra argument {tok.describe()} for "{what}"')

    def _number(self, what: str, start: _Token, limits: tuple[int, int]) -> int:
        tok = self._arg(what, start)
        if not _NUMBER.match(tok.value):
            raise self._err(tok.line, f'{what} "{tok.value}" is not a number')
        lo, hi = limits
        value = int(tok.value) if len(tok.value) < 20 else hi + 1
        if not lo <= value <= hi:
            raise self._err(tok.line, f"{what} {tok.value} out of range ({lo}-{hi})")
        return value

    def _host(self, what: str, start: _Token, allow_any: bool) -> str:
        tok = self._arg(what, start)
        if not _valid_host(tok.value, allow_any):
            raise self._err(tok.line, f'invalid address "{tok.value}" in "{what}"')
        return tok.value

    def _path(self, tok: _Token) -> str:
        if not tok.value:
            raise self._err(tok.line, "empty path")
        base = os.path.dirname(os.path.abspath(self.file))
        return os.path.abspath(os.path.join(base, tok.value))

    # top level

    def _toplevel(self, tok: _Token) -> _RelayBuilder | _ServiceBuilder | None:
        if tok.kind == _WORD and self.lex.peek().kind == "=":
            self._macro(tok)
            return None
        if not tok.is_arg:
            raise self._err(tok.line, f"unexpected {tok.describe()}")
        word = tok.value if tok.kind == _WORD else ""
        if word == "relay":
            return self._relay(tok)
        if word == "keyservice":
            return self._service(tok)
        if word == "allow":
            raise self._err(tok.line, '"allow" is only valid inside a keyservice block')
        if word == "table":
            self._table(tok)
            return None
        if word == "pkcs11":
            self._pkcs11(tok)
            return None
        if word == "prefork":
            self.config.prefork = self._number("prefork", tok, PREFORK_RANGE)
            self._eol("prefork")
        elif word == "user":
            self.config.user = self._user("user", tok)
            self.config.user_where = Where(self.file, tok.line)
            self.last_user_where = self.config.user_where
        elif word == "ca":
            self._expect("ca", tok, "user")
            self.config.ca_user = self._user("ca user", tok)
            self.config.ca_user_where = Where(self.file, tok.line)
            self.last_user_where = self.config.ca_user_where
        elif word == "chroot":
            path = self._arg("chroot", tok)
            if not os.path.isabs(path.value):
                raise self._err(path.line, f'chroot "{path.value}" is not an absolute path')
            self.config.chroot = path.value
            self._eol("chroot")
        elif word == "timeout":
            self.config.timeout = self._number("timeout", tok, CHECK_TIMEOUT_RANGE)
            self.config.timeout_where = Where(self.file, tok.line)
            self._eol("timeout")
        elif word == "interval":
            self.config.interval = self._number("interval", tok, INTERVAL_RANGE)
            self._eol("interval")
        elif word == "max":
            self._expect("max", tok, "connections")
            self.config.max_connections = self._number(
                "max connections", tok, MAX_CONNECTIONS_RANGE)
            self._eol("max connections")
        elif word == "socket":
            path = self._arg("socket", tok)
            if not os.path.isabs(path.value):
                raise self._err(path.line, f'socket "{path.value}" is not an absolute path')
            self.config.socket = path.value
            self._eol("socket")
        elif word == "metrics":
            self._expect("metrics", tok, "listen")
            self._expect("metrics listen", tok, "on")
            host = self._host("metrics listen on", tok, allow_any=True)
            self._expect("metrics listen on", tok, "port")
            port = self._number("port", tok, PORT_RANGE)
            self._eol("metrics listen on")
            self.config.metrics = Listen(host, port, False, Where(self.file, tok.line))
        elif word == "keyops":
            mode = self._arg("keyops", tok)
            if mode.value not in ("async", "blocking"):
                raise self._err(mode.line, f'keyops "{mode.value}": expected '
                                '"async" or "blocking"')
            self.config.keyops = mode.value
            self.config.keyops_where = Where(self.file, tok.line)
            self._eol("keyops")
        elif word == "keys":
            self._expect("keys", tok, "inprocess")
            self.config.keys_inprocess = True
            self._eol("keys inprocess")
        elif word == "log":
            self._log(tok)
        elif word == "include":
            self._include(tok)
        elif word == "tls":
            sub = self._arg("tls", tok)
            if sub.is_word("keyop"):
                self.config.keyop_timeout_ms = self._keyop(tok)
            elif sub.is_word("ticket"):
                what = self._arg("tls ticket", tok)
                if what.is_word("lifetime"):
                    self.config.ticket_lifetime = self._number(
                        "tls ticket lifetime", tok, TICKET_LIFETIME_RANGE)
                    self._eol("tls ticket lifetime")
                elif what.is_word("keys"):
                    if self.config.ticket_keys_where is not None:
                        raise self._err(tok.line, '"tls ticket keys" given twice '
                                        f'(first at line {self.config.ticket_keys_where.line})')
                    self.config.ticket_keys_file = self._path(
                        self._arg("tls ticket keys", tok))
                    self.config.ticket_keys_where = Where(self.file, tok.line)
                    self._eol("tls ticket keys")
                else:
                    raise self._err(what.line, 'expected "lifetime" or "keys" in '
                                    f'"tls ticket", got {what.describe()}')
            elif sub.is_word("handshake"):
                self._expect("tls handshake", tok, "timeout")
                self.config.handshake_timeout = self._number(
                    "tls handshake timeout", tok, HANDSHAKE_TIMEOUT_RANGE)
                self._eol("tls handshake timeout")
            elif sub.kind == _WORD and sub.value in _RELAY_ONLY_TLS:
                raise self._err(tok.line, f'"tls {sub.value}" is only valid inside a relay block')
            else:
                raise self._err(tok.line, f'unknown directive "tls {sub.value}"')
        elif word in _RELAY_ONLY:
            raise self._err(tok.line, f'"{word}" is only valid inside a relay block')
        else:
            raise self._err(tok.line, f'unknown directive "{tok.value}"')
        return None

    def _user(self, what: str, tok: _Token) -> str:
        user = self._arg(what, tok)
        if not user.value:
            raise self._err(user.line, "empty user name")
        self._eol(what)
        return user.value

    def _macro(self, name: _Token) -> None:
        self.lex.next()  # "="
        problem = _macro_name_problem(name.value)
        if problem:
            raise self._err(name.line, problem)
        value = self.lex.next()
        if not value.is_arg:
            raise self._err(name.line, f'missing value for macro "{name.value}"')
        self._eol(f"{name.value} =")
        if name.value not in self.cli_macros:  # -D definitions win
            self.macros[name.value] = value.value

    def _log(self, tok: _Token) -> None:
        sub = self._arg("log", tok)
        if sub.is_word("connection") or sub.is_word("errors"):
            self.config.log.add(sub.value)
        elif sub.is_word("state"):
            self._expect("log state", tok, "changes")
            self.config.log.add("state changes")
        else:
            raise self._err(sub.line, f'unknown log option "{sub.value}"')
        self._eol("log")

    def _include(self, tok: _Token) -> None:
        name = self._arg("include", tok)
        if not name.value:
            raise self._err(name.line, "empty include file name")
        self._eol("include")
        path = os.path.join(os.path.dirname(self.file), name.value)
        self._parse_file(path, Where(self.file, tok.line))

    def _keyop(self, start: _Token) -> int:
        self._expect("tls keyop", start, "timeout")
        value = self._number("tls keyop timeout", start, KEYOP_TIMEOUT_RANGE)
        self._eol("tls keyop timeout")
        return value

    # relay blocks

    def _relay(self, tok: _Token) -> _RelayBuilder:
        name = self._arg("relay", tok)
        if not name.value:
            raise self._err(name.line, "empty relay name")
        if any(r.name == name.value for r in self.relays):
            raise self._err(name.line, f'duplicate relay name "{name.value}"')
        brace = self.lex.next()
        while brace.kind == _NL:
            brace = self.lex.next()
        if brace.kind != "{":
            raise self._err(brace.line, f'expected "{{" after relay "{name.value}", '
                            f"got {brace.describe()}")
        relay = _RelayBuilder(name.value, Where(self.file, tok.line))
        self.relays.append(relay)
        return relay

    def _relay_option(self, relay: _RelayBuilder, tok: _Token) -> None:
        if tok.kind == _WORD and self.lex.peek().kind == "=":
            raise self._err(tok.line, "macros must be defined at top level")
        if not tok.is_arg:
            raise self._err(tok.line, f"unexpected {tok.describe()}")
        word = tok.value if tok.kind == _WORD else ""
        if word == "listen":
            self._listen(relay, tok)
        elif word == "forward":
            self._forward(relay, tok)
        elif word == "tls":
            self._relay_tls(relay, tok)
        elif word == "session":
            self._expect("session", tok, "timeout")
            relay.session_timeout = self._number("session timeout", tok, TIMEOUT_RANGE)
            self._eol("session timeout")
        elif word in ("relay", "keyservice"):
            raise self._err(tok.line, f"nested {word} blocks are not allowed")
        elif word in _GLOBAL_ONLY:
            raise self._err(tok.line, f'"{word}" is not allowed inside a relay block')
        else:
            raise self._err(tok.line, f'unknown directive "{tok.value}"')

    def _listen(self, relay: _RelayBuilder, tok: _Token) -> None:
        self._expect("listen", tok, "on")
        host = self._host("listen on", tok, allow_any=True)
        self._expect("listen on", tok, "port")
        port = self._number("port", tok, PORT_RANGE)
        tls = self.lex.peek().is_word("tls")
        if tls:
            self.lex.next()
        self._eol("listen on")
        if not tls:
            # The relays speak only TLS; the parser owns this rule so that
            # `pyprivsep -n` refuses what the daemon would.
            raise self._err(tok.line, f'"listen on {host} port {port}" without '
                            '"tls": only TLS listeners are supported')
        where = Where(self.file, tok.line)
        key = (_host_key(host), port)
        if key in self.listens:
            raise self._err(tok.line, f"duplicate listen address {host} port {port} "
                            f"(already used at {self.listens[key]})")
        self.listens[key] = where
        relay.listens.append(Listen(host, port, tls, where))

    def _table(self, tok: _Token) -> None:
        """`table <name> [disable] { host[,] ... } [disable]` (relayd's
        tabledef): hosts are addresses or names, one per word, commas or
        newlines between them."""
        name = self._arg("table", tok)
        m = _TABLE_NAME.match(name.value)
        if name.kind != _WORD or m is None:
            raise self._err(name.line, f'invalid table name "{name.value}": '
                            "expected <name> (letters, digits, _ . -)")
        if m[1] in self.config.tables:
            raise self._err(name.line, f'duplicate table "<{m[1]}>" (already '
                            f"defined at {self.config.tables[m[1]].where})")
        table = Table(m[1], [], False, Where(self.file, tok.line))
        nxt = self.lex.next()
        if nxt.is_word("disable"):
            table.disabled = True
            nxt = self.lex.next()
        while nxt.kind == _NL:
            nxt = self.lex.next()
        if nxt.kind != "{":
            raise self._err(nxt.line, f'expected "{{" after table "<{m[1]}>", '
                            f"got {nxt.describe()}")
        seen: dict[str, int] = {}
        while True:
            nxt = self.lex.next()
            if nxt.kind == "}":
                break
            if nxt.kind == _NL:
                continue
            if nxt.kind == _EOF:
                raise self._err(nxt.line, f'missing "}}" (table "<{m[1]}>" '
                                f"opened at line {tok.line})")
            if not nxt.is_arg:
                raise self._err(nxt.line, f"unexpected {nxt.describe()} in "
                                f'table "<{m[1]}>"')
            for host in filter(None, nxt.value.split(",")):
                if not _valid_host(host, allow_any=False):
                    raise self._err(nxt.line, f'invalid address "{host}" in '
                                    f'table "<{m[1]}>"')
                key = _host_key(host)
                if key in seen:
                    raise self._err(nxt.line, f'table "<{m[1]}>": host {host} '
                                    f"listed twice (line {seen[key]})")
                seen[key] = nxt.line
                table.hosts.append(host)
        if len(table.hosts) > TABLE_MAX_HOSTS:
            raise self._err(tok.line, f'table "<{m[1]}>" has {len(table.hosts)} '
                            f"hosts, at most {TABLE_MAX_HOSTS}")
        if not table.hosts:
            raise self._err(tok.line, f'table "<{m[1]}>" has no hosts')
        if self.lex.peek().is_word("disable"):
            self.lex.next()
            table.disabled = True
        self._eol("table")
        self.config.tables[m[1]] = table

    def _forward(self, relay: _RelayBuilder, tok: _Token) -> None:
        """`forward to <table>|ADDRESS port N [mode M] [proxy protocol vN]`;
        a second line is the fallback, used while every host of the first
        is down (relayd)."""
        if len(relay.forwards) == MAX_FORWARDS:
            raise self._err(tok.line, f'relay "{relay.name}" has more than two '
                            '"forward to" (a table and its fallback)')
        self._expect("forward", tok, "to")
        target = self._arg("forward to", tok)
        where = Where(self.file, tok.line)
        if target.kind == _WORD and target.value.startswith("<"):
            m = _TABLE_NAME.match(target.value)
            if m is None:
                raise self._err(target.line, f'invalid table name "{target.value}"')
            table = self.config.tables.get(m[1])
            if table is None:
                raise self._err(target.line, f'table "<{m[1]}>" is not defined '
                                "(define it above the relay)")
            fwd = Forward(m[1], list(table.hosts), 0, where,
                          disabled=table.disabled)
        else:
            if not _valid_host(target.value, allow_any=False):
                raise self._err(target.line, f'invalid address "{target.value}" '
                                'in "forward to"')
            fwd = Forward(None, [target.value], 0, where)
        self._expect("forward to", tok, "port")
        fwd.port = self._number("port", tok, PORT_RANGE)
        timeout: int | None = None
        interval: int | None = None
        while not self.lex.peek().ends_statement:
            opt = self.lex.next()
            if opt.kind == _WORD and opt.value in ("check", "timeout", "interval") \
                    and fwd.table is None:
                raise self._err(opt.line, f'"{opt.value}" needs a table: forward '
                                f"to <table> port N {opt.value} ...")
            if opt.is_word("check"):
                if fwd.check is not None:
                    raise self._err(opt.line, 'more than one "check" in "forward to"')
                fwd.check = self._check(tok)
                continue
            if opt.is_word("timeout"):
                timeout = self._number("timeout", tok, CHECK_TIMEOUT_RANGE)
                continue
            if opt.is_word("interval"):
                interval = self._number("interval", tok, INTERVAL_RANGE)
                continue
            if opt.is_word("proxy"):
                self._expect("forward to ... proxy", tok, "protocol")
                version = self._arg("proxy protocol", tok)
                if version.value not in PROXY_PROTOCOLS:
                    raise self._err(version.line, f'proxy protocol "{version.value}": '
                                    'expected "v1" or "v2"')
                value = PROXY_PROTOCOLS[version.value]
                if relay.proxy_where and relay.proxy_protocol != value:
                    raise self._err(version.line, f'proxy protocol {version.value}: '
                                    f"line {relay.proxy_where} says another version "
                                    "(one version a relay)")
                relay.proxy_protocol, relay.proxy_where = value, tok.line
            elif opt.is_word("mode"):
                if fwd.table is None:
                    raise self._err(opt.line, '"mode" needs a table: '
                                    "forward to <table> port N mode M")
                mode = self._arg("mode", tok)
                if mode.value not in MODES:
                    raise self._err(mode.line, f'unknown mode "{mode.value}": expected '
                                    + ", ".join(MODES))
                fwd.mode = mode.value
            else:
                raise self._err(opt.line, f'extra argument {opt.describe()} for '
                                '"forward to"')
        self._eol("forward to")
        relay.forwards.append(fwd)
        relay.own.append((timeout, interval, where))

    def _check(self, start: _Token) -> Check:
        """relayd's `check tcp | tls | http PATH code N | https PATH code N
        | send DATA expect PATTERN [tls]`."""
        kind = self._arg("check", start)
        if kind.is_word("tcp") or kind.is_word("tls"):
            return Check(kind.value, tls=kind.value == "tls")
        if kind.is_word("http") or kind.is_word("https"):
            path = self._arg(f"check {kind.value}", start)
            if not path.value.startswith("/") or any(c in path.value for c in " \r\n"):
                raise self._err(path.line, f'check {kind.value} "{path.value}": '
                                'expected a path from "/", without spaces')
            self._expect(f"check {kind.value}", start, "code")
            code = self._number("code", start, CHECK_CODE_RANGE)
            return Check(kind.value, path=path.value, code=code,
                         tls=kind.value == "https")
        if kind.is_word("send"):
            send = self._arg("check send", start)
            self._expect("check send", start, "expect")
            expect = self._arg("check send ... expect", start)
            for tok in (send, expect):
                if len(tok.value.encode()) > CHECK_MAX_DATA:
                    raise self._err(tok.line, f"check send: more than {CHECK_MAX_DATA} "
                                    "bytes")
            if not expect.value:
                raise self._err(expect.line, 'check send: empty "expect"')
            tls = self.lex.peek().is_word("tls")
            if tls:
                self.lex.next()
            return Check("send", send=send.value, expect=expect.value, tls=tls)
        raise self._err(kind.line, f'unknown check "{kind.value}": expected tcp, tls, '
                        "http, https or send")

    def _alpn(self, relay: _RelayBuilder, tok: _Token) -> None:
        """`tls alpn "h2,http/1.1"`: the names in the server's order of
        preference, checked here so that `pyprivsep -n` refuses a list the
        TLS library would (or that says something else than meant)."""
        if relay.alpn is not None:
            raise self._err(tok.line, f'relay "{relay.name}" has more than one "tls alpn"')
        arg = self._arg("tls alpn", tok)
        names = arg.value.split(",")
        for name in names:
            if not _ALPN_NAME.match(name):
                what = f'"{name}"' if name else "an empty name"
                raise self._err(arg.line, f'tls alpn "{arg.value}": {what} is not a '
                                "protocol name (1-255 printable characters, no space "
                                "or comma)")
            if names.count(name) > 1:
                raise self._err(arg.line, f'tls alpn "{arg.value}": "{name}" is '
                                "listed twice")
        if len(names) > ALPN_MAX_NAMES:
            raise self._err(arg.line, f'tls alpn: {len(names)} protocols, at most '
                            f"{ALPN_MAX_NAMES}")
        relay.alpn = names
        self._eol("tls alpn")

    def _keypair(self, sub: _Token, tok: _Token) -> Keypair | None:
        """`tls keypair NAME` or `tls certificate PATH key PATH`, each with
        an optional `ocsp PATH` after it, or None."""
        where = Where(self.file, tok.line)
        if sub.is_word("keypair"):
            name = self._arg("tls keypair", tok)
            if name.value in ("", ".", "..") or "/" in name.value:
                raise self._err(name.line, f'invalid keypair name "{name.value}"')
            ocsp = self._ocsp("tls keypair", tok)
            self._eol("tls keypair")
            cert = os.path.join(SSL_DIR, f"{name.value}.crt")
            key = os.path.join(SSL_DIR, "private", f"{name.value}.key")
            return Keypair(cert, key, where, ocsp)
        if sub.is_word("certificate"):
            cert = self._path(self._arg("tls certificate", tok))
            self._expect("tls certificate", tok, "key")
            keytok = self._arg("tls certificate key", tok)
            ocsp = self._ocsp("tls certificate", tok)
            self._eol("tls certificate")
            if keytok.value.startswith("pkcs11:"):
                try:
                    uri = parse_pkcs11_uri(keytok.value)
                except ValueError as e:
                    raise self._err(keytok.line, f'key "{keytok.value}": {e}') from None
                return Keypair(cert, keytok.value, where, ocsp, uri)
            return Keypair(cert, self._path(keytok), where, ocsp)
        return None

    def _ocsp(self, what: str, tok: _Token) -> str | None:
        """`ocsp PATH` at the end of a keypair's line: the response to
        staple for that certificate."""
        if not self.lex.peek().is_word("ocsp"):
            return None
        self.lex.next()
        return self._path(self._arg(f"{what} ocsp", tok))

    def _client_ca(self, relay: _RelayBuilder, tok: _Token) -> None:
        self._expect("tls client", tok, "ca")
        path = self._path(self._arg("tls client ca", tok))
        optional = self.lex.peek().is_word("optional")
        if optional:
            self.lex.next()
        self._eol("tls client ca")
        if relay.client_ca is not None:
            raise self._err(tok.line, f'relay "{relay.name}" has more than one '
                            f'"tls client ca" (first at {relay.client_ca.where})')
        relay.client_ca = ClientCa(path, optional, Where(self.file, tok.line))

    def _relay_tls(self, relay: _RelayBuilder, tok: _Token) -> None:
        sub = self._arg("tls", tok)
        kp = self._keypair(sub, tok)
        if kp is not None:
            relay.keypairs.append(kp)
        elif sub.is_word("ciphers"):
            ciphers = self._arg("tls ciphers", tok)
            if not ciphers.value:
                raise self._err(ciphers.line, "empty cipher list")
            relay.ciphers = ciphers.value
            self._eol("tls ciphers")
        elif sub.is_word("keyop"):
            relay.keyop_timeout_ms = self._keyop(tok)
        elif sub.is_word("alpn"):
            self._alpn(relay, tok)
        elif sub.is_word("client"):
            self._client_ca(relay, tok)
        elif sub.is_word("ocsp"):
            # a response is for one certificate: it goes on that one's line
            raise self._err(tok.line, '"tls ocsp" belongs on its certificate\'s '
                            'line: tls certificate "CERT" key "KEY" ocsp "FILE" '
                            '(or tls keypair NAME ocsp "FILE")')
        elif sub.is_word("ticket"):
            # one daemon, one set of ticket keys: every relay process
            # holds them all, whichever relay block a session came in by
            raise self._err(tok.line, '"tls ticket" is global: it is only '
                            'valid outside a relay block')
        else:
            raise self._err(tok.line, f'unknown directive "tls {sub.value}"')

    def _close_relay(self, relay: _RelayBuilder) -> None:
        line, name = relay.where.line, relay.name
        if not relay.listens:
            raise self._err(line, f'relay "{name}" has no "listen on"')
        if not relay.forwards:
            raise self._err(line, f'relay "{name}" has no "forward to"')
        # every listen is tls (see _listen), so every relay needs a keypair
        if not relay.keypairs:
            raise self._err(line, f'relay "{name}" listens with tls but has no keypair')

    # keyservice blocks

    def _service(self, tok: _Token) -> _ServiceBuilder:
        name = self._arg("keyservice", tok)
        if not name.value:
            raise self._err(name.line, "empty keyservice name")
        if any(k.name == name.value for k in self.services):
            raise self._err(name.line, f'duplicate keyservice name "{name.value}"')
        brace = self.lex.next()
        while brace.kind == _NL:
            brace = self.lex.next()
        if brace.kind != "{":
            raise self._err(brace.line, f'expected "{{" after keyservice '
                            f'"{name.value}", got {brace.describe()}')
        service = _ServiceBuilder(name.value, Where(self.file, tok.line))
        self.services.append(service)
        return service

    def _service_option(self, service: _ServiceBuilder, tok: _Token) -> None:
        if tok.kind == _WORD and self.lex.peek().kind == "=":
            raise self._err(tok.line, "macros must be defined at top level")
        if not tok.is_arg:
            raise self._err(tok.line, f"unexpected {tok.describe()}")
        word = tok.value if tok.kind == _WORD else ""
        if word == "socket":
            path = self._arg("socket", tok)
            if not os.path.isabs(path.value):
                raise self._err(path.line, f'socket "{path.value}" is not an absolute path')
            if service.socket is not None:
                raise self._err(tok.line, f'keyservice "{service.name}" has more '
                                'than one "socket"')
            real = os.path.normpath(path.value)
            if real in self.sockets:
                raise self._err(path.line, f"duplicate keyservice socket {path.value} "
                                f"(already used at {self.sockets[real]})")
            self.sockets[real] = Where(self.file, tok.line)
            service.socket = real
            self._eol("socket")
        elif word == "allow":
            self._allow(service, tok)
        elif word == "prefork":
            service.prefork = self._number("prefork", tok, KEYSERVICE_PREFORK_RANGE)
            self._eol("prefork")
        elif word == "tls":
            sub = self._arg("tls", tok)
            kp = self._keypair(sub, tok)
            if kp is None:
                raise self._err(tok.line, f'"tls {sub.value}" is not valid inside '
                                'a keyservice block')
            if kp.ocsp is not None:
                raise self._err(tok.line, '"ocsp" is not valid inside a keyservice '
                                'block: its programs staple their own responses')
            service.keypairs.append(kp)
        elif word in ("relay", "keyservice"):
            raise self._err(tok.line, f"nested {word} blocks are not allowed")
        elif word in _GLOBAL_ONLY or word in _RELAY_ONLY:
            raise self._err(tok.line, f'"{word}" is not allowed inside a keyservice block')
        else:
            raise self._err(tok.line, f'unknown directive "{tok.value}"')

    def _allow(self, service: _ServiceBuilder, tok: _Token) -> None:
        """Names are resolved here, so that `pyprivsep -n` and a reload
        refuse one that does not exist; the cas are given the numbers."""
        sub = self._arg("allow", tok)
        if sub.is_word("user"):
            name = self._arg("allow user", tok)
            uid = _lookup_user(name.value)
            if uid is None:
                raise self._err(name.line, f'allow user "{name.value}": no such user')
            service.allow_users.append(name.value)
            service.uids.append(uid)
            self._eol("allow user")
        elif sub.is_word("group"):
            name = self._arg("allow group", tok)
            found = _lookup_group(name.value)
            if found is None:
                raise self._err(name.line, f'allow group "{name.value}": no such group')
            service.allow_groups.append(name.value)
            service.gids.append(found[0])
            service.uids += found[1]
            self._eol("allow group")
        else:
            raise self._err(sub.line, f'"allow {sub.value}": expected "allow user" '
                            'or "allow group"')

    def _close_service(self, service: _ServiceBuilder) -> None:
        line, name = service.where.line, service.name
        if service.socket is None:
            raise self._err(line, f'keyservice "{name}" has no "socket"')
        if not service.allow_users and not service.allow_groups:
            raise self._err(line, f'keyservice "{name}" allows nobody: it needs '
                            '"allow user" or "allow group"')
        if not service.keypairs:
            raise self._err(line, f'keyservice "{name}" has no keypair')
