"""The daemon's children inherit nothing of its caller's environment.

A DB_PASSWORD from the environment pyprivsep was started in used to be
found in the relays' memory (they are forked, with the parent's whole
environment).  The daemon now executes itself again, same pid, with only
the variables it needs (pyprivsep/environment.py)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from backends import HttpBackend
from basics import MIB
from daemonctl import SANITIZED, DaemonConfig, StartDaemon, simple_relay
from keypairs import Pki
from memscan import scan_process_memory
from procs import proc_title, python_process
from tlsclients import https_get, tls_handshake

pytestmark = [
    pytest.mark.skipif(SANITIZED, reason="memory scan skipped in an AddressSanitizer run"),
    pytest.mark.skipif(os.geteuid() != 0, reason="reading the non-dumpable cas' memory needs root"),
]

JUST_SLEEP = 'import time; print("ready", flush=True); time.sleep(30)'


def found_in(pid: int, value: bytes) -> list[str]:
    """Where value is in pid: its memory, its /proc/PID/environ."""
    where = []
    result = scan_process_memory(pid, {"value": value})
    assert result.bytes_scanned >= 4 * MIB, f"scanned only {result} of pid {pid}"
    if result.found:
        where.append("memory")
    if value in Path(f"/proc/{pid}/environ").read_bytes():
        where.append("environ")
    return where


def test_scanner_finds_an_inherited_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: a process started with the variable holds it where we look."""
    secret = secrets.token_hex(16)
    monkeypatch.setenv("DB_PASSWORD", secret)
    with python_process(JUST_SLEEP) as proc:
        assert found_in(proc.pid, secret.encode()) == ["memory", "environ"]


def test_callers_environment_reaches_no_process_of_the_daemon(
    monkeypatch: pytest.MonkeyPatch, start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend
) -> None:
    secret = secrets.token_hex(16)
    monkeypatch.setenv("DB_PASSWORD", secret)
    relay = simple_relay(pki, http_backend.port, ("rsa2048", "p256"))
    daemon = start_daemon(DaemonConfig([relay], prefork=2))
    kp = pki["rsa2048"]
    # the daemon works: handshakes with each key, a request through it
    for name in ("rsa2048", "p256"):
        tls_handshake(relay.listen_port, pki[name].dns_name, cafile=pki[name].cert_path)
    assert https_get(relay.listen_port, kp.dns_name, cafile=kp.cert_path) == http_backend.page
    targets = {"parent": daemon.parent_pid}
    targets |= {f"relay {i}": pid for i, pid in daemon.relay_pids().items()}
    targets |= {f"ca {i}": pid for i, pid in daemon.ca_pids().items()}
    assert len(targets) == 5, daemon.describe()
    leaks = {name: found_in(pid, secret.encode()) for name, pid in targets.items()}
    assert leaks == {name: [] for name in targets}, f"DB_PASSWORD found: {leaks}"
    # executed again in place: the pid we started is still the parent's
    assert (proc_title(daemon.parent_pid) or "").startswith("pyprivsep: parent"), daemon.describe()
    assert daemon.stop() == 0, daemon.describe()
