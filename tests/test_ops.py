"""Operating the daemon like relayd: `pyprivsep ctl`, graceful reload,
session-ticket key rotation, Prometheus metrics and the connection/error logs.

Every daemon here has its control socket under the test's tmp dir; ctl runs
as a user would run it (`python -m pyprivsep ctl -s SOCK ...`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from backends import EchoServer, HttpBackend
from basics import LOCALHOST, free_port, wait_until
from daemonctl import Daemon, DaemonConfig, RelaySpec, StartDaemon, run_pyprivsep
from keypairs import KeyPair, Pki, make_keypair
from procs import Freezer, frozen, pid_alive, proc_status
from pyprivsep.ctl import request as ctl_request
from tlsclients import NO_TLS13_RESUMPTION, TLS13_RESUMES, TlsVersion, client_context, s_client, tls_handshake

HTTP_REQUEST = b"GET / HTTP/1.0\r\n\r\n"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class OpsConfig(DaemonConfig):
    """DaemonConfig plus global lines rendered before the rest."""

    extra: tuple[str, ...] = ()

    def render(self) -> str:
        return "".join(f"{line}\n" for line in self.extra) + super().render()


@dataclass
class Ops:
    """A running daemon and its control socket."""

    daemon: Daemon
    sock: Path

    def ctl(self, *words: str, as_json: bool = False, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        flags = ["-j"] if as_json else []
        return run_pyprivsep("ctl", "-s", str(self.sock), *flags, *words, timeout=timeout)

    def json(self, *words: str, expect_rc: int = 0) -> dict[str, Any]:
        proc = self.ctl(*words, as_json=True)
        assert proc.returncode == expect_rc, f"ctl -j {' '.join(words)}: {describe(proc)}\n{self.daemon.describe()}"
        answer = json.loads(proc.stdout)
        assert isinstance(answer, dict)
        return answer

    def query(self, *words: str) -> dict[str, Any]:
        """The same request, in-process: for polling (a ctl process costs
        a Python start-up each time)."""
        return ctl_request(str(self.sock), list(words))

    def summary(self) -> dict[str, Any]:
        return self.query("show", "summary")

    def stderr(self) -> str:
        return self.daemon.stderr_text()


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def start_ops(
    start_daemon: StartDaemon,
    tmp_path: Path,
    relays: Sequence[RelaySpec],
    *,
    prefork: int = 2,
    extra: Sequence[str] = (),
) -> Ops:
    sock = tmp_path / f"ctl{free_port()}.sock"
    config = OpsConfig(list(relays), prefork=prefork, extra=(f'socket "{sock}"', *extra))
    daemon = start_daemon(config)
    wait_until(lambda: sock.exists(), 30, f"control socket {sock}")
    return Ops(daemon, sock)


def stat_sum(summary: Mapping[str, Any], name: str) -> int:
    """A counter summed over the relay processes of a `show summary` answer."""
    return sum(int(r["stats"][name]) for r in summary["relays"])


def relay_ports(relay: RelaySpec) -> tuple[int, str]:
    return relay.listen_port, relay.keypairs[0].dns_name


@contextlib.contextmanager
def tls_session(port: int, name: str, *, timeout: float = 10.0) -> Iterator[tuple[ssl.SSLSocket, int]]:
    """An established TLS connection and its local (client) port."""
    raw = socket.create_connection((LOCALHOST, port), timeout=timeout)
    try:
        local_port = int(raw.getsockname()[1])
        with client_context().wrap_socket(raw, server_hostname=name) as tls:
            yield tls, local_port
    finally:
        raw.close()


def roundtrip(tls: ssl.SSLSocket, payload: bytes) -> None:
    """Send payload through the relay to the echo backend and read it back."""
    tls.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = tls.recv(len(payload) - len(got))
        assert chunk, f"session closed after {len(got)} of {len(payload)} echoed bytes"
        got += chunk
    assert got == payload


def handshake_from(port: int, name: str, *, version: str | None = None, ciphers: str | None = None) -> tuple[int, bool]:
    """One full handshake; returns (client port, whether it succeeded)."""
    ctx = client_context()
    if version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    with socket.create_connection((LOCALHOST, port), timeout=5) as raw:
        local_port = int(raw.getsockname()[1])
        try:
            with ctx.wrap_socket(raw, server_hostname=name):
                return local_port, True
        except OSError:  # ssl.SSLError, timeouts, resets
            return local_port, False


def relay_processes(daemon: Daemon) -> set[int]:
    return {c.pid for c in daemon.processes("relay")}


def ca_processes(daemon: Daemon) -> set[int]:
    return {c.pid for c in daemon.processes("ca")}


# Prometheus text format: name{label="value",...} value
_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, dict[str, str], float]


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        assert match, f"unparsable metrics line {line!r}"
        samples.append((match[1], dict(_LABEL_RE.findall(match[2] or "")), float(match[3])))
    return samples


def metric(samples: Sequence[Sample], name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    found = [v for n, lv, v in samples if n == name and all(lv.get(k) == x for k, x in labels.items())]
    assert found, f"no sample {name}{labels}"
    return sum(found)


# --------------------------------------------------------------------------
# ctl: every command
# --------------------------------------------------------------------------


def test_show_summary_counts_handshakes_and_keyops(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["rsa2048"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=2)
    relays, cas = ops.daemon.relay_pids(), ops.daemon.ca_pids()

    human = ops.ctl("show", "summary")
    assert human.returncode == 0, describe(human)
    numbers = set(re.findall(r"\b\d+\b", human.stdout))
    for pid in [*relays.values(), *cas.values()]:
        assert str(pid) in numbers, f"pid {pid} not in\n{human.stdout}"
    assert f"listen {LOCALHOST}:{relay.listen_port} -> {LOCALHOST}:{echo_backend.port}" in human.stdout

    before = ops.json("show", "summary")
    assert {r["pid"] for r in before["relays"]} == set(relays.values())
    assert {r["ca_pid"] for r in before["relays"]} == set(cas.values())
    assert before["prefork"] == 2 and before["keys"] == "ca" and before["generation"] == 1

    n = 5
    for _ in range(n):
        tls_handshake(*relay_ports(relay))

    def grown() -> dict[str, Any] | None:
        now = ops.summary()
        return now if stat_sum(now, "hs_full") - stat_sum(before, "hs_full") >= n else None

    after = wait_until(grown, 30, lambda: f"{n} more full handshakes\n{ops.daemon.describe()}")
    assert stat_sum(after, "hs_full") - stat_sum(before, "hs_full") == n
    assert stat_sum(after, "keyops") - stat_sum(before, "keyops") == n  # one RSA signature each
    assert stat_sum(after, "hs_resumed") == stat_sum(before, "hs_resumed")
    assert stat_sum(after, "keyop_fail") == 0
    assert after["totals"]["hs_full"] == stat_sum(after, "hs_full")
    assert f"{after['totals']['hs_full']} full and" in ops.ctl("show", "summary").stdout


def test_show_sessions_lists_an_open_session(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=2)
    with tls_session(*relay_ports(relay)) as (tls, local_port):
        roundtrip(tls, b"x" * 1000)
        client = f"{LOCALHOST}:{local_port}"
        mine = [s for s in ops.json("show", "sessions")["sessions"] if s["client"] == client]
        assert len(mine) == 1, ops.json("show", "sessions")
        (session,) = mine
        assert session["state"] == "relaying"
        assert session["relay"] == "www"
        assert session["generation"] == 1
        assert session["relay_process"] in ops.daemon.relay_pids()
        # bytes are counted once relayed: poll for the 1000 each way
        wait_until(
            lambda: [
                s
                for s in ops.query("show", "sessions")["sessions"]
                if s["client"] == client and s["bytes_in"] == 1000 and s["bytes_out"] == 1000
            ],
            30,
            lambda: f"the session's byte counts: {ops.query('show', 'sessions')}",
        )
        human = ops.ctl("show", "sessions")
        assert human.returncode == 0, describe(human)
        (line,) = [ln for ln in human.stdout.splitlines() if client in ln]
        assert "relaying" in line.split() and "www" in line.split()
    wait_until(
        lambda: all(s["client"] != client for s in ops.query("show", "sessions")["sessions"]),
        30,
        "the closed session to leave show sessions",
    )
    assert client not in ops.ctl("show", "sessions").stdout


def secret_strings(kp: KeyPair) -> dict[str, str]:
    """Every text form in which a key could leak: PEM body lines, and each
    secret integer in decimal and hex."""
    out = {}
    for part, secret in kp.secrets.items():
        out[f"{kp.name}:{part}:dec"] = str(secret.value)
        out[f"{kp.name}:{part}:hex"] = format(secret.value, "x")
        out[f"{kp.name}:{part}:HEX"] = format(secret.value, "X")
    pem_lines = [ln for ln in kp.key_path.read_text().splitlines() if ln and not ln.startswith("-----")]
    for i, line in enumerate(pem_lines):
        out[f"{kp.name}:pem line {i}"] = line
    return out


def test_show_keys_lists_keypairs_without_key_material(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    keypairs = [pki["rsa2048"], pki["p256"]]
    relay = RelaySpec("www", free_port(), echo_backend.port, keypairs)
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=2)
    answer = ops.json("show", "keys")
    by_subject = {k["subject"]: k for k in answer["keys"]}
    assert len(answer["keys"]) == 2, answer
    for kp, kind in ((pki["rsa2048"], "RSA-2048"), (pki["p256"], "EC-256")):
        entry = by_subject[kp.certificate.subject.rfc4514_string()]
        assert entry["type"] == kind
        assert entry["relay"] == "www"
        assert entry["not_after"] == kp.certificate.not_valid_after_utc.isoformat()
        assert entry["certificate"] == str(kp.cert_path)
    human = ops.ctl("show", "keys")
    assert human.returncode == 0, describe(human)
    for kind in ("RSA-2048", "EC-256"):
        assert kind in human.stdout
    raw_json = ops.ctl("show", "keys", as_json=True).stdout
    for text in (raw_json, human.stdout):
        assert "PRIVATE KEY" not in text
        leaked = {name for kp in keypairs for name, s in secret_strings(kp).items() if s in text}
        assert not leaked, f"key material in show keys: {sorted(leaked)}"


def test_log_verbose_then_brief(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=2, extra=("log connection",))
    port, name = relay_ports(relay)

    def closed_line(client_port: int) -> str:
        return f"relay www: {LOCALHOST}:{client_port}: closed after"

    quiet_port, ok = handshake_from(port, name)
    assert ok
    wait_until(lambda: closed_line(quiet_port) in ops.stderr(), 30, "the closed line (brief)")
    assert "full handshake" not in ops.stderr()

    proc = ops.ctl("log", "verbose")
    assert (proc.returncode, proc.stdout.strip()) == (0, "logging verbose"), describe(proc)
    ops.summary()  # a round trip to every relay: each has read the earlier VERBOSE
    loud_port, ok = handshake_from(port, name)
    assert ok
    wait_until(
        lambda: f"{LOCALHOST}:{loud_port}: full handshake" in ops.stderr(),
        30,
        lambda: f"a full handshake debug line\n{ops.daemon.describe()}",
    )

    proc = ops.ctl("log", "brief")
    assert (proc.returncode, proc.stdout.strip()) == (0, "logging brief"), describe(proc)
    ops.summary()
    lines = ops.stderr().count("full handshake")
    brief_port, ok = handshake_from(port, name)
    assert ok
    wait_until(lambda: closed_line(brief_port) in ops.stderr(), 30, "the closed line (brief again)")
    assert f"{LOCALHOST}:{brief_port}: full handshake" not in ops.stderr()
    assert ops.stderr().count("full handshake") == lines


def test_unknown_command_socket_mode_and_stop(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=2)
    mode = os.stat(ops.sock).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600, oct(mode)

    proc = ops.ctl("frobnicate", "now")
    assert proc.returncode == 1, describe(proc)
    assert proc.stdout.startswith("error: unknown command: frobnicate now"), describe(proc)
    answer = ops.json("frobnicate", expect_rc=1)
    assert "unknown command" in answer["error"]
    assert {"show summary", "show sessions", "show keys", "reload", "stop", "log brief", "log verbose"} <= set(
        answer["commands"]
    )
    assert ops.summary()["generation"] == 1  # the daemon is unharmed

    children = relay_processes(ops.daemon) | ca_processes(ops.daemon)
    assert len(children) == 4
    proc = ops.ctl("stop")
    assert (proc.returncode, proc.stdout.strip()) == (0, "stopping"), describe(proc)
    assert ops.daemon.proc.wait(timeout=15) == 0, ops.daemon.describe()
    wait_until(lambda: not any(pid_alive(p) for p in children), 30, "every child to exit")
    assert not ops.sock.exists()
    after = ops.ctl("show", "summary")
    assert after.returncode == 1 and str(ops.sock) in after.stderr, describe(after)


# --------------------------------------------------------------------------
# Reload
# --------------------------------------------------------------------------


def test_reload_under_load_keeps_old_sessions(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=2)
    port, name = relay_ports(relay)
    before = ops.summary()
    old_pairs = {int(r["pid"]): int(r["ca_pid"]) for r in before["relays"]}
    pid_of_index = {int(r["relay"]): int(r["pid"]) for r in before["relays"]}

    with tls_session(port, name) as (tls, local_port):
        roundtrip(tls, b"before reload")
        (mine,) = [s for s in ops.query("show", "sessions")["sessions"] if s["client"] == f"{LOCALHOST}:{local_port}"]
        holder = pid_of_index[mine["relay_process"]]
        holder_ca = old_pairs[holder]
        other = next(p for p in old_pairs if p != holder)

        s_time = subprocess.Popen(
            ["openssl", "s_time", "-connect", f"{LOCALHOST}:{port}", "-new", "-time", "4"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # s_time is under way: handshakes are counted
            wait_until(
                lambda: stat_sum(ops.summary(), "hs_full") >= stat_sum(before, "hs_full") + 5, 30, "s_time to run"
            )
            reload = ops.ctl("reload")
            assert reload.returncode == 0, f"{describe(reload)}\n{ops.daemon.describe()}"
            assert reload.stdout.strip() == "reloaded, generation 2"
            trips = 0
            deadline = time.monotonic() + 30
            while s_time.poll() is None and time.monotonic() < deadline:
                roundtrip(tls, f"during reload {trips}".encode())
                trips += 1
                time.sleep(0.05)  # pacing the traffic, not waiting for anything
            out, err = s_time.communicate(timeout=30)
        finally:
            if s_time.poll() is None:
                s_time.kill()
                s_time.wait(5)
        assert s_time.returncode == 0 and "ERROR" not in out, f"s_time:\n{out}\n{err}\n{ops.daemon.describe()}"
        count = re.search(r"(\d+) connections in \d+ real seconds", out)
        assert count and int(count[1]) > 0, out
        assert trips >= 3, f"only {trips} round trips while s_time ran"

        # new relays and cas; the idle old relay and its ca are gone, the one
        # holding our session drains
        def settled() -> set[int] | None:
            relays = relay_processes(ops.daemon)
            new = relays - set(old_pairs)
            return new if len(new) == 2 and relays == new | {holder} else None

        new_relays = wait_until(settled, 30, lambda: f"two new relays, the holder draining\n{ops.daemon.describe()}")
        wait_until(lambda: not pid_alive(old_pairs[other]), 30, "the idle old relay's ca to exit")
        assert not pid_alive(other)
        summary = ops.summary()
        assert summary["generation"] == 2
        draining = {r["pid"] for r in summary["relays"] if r["draining"]}
        assert draining == {holder}
        assert {r["pid"] for r in summary["relays"] if not r["draining"]} == new_relays
        for i in range(5):
            roundtrip(tls, f"after reload {i}".encode() * 100)
        assert pid_alive(holder) and pid_alive(holder_ca)
    wait_until(lambda: not pid_alive(holder), 30, lambda: f"the draining relay to exit\n{ops.daemon.describe()}")
    wait_until(lambda: not pid_alive(holder_ca), 30, "the draining relay's ca to exit")
    assert relay_processes(ops.daemon) == new_relays
    assert len(ca_processes(ops.daemon)) == 2
    assert not ca_processes(ops.daemon) & set(old_pairs.values())
    tls_handshake(port, name)


def test_sighup_reloads(pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path) -> None:
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=2)
    port, name = relay_ports(relay)
    old_relays, old_cas = relay_processes(ops.daemon), ca_processes(ops.daemon)
    assert len(old_relays) == 2 and len(old_cas) == 2
    session = tmp_path / "session"
    first = s_client(port, servername=name, version="1.2", sess_out=session)
    assert first.handshake_ok and first.reused is False, first.describe()
    os.kill(ops.daemon.parent_pid, signal.SIGHUP)

    def replaced() -> bool:
        relays, cas = relay_processes(ops.daemon), ca_processes(ops.daemon)
        return len(relays) == 2 and len(cas) == 2 and not (relays & old_relays) and not (cas & old_cas)

    wait_until(replaced, 30, lambda: f"every relay and ca replaced\n{ops.daemon.describe()}")
    assert ops.summary()["generation"] == 2
    assert {r["pid"] for r in ops.summary()["relays"]} == relay_processes(ops.daemon)
    tls_handshake(port, name)
    # the new generation has the same ticket keys: the old session resumes
    again = s_client(port, servername=name, version="1.2", sess_in=session)
    assert again.handshake_ok and again.reused is True, again.describe()
    assert "reloaded: generation 2" in ops.stderr()
    assert ops.daemon.proc.poll() is None


def test_reload_with_a_broken_config_keeps_running(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=2)
    relays, cas = relay_processes(ops.daemon), ca_processes(ops.daemon)
    conf = ops.daemon.conf_path
    good = conf.read_text()
    bad_line = len(good.splitlines()) + 1
    conf.write_text(good + "frobnicate the relays\n")
    try:
        proc = ops.ctl("reload")
        assert proc.returncode == 1, describe(proc)
        assert f"{conf}:{bad_line}:" in proc.stdout, describe(proc)
        answer = ops.json("reload", expect_rc=1)
        assert f"{conf}:{bad_line}:" in answer["error"]
    finally:
        conf.write_text(good)
    assert relay_processes(ops.daemon) == relays
    assert ca_processes(ops.daemon) == cas
    assert ops.summary()["generation"] == 1
    with tls_session(*relay_ports(relay)) as (tls, _):
        roundtrip(tls, b"still serving")
    # restored: a reload works again
    proc = ops.ctl("reload")
    assert proc.returncode == 0, describe(proc)
    assert ops.summary()["generation"] == 2


def test_reload_picks_up_a_new_certificate(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    old_kp = pki["rsa2048"]
    relay = RelaySpec("www", free_port(), echo_backend.port, [old_kp])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=2)
    port, name = relay_ports(relay)
    assert tls_handshake(port, name).peer_cert_der == old_kp.cert_der

    new_dir = tmp_path / "newpki"
    new_dir.mkdir()
    new_kp = make_keypair(new_dir, "rsa2048")
    assert new_kp.cert_der != old_kp.cert_der
    config = ops.daemon.config
    ops.daemon.conf_path.write_text(replace(config, relays=[replace(relay, keypairs=[new_kp])]).render())
    proc = ops.ctl("reload")
    assert proc.returncode == 0, f"{describe(proc)}\n{ops.daemon.describe()}"
    keys = ops.query("show", "keys")["keys"]
    assert [k["certificate"] for k in keys] == [str(new_kp.cert_path)]
    for _ in range(6):  # several connections: whichever relay takes them
        assert tls_handshake(port, name).peer_cert_der == new_kp.cert_der


# --------------------------------------------------------------------------
# Session-ticket keys
# --------------------------------------------------------------------------


@pytest.mark.skipif(not TLS13_RESUMES, reason=f"resumes TLS 1.3 sessions; {NO_TLS13_RESUMPTION}")
def test_ticket_keys_rotate_and_expire(
    pki: Pki, http_backend: HttpBackend, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    lifetime, rotation = 8, 2
    relay = RelaySpec("www", free_port(), http_backend.port, [pki["p256"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=2, extra=(f"tls ticket lifetime {lifetime}",))
    port, name = relay_ports(relay)
    # the parent logs each rotation at debug level: count them
    assert ops.ctl("log", "verbose").returncode == 0

    def rotations() -> int:
        return ops.stderr().count("session ticket keys rotated")

    versions: tuple[TlsVersion, ...] = ("1.2", "1.3")
    sessions: dict[TlsVersion, Path] = {}
    for version in versions:
        path = tmp_path / f"sess{version}"
        first = s_client(port, servername=name, version=version, sess_out=path, request=HTTP_REQUEST)
        assert first.handshake_ok and first.reused is False, first.describe()
        sessions[version] = path
    sealed_after = rotations()  # both sealed by this key or, at worst, its successor
    before = ops.summary()

    def resumes(version: TlsVersion) -> bool:
        result = s_client(port, servername=name, version=version, sess_in=sessions[version])
        assert result.handshake_ok, result.describe()
        return bool(result.reused)

    # six resumptions of each session, three on each relay process: the one
    # not under test is frozen, so the other takes every connection off the
    # shared listening socket
    relay_pids = sorted(ops.daemon.relay_pids().values())
    assert len(relay_pids) == 2
    for i in range(6):
        with frozen(relay_pids[i % 2]):
            for version in sessions:
                assert resumes(version), f"TLS {version}: not resumed by relay pid {relay_pids[(i + 1) % 2]}"

    def counted() -> dict[str, Any] | None:
        now = ops.summary()
        return now if stat_sum(now, "hs_resumed") - stat_sum(before, "hs_resumed") >= 12 else None

    resumed = wait_until(counted, 30, "12 resumed handshakes counted")
    assert stat_sum(resumed, "hs_resumed") - stat_sum(before, "hs_resumed") == 12
    base = {r["pid"]: r["stats"]["hs_resumed"] for r in before["relays"]}
    per_relay = {r["pid"]: r["stats"]["hs_resumed"] - base[r["pid"]] for r in resumed["relays"]}
    assert per_relay == {pid: 6 for pid in relay_pids}, per_relay

    # one rotation later the older key still opens the tickets
    wait_until(lambda: rotations() >= sealed_after + 1, rotation + 2, "one ticket key rotation")
    ops.summary()  # every relay has read the new keys (messages arrive in order)
    for version in sessions:
        assert resumes(version), f"TLS {version}: not resumed after one rotation"
    assert rotations() - sealed_after < lifetime // rotation, "too slow: the sealing key may be gone already"

    # the parent keeps lifetime / rotation + 1 keys: the one that sealed them
    # (the newest when sealed_after was read, or older) is gone `keep`
    # rotations later, i.e. after lifetime + rotation at the most
    keep = lifetime // rotation + 1
    wait_until(lambda: rotations() >= sealed_after + keep, rotation * (keep + 1), "the sealing key to be dropped")
    ops.summary()
    for version in sessions:
        assert not resumes(version), f"TLS {version}: still resumed after the ticket lifetime"


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def test_metrics(pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path) -> None:
    metrics_port = free_port()
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["rsa2048"]])
    ops = start_ops(
        start_daemon,
        tmp_path,
        [relay],
        prefork=1,
        extra=(f"metrics listen on {LOCALHOST} port {metrics_port}", "tls keyop timeout 300"),
    )
    port, name = relay_ports(relay)
    base = scrape(metrics_port)
    assert metric(base, "pyprivsep_handshakes_total", kind="full") == stat_sum(ops.summary(), "hs_full")

    n = 4
    for _ in range(n):
        tls_handshake(port, name)
    full0 = metric(base, "pyprivsep_handshakes_total", kind="full")
    now = wait_until(
        lambda: (lambda s: s if metric(s, "pyprivsep_handshakes_total", kind="full") >= full0 + n else None)(
            scrape(metrics_port)
        ),
        30,
        "the handshakes in the metrics",
    )
    assert metric(now, "pyprivsep_handshakes_total", kind="full") == full0 + n
    assert metric(now, "pyprivsep_handshakes_total", kind="resumed") == 0
    ok = metric(now, "pyprivsep_keyops_total", result="ok")
    assert ok == metric(base, "pyprivsep_keyops_total", result="ok") + n
    assert metric(now, "pyprivsep_keyop_latency_seconds_count") == ok
    assert metric(now, "pyprivsep_keyop_latency_seconds_bucket", le="+Inf") == ok
    assert metric(now, "pyprivsep_keyop_latency_seconds_sum") > 0
    assert {lv["generation"] for n_, lv, _ in now if n_ == "pyprivsep_handshakes_total"} == {"1"}

    # bytes relayed
    in0, out0 = (metric(now, "pyprivsep_bytes_total", direction=d) for d in ("in", "out"))
    with tls_session(port, name) as (tls, _):
        roundtrip(tls, b"m" * 3000)
        wait_until(
            lambda: (lambda s: metric(s, "pyprivsep_bytes_total", direction="in") == in0 + 3000
                     and metric(s, "pyprivsep_bytes_total", direction="out") == out0 + 3000)(scrape(metrics_port)),
            30,
            lambda: f"3000 bytes each way in pyprivsep_bytes_total\n{scrape(metrics_port)}",
        )
        wait_until(
            lambda: metric(scrape(metrics_port), "pyprivsep_sessions_active") == 1, 30, "exactly one active session"
        )

    # a handshake failed by a frozen ca
    before = scrape(metrics_port)
    (ca_pid,) = ops.daemon.ca_pids().values()
    with frozen(ca_pid):
        _, succeeded = handshake_from(port, name)
    assert not succeeded
    failed0 = metric(before, "pyprivsep_handshakes_failed_total", reason="ca")
    timeouts0 = metric(before, "pyprivsep_keyops_total", result="timeout")
    after = wait_until(
        lambda: (lambda s: s if metric(s, "pyprivsep_handshakes_failed_total", reason="ca") > failed0 else None)(
            scrape(metrics_port)
        ),
        30,
        "a ca failure in the metrics",
    )
    assert metric(after, "pyprivsep_handshakes_failed_total", reason="ca") == failed0 + 1
    assert metric(after, "pyprivsep_keyops_total", result="timeout") == timeouts0 + 1
    assert metric(after, "pyprivsep_handshakes_failed_total", reason="client") == metric(
        before, "pyprivsep_handshakes_failed_total", reason="client"
    )
    # answered operations only in the latency histogram
    assert metric(after, "pyprivsep_keyop_latency_seconds_count") == metric(after, "pyprivsep_keyops_total", result="ok")
    wait_until(lambda: handshake_from(port, name)[1], 30, "a handshake once the ca runs again")


# --------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------


def test_connection_and_error_logs(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    www = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    down = RelaySpec("down", free_port(), free_port(), [pki["p256"]])  # nothing listens there
    ops = start_ops(
        start_daemon,
        tmp_path,
        [www, down],
        prefork=1,
        extra=("log connection", "log errors", "tls keyop timeout 300"),
    )

    def logged(line: str) -> None:
        wait_until(lambda: line in ops.stderr(), 30, lambda: f"log line {line!r}\n{ops.daemon.describe()}")

    # a closed connection, with the bytes sent each way
    with tls_session(*relay_ports(www)) as (tls, local_port):
        roundtrip(tls, b"a" * 1234)
        roundtrip(tls, b"b" * 766)
    logged(f"relay www: {LOCALHOST}:{local_port}: closed after")
    assert re.search(
        rf"relay www: {re.escape(LOCALHOST)}:{local_port}: closed after \d+s, 2000 bytes in, 2000 out$",
        ops.stderr(),
        re.M,
    ), ops.stderr()

    # a backend that refuses
    with tls_session(*relay_ports(down)) as (tls, local_port):
        with contextlib.suppress(OSError):
            tls.sendall(b"anyone there?")
            tls.recv(100)
    logged(f"relay down: {LOCALHOST}:{local_port}: backend: Connection refused")

    # a frozen ca
    (ca_pid,) = ops.daemon.ca_pids().values()
    with frozen(ca_pid):
        local_port, ok = handshake_from(*relay_ports(www))
        assert not ok
        logged(f"relay www: {LOCALHOST}:{local_port}: handshake failed: ca timeout")

    # a client the server cannot agree with: TLS 1.2 static RSA only
    local_port, ok = handshake_from(*relay_ports(www), version="1.2", ciphers="AES128-SHA")
    assert not ok
    prefix = f"relay www: {LOCALHOST}:{local_port}: handshake failed: "
    logged(prefix)
    (line,) = [ln for ln in ops.stderr().splitlines() if prefix in ln]
    reason = line.split(prefix, 1)[1]
    assert re.match(r"error:[0-9A-F]{8}:SSL routines:", reason), line
    assert "ca " not in reason
    assert "no shared cipher" in reason, line


# --------------------------------------------------------------------------
# Product bugs these tests found (now fixed): malformed control requests,
# a reload with a key that does not fit, verbosity and ticket lifetime
# --------------------------------------------------------------------------


def test_malformed_control_request_is_refused(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(ops.sock))
        s.sendall(b'{"cmd": [["show"], {"summary": 1}]}\n')
        reply = b""
        while not reply.endswith(b"\n") and (chunk := s.recv(4096)):
            reply += chunk
    assert reply, f"no answer\n{ops.daemon.describe()}"
    assert "error" in json.loads(reply)
    assert ops.daemon.proc.poll() is None, ops.daemon.describe()
    assert ops.summary()["generation"] == 1


def test_reload_with_a_mismatched_key_keeps_running(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["rsa2048"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=1)
    relays = relay_processes(ops.daemon)
    bad = replace(pki["rsa2048"], cert_path=pki.mismatched_cert, key_path=pki.mismatched_key)
    ops.daemon.conf_path.write_text(replace(ops.daemon.config, relays=[replace(relay, keypairs=[bad])]).render())
    proc = ops.ctl("reload")
    assert proc.returncode == 1, f"{describe(proc)}\n{ops.daemon.describe()}"
    assert f"{ops.daemon.conf_path}:" in proc.stdout
    assert relay_processes(ops.daemon) == relays
    tls_handshake(*relay_ports(relay))


def test_log_verbose_survives_a_reload(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=1, extra=("log connection",))
    old = relay_processes(ops.daemon)
    assert ops.ctl("log", "verbose").returncode == 0
    assert ops.ctl("reload").returncode == 0
    wait_until(lambda: not relay_processes(ops.daemon) & old, 30, "the old relay to drain")
    local_port, ok = handshake_from(*relay_ports(relay))
    assert ok
    closed = f"relay www: {LOCALHOST}:{local_port}: closed after"
    wait_until(lambda: closed in ops.stderr(), 30, "the closed line")
    assert f"{LOCALHOST}:{local_port}: full handshake" in ops.stderr(), ops.stderr()


def test_ticket_lifetime_hint_is_the_configured_lifetime(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=1, extra=("tls ticket lifetime 60",))
    result = s_client(relay.listen_port, servername=relay.keypairs[0].dns_name, version="1.2",
                      sess_out=tmp_path / "session")
    assert result.handshake_ok, result.describe()
    hint = re.search(r"lifetime hint: (\d+)", result.stdout)
    assert hint, result.describe()
    assert int(hint[1]) <= 60, f"hint {hint[1]} s for a 60 s lifetime\n{ops.daemon.describe()}"


# --------------------------------------------------------------------------
# The root parent never blocks on a child or a client
# --------------------------------------------------------------------------


# pyprivsep/parent.py: heartbeat_deadline() with the default tls keyop timeout
# (2 x 1 s + 10 s), and HEARTBEAT_INTERVAL
HEARTBEAT_DEADLINE = 12.0
HEARTBEAT_INTERVAL = 3.0


def summary_answers(ops: Ops) -> dict[str, Any]:
    """`ctl show summary` as a user runs it; its own 20 s timeout is the
    bound: a parent blocked on a relay never answers."""
    proc = ops.ctl("show", "summary", as_json=True)
    assert proc.returncode == 0, f"{describe(proc)}\n{ops.daemon.describe()}"
    answer = json.loads(proc.stdout)
    assert isinstance(answer, dict)
    return answer


def test_a_frozen_relay_is_killed_and_restarted_and_the_parent_keeps_serving(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path, freezer: Freezer
) -> None:
    """A relay that stops reading its control channel, without its parent
    seeing it stopped (a frozen cgroup): the parent kills and restarts it
    (heartbeat, then queue overflow), and meanwhile answers ctl, restarts a
    killed ca and completes a reload."""
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    ops = start_ops(start_daemon, tmp_path, [relay], prefork=2, extra=("tls ticket lifetime 4",))
    daemon = ops.daemon
    frozen_pid = daemon.relay_pids()[1]
    cas = daemon.ca_pids()
    freezer.freeze(frozen_pid)

    # the parent reaps and restarts a killed ca meanwhile
    os.kill(cas[2], signal.SIGKILL)
    wait_until(lambda: daemon.ca_pids().get(2) not in (None, cas[2]), 30, lambda: f"ca 2 restarted\n{daemon.describe()}")

    # heartbeat: killed and restarted within its deadline (plus one interval
    # and slack for a loaded machine); show summary answers all along
    bound = HEARTBEAT_DEADLINE + HEARTBEAT_INTERVAL + 20

    def replaced() -> bool:
        summary = summary_answers(ops)
        pids = {r["relay"]: r["pid"] for r in summary["relays"] if r["generation"] == 1}
        return pids.get(1) not in (None, frozen_pid)

    wait_until(replaced, bound, lambda: f"the frozen relay replaced\n{daemon.describe()}", interval=0.5)
    assert "relay 1 did not answer the heartbeat" in ops.stderr(), ops.stderr()
    # it was SIGKILLed: thawed, it dies (until then it still shows as relay 1)
    freezer.thaw(frozen_pid)
    wait_until(lambda: not pid_alive(frozen_pid), 30, "the frozen relay to die once thawed")
    wait_until(lambda: daemon.relay_pids().get(1) not in (None, frozen_pid), 30, "the new relay 1 up")
    for _ in range(3):
        tls_handshake(*relay_ports(relay))

    # a relay frozen again, while control messages keep coming (ticket
    # rotations every second, verbosity changes): the parent never blocks
    # in a send; the relay's queue overflows or goes undrained, and it goes
    second = daemon.relay_pids()[1]
    freezer.freeze(second)
    began = time.monotonic()
    n = 0
    while {r["relay"]: r["pid"] for r in ops.summary()["relays"] if r["generation"] == 1}.get(1) in (None, second):
        for _ in range(50):
            ops.query("log", "verbose" if n % 2 else "brief")
            n += 1
        n += 1
        assert time.monotonic() - began < bound, f"{n} control messages, relay still there\n{daemon.describe()}"
    text = ops.stderr()
    assert "relay 1 let its control queue overflow" in text or "relay 1 did not read its control channel" in text \
        or text.count("relay 1 did not answer the heartbeat") >= 2, text[-4000:]

    # and a reload completes, the old generation drains
    offset = len(ops.stderr())
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded: generation 2" in ops.stderr()[offset:], 30, lambda: f"the reload\n{daemon.describe()}")
    assert summary_answers(ops)["generation"] == 2
    freezer.thaw(second)
    wait_until(lambda: not pid_alive(second), 30, "the second frozen relay to die once thawed")
    daemon.wait_ready()


def test_metrics_idle_connections_cost_the_parent_no_thread(
    pki: Pki, echo_backend: EchoServer, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """400 idle connections to the metrics port from an unprivileged
    client: the root parent stays one thread with a bounded number of
    descriptors, drops them, and then serves a scrape."""
    metrics_port = free_port()
    relay = RelaySpec("www", free_port(), echo_backend.port, [pki["p256"]])
    ops = start_ops(
        start_daemon, tmp_path, [relay], prefork=1, extra=(f"metrics listen on {LOCALHOST} port {metrics_port}",)
    )
    pid = ops.daemon.parent_pid
    tls_handshake(*relay_ports(relay))
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))

    idle: list[socket.socket] = []
    try:
        for _ in range(400):
            s = socket.socket()
            s.settimeout(20)
            s.connect((LOCALHOST, metrics_port))
            idle.append(s)
        assert proc_status(pid)["Threads"] == "1", proc_status(pid)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        # 16 connections held, and the one a loaded machine may catch
        # between its accept and its close beyond the limit
        assert fds <= fds_before + 16 + 1, f"{fds} descriptors, {fds_before} before"

        # each is dropped: at once beyond the limit, after its deadline otherwise
        def dropped(s: socket.socket) -> bool:
            try:
                return s.recv(1) == b""
            except ConnectionResetError:
                return True

        assert all(dropped(s) for s in idle)
    finally:
        for s in idle:
            s.close()
    assert proc_status(pid)["Threads"] == "1", proc_status(pid)
    wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= fds_before, 30, "the parent's descriptors back")
    samples = scrape(metrics_port)
    assert metric(samples, "pyprivsep_handshakes_total", kind="full") == stat_sum(ops.summary(), "hs_full") >= 1
    assert metric(samples, "pyprivsep_connections_accepted_total", process="1", generation="1") >= 1
    assert "metrics: 16 connections open, refusing more" in ops.stderr(), ops.stderr()[-3000:]
