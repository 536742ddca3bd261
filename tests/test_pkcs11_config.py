"""The `pkcs11` line and `key "pkcs11:..."` URIs (RFC 7512) as the parser
reads them: what they become, and every refusal naming its file and line.
No token is needed here (tests/test_pkcs11.py uses one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyprivsep.config import ConfigError, Pkcs11, Pkcs11Uri, parse_config

MODULE = 'pkcs11 module "/usr/lib/softhsm/libsofthsm2.so" pin "file:/etc/pyprivsep/token.pin"'


def relay(key: str, *extra: str) -> str:
    return "\n".join(['relay "www" {', "    listen on 127.0.0.1 port 8443 tls",
                      "    forward to 127.0.0.1 port 8080", *extra,
                      f'    tls certificate "/etc/ssl/www.crt" key "{key}"', "}", ""])


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "p11.conf"
    path.write_text(text)
    return str(path)


def test_the_brief_example(tmp_path: Path) -> None:
    cfg = parse_config(write(tmp_path, MODULE + "\n" + relay("pkcs11:token=web;object=www;type=private")))
    assert cfg.pkcs11 == Pkcs11("/usr/lib/softhsm/libsofthsm2.so", "/etc/pyprivsep/token.pin", None,
                                cfg.pkcs11.where if cfg.pkcs11 else None)  # type: ignore[arg-type]
    assert cfg.pkcs11 is not None and cfg.pkcs11.where.line == 1
    kp = cfg.relays[0].keypairs[0]
    assert kp.key == "pkcs11:token=web;object=www;type=private"
    assert kp.p11 == Pkcs11Uri("web", b"www", None)


def test_percent_encoded_id_and_server(tmp_path: Path) -> None:
    text = (MODULE.replace("libsofthsm2.so", "x").replace(
        '"/usr/lib/softhsm/x"', '"/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"')
        + ' server "unix:path=/run/pyprivsep/p11.sock"\n'
        + relay("pkcs11:token=my%20token;id=%01%ff%41"))
    cfg = parse_config(write(tmp_path, text))
    assert cfg.pkcs11 is not None and cfg.pkcs11.server == "unix:path=/run/pyprivsep/p11.sock"
    assert cfg.relays[0].keypairs[0].p11 == Pkcs11Uri("my token", None, b"\x01\xffA")


def test_a_keyservice_takes_token_keys(tmp_path: Path) -> None:
    text = MODULE + '\nkeyservice "ks" {\n    socket "/run/ks.sock"\n    allow user "root"\n' \
        '    tls certificate "/etc/ssl/a.crt" key "pkcs11:token=web;object=a"\n}\n'
    cfg = parse_config(write(tmp_path, text))
    assert cfg.keyservices[0].keypairs[0].p11 == Pkcs11Uri("web", b"a", None)


ERRORS = [
    ("unknown-attribute", MODULE + "\n" + relay("pkcs11:token=web;object=www;slot-id=1"), 5,
     'attribute "slot-id" not supported'),
    ("query", MODULE + "\n" + relay("pkcs11:token=web;object=www?pin-value=1234"), 5,
     "query attributes (after ?) are not accepted"),
    ("type-public", MODULE + "\n" + relay("pkcs11:token=web;object=www;type=public"), 5,
     "only type=private"),
    ("no-token", MODULE + "\n" + relay("pkcs11:object=www"), 5, "no token=LABEL"),
    ("no-object-or-id", MODULE + "\n" + relay("pkcs11:token=web;type=private"), 5,
     "neither object=LABEL nor id=ID"),
    ("bad-percent", MODULE + "\n" + relay("pkcs11:token=web;id=%zz"), 5, "bad percent-encoding"),
    ("twice", MODULE + "\n" + relay("pkcs11:token=web;object=a;object=b"), 5, 'attribute "object" given twice'),
    ("empty", MODULE + "\n" + relay("pkcs11:token=web;object="), 5, 'empty attribute "object"'),
    ("not-attr", MODULE + "\n" + relay("pkcs11:token=web;www"), 5, '"www" is not attribute=value'),
    ("long-token", MODULE + "\n" + relay("pkcs11:token=" + "t" * 33 + ";object=a"), 5,
     "token label longer than 32 bytes"),
    ("no-pkcs11-line", relay("pkcs11:token=web;object=www"), 4, 'no "pkcs11 module" line'),
    ("inprocess", MODULE + "\nkeys inprocess\n" + relay("pkcs11:token=web;object=www"), 6,
     '"keys inprocess" relays cannot use a key in a PKCS#11 token'),
    ("second-line", MODULE + "\n" + MODULE + "\n", 2, 'more than one "pkcs11" line'),
    ("pin-literal", 'pkcs11 module "/m.so" pin "1234"\n', 1, '"file:/absolute/path"'),
    ("pin-relative", 'pkcs11 module "/m.so" pin "file:token.pin"\n', 1, '"file:/absolute/path"'),
    ("module-relative", 'pkcs11 module "m.so" pin "file:/p"\n', 1, "is not an absolute path"),
    ("no-pin", 'pkcs11 module "/m.so"\n', 1, 'missing "pin" in "pkcs11 module"'),
    ("server-tcp", 'pkcs11 module "/m.so" pin "file:/p" server "tcp:host=hsm"\n', 1,
     'expected "unix:path=/absolute/socket"'),
    ("extra", 'pkcs11 module "/m.so" pin "file:/p" slot 1\n', 1, 'extra argument'),
    ("in-relay", relay("/etc/ssl/www.key", MODULE), 4, '"pkcs11" is not allowed inside a relay block'),
]


@pytest.mark.parametrize("text, line, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        parse_config(path)
    assert (info.value.file, info.value.line) == (path, line), str(info.value)
    assert message in info.value.msg, str(info.value)
