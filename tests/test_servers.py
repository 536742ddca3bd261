"""The harnesses of tests/servers.py, proven with ordinary key files: each real
server (nginx, postfix, dovecot, haproxy) starts on loopback with the test
PKI's RSA-2048 and P-256 keys, completes TLS 1.3 and 1.2 handshakes
(STARTTLS where the protocol has it), gets OPENSSL_CONF into the processes
that hold the key, and stops cleanly; and the memory scanner finds the key's
secret components in the server's processes, so that the integration tests,
which give these servers a key reference instead, can show them found
nowhere."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from keypairs import KeyPair, Pki, found_components, key_patterns
from procs import pid_alive
from servers import (
    SERVERS,
    StartServer,
    DovecotServer,
    HaproxyServer,
    NginxServer,
    PostfixServer,
    TlsServer,
    missing_program,
    process_getenv,
    scan_processes,
)
from tlsclients import SClientResult, TlsVersion, curl, s_client

KEYS = ("rsa2048", "p256")
VERSIONS: tuple[TlsVersion, ...] = ("1.3", "1.2")
SYSTEM_OPENSSL_CNF = Path("/usr/lib/ssl/openssl.cnf")


def skip_if_missing(cls: type[TlsServer]) -> None:
    reason = missing_program(*cls.programs)
    if reason is not None:
        pytest.skip(reason)


def handshake(server: TlsServer, kp: KeyPair, version: TlsVersion, *, starttls: bool = False) -> SClientResult:
    """``openssl s_client`` to the server's TLS port, or its STARTTLS port."""
    if isinstance(server, PostfixServer):
        port, extra = server.port, ["-starttls", "smtp"]
    elif isinstance(server, DovecotServer) and starttls:
        port, extra = server.starttls_port, ["-starttls", "imap"]
    else:
        port, extra = server.port, []
    result = s_client(port, servername=kp.dns_name, version=version, extra=extra)
    assert result.handshake_ok, result.describe()
    assert result.protocol == f"TLSv{version}", result.describe()
    assert result.peer_certificate == kp.certificate, result.describe()
    return result


def start(name: str, kp: KeyPair, **kwargs: object) -> TlsServer:
    cls = SERVERS[name]
    skip_if_missing(cls)
    return cls(kp.cert_path, kp.key_path, **kwargs)  # type: ignore[arg-type]


def server_ids() -> list[str]:
    return list(SERVERS)


@pytest.fixture
def openssl_conf(tmp_path: Path) -> Path:
    """A harmless OPENSSL_CONF: a copy of the system's configuration."""
    conf = tmp_path / "openssl.cnf"
    shutil.copyfile(SYSTEM_OPENSSL_CNF, conf)
    return conf


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("name", server_ids())
def test_handshakes_and_key_in_memory(name: str, key: str, pki: Pki) -> None:
    kp = pki[key]
    server = start(name, kp)
    with server:
        pids = server.pids()
        assert pids and all(pid_alive(p) for p in pids)
        for version in VERSIONS:
            handshake(server, kp, version)
            if isinstance(server, DovecotServer):
                handshake(server, kp, version, starttls=True)
        if isinstance(server, (NginxServer, HaproxyServer)):
            for version in VERSIONS:
                got = curl(server.port, kp.dns_name, cacert=kp.cert_path, version=version, timeout=10)
                assert got.returncode == 0 and got.stdout == b"ok\n", got
        # the scanner sees the key where the server has it
        patterns = key_patterns([kp])
        by_pid = scan_processes(server, patterns)
        found = found_components(set().union(*by_pid.values()))
        assert found == kp.components(), f"{name}: found {by_pid} of {kp.components()}"
        # among them, in a process that did a handshake
        in_holders = found_components(set().union(*(by_pid.get(p, frozenset()) for p in server.handshake_pids())))
        assert in_holders == kp.components(), f"{name}: found {by_pid}, handshakes in {server.handshake_pids()}"
        all_pids = server.pids()
    assert server.stopped_cleanly, f"{name} left processes to kill"
    assert not [p for p in all_pids if pid_alive(p)]


@pytest.mark.parametrize("name", server_ids())
def test_openssl_conf_reaches_key_holders(name: str, pki: Pki, openssl_conf: Path) -> None:
    """OPENSSL_CONF (how the integration points at the provider) is in the
    environment of every process that does handshakes."""
    if shutil.which("gdb") is None:
        pytest.skip("gdb not installed (`make testdeps` as root installs it)")
    kp = pki["p256"]
    with start(name, kp, env={"OPENSSL_CONF": str(openssl_conf)}) as server:
        handshake(server, kp, "1.3")
        holders = server.handshake_pids()
        assert holders, f"{name}: no process doing handshakes among {server.pids()}"
        for pid in holders:
            assert process_getenv(pid, "OPENSSL_CONF") == str(openssl_conf), f"{name} pid {pid}"


def test_postfix_chain_files(pki: Pki) -> None:
    """smtpd_tls_chain_files (key first, then the certificate) instead of
    smtpd_tls_cert_file/smtpd_tls_key_file."""
    kp = pki["rsa2048"]
    with start("postfix", kp, chain_files=True) as server:
        assert isinstance(server, PostfixServer)
        assert "smtpd_tls_chain_files" in (server.config_dir / "main.cf").read_text()
        for version in VERSIONS:
            handshake(server, kp, version)
    assert server.stopped_cleanly


def test_nginx_reload(pki: Pki, start_server: StartServer, openssl_conf: Path) -> None:
    """``nginx -s reload`` replaces both workers; the new ones serve, with
    OPENSSL_CONF.  (Through the ``start_server`` fixture, which stops it at
    teardown.)"""
    kp = pki["p256"]
    server = start_server("nginx", kp.cert_path, kp.key_path, {"OPENSSL_CONF": str(openssl_conf)})
    assert isinstance(server, NginxServer)
    old = server.worker_pids()
    master = server.pids()[0]
    new = server.reload()
    assert not set(old) & set(new) and server.pids()[0] == master
    handshake(server, kp, "1.3")
    if shutil.which("gdb") is not None:
        for pid in new:
            assert process_getenv(pid, "OPENSSL_CONF") == str(openssl_conf), f"new worker {pid}"


def test_postfix_leaves_system_instance_alone(pki: Pki) -> None:
    """The private instance writes nothing into /etc/postfix."""
    before = sorted(os.listdir("/etc/postfix")) if os.path.isdir("/etc/postfix") else []
    with start("postfix", pki["rsa2048"]):
        pass
    after = sorted(os.listdir("/etc/postfix")) if os.path.isdir("/etc/postfix") else []
    assert before == after
