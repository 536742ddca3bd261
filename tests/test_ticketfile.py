"""`tls ticket keys "file"`: session-ticket keys read from a file (haproxy's
base64 lines of name|AES|HMAC), shared by several daemons; the first key
seals, every key opens; the file is read again on every reload."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from backends import BACKEND_PAGE, HttpBackend
from basics import free_port
from daemonctl import Daemon, DaemonConfig, RelaySpec, StartDaemon, run_pyprivsep
from keypairs import Pki
from tlsclients import HTTP_GET_ROOT, NO_TLS13_RESUMPTION, TLS13_RESUMES, TlsVersion, s_client

from pyprivsep import tickets
from pyprivsep.config import ConfigError, Where, parse_config

VERSIONS: tuple[TlsVersion, ...] = ("1.2", "1.3")
WHERE = Where("/etc/pyprivsep.conf", 7)


def key(name: bytes) -> bytes:
    """An 80-byte key, haproxy's layout: name 16, AES 32, HMAC 32."""
    assert len(name) == 16
    return name + os.urandom(64)


def write_keys(path: Path, keys: Sequence[bytes], mode: int = 0o600) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text("# ticket keys, newest (sealing) first\n"
                   + "".join(base64.b64encode(k).decode() + "\n" for k in keys))
    tmp.chmod(mode)
    os.replace(tmp, path)


def ticket_key_name(session: Path) -> bytes:
    """The first 16 bytes of the ticket in an s_client -sess_out file."""
    out = subprocess.run(["openssl", "sess_id", "-in", str(session), "-noout", "-text"],
                         capture_output=True, text=True, check=True).stdout
    dump = out.split("TLS session ticket:", 1)[1]
    hexbytes = []
    for line in dump.splitlines():
        m = re.match(r"\s*[0-9a-f]{4} - ((?:[0-9a-f]{2}[ -]){1,16})", line)
        if m is None:
            if hexbytes:
                break
            continue
        hexbytes += re.findall(r"[0-9a-f]{2}", m.group(1))
    return bytes.fromhex("".join(hexbytes[:16]))


# -- the file ----------------------------------------------------------------


def test_file_layout_maps_onto_the_relays_layout(tmp_path: Path) -> None:
    """haproxy's name|aes|hmac becomes the relays' name|hmac|aes, in order."""
    name, aes, hmac = b"N" * 16, b"A" * 32, b"H" * 32
    second = key(b"second-key-name!")
    path = tmp_path / "ticket.keys"
    write_keys(path, [name + aes + hmac, second])
    got = tickets.read_ticket_keys(str(path), WHERE)
    assert got == [name + hmac + aes, second[:16] + second[48:] + second[16:48]]


@pytest.mark.parametrize("text, line, msg", [
    ("not base64!\n", 1, "not a base64 line"),
    ("# c\n\n" + base64.b64encode(b"x" * 48).decode() + "\n", 3, "a key of 48 bytes, expected 80"),
    (base64.b64encode(b"k" * 80).decode() + "\n" + base64.b64encode(b"k" * 80).decode() + "\n",
     2, "the same key name as line 1"),
    ("# only a comment\n", 0, "no key"),
    ("".join(base64.b64encode(bytes([i]) * 80).decode() + "\n" for i in range(9)), 0, "9 keys, at most 8"),
])
def test_malformed_files_are_refused_naming_file_and_line(tmp_path: Path, text: str, line: int,
                                                         msg: str) -> None:
    path = tmp_path / "ticket.keys"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ConfigError) as e:
        tickets.read_ticket_keys(str(path), WHERE)
    at = f"{path}:{line}" if line else f"{path}:"
    assert str(e.value).startswith(f"{WHERE.file}:{WHERE.line}: tls ticket keys {at}"), str(e.value)
    assert msg in str(e.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "ticket.keys"
    write_keys(path, [key(b"0123456789abcdef")], mode=mode)
    with pytest.raises(ConfigError, match=f"mode {mode:04o} lets group or others"):
        tickets.read_ticket_keys(str(path), WHERE)


def nginx_key(path: Path, name: bytes) -> bytes:
    """nginx's ssl_session_ticket_key file: 80 raw bytes, name, HMAC, AES
    (`openssl rand 80`); returned in the relays' layout, which is the same."""
    assert len(name) == 16
    raw = name + os.urandom(64)
    while set(raw[16:]) <= set(range(0x20, 0x7f)):     # never, in practice
        raw = name + os.urandom(64)
    path.write_bytes(raw)
    path.chmod(0o600)
    return raw


def test_nginx_raw_key_file_is_one_key_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "nginx.key"
    raw = nginx_key(path, b"nginx-raw-key-01")
    assert tickets.read_ticket_keys(str(path), WHERE) == [raw]


def test_nginx_48_byte_key_file_is_refused_saying_why(tmp_path: Path) -> None:
    path = tmp_path / "nginx48.key"
    path.write_bytes(b"\x00" + os.urandom(47))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="nginx's 48-byte key .AES-128.*openssl rand 80"):
        tickets.read_ticket_keys(str(path), WHERE)


def test_keys_of_several_files_in_order_names_distinct(tmp_path: Path) -> None:
    a, b = tmp_path / "a.key", tmp_path / "b.keys"
    raw = nginx_key(a, b"several-files-01")
    k2, k3 = key(b"several-files-02"), key(b"several-files-03")
    write_keys(b, [k2, k3])
    files = [(str(a), Where("/c", 1)), (str(b), Where("/c", 2))]
    assert tickets.read_ticket_key_files(files) == [raw] + [tickets.wire_order(k) for k in (k2, k3)]
    write_keys(b, [key(b"several-files-01")])
    with pytest.raises(ConfigError, match=f"^/c:2: tls ticket keys {b}: a key named as one in {a}"):
        tickets.read_ticket_key_files(files)
    write_keys(b, [key(b"several-files-%02d" % i) for i in range(2, 10)])
    with pytest.raises(ConfigError, match="^/c:2: tls ticket keys: 9 keys in all, at most 8"):
        tickets.read_ticket_key_files(files)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ticket.keys: cannot read: No such file"):
        tickets.read_ticket_keys(str(tmp_path / "ticket.keys"), WHERE)


def test_directive_parses_relative_to_the_config(tmp_path: Path) -> None:
    conf = tmp_path / "pps.conf"
    conf.write_text('# fleet\ntls ticket keys "keys/ticket.keys"\n')
    cfg = parse_config(str(conf))
    assert cfg.ticket_key_files == [(str(tmp_path / "keys" / "ticket.keys"), Where(str(conf), 2))]


def test_several_directives_read_their_files_in_order(tmp_path: Path) -> None:
    conf = tmp_path / "pps.conf"
    conf.write_text('tls ticket keys "current.key"\ntls ticket keys "/etc/previous.key"\n')
    cfg = parse_config(str(conf))
    assert cfg.ticket_key_files == [(str(tmp_path / "current.key"), Where(str(conf), 1)),
                                    ("/etc/previous.key", Where(str(conf), 2))]


@pytest.mark.parametrize("text, line, msg", [
    ("tls ticket keys\n", 1, 'missing argument for "tls ticket keys"'),
    ('tls ticket keys "a" "b"\n', 1, 'extra argument'),
    ('tls ticket keys "/a"\ntls ticket keys "/b"\ntls ticket keys "/a"\n', 3,
     '"tls ticket keys" /a given twice (first at line 1)'),
    ("tls ticket keyz x\n", 1, 'expected "lifetime" or "keys"'),
    ('relay r {\n  tls ticket keys "a"\n}\n', 2, '"tls ticket" is global'),
])
def test_directive_errors_name_file_and_line(tmp_path: Path, text: str, line: int, msg: str) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(str(conf))
    assert str(e.value).startswith(f"{conf}:{line}: ") and msg in str(e.value), str(e.value)


def test_check_mode_reads_the_file_and_logs_no_key_bytes(tmp_path: Path, pki: Pki) -> None:
    keys = [key(b"check-mode-key-1"), key(b"check-mode-key-2")]
    path = tmp_path / "ticket.keys"
    relay = RelaySpec("www", free_port(), free_port(), [pki["rsa2048"]])
    conf = tmp_path / "pps.conf"
    conf.write_text(f'tls ticket keys "{path}"\n' + DaemonConfig([relay], prefork=1).render())
    write_keys(path, keys)
    ok = run_pyprivsep("-n", "-v", "-f", str(conf))
    assert ok.returncode == 0, ok.stderr
    for k in keys:
        for text in (base64.b64encode(k).decode(), k[16:].hex(), base64.b64encode(k[16:48]).decode()):
            assert text not in ok.stderr + ok.stdout
    path.write_text(path.read_text() + "garbage\n")
    bad = run_pyprivsep("-n", "-f", str(conf))
    assert bad.returncode != 0
    assert f"{conf}:1: tls ticket keys {path}:4: not a base64 line" in bad.stderr, bad.stderr
    path.chmod(0o644)
    bad = run_pyprivsep("-n", "-f", str(conf))
    assert bad.returncode != 0 and "mode 0644" in bad.stderr, bad.stderr


# -- two daemons, one file ---------------------------------------------------


def two_daemons(start_daemon: StartDaemon, pki: Pki, port: int, path: Path,
                n: int = 2, extra: Sequence[str] = ()) -> list[tuple[Daemon, RelaySpec]]:
    out = []
    for _ in range(n):
        relay = RelaySpec("www", free_port(), port, [pki["rsa2048"]])
        config = DaemonConfig([relay], prefork=1, globals=(f'tls ticket keys "{path}"', *extra))
        out.append((start_daemon(config), relay))
    return out


def reload(daemon: Daemon) -> subprocess.CompletedProcess[str]:
    return run_pyprivsep("ctl", "-s", str(daemon.workdir / "ctl.sock"), "reload")


def connect(relay: RelaySpec, version: TlsVersion, *, sess_in: Path | None = None,
            sess_out: Path | None = None) -> bool:
    """Whether the session (sess_in) resumed; the handshake must succeed."""
    r = s_client(relay.listen_port, servername=relay.keypairs[0].dns_name, version=version,
                 sess_in=sess_in, sess_out=sess_out, request=HTTP_GET_ROOT)
    assert r.handshake_ok and BACKEND_PAGE.decode() in r.stdout, r.describe()
    return bool(r.reused)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_session_from_one_daemon_resumes_on_another(start_daemon: StartDaemon, pki: Pki,
                                                      tmp_path: Path, version: TlsVersion) -> None:
    if version == "1.3" and not TLS13_RESUMES:
        pytest.skip(NO_TLS13_RESUMPTION)
    first = key(b"fleet-key-first!")
    path = tmp_path / "ticket.keys"
    write_keys(path, [first, key(b"fleet-key-older!")])
    with HttpBackend() as http:
        (a, ra), (b, rb) = two_daemons(start_daemon, pki, http.port, path)
        session = tmp_path / "a.pem"
        assert connect(ra, version, sess_out=session) is False
        assert ticket_key_name(session) == first[:16], "not sealed with the file's first key"
        assert connect(rb, version, sess_in=session) is True, "A's session did not resume on B"
        assert connect(ra, version, sess_in=session) is True
        for d in (a, b):
            assert d.stop() == 0, d.describe()


@pytest.mark.parametrize("version", VERSIONS)
def test_nginx_key_files_shared_with_another_daemon(start_daemon: StartDaemon, pki: Pki,
                                                    tmp_path: Path, version: TlsVersion) -> None:
    """An nginx fleet's key files, as nginx lists them (current, then
    previous): A seals with the current one; B, reading the same two
    files, resumes A's session."""
    if version == "1.3" and not TLS13_RESUMES:
        pytest.skip(NO_TLS13_RESUMPTION)
    current, previous = tmp_path / "current.key", tmp_path / "previous.key"
    raw = nginx_key(current, b"nginx-current-k1")
    nginx_key(previous, b"nginx-previous-1")
    with HttpBackend() as http:
        (a, ra), (b, rb) = two_daemons(start_daemon, pki, http.port, current,
                                       extra=(f'tls ticket keys "{previous}"',))
        session = tmp_path / "a.pem"
        assert connect(ra, version, sess_out=session) is False
        assert ticket_key_name(session) == raw[:16], "not sealed with the first file's key"
        assert connect(rb, version, sess_in=session) is True, "A's session did not resume on B"
        for d in (a, b):
            assert d.stop() == 0, d.describe()


@pytest.mark.parametrize("version", VERSIONS)
def test_rotating_the_file_keeps_old_tickets_until_their_key_leaves(
        start_daemon: StartDaemon, pki: Pki, tmp_path: Path, version: TlsVersion) -> None:
    if version == "1.3" and not TLS13_RESUMES:
        pytest.skip(NO_TLS13_RESUMPTION)
    k1, k2 = key(b"rotation-key-one"), key(b"rotation-key-two")
    path = tmp_path / "ticket.keys"
    write_keys(path, [k1])
    with HttpBackend() as http:
        (a, ra), (b, rb) = two_daemons(start_daemon, pki, http.port, path)
        old = tmp_path / "old.pem"
        assert connect(ra, version, sess_out=old) is False
        assert ticket_key_name(old) == k1[:16]

        write_keys(path, [k2, k1])                  # a new key prepended
        for d in (a, b):
            r = reload(d)
            assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{d.describe()}"
        assert connect(rb, version, sess_in=old) is True, "k1 is still in the file"
        new = tmp_path / "new.pem"
        assert connect(rb, version, sess_out=new) is False
        assert ticket_key_name(new) == k2[:16], "new tickets not sealed with the new first key"
        assert connect(ra, version, sess_in=new) is True

        write_keys(path, [k2])                      # k1 retired
        for d in (a, b):
            assert reload(d).returncode == 0, d.describe()
        for relay in (ra, rb):
            assert connect(relay, version, sess_in=old) is False, "a ticket of a retired key resumed"
            assert connect(relay, version, sess_in=new) is True
        for d in (a, b):
            assert d.stop() == 0, d.describe()


def test_a_reload_with_a_broken_key_file_keeps_the_keys(start_daemon: StartDaemon, pki: Pki,
                                                        tmp_path: Path) -> None:
    k1 = key(b"kept-across-fail")
    path = tmp_path / "ticket.keys"
    write_keys(path, [k1])
    with HttpBackend() as http:
        (a, ra), = two_daemons(start_daemon, pki, http.port, path, n=1)
        session = tmp_path / "s.pem"
        assert connect(ra, "1.2", sess_out=session) is False
        path.write_text(path.read_text() + base64.b64encode(b"short").decode() + "\n")
        r = reload(a)
        assert r.returncode != 0
        assert f"tls ticket keys {path}:3: a key of 5 bytes, expected 80" in r.stdout + r.stderr, r
        assert connect(ra, "1.2", sess_in=session) is True
        assert a.stop() == 0, a.describe()


def test_file_keys_are_not_rotated_by_the_daemon(start_daemon: StartDaemon, pki: Pki, tmp_path: Path) -> None:
    """Generated keys rotate every quarter of the ticket lifetime (1 s
    here); the file's keys stay until the file changes."""
    k1 = key(b"never-rotated-k1")
    path = tmp_path / "ticket.keys"
    write_keys(path, [k1])
    with HttpBackend() as http:
        (a, ra), = two_daemons(start_daemon, pki, http.port, path, n=1, extra=("tls ticket lifetime 4",))
        first = tmp_path / "first.pem"
        assert connect(ra, "1.2", sess_out=first) is False
        time.sleep(2.5)                             # two rotations' worth
        later = tmp_path / "later.pem"
        assert connect(ra, "1.2", sess_out=later) is False
        assert ticket_key_name(later) == k1[:16], "the daemon rotated the file's key away"
        assert a.stop() == 0, a.describe()
