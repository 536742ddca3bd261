"""Command line: -n config check, error reporting as file:line, -D macros."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from backends import BACKEND_PAGE, HttpBackend
from basics import free_port
from daemonctl import DaemonConfig, RelaySpec, StartDaemon, run_pyprivsep, simple_relay
from keypairs import KEY_NAMES, Pki
from pyprivsep import keyref, native
from tlsclients import https_get

HEADER = ["# pyprivsep test configuration", "", "prefork 1"]


def write_conf(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def relay_block(port: int, backend_port: int, tls_lines: list[str], host: str = "127.0.0.1") -> list[str]:
    return [
        'relay "www" {',
        f"    listen on {host} port {port} tls",
        f"    forward to 127.0.0.1 port {backend_port}",
        *tls_lines,
        "}",
    ]


def tls_line(cert: Path, key: Path) -> str:
    return f'    tls certificate "{cert}" key "{key}"'


def line_of(lines: list[str], needle: str) -> int:
    """1-based number of the only line containing ``needle``."""
    matches = [n for n, line in enumerate(lines, 1) if needle in line]
    assert len(matches) == 1, f"{needle!r} in lines {matches}"
    return matches[0]


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def assert_error_at(proc: subprocess.CompletedProcess[str], conf: Path, line: int) -> None:
    """Exit 1 and ``file:line:`` on stderr (the path as given or its basename)."""
    assert proc.returncode == 1, output(proc)
    location = rf"(?:^|[\s'\"]|/){re.escape(conf.name)}:{line}:"
    assert re.search(location, proc.stderr, re.M), f"no {conf}:{line}: on stderr\n{output(proc)}"
    assert "configuration OK" not in proc.stdout + proc.stderr


def check(conf: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_pyprivsep("-n", "-f", str(conf), *extra)


# -- -n ------------------------------------------------------------------------


def test_check_good_config(pki: Pki, tmp_path: Path) -> None:
    relay = RelaySpec("www", free_port(), free_port(), [pki[name] for name in KEY_NAMES])
    conf = tmp_path / "good.conf"
    conf.write_text(DaemonConfig([relay], prefork=2).render())
    proc = check(conf)
    assert proc.returncode == 0, output(proc)
    assert "configuration OK" in proc.stdout + proc.stderr, output(proc)


def test_check_does_not_start_the_daemon(pki: Pki, tmp_path: Path) -> None:
    relay = simple_relay(pki, free_port())
    conf = tmp_path / "good.conf"
    conf.write_text(DaemonConfig([relay], prefork=1).render())
    proc = check(conf)
    assert proc.returncode == 0, output(proc)
    with pytest.raises(OSError):  # nothing may be listening after -n
        socket.create_connection(("127.0.0.1", relay.listen_port), timeout=2).close()


def test_check_key_not_matching_certificate(pki: Pki, tmp_path: Path) -> None:
    good = pki["p256"]
    lines = HEADER + relay_block(
        free_port(),
        free_port(),
        [tls_line(good.cert_path, good.key_path), tls_line(pki.mismatched_cert, pki.mismatched_key)],
    )
    conf = write_conf(tmp_path / "mismatch.conf", lines)
    assert_error_at(check(conf), conf, line_of(lines, str(pki.mismatched_key)))


@pytest.mark.parametrize("missing", ["certificate", "key"])
def test_check_missing_file(pki: Pki, tmp_path: Path, missing: str) -> None:
    kp = pki["rsa2048"]
    absent = tmp_path / f"absent.{missing}"
    cert, key = (absent, kp.key_path) if missing == "certificate" else (kp.cert_path, absent)
    lines = HEADER + relay_block(free_port(), free_port(), [tls_line(cert, key)])
    conf = write_conf(tmp_path / "missing.conf", lines)
    assert_error_at(check(conf), conf, line_of(lines, str(absent)))


BAD_LINES = {
    "prefork-zero": "prefork 0",
    "unknown-keyword": "foo bar",
    "prefork-not-a-number": "prefork many",
}


def bad_config(pki: Pki, tmp_path: Path, bad: str) -> tuple[Path, int]:
    """A valid config with ``bad`` inserted after a comment and a blank line."""
    kp = pki["rsa2048"]
    lines = ["# comment", "", bad, *relay_block(free_port(), free_port(), [tls_line(kp.cert_path, kp.key_path)])]
    return write_conf(tmp_path / "bad.conf", lines), 3


@pytest.mark.parametrize("bad", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_check_bad_line(pki: Pki, tmp_path: Path, bad: str) -> None:
    conf, line = bad_config(pki, tmp_path, bad)
    assert_error_at(check(conf), conf, line)


def test_check_bad_line_inside_relay_block(pki: Pki, tmp_path: Path) -> None:
    kp = pki["rsa2048"]
    lines = HEADER + relay_block(free_port(), free_port(), [tls_line(kp.cert_path, kp.key_path), "    bogus option"])
    conf = write_conf(tmp_path / "bad-relay.conf", lines)
    assert_error_at(check(conf), conf, line_of(lines, "bogus option"))


@pytest.mark.parametrize("bad", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_start_with_bad_config_exits_1(pki: Pki, tmp_path: Path, bad: str) -> None:
    conf, line = bad_config(pki, tmp_path, bad)
    assert_error_at(run_pyprivsep("-d", "-f", str(conf), timeout=20), conf, line)


# -- -D ----------------------------------------------------------------------------


def macro_config(pki: Pki, listen_port: int, backend_port: int) -> tuple[DaemonConfig, str]:
    relay = RelaySpec("www", listen_port, backend_port, [pki["rsa2048"]], listen_host="$ext")
    config = DaemonConfig([relay], prefork=1)
    return config, config.render()


def test_macro_undefined_is_an_error(pki: Pki, tmp_path: Path) -> None:
    """Control for the -D test: without -D the macro is unknown."""
    _, text = macro_config(pki, free_port(), free_port())
    conf = tmp_path / "macro.conf"
    conf.write_text(text)
    assert_error_at(check(conf), conf, line_of(text.splitlines(), "$ext"))


def test_macro_from_command_line(
    pki: Pki, tmp_path: Path, start_daemon: StartDaemon, http_backend: HttpBackend
) -> None:
    config, text = macro_config(pki, free_port(), http_backend.port)
    conf = tmp_path / "macro.conf"
    conf.write_text(text)
    proc = check(conf, "-D", "ext=127.0.0.1")
    assert proc.returncode == 0, output(proc)
    daemon = start_daemon(config, args=["-D", "ext=127.0.0.1"])
    kp = pki["rsa2048"]
    port = config.relays[0].listen_port
    assert https_get(port, kp.dns_name, cafile=kp.cert_path) == http_backend.page
    assert daemon.stop() == 0, daemon.describe()


# -- what only OpenSSL can judge: found by -n, and at start ------------------------


def cipher_config(pki: Pki, tmp_path: Path) -> tuple[Path, int]:
    kp = pki["rsa2048"]
    block = relay_block(free_port(), free_port(), [tls_line(kp.cert_path, kp.key_path),
                                                    '    tls ciphers "NO-SUCH-CIPHER"'])
    lines = HEADER + block
    return write_conf(tmp_path / "ciphers.conf", lines), line_of(lines, 'relay "www"')


def test_check_rejects_cipher_list_openssl_refuses(pki: Pki, tmp_path: Path) -> None:
    conf, line = cipher_config(pki, tmp_path)
    proc = check(conf)
    assert_error_at(proc, conf, line)
    assert "cipher" in proc.stderr.lower(), output(proc)


def test_start_with_bad_cipher_list_exits_1(pki: Pki, tmp_path: Path) -> None:
    conf, line = cipher_config(pki, tmp_path)
    proc = run_pyprivsep("-d", "-f", str(conf))
    assert_error_at(proc, conf, line)


# -- one owner for each rule: what -n accepts, the daemon accepts -----------------


def test_check_refuses_listen_without_tls(pki: Pki, tmp_path: Path) -> None:
    """`listen on` without `tls` used to pass -n and be refused only when the
    daemon started; the parser owns the rule now, so -n names the line."""
    kp = pki["rsa2048"]
    lines = HEADER + [
        'relay "www" {',
        f"    listen on 127.0.0.1 port {free_port()} tls",
        f"    listen on 127.0.0.1 port {free_port()}",
        f"    forward to 127.0.0.1 port {free_port()}",
        tls_line(kp.cert_path, kp.key_path),
        "}",
    ]
    conf = write_conf(tmp_path / "plain.conf", lines)
    proc = check(conf)
    assert_error_at(proc, conf, len(HEADER) + 3)
    assert "tls" in proc.stderr, output(proc)


# -- one daemon per control socket -------------------------------------------------


def test_second_daemon_on_the_same_control_socket_refuses_to_start(
    pki: Pki, http_backend: HttpBackend, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """It exits 1 naming the socket, before binding its listen port or
    forking; the first daemon is unaffected."""
    first = start_daemon(DaemonConfig([simple_relay(pki, http_backend.port)], prefork=1))
    children = first.children()
    sock = first.workdir / "ctl.sock"
    port = free_port()
    second = DaemonConfig([RelaySpec("www", port, http_backend.port, [pki["rsa2048"]])], prefork=1)
    conf = write_conf(tmp_path / "second.conf", [f'socket "{sock}"', second.render()])

    proc = run_pyprivsep("-d", "-f", str(conf), timeout=20)
    assert proc.returncode == 1, output(proc)
    assert f"control socket {sock}: another pyprivsep is listening" in proc.stderr, output(proc)
    assert "relay processes" not in proc.stderr, output(proc)  # its "starting: N relay processes" line
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass

    assert first.proc.poll() is None and first.children() == children, first.describe()
    assert sock.exists()
    relay = first.config.relays[0]
    kp = relay.keypairs[0]
    assert https_get(relay.listen_port, kp.dns_name, cafile=kp.cert_path) == BACKEND_PAGE


def test_openssl_conf_says_why_there_is_no_provider() -> None:
    """``pyprivsep openssl-conf`` prints a configuration naming the installed
    provider module or, where there is none (LibreSSL: no providers), exits
    1 saying why and prints nothing on stdout.  Runs against any library,
    unlike tests/test_provider.py, which skips without the module."""
    proc = run_pyprivsep("openssl-conf")
    library = native.library_version()
    why = keyref.provider_missing()
    if library.startswith("LibreSSL"):
        assert why is not None and f"{library}, which has no OpenSSL providers" in why
    if why is None:
        assert proc.returncode == 0, output(proc)
        assert f"module = {keyref.provider_path()}" in proc.stdout
    else:
        assert proc.returncode == 1 and not proc.stdout, output(proc)
        assert why in proc.stderr, output(proc)
