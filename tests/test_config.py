"""Tests for pyprivsep.config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyprivsep import config
from pyprivsep.config import (
    ClientCa, Config, ConfigError, Keypair, Listen, Where, parse_config, parse_macro_arg,
)

# A minimal valid relay block, for cases that need one around the error.
PLAIN = """relay plain {
    listen on 127.0.0.1 port 8080 tls
    forward to 127.0.0.1 port 80
    tls keypair plain
}
"""


def write(directory: Path, text: str, name: str = "test.conf") -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def parse_text(tmp_path: Path, text: str, macros: dict[str, str] | None = None) -> Config:
    return parse_config(write(tmp_path, text), macros)


FULL = """\
# pyprivsep test configuration
ext = "127.0.0.1"   # the external address
backend=10.0.0.2

prefork 5
user "_relayd"
chroot "/var/chroot"
keys inprocess
log connection
log state changes
log errors

relay "www" {
    listen on $ext port 8443 tls
    listen on ::1 port 8443 tls
    listen on * port 9443 tls
    forward to $backend port 8080
    tls keypair "server"
    tls keypair other
    tls certificate "certs/chain.pem" key "/abs/key.pem"
    tls ciphers "HIGH:!aNULL"
    tls keyop timeout 500
    session timeout 300
}

relay api {
    listen on localhost port 8080 tls
    forward to backend.example.com port 80
    tls keypair api
}

timeout 120
tls keyop timeout 2000
table <t> { 10.0.0.3 }
relay checked {
    listen on 127.0.0.1 port 7443 tls
    forward to <t> port 80 check tcp
    tls keypair api
}
"""


def test_full_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "SSL_DIR", "/ssl")
    path = write(tmp_path, FULL)
    cfg = parse_config(path)
    assert cfg.path == path
    assert cfg.prefork == 5
    assert cfg.user == "_relayd"
    assert cfg.chroot == "/var/chroot"
    assert cfg.timeout == 120  # ms: the health checks' (relayd)
    assert cfg.keys_inprocess is True
    assert cfg.keyop_timeout_ms == 2000
    assert cfg.log == {"connection", "state changes", "errors"}
    assert [r.name for r in cfg.relays] == ["www", "api", "checked"]

    www, api, checked = cfg.relays
    assert (checked.forwards[0].timeout_ms, checked.forwards[0].interval) == (120, 10)
    assert www.where == Where(path, 13)
    assert www.listens == [
        Listen("127.0.0.1", 8443, True, Where(path, 14)),
        Listen("::1", 8443, True, Where(path, 15)),
        Listen("*", 9443, True, Where(path, 16)),
    ]
    assert (www.forward_host, www.forward_port) == ("10.0.0.2", 8080)
    assert www.keypairs == [
        Keypair("/ssl/server.crt", "/ssl/private/server.key", Where(path, 18)),
        Keypair("/ssl/other.crt", "/ssl/private/other.key", Where(path, 19)),
        Keypair(str(tmp_path / "certs/chain.pem"), "/abs/key.pem", Where(path, 20)),
    ]
    assert www.ciphers == "HIGH:!aNULL"
    assert www.keyop_timeout_ms == 500
    assert www.session_timeout == 300

    # No overrides: the global values, even though given after the block.
    assert api.where == Where(path, 26)
    assert api.listens == [Listen("localhost", 8080, True, Where(path, 27))]
    assert (api.forward_host, api.forward_port) == ("backend.example.com", 80)
    assert api.keypairs == [Keypair("/ssl/api.crt", "/ssl/private/api.key", Where(path, 29))]
    assert api.ciphers is None
    assert api.keyop_timeout_ms == 2000
    assert api.session_timeout == 600  # relayd's default: `timeout` is the checks'


def test_defaults(tmp_path: Path) -> None:
    cfg = parse_text(tmp_path, PLAIN)
    assert (cfg.prefork, cfg.user, cfg.chroot, cfg.timeout) == (3, "_pyprivsep", "/var/empty", 200)
    assert cfg.interval == 10
    assert cfg.ca_user == "_pyprivsep_ca"
    assert (cfg.keys_inprocess, cfg.keyop_timeout_ms, cfg.log) == (False, 1000, set())
    relay = cfg.relays[0]
    assert (relay.keyop_timeout_ms, relay.session_timeout) == (1000, 600)
    assert parse_text(tmp_path, "").relays == []


def test_users_per_role(tmp_path: Path) -> None:
    cfg = parse_text(tmp_path, 'user "_relayd"\nca user "_relayd_ca"\n' + PLAIN)
    assert (cfg.user, cfg.ca_user) == ("_relayd", "_relayd_ca")
    # root for both is allowed: `make asan`'s children must stay dumpable
    cfg = parse_text(tmp_path, 'user "root"\nca user "root"\n' + PLAIN)
    assert (cfg.user, cfg.ca_user) == ("root", "root")


def test_keypair_maps_under_ssl_dir(tmp_path: Path) -> None:
    cfg = parse_text(tmp_path, "relay r {\n listen on * port 1 tls\n forward to ::1 port 2\n"
                     ' tls keypair "a.example"\n}\n')
    kp = cfg.relays[0].keypairs[0]
    assert kp.cert == os.path.join(config.SSL_DIR, "a.example.crt")
    assert kp.key == os.path.join(config.SSL_DIR, "private", "a.example.key")


def test_macros(tmp_path: Path) -> None:
    text = """\
p = 8000
p = 8001
host = "127.0.0.2"
name = "relay name"
flag = tls
relay $name {
    listen on $host port $p $flag
    forward to $host port $fwd
    tls certificate $cert key "k.pem"
}
"""
    cfg = parse_text(tmp_path, text, {"fwd": "9", "cert": "/c d.pem"})
    relay = cfg.relays[0]
    assert relay.name == "relay name"
    assert relay.listens[0].host == "127.0.0.2"
    assert relay.listens[0].port == 8001  # a later file definition wins
    assert relay.listens[0].tls
    assert relay.forward_port == 9
    assert relay.keypairs[0].cert == "/c d.pem"
    assert relay.keypairs[0].key == str(tmp_path / "k.pem")


def test_command_line_macros_take_precedence(tmp_path: Path) -> None:
    text = 'p = 8000\nrelay r {\n listen on * port $p tls\n forward to ::1 port 1\n tls keypair k\n}\np = 7000\n'
    assert parse_text(tmp_path, text).relays[0].listens[0].port == 8000
    assert parse_text(tmp_path, text, {"p": "9000"}).relays[0].listens[0].port == 9000


def test_macro_in_quotes_is_not_expanded(tmp_path: Path) -> None:
    cfg = parse_text(tmp_path, 'u = x\nuser "$u"\n')
    assert cfg.user == "$u"


def test_include(tmp_path: Path) -> None:
    write(tmp_path, 'addr = "127.0.0.1"\nprefork 7\n', "sub/macros.conf")
    write(tmp_path, "relay inc {\n listen on $addr port 443 tls\n"
          ' forward to $addr port 80\n tls certificate "c.pem" key "private/k.pem"\n}\n',
          "sub/relay.conf")
    write(tmp_path, 'include "macros.conf"\ninclude "relay.conf"\n', "sub/all.conf")
    main = write(tmp_path, 'include "sub/all.conf"\n' + PLAIN)
    cfg = parse_config(main)
    assert cfg.prefork == 7
    assert [r.name for r in cfg.relays] == ["inc", "plain"]
    inc = cfg.relays[0]
    relay_conf = str(tmp_path / "sub" / "relay.conf")
    assert inc.where == Where(relay_conf, 1)
    assert inc.keypairs == [Keypair(str(tmp_path / "sub/c.pem"),
                                    str(tmp_path / "sub/private/k.pem"), Where(relay_conf, 4))]
    assert cfg.relays[1].where == Where(main, 2)


def test_include_error_names_included_file(tmp_path: Path) -> None:
    write(tmp_path, "\n\nprefork 99\n", "inc.conf")
    main = write(tmp_path, 'include "inc.conf"\n')
    with pytest.raises(ConfigError) as info:
        parse_config(main)
    inc = str(tmp_path / "inc.conf")
    assert (info.value.file, info.value.line) == (inc, 3)
    assert str(info.value) == f"{inc}:3: prefork 99 out of range (1-64)"


def test_line_continuation_and_comments(tmp_path: Path) -> None:
    text = """\
relay r { # comment after brace
    listen on 127.0.0.1 \\
        port 8443 tls # comment
    forward to 127.0.0.1 port 80#no space needed
    tls ciphers "HIGH:\\
!aNULL#not a comment \\"quoted\\" \\\\"
    tls keypair k
}
prefork \\
    99
"""
    with pytest.raises(ConfigError, match=r":10: prefork 99 out of range"):
        parse_text(tmp_path, text)
    cfg = parse_text(tmp_path, text.replace("99", "9"))
    relay = cfg.relays[0]
    assert relay.listens[0].port == 8443 and relay.listens[0].tls
    assert relay.forward_port == 80
    assert relay.ciphers == 'HIGH:!aNULL#not a comment "quoted" \\'
    assert relay.keypairs[0].where.line == 7
    assert cfg.prefork == 9


def test_layout_variants(tmp_path: Path) -> None:
    text = ("relay one\n{\nlisten on 127.0.0.1 port 1 tls\ntls keypair k\n"
            "forward to 127.0.0.1 port 2 }\n"
            "relay two { listen on 127.0.0.1 port 3 tls\r\n tls keypair k\r\n"
            " forward to 127.0.0.1 port 4\r\n}")
    cfg = parse_text(tmp_path, text)
    assert [(r.name, r.listens[0].port, r.forward_port) for r in cfg.relays] == [
        ("one", 1, 2), ("two", 3, 4)]


def test_where_and_error_formatting() -> None:
    assert str(Where("/a.conf", 3)) == "/a.conf:3"
    err = ConfigError("/a.conf", 12, "boom")
    assert (err.file, err.line, err.msg, str(err)) == ("/a.conf", 12, "boom", "/a.conf:12: boom")
    assert str(ConfigError("/a.conf", 0, "boom")) == "/a.conf: boom"


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as info:
        parse_config(path)
    assert info.value.line == 0
    assert str(info.value) == f"{path}: cannot open: No such file or directory"


def relay(*body: str, name: str = "r") -> str:
    return f'relay "{name}" {{\n' + "".join(f"    {line}\n" for line in body) + "}\n"


LISTEN = "listen on 127.0.0.1 port 8443 tls"
KEYPAIR = "tls keypair k"
FORWARD = "forward to 127.0.0.1 port 8080"

ERRORS = [
    ("unknown-directive", "prefork 2\nfoo bar\n", 2, 'unknown directive "foo"'),
    ("unknown-tls-directive", "tls foo\n", 1, 'unknown directive "tls foo"'),
    ("unknown-relay-directive", relay(LISTEN, "frobnicate", FORWARD), 3,
     'unknown directive "frobnicate"'),
    ("missing-argument", "prefork\n", 1, 'missing argument for "prefork"'),
    ("missing-argument-eof", "user", 1, 'missing argument for "user"'),
    ("missing-port", relay(LISTEN, "forward to 127.0.0.1"), 3, 'missing "port" in "forward to"'),
    ("missing-port-number", relay("listen on * port", FORWARD), 2,
     'missing argument for "port"'),
    ("missing-keyop-timeout", "tls keyop 100\n", 1,
     'expected "timeout" in "tls keyop", got "100"'),
    ("extra-argument", "prefork 3 4\n", 1, 'extra argument "4" for "prefork"'),
    ("extra-argument-listen", relay("listen on * port 1 tls now", FORWARD), 2,
     'extra argument "now" for "listen on"'),
    ("extra-after-brace", PLAIN.replace("}", "} x"), 5, 'extra argument "x" for "}"'),
    ("not-a-number", "prefork three\n", 1, 'prefork "three" is not a number'),
    ("negative-number", "timeout -1\n", 1, 'timeout "-1" is not a number'),
    ("port-not-a-number", relay("listen on * port http", FORWARD), 2,
     'port "http" is not a number'),
    ("prefork-low", "prefork 0\n", 1, "prefork 0 out of range (1-64)"),
    ("prefork-high", "prefork 65\n", 1, "prefork 65 out of range (1-64)"),
    ("timeout-low", "timeout 0\n", 1, "timeout 0 out of range (1-3600000)"),
    ("timeout-high", "timeout 3600001\n", 1, "timeout 3600001 out of range (1-3600000)"),
    ("keyop-low", "tls keyop timeout 9\n", 1, "tls keyop timeout 9 out of range (10-60000)"),
    ("keyop-high", relay(LISTEN, FORWARD, "tls keyop timeout 60001"), 4,
     "tls keyop timeout 60001 out of range (10-60000)"),
    ("session-high", relay(LISTEN, FORWARD, "session timeout 86401"), 4,
     "session timeout 86401 out of range (1-86400)"),
    ("port-high", relay("listen on * port 70000", FORWARD), 2,
     "port 70000 out of range (1-65535)"),
    ("port-zero", relay(LISTEN, "forward to ::1 port 0"), 3, "port 0 out of range (1-65535)"),
    ("port-huge", relay(LISTEN, "forward to ::1 port " + "9" * 30), 3, "out of range (1-65535)"),
    ("duplicate-relay", relay(LISTEN, FORWARD, KEYPAIR, name="a") + 'relay a {\n', 6,
     'duplicate relay name "a"'),
    ("unterminated-string", 'prefork 3\nuser "nobody\nprefork 4\n', 2, "unterminated string"),
    ("unterminated-string-eof", 'user "nobody', 1, "unterminated string"),
    ("missing-brace", "\n" + relay(LISTEN, FORWARD)[:-2] + "\n\n", 6,
     'missing "}" (relay "r" opened at line 2)'),
    ("unexpected-brace", PLAIN + "}\n", 6, 'unexpected "}"'),
    ("unexpected-open-brace", "{\n", 1, 'unexpected "{"'),
    ("relay-without-brace", "relay r\nprefork 3\n", 2, 'expected "{" after relay "r"'),
    ("undefined-macro", relay("listen on $addr port 1", FORWARD), 2, 'undefined macro "addr"'),
    ("macro-defined-later", relay("listen on $addr port 1", FORWARD) + "addr = ::1\n", 2,
     'undefined macro "addr"'),
    ("bad-macro-reference", "user $a-b\n", 1, 'invalid macro reference "$a-b"'),
    ("macro-name-keyword", "port = 80\n", 1, 'invalid macro name "port": it is a keyword'),
    ("macro-name-invalid", "a-b = 80\n", 1, 'invalid macro name "a-b"'),
    ("macro-without-value", "a =\n", 1, 'missing value for macro "a"'),
    ("macro-inside-relay", relay(LISTEN, "a = 1", FORWARD), 3,
     "macros must be defined at top level"),
    ("no-listen", "\n" + relay(FORWARD), 2, 'relay "r" has no "listen on"'),
    ("no-forward", relay(LISTEN), 1, 'relay "r" has no "forward to"'),
    ("three-forwards", relay(LISTEN, FORWARD, "forward to ::1 port 1", "forward to ::1 port 2"), 5,
     'relay "r" has more than two "forward to" (a table and its fallback)'),
    ("tls-without-keypair", relay(LISTEN, FORWARD), 1,
     'relay "r" listens with tls but has no keypair'),
    ("listen-without-tls", relay(LISTEN, "listen on ::1 port 8443", FORWARD, KEYPAIR), 3,
     '"listen on ::1 port 8443" without "tls": only TLS listeners are supported'),
    ("duplicate-listen", relay("listen on ::1 port 1 tls", FORWARD, KEYPAIR, name="a")
     + relay("listen on 0::1 port 1 tls", FORWARD, name="b"), 7,
     "duplicate listen address 0::1 port 1 (already used at {path}:2)"),
    ("duplicate-listen-same-relay", relay("listen on * port 1 tls", "listen on * port 1 tls"), 3,
     "duplicate listen address * port 1"),
    ("nested-relay", relay(LISTEN, FORWARD, "relay x {"), 4, "nested relay blocks are not allowed"),
    ("listen-at-top", "listen on * port 1\n", 1, '"listen" is only valid inside a relay block'),
    ("forward-at-top", "forward to ::1 port 1\n", 1,
     '"forward" is only valid inside a relay block'),
    ("session-at-top", "session timeout 1\n", 1, '"session" is only valid inside a relay block'),
    ("keypair-at-top", "tls keypair k\n", 1, '"tls keypair" is only valid inside a relay block'),
    ("ciphers-at-top", "tls ciphers x\n", 1, '"tls ciphers" is only valid inside a relay block'),
    ("prefork-in-relay", relay(LISTEN, "prefork 3"), 3,
     '"prefork" is not allowed inside a relay block'),
    ("timeout-in-relay", relay("timeout 3"), 2, '"timeout" is not allowed inside a relay block'),
    ("log-in-relay", relay("log errors"), 2, '"log" is not allowed inside a relay block'),
    ("include-in-relay", relay('include "x"'), 2, '"include" is not allowed inside a relay block'),
    ("keys-not-inprocess", "keys elsewhere\n", 1,
     'expected "inprocess" in "keys", got "elsewhere"'),
    ("unknown-log", "log everything\n", 1, 'unknown log option "everything"'),
    ("log-state", "log state\n", 1, 'missing "changes" in "log state"'),
    ("bad-listen-address", relay("listen on 300.1.1.1 port 1", FORWARD), 2,
     'invalid address "300.1.1.1" in "listen on"'),
    ("bad-hostname", relay("listen on bad_host port 1", FORWARD), 2,
     'invalid address "bad_host" in "listen on"'),
    ("forward-to-any", relay(LISTEN, "forward to * port 1"), 3,
     'invalid address "*" in "forward to"'),
    ("bad-keypair-name", relay(LISTEN, FORWARD, 'tls keypair "../x"'), 4,
     'invalid keypair name "../x"'),
    ("certificate-without-key", relay(LISTEN, FORWARD, 'tls certificate "c"'), 4,
     'missing "key" in "tls certificate"'),
    ("relative-chroot", "chroot var/empty\n", 1, 'chroot "var/empty" is not an absolute path'),
    ("ca-without-user", "ca nobody\n", 1, 'expected "user" in "ca", got "nobody"'),
    ("ca-user-missing-argument", "ca user\n", 1, 'missing argument for "ca user"'),
    ("ca-user-empty", 'ca user ""\n', 1, "empty user name"),
    ("ca-user-in-relay", relay('ca user "x"'), 2, '"ca" is not allowed inside a relay block'),
    # relays and cas share no uid: an owned relay could signal its ca
    ("ca-user-is-user", 'user "www"\nprefork 2\nca user "www"\n', 3,
     'ca user "www" is the relays\' user too'),
    ("user-is-ca-user", 'ca user "www"\nuser "www"\n', 2,
     'ca user "www" is the relays\' user too'),
    ("user-is-default-ca-user", 'prefork 2\nuser "_pyprivsep_ca"\n', 2,
     'ca user "_pyprivsep_ca" is the relays\' user too'),
    ("ca-user-is-default-user", 'ca user "_pyprivsep"\n', 1,
     'ca user "_pyprivsep" is the relays\' user too'),
    # forward to ... proxy protocol v1|v2
    ("proxy-bad-version", relay(LISTEN, FORWARD + " proxy protocol v3"), 3,
     'proxy protocol "v3": expected "v1" or "v2"'),
    ("proxy-bare-number", relay(LISTEN, FORWARD + " proxy protocol 2"), 3,
     'proxy protocol "2": expected "v1" or "v2"'),
    ("proxy-without-protocol", relay(LISTEN, FORWARD + " proxy v2"), 3,
     'expected "protocol" in "forward to ... proxy", got "v2"'),
    ("proxy-without-version", relay(LISTEN, FORWARD + " proxy protocol"), 3,
     'missing argument for "proxy protocol"'),
    ("proxy-extra", relay(LISTEN, FORWARD + " proxy protocol v1 v2"), 3,
     'extra argument "v2" for "forward to"'),
    ("forward-junk", relay(LISTEN, FORWARD + " haproxy"), 3,
     'extra argument "haproxy" for "forward to"'),
    # tls alpn
    ("alpn-missing", relay(LISTEN, FORWARD, "tls alpn"), 4, 'missing argument for "tls alpn"'),
    ("alpn-empty", relay(LISTEN, FORWARD, 'tls alpn ""'), 4,
     'tls alpn "": an empty name is not a protocol name'),
    ("alpn-empty-name", relay(LISTEN, FORWARD, 'tls alpn "h2,"'), 4,
     'tls alpn "h2,": an empty name is not a protocol name'),
    ("alpn-space", relay(LISTEN, FORWARD, 'tls alpn "h2, http/1.1"'), 4,
     'tls alpn "h2, http/1.1": " http/1.1" is not a protocol name'),
    ("alpn-too-long-name", relay(LISTEN, FORWARD, f'tls alpn "{"x" * 256}"'), 4,
     "is not a protocol name (1-255 printable characters"),
    ("alpn-twice-listed", relay(LISTEN, FORWARD, 'tls alpn "h2,http/1.1,h2"'), 4,
     'tls alpn "h2,http/1.1,h2": "h2" is listed twice'),
    ("alpn-too-many", relay(LISTEN, FORWARD, 'tls alpn "' + ",".join(f"p{i}" for i in range(17)) + '"'),
     4, "tls alpn: 17 protocols, at most 16"),
    ("alpn-two-directives", relay(LISTEN, FORWARD, "tls alpn h2", "tls alpn http/1.1"), 5,
     'relay "r" has more than one "tls alpn"'),
    ("alpn-at-top", 'tls alpn "h2"\n', 1, '"tls alpn" is only valid inside a relay block'),
    ("alpn-in-keyservice", 'keyservice k {\n    tls alpn h2\n}\n', 2,
     '"tls alpn" is not valid inside a keyservice block'),
]


def test_proxy_protocol_and_alpn(tmp_path: Path) -> None:
    cfg = parse_text(tmp_path, relay(LISTEN, FORWARD + " proxy protocol v1", KEYPAIR, name="one")
                     + relay("listen on ::1 port 1 tls", "forward to ::1 port 2 proxy protocol v2",
                             'tls alpn "h2,http/1.1"', KEYPAIR, name="two")
                     + PLAIN)
    one, two, plain = cfg.relays
    assert (one.proxy_protocol, one.alpn) == (1, [])
    assert (two.proxy_protocol, two.alpn) == (2, ["h2", "http/1.1"])
    assert (two.forward_host, two.forward_port) == ("::1", 2)
    # the defaults: no PROXY header, no ALPN
    assert (plain.proxy_protocol, plain.alpn) == (0, [])


def test_proxy_and_alpn_from_macros(tmp_path: Path) -> None:
    cfg = parse_text(tmp_path, 'pp = v2\nprotos = "h2,http/1.1"\n'
                     + relay(LISTEN, FORWARD + " proxy protocol $pp", "tls alpn $protos", KEYPAIR))
    assert (cfg.relays[0].proxy_protocol, cfg.relays[0].alpn) == (2, ["h2", "http/1.1"])


@pytest.mark.parametrize("text, line, message", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        parse_config(path)
    err = info.value
    assert (err.file, err.line) == (path, line)
    assert str(err).startswith(f"{path}:{line}: ")
    assert message.replace("{path}", path) in err.msg


def test_include_missing(tmp_path: Path) -> None:
    main = write(tmp_path, 'prefork 3\ninclude "missing.conf"\n')
    with pytest.raises(ConfigError) as info:
        parse_config(main)
    assert str(info.value) == (f'{main}:2: cannot open "{tmp_path / "missing.conf"}": '
                               "No such file or directory")


def test_include_loop(tmp_path: Path) -> None:
    write(tmp_path, 'include "a.conf"\n', "b.conf")
    main = write(tmp_path, 'include "b.conf"\n', "a.conf")
    with pytest.raises(ConfigError) as info:
        parse_config(main)
    assert str(info.value) == f'{tmp_path / "b.conf"}:1: include loop: "{main}"'


@pytest.mark.parametrize("arg, expected", [
    ("ext=127.0.0.1", ("ext", "127.0.0.1")),
    ("a=b=c", ("a", "b=c")),
    ("empty=", ("empty", "")),
    ("with_space=a b", ("with_space", "a b")),
])
def test_parse_macro_arg(arg: str, expected: tuple[str, str]) -> None:
    assert parse_macro_arg(arg) == expected


@pytest.mark.parametrize("arg, message", [
    ("novalue", "expected name=value"),
    ("=x", 'invalid macro name ""'),
    ("bad-name=1", 'invalid macro name "bad-name"'),
    ("relay=1", "keyword"),
])
def test_parse_macro_arg_errors(arg: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_macro_arg(arg)


def test_connection_limit_and_handshake_timeout(tmp_path: Path) -> None:
    conf = tmp_path / "limits.conf"
    conf.write_text("max connections 500\ntls handshake timeout 5\n")
    cfg = parse_config(str(conf))
    assert (cfg.max_connections, cfg.handshake_timeout) == (500, 5)
    defaults = tmp_path / "defaults.conf"
    defaults.write_text("")
    cfg = parse_config(str(defaults))
    assert (cfg.max_connections, cfg.handshake_timeout) == (10000, 30)


@pytest.mark.parametrize("line, msg", [
    ("max connections 0", "max connections 0 out of range"),
    ("max connections", 'missing argument for "max connections"'),
    ("max sessions 4", 'expected "connections"'),
    ("tls handshake timeout 0", "tls handshake timeout 0 out of range"),
])
def test_limit_errors(tmp_path: Path, line: str, msg: str) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(f"# limits\n{line}\n")
    with pytest.raises(ConfigError) as e:
        parse_config(str(conf))
    assert str(e.value).startswith(f"{conf}:2: ") and msg in str(e.value)


def test_operations_directives(tmp_path: Path) -> None:
    conf = tmp_path / "ops.conf"
    conf.write_text('tls ticket lifetime 60\nsocket "/tmp/x.sock"\n'
                    "metrics listen on 127.0.0.1 port 9102\nkeyops blocking\n"
                    "log connection\nlog errors\n")
    cfg = parse_config(str(conf))
    assert cfg.ticket_lifetime == 60 and cfg.socket == "/tmp/x.sock"
    assert cfg.metrics is not None and (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 9102)
    assert cfg.keyops == "blocking" and cfg.log == {"connection", "errors"}


@pytest.mark.parametrize("line, msg", [
    ("tls ticket lifetime 1", "tls ticket lifetime 1 out of range"),
    ('socket "relative.sock"', "is not an absolute path"),
    ("metrics listen on 127.0.0.1", 'missing "port"'),
    ("keyops sometimes", 'keyops "sometimes"'),
])
def test_operations_errors(tmp_path: Path, line: str, msg: str) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(f"# ops\n{line}\n")
    with pytest.raises(ConfigError) as e:
        parse_config(str(conf))
    assert str(e.value).startswith(f"{conf}:2: ") and msg in str(e.value)


def test_keyops_async_without_async_support_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LibreSSL has no ASYNC: asking for keyops async there names the line."""
    from pyprivsep import native, relay

    conf = tmp_path / "async.conf"
    conf.write_text("# a LibreSSL build\nkeyops async\n")
    cfg = parse_config(str(conf))
    monkeypatch.setattr(native, "async_supported", lambda: False)
    with pytest.raises(ConfigError) as e:
        relay.keyops_async(cfg)
    assert str(e.value).startswith(f"{conf}:2: keyops async: ")
    conf.write_text("keyops blocking\n")
    assert relay.keyops_async(parse_config(str(conf))) is False


def test_default_socket_has_one_owner(tmp_path: Path) -> None:
    """`pyprivsep ctl` looks where the daemon listens by default: both take
    the path from config.DEFAULT_SOCKET, not from two copies of it."""
    from pyprivsep import ctl

    assert parse_text(tmp_path, "").socket == config.DEFAULT_SOCKET
    assert ctl.DEFAULT_SOCKET is config.DEFAULT_SOCKET


# --- keyservice blocks ------------------------------------------------------

KEYSERVICE = """keyservice "web" {
    socket "/run/pyprivsep/web.sock"
    allow user "root"
    allow group "daemon"
    tls keypair "web"
    tls certificate "certs/web.crt" key "/abs/web.key"
}
"""


def test_keyservice_block_and_defaults(tmp_path: Path) -> None:
    """A configuration of a keyservice alone: no relays, the block's
    directives, names resolved to numbers, prefork 2 by default."""
    import grp
    import pwd
    cfg = parse_text(tmp_path, KEYSERVICE)
    assert cfg.relays == []
    [ks] = cfg.keyservices
    assert (ks.name, ks.socket, ks.prefork) == ("web", "/run/pyprivsep/web.sock", config.KEYSERVICE_PREFORK)
    assert config.KEYSERVICE_PREFORK == 2
    assert ks.allow_users == ["root"] and ks.allow_groups == ["daemon"]
    daemon = grp.getgrnam("daemon")
    members = {pwd.getpwnam(n).pw_uid for n in daemon.gr_mem}
    members |= {pw.pw_uid for pw in pwd.getpwall() if pw.pw_gid == daemon.gr_gid}
    assert set(ks.uids) == {0} | members and ks.gids == [daemon.gr_gid]
    assert [(kp.cert, kp.key) for kp in ks.keypairs] == [
        ("/etc/ssl/web.crt", "/etc/ssl/private/web.key"),
        (str(tmp_path / "certs/web.crt"), "/abs/web.key")]
    assert ks.where == Where(str(tmp_path / "test.conf"), 1)


def test_keyservice_with_relays_and_prefork(tmp_path: Path) -> None:
    cfg = parse_text(tmp_path, PLAIN + KEYSERVICE.replace('allow group "daemon"', "prefork 5\n allow user 4242"))
    assert len(cfg.relays) == 1
    [ks] = cfg.keyservices
    assert ks.prefork == 5 and ks.uids == [0, 4242] and ks.gids == []


@pytest.mark.parametrize("text, line, message", [
    ('keyservice "a" {\n allow user root\n tls keypair a\n}\n', 1, 'keyservice "a" has no "socket"'),
    ('keyservice "a" {\n socket "x.sock"\n}\n', 2, 'socket "x.sock" is not an absolute path'),
    ('keyservice "a" {\n socket "/r/a"\n tls keypair a\n}\n', 1, "allows nobody"),
    ('keyservice "a" {\n socket "/r/a"\n allow user root\n}\n', 1, 'keyservice "a" has no keypair'),
    ('keyservice "a" {\n socket "/r/a"\n allow user "no-such-pps-user"\n}\n', 3,
     'allow user "no-such-pps-user": no such user'),
    ('keyservice "a" {\n socket "/r/a"\n allow group "no-such-pps-group"\n}\n', 3,
     'allow group "no-such-pps-group": no such group'),
    ('keyservice "a" {\n socket "/r/a"\n allow everyone\n}\n', 3, '"allow everyone": expected'),
    ('keyservice "a" {\n socket "/r/a"\n socket "/r/b"\n}\n', 3, 'more than one "socket"'),
    ('keyservice "a" {\n prefork 65\n}\n', 2, "prefork 65 out of range (1-64)"),
    ('keyservice "a" {\n forward to 127.0.0.1 port 80\n}\n', 2, '"forward" is not allowed inside a keyservice'),
    ('keyservice "a" {\n tls ciphers "HIGH"\n}\n', 2, '"tls ciphers" is not valid inside a keyservice'),
    ('keyservice "a" {\n relay b {\n', 2, "nested relay blocks are not allowed"),
    ('keyservice "a" {\n socket "/r/a"\n', 2, 'missing "}" (keyservice "a" opened at line 1)'),
    ('allow user root\n', 1, '"allow" is only valid inside a keyservice block'),
    ('keyservice "a" {\n socket "/r/a"\n allow user root\n tls keypair a\n}\n'
     'keyservice "a" {\n', 6, 'duplicate keyservice name "a"'),
    ('keyservice "a" {\n socket "/r/a"\n allow user root\n tls keypair a\n}\n'
     'keyservice "b" {\n socket "/r/./a"\n', 7, "duplicate keyservice socket /r/./a (already used at"),
    ('socket "/r/a"\nkeyservice "a" {\n socket "/r/a"\n allow user root\n tls keypair a\n}\n', 2,
     "is the control socket"),
])
def test_keyservice_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_text(tmp_path, text)
    assert (exc.value.file, exc.value.line) == (str(tmp_path / "test.conf"), line)
    assert message in exc.value.msg


# -- OCSP stapling and client certificates -------------------------------------


def test_ocsp_on_the_keypair_line_and_client_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "SSL_DIR", "/ssl")
    cfg = parse_text(tmp_path, relay(
        LISTEN, FORWARD,
        'tls certificate "a.crt" key "a.key" ocsp "ocsp/a.der"',
        'tls keypair b ocsp "/abs/b.der"',
        "tls keypair c",
        'tls client ca "clients.pem"'))
    path = str(tmp_path / "test.conf")
    [r] = cfg.relays
    assert r.keypairs == [
        Keypair(str(tmp_path / "a.crt"), str(tmp_path / "a.key"), Where(path, 4), str(tmp_path / "ocsp/a.der")),
        Keypair("/ssl/b.crt", "/ssl/private/b.key", Where(path, 5), "/abs/b.der"),
        Keypair("/ssl/c.crt", "/ssl/private/c.key", Where(path, 6)),
    ]
    # required unless told optional
    assert r.client_ca == ClientCa(str(tmp_path / "clients.pem"), False, Where(path, 7))


def test_client_ca_optional_and_defaults(tmp_path: Path) -> None:
    cfg = parse_text(tmp_path, relay(LISTEN, FORWARD, KEYPAIR, 'tls client ca "/c.pem" optional')
                     + relay("listen on ::1 port 1 tls", FORWARD, KEYPAIR, name="s"))
    first, second = cfg.relays
    assert first.client_ca is not None and first.client_ca.optional
    assert second.client_ca is None
    assert all(kp.ocsp is None for r in cfg.relays for kp in r.keypairs)


@pytest.mark.parametrize("text, line, message", [
    (relay(LISTEN, FORWARD, KEYPAIR, 'tls ocsp "a.der"'), 5,
     '"tls ocsp" belongs on its certificate\'s line: tls certificate "CERT" key "KEY" ocsp "FILE"'),
    (relay(LISTEN, FORWARD, 'tls certificate "a" key "b" ocsp'), 4,
     'missing argument for "tls certificate ocsp"'),
    (relay(LISTEN, FORWARD, 'tls keypair a ocsp ""'), 4, "empty path"),
    (relay(LISTEN, FORWARD, 'tls keypair a ocsp "x" "y"'), 4, 'extra argument "y" for "tls keypair"'),
    (relay(LISTEN, FORWARD, 'tls certificate "a" ocsp "x" key "b"'), 4,
     'expected "key" in "tls certificate", got "ocsp"'),
    ('tls ocsp "a.der"\n', 1, '"tls ocsp" is only valid inside a relay block'),
    ('tls client ca "c.pem"\n', 1, '"tls client" is only valid inside a relay block'),
    (relay(LISTEN, FORWARD, KEYPAIR, "tls client"), 5, 'missing "ca" in "tls client"'),
    (relay(LISTEN, FORWARD, KEYPAIR, 'tls client cert "c.pem"'), 5, 'expected "ca" in "tls client", got "cert"'),
    (relay(LISTEN, FORWARD, KEYPAIR, "tls client ca"), 5, 'missing argument for "tls client ca"'),
    (relay(LISTEN, FORWARD, KEYPAIR, 'tls client ca "c.pem" required'), 5,
     'extra argument "required" for "tls client ca"'),
    (relay(LISTEN, FORWARD, KEYPAIR, 'tls client ca "c.pem"', 'tls client ca "d.pem" optional'), 6,
     'relay "r" has more than one "tls client ca" (first at {path}:5)'),
    ('keyservice "a" {\n socket "/r/a"\n allow user root\n tls keypair a ocsp "a.der"\n}\n', 4,
     '"ocsp" is not valid inside a keyservice block'),
    ('keyservice "a" {\n tls client ca "c.pem"\n}\n', 2, '"tls client" is not valid inside a keyservice'),
])
def test_ocsp_and_client_ca_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        parse_config(path)
    assert (info.value.file, info.value.line) == (path, line)
    assert message.replace("{path}", path) in info.value.msg


# -- tables, modes and the fallback (relayd's `table` and `forward to <t>`) ---

TABLES = """\
table <web> { 127.0.0.1, 127.0.0.2
    ::1 }
table <spare> disable { 10.0.0.9 }
table <backup> { 10.0.0.7 } disable
relay r {
    listen on 127.0.0.1 port 8443 tls
    forward to <web> port 8080 mode least-states proxy protocol v2
    forward to <spare> port 80
    tls keypair k
}
relay plain {
    listen on 127.0.0.1 port 9443 tls
    forward to 127.0.0.3 port 81 proxy protocol v1
    tls keypair k
}
"""


def test_tables_modes_and_fallback(tmp_path: Path) -> None:
    cfg = parse_text(tmp_path, TABLES)
    assert set(cfg.tables) == {"web", "spare", "backup"}
    assert cfg.tables["web"].hosts == ["127.0.0.1", "127.0.0.2", "::1"]
    assert [cfg.tables[t].disabled for t in ("web", "spare", "backup")] == [False, True, True]
    r, plain = cfg.relays
    first, fallback = r.forwards
    assert (first.table, first.hosts, first.port, first.mode) == (
        "web", ["127.0.0.1", "127.0.0.2", "::1"], 8080, "least-states")
    assert (fallback.table, fallback.mode, fallback.disabled) == ("spare", "roundrobin", True)
    assert r.proxy_protocol == 2
    assert (r.forward_host, r.forward_port) == ("127.0.0.1", 8080)
    # `forward to ADDRESS` is a table of one host
    assert [(f.table, f.hosts, f.port) for f in plain.forwards] == [(None, ["127.0.0.3"], 81)]
    assert plain.proxy_protocol == 1


@pytest.mark.parametrize("mode", sorted(config.MODES))
def test_every_mode(tmp_path: Path, mode: str) -> None:
    cfg = parse_text(tmp_path, "table <t> { 127.0.0.1 }\n"
                     + relay(LISTEN, f"forward to <t> port 80 mode {mode}", KEYPAIR))
    assert cfg.relays[0].forwards[0].mode == mode


TABLE_T = "table <t> { 127.0.0.1 127.0.0.2 }\n"

TABLE_ERRORS = [
    ("undefined", relay(LISTEN, "forward to <nope> port 80", KEYPAIR), 3,
     'table "<nope>" is not defined'),
    ("defined-after", relay(LISTEN, "forward to <t> port 80", KEYPAIR) + TABLE_T, 3,
     'table "<t>" is not defined'),
    ("bad-mode", TABLE_T + relay(LISTEN, "forward to <t> port 80 mode fastest", KEYPAIR), 4,
     'unknown mode "fastest"'),
    ("mode-without-table", relay(LISTEN, "forward to 127.0.0.1 port 80 mode random", KEYPAIR), 3,
     '"mode" needs a table'),
    ("mode-missing", TABLE_T + relay(LISTEN, "forward to <t> port 80 mode", KEYPAIR), 4,
     'missing argument for "mode"'),
    ("table-no-port", TABLE_T + relay(LISTEN, "forward to <t>", KEYPAIR), 4,
     'missing "port" in "forward to"'),
    ("duplicate-table", TABLE_T + "\n" + TABLE_T, 3, 'duplicate table "<t>" (already defined at'),
    ("empty-table", "table <e> { }\n", 1, 'table "<e>" has no hosts'),
    ("bad-table-name", "table web { 127.0.0.1 }\n", 1, 'invalid table name "web"'),
    ("bad-host", "table <t> {\n 127.0.0.1\n 300.1.1.1\n}\n", 3,
     'invalid address "300.1.1.1" in table "<t>"'),
    ("host-twice", "table <t> {\n 127.0.0.1\n 127.0.0.1\n}\n", 3,
     "host 127.0.0.1 listed twice (line 2)"),
    ("unclosed-table", "table <t> { 127.0.0.1\n", 1, 'missing "}" (table "<t>" opened at line 1)'),
    ("no-brace", "table <t> 127.0.0.1\n", 1, 'expected "{" after table "<t>"'),
    ("table-in-relay", relay(LISTEN, "table <t> { 127.0.0.1 }"), 3,
     '"table" is not allowed inside a relay block'),
    ("proxy-versions-differ", TABLE_T + relay(LISTEN, "forward to <t> port 80 proxy protocol v1",
                                              "forward to ::1 port 80 proxy protocol v2", KEYPAIR), 5,
     "proxy protocol v2: line 4 says another version"),
    ("table-junk", TABLE_T + relay(LISTEN, "forward to <t> port 80 fast", KEYPAIR), 4,
     'extra argument "fast" for "forward to"'),
    ("too-many-hosts", "table <big> {\n" + "".join(f" 10.0.{i // 250}.{i % 250 + 1}\n" for i in range(65))
     + "}\n", 1, 'table "<big>" has 65 hosts, at most 64'),
]


@pytest.mark.parametrize("text, line, message", [e[1:] for e in TABLE_ERRORS],
                         ids=[e[0] for e in TABLE_ERRORS])
def test_table_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    test_errors(tmp_path, text, line, message)


# -- health checks; the global `timeout` is relayd's (ms), not the session's --

CHECKED = """\
interval 3
timeout 500
table <web> { 127.0.0.1, 127.0.0.2 }
table <backup> { 127.0.0.3 }
relay r {
    listen on 127.0.0.1 port 8443 tls
    forward to <web> port 80 mode roundrobin check http "/health" code 200 timeout 300
    forward to <backup> port 81 check send "PING\\r\\n" expect "+PONG*" tls interval 6
    tls keypair k
}
relay s {
    listen on 127.0.0.1 port 9443 tls
    forward to <web> port 443 check https "/" code 204
    forward to <backup> port 443 check tls
    tls keypair k
}
relay t {
    listen on 127.0.0.1 port 7443 tls
    forward to <web> port 22 check tcp
    tls keypair k
    session timeout 30
}
"""


def test_checks_interval_and_timeouts(tmp_path: Path) -> None:
    cfg = parse_text(tmp_path, CHECKED)
    assert (cfg.interval, cfg.timeout) == (3, 500)
    r, s, t = cfg.relays
    web, backup = r.forwards
    assert web.check == config.Check("http", path="/health", code=200)
    assert (web.timeout_ms, web.interval) == (300, 3)
    assert backup.check == config.Check("send", send="PING\\r\\n", expect="+PONG*", tls=True)
    assert (backup.timeout_ms, backup.interval) == (500, 6)
    assert s.forwards[0].check == config.Check("https", path="/", code=204, tls=True)
    assert s.forwards[1].check == config.Check("tls", tls=True)
    assert t.forwards[0].check == config.Check("tcp")
    assert (r.session_timeout, t.session_timeout) == (600, 30)


def test_old_timeout_is_refused_naming_session_timeout(tmp_path: Path) -> None:
    """pyprivsep's `timeout 600` (idle seconds) must not become 600 ms
    checks of nothing: refused, naming `session timeout`."""
    path = write(tmp_path, "prefork 2\ntimeout 600\n" + PLAIN)
    with pytest.raises(ConfigError) as info:
        parse_config(path)
    assert (info.value.file, info.value.line) == (path, 2)
    assert 'write "session timeout 600" in each relay block' in info.value.msg
    assert "health check timeout in milliseconds" in info.value.msg


CHECK_ERRORS = [
    ("check-on-address", relay(LISTEN, "forward to 127.0.0.1 port 80 check tcp", KEYPAIR), 3,
     '"check" needs a table'),
    ("unknown-check", TABLE_T + relay(LISTEN, "forward to <t> port 80 check icmp", KEYPAIR), 4,
     'unknown check "icmp"'),
    ("http-no-code", TABLE_T + relay(LISTEN, 'forward to <t> port 80 check http "/"', KEYPAIR), 4,
     'missing "code" in "check http"'),
    ("http-bad-path", TABLE_T + relay(LISTEN, 'forward to <t> port 80 check http "x" code 200', KEYPAIR),
     4, 'check http "x": expected a path from "/"'),
    ("http-bad-code", TABLE_T + relay(LISTEN, 'forward to <t> port 80 check http "/" code 99', KEYPAIR),
     4, "code 99 out of range (100-999)"),
    ("send-no-expect", TABLE_T + relay(LISTEN, 'forward to <t> port 80 check send "x"', KEYPAIR), 4,
     'missing "expect" in "check send"'),
    ("two-checks", TABLE_T + relay(LISTEN, "forward to <t> port 80 check tcp check tls", KEYPAIR), 4,
     'more than one "check"'),
    ("check-timeout-zero", TABLE_T + relay(LISTEN, "forward to <t> port 80 check tcp timeout 0",
                                           KEYPAIR), 4, "timeout 0 out of range"),
    ("interval-zero", "interval 0\n", 1, "interval 0 out of range (1-3600)"),
    ("interval-not-multiple", "interval 2\n" + TABLE_T + relay(LISTEN, "forward to <t> port 80 check tcp interval 3",
                                                             KEYPAIR), 5,
     "interval 3: a table's interval must be a multiple of the global interval (2)"),
    ("interval-in-relay", relay("interval 3"), 2, '"interval" is not allowed inside a relay block'),
]


@pytest.mark.parametrize("text, line, message", [e[1:] for e in CHECK_ERRORS],
                         ids=[e[0] for e in CHECK_ERRORS])
def test_check_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    test_errors(tmp_path, text, line, message)
