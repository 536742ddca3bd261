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
TIMEOUT_RANGE = (1, 86400)
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

KEYWORDS = frozenset({
    "ca", "certificate", "changes", "chroot", "ciphers", "connection", "connections",
    "allow", "alpn", "errors", "forward", "group", "handshake", "include", "inprocess", "key", "keyop",
    "keyops", "keypair", "keys", "keyservice", "lifetime", "listen", "log", "max", "metrics",
    "on", "port", "prefork", "protocol", "proxy", "relay", "session", "socket", "state",
    "ticket",
    "timeout", "tls", "to", "user",
})
_GLOBAL_ONLY = frozenset({
    "ca", "chroot", "include", "keyops", "keys", "log", "max", "metrics", "prefork",
    "socket", "timeout", "user",
})
# Debian/OpenBSD style system users, one per role (`make users` creates them).
DEFAULT_USER = "_pyprivsep"
DEFAULT_CA_USER = "_pyprivsep_ca"

_RELAY_ONLY = frozenset({"forward", "listen", "session"})
_RELAY_ONLY_TLS = frozenset({"alpn", "certificate", "ciphers", "keypair"})

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


@dataclass
class Keypair:
    cert: str  # absolute path of the certificate chain PEM
    key: str  # absolute path of the private key PEM
    where: Where


@dataclass
class Listen:
    host: str  # as written ("*" for any); the parent resolves it
    port: int
    tls: bool
    where: Where


@dataclass
class Relay:
    name: str
    listens: list[Listen]
    forward_host: str
    forward_port: int
    keypairs: list[Keypair]
    ciphers: str | None
    keyop_timeout_ms: int  # resolved: relay override or global
    session_timeout: int  # resolved: relay override or global timeout
    where: Where
    proxy_protocol: int = 0  # PROXY protocol version to the backend; 0: none
    alpn: list[str] = field(default_factory=list)  # server's preference order


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
    timeout: int = 600
    keys_inprocess: bool = False
    keyop_timeout_ms: int = 1000
    max_connections: int = 10000      # per relay process
    handshake_timeout: int = 30       # seconds
    keyops: str | None = None         # "async", "blocking"; None: the library's best
    keyops_where: Where | None = None
    ticket_lifetime: int = 7200       # seconds; keys rotate every quarter
    socket: str = DEFAULT_SOCKET
    metrics: Listen | None = None     # Prometheus endpoint, off by default
    log: set[str] = field(default_factory=set)
    relays: list[Relay] = field(default_factory=list)
    keyservices: list[KeyService] = field(default_factory=list)


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
    forward: tuple[str, int] | None = None
    keypairs: list[Keypair] = field(default_factory=list)
    ciphers: str | None = None
    keyop_timeout_ms: int | None = None
    session_timeout: int | None = None
    proxy_protocol: int = 0
    alpn: list[str] | None = None

    def build(self, config: Config) -> Relay:
        assert self.forward is not None
        keyop = self.keyop_timeout_ms
        session = self.session_timeout
        return Relay(
            name=self.name,
            listens=self.listens,
            forward_host=self.forward[0],
            forward_port=self.forward[1],
            keypairs=self.keypairs,
            ciphers=self.ciphers,
            keyop_timeout_ms=config.keyop_timeout_ms if keyop is None else keyop,
            session_timeout=config.timeout if session is None else session,
            where=self.where,
            proxy_protocol=self.proxy_protocol,
            alpn=list(self.alpn or []),
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
            self.config.timeout = self._number("timeout", tok, TIMEOUT_RANGE)
            self._eol("timeout")
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
                self._expect("tls ticket", tok, "lifetime")
                self.config.ticket_lifetime = self._number(
                    "tls ticket lifetime", tok, TICKET_LIFETIME_RANGE)
                self._eol("tls ticket lifetime")
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

    def _forward(self, relay: _RelayBuilder, tok: _Token) -> None:
        if relay.forward is not None:
            raise self._err(tok.line, f'relay "{relay.name}" has more than one "forward to"')
        self._expect("forward", tok, "to")
        host = self._host("forward to", tok, allow_any=False)
        self._expect("forward to", tok, "port")
        relay.forward = (host, self._number("port", tok, PORT_RANGE))
        if self.lex.peek().is_word("proxy"):
            self.lex.next()
            self._expect("forward to ... proxy", tok, "protocol")
            version = self._arg("proxy protocol", tok)
            if version.value not in PROXY_PROTOCOLS:
                raise self._err(version.line, f'proxy protocol "{version.value}": '
                                'expected "v1" or "v2"')
            relay.proxy_protocol = PROXY_PROTOCOLS[version.value]
        self._eol("forward to")

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
        """`tls keypair NAME` or `tls certificate PATH key PATH`, or None."""
        where = Where(self.file, tok.line)
        if sub.is_word("keypair"):
            name = self._arg("tls keypair", tok)
            if name.value in ("", ".", "..") or "/" in name.value:
                raise self._err(name.line, f'invalid keypair name "{name.value}"')
            self._eol("tls keypair")
            cert = os.path.join(SSL_DIR, f"{name.value}.crt")
            key = os.path.join(SSL_DIR, "private", f"{name.value}.key")
            return Keypair(cert, key, where)
        if sub.is_word("certificate"):
            cert = self._path(self._arg("tls certificate", tok))
            self._expect("tls certificate", tok, "key")
            key = self._path(self._arg("tls certificate key", tok))
            self._eol("tls certificate")
            return Keypair(cert, key, where)
        return None

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
        else:
            raise self._err(tok.line, f'unknown directive "tls {sub.value}"')

    def _close_relay(self, relay: _RelayBuilder) -> None:
        line, name = relay.where.line, relay.name
        if not relay.listens:
            raise self._err(line, f'relay "{name}" has no "listen on"')
        if relay.forward is None:
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
