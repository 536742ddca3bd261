"""Private key material must live only in the ca processes.

The scanner looks for the RSA primes p, q and the EC private scalar, big- and
little-endian (the latter also matches an OpenSSL BIGNUM on x86_64).
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Sequence

import pytest

from backends import HttpBackend
from basics import MIB, wait_until
from daemonctl import SANITIZED, Daemon, DaemonConfig, StartDaemon, simple_relay
from keypairs import KeyPair, Pki, found_components, key_patterns
from memscan import ScanResult, scan_process_memory
from procs import python_process
from tlsclients import TlsVersion, tls_handshake

# Under `make asan` the daemon maps terabytes of sanitizer shadow memory;
# the scan proves nothing more there and would read for hours.
pytestmark = pytest.mark.skipif(
    SANITIZED,
    reason="memory scan skipped in an AddressSanitizer run")

SCANNED_KEYS = ("rsa2048", "p256")
VERSIONS: tuple[TlsVersion, ...] = ("1.2", "1.3")
# A running CPython maps well over this much readable memory.
MIN_SCANNED_BYTES = 4 * MIB

LOAD_KEY_AND_SLEEP = """
import sys, time
from cryptography.hazmat.primitives.serialization import load_pem_private_key
with open(sys.argv[1], "rb") as f:
    key = load_pem_private_key(f.read(), password=None)
print("ready", flush=True)
time.sleep(30)
"""

JUST_SLEEP = 'import time; print("ready", flush=True); time.sleep(30)'


def scan(pid: int, patterns: dict[str, bytes]) -> ScanResult:
    """Scan ``pid``; a scan that read almost nothing would prove nothing."""
    try:
        result = scan_process_memory(pid, patterns)
    except PermissionError as exc:
        if os.geteuid() != 0:
            pytest.skip(f"cannot read /proc/{pid}/mem without root: {exc}")
        raise
    assert result.bytes_scanned >= MIN_SCANNED_BYTES, f"scanned only {result} of pid {pid}"
    return result


def keypairs(pki: Pki) -> list[KeyPair]:
    return [pki[name] for name in SCANNED_KEYS]


def all_components(pairs: Sequence[KeyPair]) -> set[str]:
    return set().union(*(kp.components() for kp in pairs))


def exercise_keys(port: int, pairs: Sequence[KeyPair], rounds: int = 3) -> None:
    """Full handshakes with each key and TLS version, so private key ops happened."""
    for kp, version, _ in itertools.product(pairs, VERSIONS, range(rounds)):
        info = tls_handshake(port, kp.dns_name, cafile=kp.cert_path, version=version)
        assert info.peer_cert_der == kp.cert_der, f"wrong certificate for SNI {kp.dns_name}"


def start_and_exercise(start_daemon: StartDaemon, pki: Pki, backend: HttpBackend, *, inprocess: bool) -> Daemon:
    relay = simple_relay(pki, backend.port, SCANNED_KEYS)
    daemon = start_daemon(DaemonConfig([relay], prefork=2, keys_inprocess=inprocess))
    exercise_keys(relay.listen_port, keypairs(pki))
    return daemon


# -- the scanner itself ------------------------------------------------------


@pytest.mark.parametrize("key_name", SCANNED_KEYS)
def test_scanner_finds_key_loaded_by_control_process(pki: Pki, key_name: str) -> None:
    kp = pki[key_name]
    with python_process(LOAD_KEY_AND_SLEEP, str(kp.key_path)) as proc:
        result = scan(proc.pid, kp.patterns())
    assert found_components(result.found) == kp.components(), result


def test_scanner_finds_nothing_in_clean_process(pki: Pki) -> None:
    patterns = key_patterns(list(pki.keypairs.values()))
    with python_process(JUST_SLEEP) as proc:
        result = scan(proc.pid, patterns)
    assert result.found == frozenset(), result


# -- the daemon ----------------------------------------------------------------


def test_relays_and_parent_hold_no_private_key_material(
    start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend
) -> None:
    daemon = start_and_exercise(start_daemon, pki, http_backend, inprocess=False)
    patterns = key_patterns(keypairs(pki))
    targets = {f"relay {i}": pid for i, pid in daemon.relay_pids().items()}
    targets["parent"] = daemon.parent_pid
    assert len(targets) == 3, daemon.describe()
    leaks = {name: sorted(scan(pid, patterns).found) for name, pid in targets.items()}
    assert leaks == {name: [] for name in targets}, "private key material outside the ca processes"
    assert daemon.stop() == 0, daemon.describe()


def test_no_key_material_outside_the_cas_after_a_reload(
    start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend
) -> None:
    """A reload re-reads every key (checked in a throwaway child, loaded by
    the new cas): the parent and the new relays still hold none of it."""
    daemon = start_and_exercise(start_daemon, pki, http_backend, inprocess=False)
    old = set(daemon.relay_pids().values())
    os.kill(daemon.parent_pid, signal.SIGHUP)
    new = wait_until(lambda: (lambda now: now if len(now) == 2 and not now & old else None)(
        set(daemon.relay_pids().values())), 15, lambda: f"a new generation\n{daemon.describe()}")
    relay = daemon.config.relays[0]
    exercise_keys(relay.listen_port, keypairs(pki))
    patterns = key_patterns(keypairs(pki))
    targets = {f"relay {pid}": pid for pid in new} | {"parent": daemon.parent_pid}
    leaks = {name: sorted(scan(pid, patterns).found) for name, pid in targets.items()}
    assert leaks == {name: [] for name in targets}, "private key material outside the ca processes"


@pytest.mark.skipif(os.geteuid() != 0, reason="ca processes are non-dumpable: reading their memory needs root")
def test_control_ca_processes_hold_the_keys(start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend) -> None:
    daemon = start_and_exercise(start_daemon, pki, http_backend, inprocess=False)
    patterns = key_patterns(keypairs(pki))
    cas = daemon.ca_pids()
    assert sorted(cas) == [1, 2], daemon.describe()
    for index, pid in cas.items():
        found = found_components(scan(pid, patterns).found)
        assert found == all_components(keypairs(pki)), f"ca {index} (pid {pid}) lacks key material"


def test_control_keys_inprocess_relays_hold_the_keys(
    start_daemon: StartDaemon, pki: Pki, http_backend: HttpBackend
) -> None:
    daemon = start_and_exercise(start_daemon, pki, http_backend, inprocess=True)
    assert daemon.ca_pids() == {}, "keys inprocess must not start ca processes"
    patterns = key_patterns(keypairs(pki))
    relays = daemon.relay_pids()
    assert sorted(relays) == [1, 2], daemon.describe()
    for index, pid in relays.items():
        found = found_components(scan(pid, patterns).found)
        assert found == all_components(keypairs(pki)), f"relay {index} (pid {pid}) lacks key material"
