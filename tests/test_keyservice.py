"""Key services: the cas serve programs we did not write.

A `keyservice` block makes the parent create a SOCK_SEQPACKET socket and
fork the service's cas on it; each ca admits a connection by its peer's
SO_PEERCRED (allow user / allow group) and answers the relay protocol
(protocol.h) under the relay's policy.  These tests run the real daemon
as root with configurations of keyservices alone (no relay processes) and
talk to it as a foreign program would: frames built with cawire (written
from the specs, not from the ca's C), signatures checked with
`cryptography`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import grp
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from basics import wait_until
from cawire import (ERR_FRAME, ERR_NOKEY, ERR_OP, ERR_POLICY, ERR_VERSION, OK, OP_ECDSA_SIGN, OP_PING,
                    OP_RSA_PRIV_DEC, OP_RSA_PRIV_ENC, PAD_NONE, PAD_PKCS1, parse_reply, pss_block, raw_frame,
                    spki_keyid)
from backends import HttpBackend
from daemonctl import SANITIZED, Daemon, DaemonConfig, KeyServiceSpec, StartDaemon, run_pyprivsep, simple_relay
from keypairs import KeyPair, Pki, found_components, key_patterns
from memscan import scan_process_memory
from procs import open_fds, pid_alive, proc_status
from pyprivsep.ctl import request as ctl_request

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="keyservice tests need root (users, SO_PEERCRED)")

NOBODY = pwd.getpwnam("nobody")
CA_USER = "_pyprivsep_ca"
MESSAGE = b"signed through a key service"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is 0700, and
    nobody must reach the socket to be refused by the ca, not by a mode);
    the socket's own directory, under it, is left for the parent to make."""
    top = Path(tempfile.mkdtemp(prefix="pps-ks-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def service(sockdir: Path, pki: Pki, *, keys: Sequence[str] = ("rsa2048", "p256"), name: str = "web",
            **kw: object) -> KeyServiceSpec:
    return KeyServiceSpec(name, sockdir / "run" / f"{name}.sock", [pki[k] for k in keys], **kw)  # type: ignore[arg-type]


def start(start_daemon: StartDaemon, *services: KeyServiceSpec) -> Daemon:
    return start_daemon(DaemonConfig([], keyservices=services))


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    """A connection; a full backlog (EAGAIN: AF_UNIX does not wait even
    with a timeout) is waited out, within the timeout."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:
            if time.monotonic() > deadline:
                s.close()
                raise
            time.sleep(0.01)


def exchange(s: socket.socket, frame: bytes) -> tuple[int, bytes]:
    s.send(frame)
    reply = parse_reply(s.recv(65536))
    return reply.arg, reply.payload


def rsa_sign_frame(kp: KeyPair, req_id: int, message: bytes = MESSAGE) -> bytes:
    bits = kp.certificate.public_key().key_size  # type: ignore[union-attr]
    block = pss_block(hashlib.sha256(message).digest(), bits)
    return raw_frame(OP_RSA_PRIV_ENC, PAD_NONE, req_id, spki_keyid(kp.certificate), block)


def ec_sign_frame(kp: KeyPair, req_id: int, message: bytes = MESSAGE) -> bytes:
    return raw_frame(OP_ECDSA_SIGN, 0, req_id, spki_keyid(kp.certificate), hashlib.sha256(message).digest())


def verify(kp: KeyPair, signature: bytes, message: bytes = MESSAGE) -> None:
    """Raises InvalidSignature unless signature is kp's over message."""
    pub = kp.certificate.public_key()
    if kp.is_rsa:
        pub.verify(signature, message, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())  # type: ignore[call-arg,union-attr]
    else:
        pub.verify(signature, hashlib.sha256(message).digest(), ec.ECDSA(utils.Prehashed(hashes.SHA256())))  # type: ignore[call-arg,union-attr]


def signs(path: Path, kp: KeyPair, req_id: int = 1, message: bytes = MESSAGE) -> None:
    """One connection, one signature, verified."""
    with connect(path) as s:
        frame = rsa_sign_frame(kp, req_id, message) if kp.is_rsa else ec_sign_frame(kp, req_id, message)
        status, sig = exchange(s, frame)
        assert status == OK, status
        verify(kp, sig, message)


def as_other_user(uid: int, gid: int, path: Path) -> str:
    """In a forked child that became uid/gid (no supplementary groups):
    connect and send a ping; what happened, as a word."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        result = "error"
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            with connect(path, timeout=15.0) as s:
                try:
                    s.send(raw_frame(OP_PING, 0, 7, b"", b""))
                    data = s.recv(65536)
                    result = "served" if data and parse_reply(data).arg == OK else "closed"
                except (ConnectionResetError, BrokenPipeError):
                    result = "closed"
                except TimeoutError:
                    result = "timeout"
        except OSError as e:
            result = f"oserror {e}"
        finally:
            os.write(w, result.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def ctl(daemon: Daemon, *words: str) -> dict[str, object]:
    return ctl_request(str(daemon.workdir / "ctl.sock"), list(words))


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_allowed_client_gets_signatures_that_verify(start_daemon: StartDaemon, pki: Pki, sockdir: Path) -> None:
    """A client of an allowed uid (root) gets RSA-PSS and ECDSA signatures
    that verify against the certificates; the socket is 0666 in a 0755
    directory the parent made; no relay process runs."""
    svc = service(sockdir, pki)
    daemon = start(start_daemon, svc)
    assert (svc.socket.stat().st_mode & 0o777) == 0o666
    assert (svc.socket.parent.stat().st_mode & 0o777) == 0o755
    assert daemon.processes("relay") == [] and daemon.processes("ca") == []
    for i, kp in enumerate(svc.keypairs):
        signs(svc.socket, kp, req_id=100 + i)
    # several requests on one connection, interleaved keys
    with connect(svc.socket) as s:
        for i in range(10):
            kp = svc.keypairs[i % 2]
            status, sig = exchange(s, rsa_sign_frame(kp, i) if kp.is_rsa else ec_sign_frame(kp, i))
            assert status == OK
            verify(kp, sig)


def test_refused_uid_is_closed_and_logged(start_daemon: StartDaemon, pki: Pki, sockdir: Path) -> None:
    """nobody (not allowed) is closed without an answer, and the ca logs the
    refusal with its uid, gid and pid; an allowed group admits nobody when
    its gid is that group's; root is still served."""
    daemon_group = grp.getgrnam("daemon")
    svc = service(sockdir, pki, groups=("daemon",))
    daemon = start(start_daemon, svc)
    assert as_other_user(NOBODY.pw_uid, NOBODY.pw_gid, svc.socket) == "closed"
    wait_until(lambda: f"refused connection from uid {NOBODY.pw_uid} gid {NOBODY.pw_gid}" in daemon.stderr_text(),
               10.0, lambda: "the refusal in the log\n" + daemon.describe())
    # allow group "daemon": the peer's gid decides
    assert as_other_user(NOBODY.pw_uid, daemon_group.gr_gid, svc.socket) == "served"
    signs(svc.socket, pki["p256"])


def test_hostile_client_gets_error_replies_and_others_are_served(start_daemon: StartDaemon, pki: Pki,
                                                                 sockdir: Path) -> None:
    """An allowed but hostile client gets what a hostile relay gets: no
    decryption, no non-PSS raw block, no unknown key, malformed frames
    answered ERR_FRAME/ERR_VERSION; the ca keeps serving it and others."""
    svc = service(sockdir, pki, prefork=1)
    daemon = start(start_daemon, svc)
    rsa_kp, ec_kp = pki["rsa2048"], pki["p256"]
    rsa_id = spki_keyid(rsa_kp.certificate)
    with connect(svc.socket) as bystander, connect(svc.socket) as hostile:
        cases = [
            (raw_frame(OP_RSA_PRIV_DEC, PAD_NONE, 1, rsa_id, b"\x01" * 256), ERR_OP),
            (raw_frame(OP_RSA_PRIV_ENC, PAD_NONE, 2, rsa_id, b"\x00\x01" + b"\xff" * 254), ERR_POLICY),
            (raw_frame(OP_RSA_PRIV_ENC, PAD_PKCS1, 3, rsa_id, b"\x30" * 35), ERR_POLICY),
            (raw_frame(OP_RSA_PRIV_ENC, PAD_NONE, 4, b"\x42" * 32, b"\x00" * 256), ERR_NOKEY),
            (raw_frame(OP_RSA_PRIV_ENC, PAD_NONE, 5, rsa_id, b"\x00" * 16, length=200), ERR_FRAME),
            (raw_frame(OP_RSA_PRIV_ENC, PAD_NONE, 6, rsa_id, b"", version=9), ERR_VERSION),
            (b"\x01\x02", ERR_FRAME),
            (b"", ERR_FRAME),
        ]
        for frame, expected in cases:
            status, payload = exchange(hostile, frame)
            assert (status, payload) == (expected, b""), frame[:16]
            status, sig = exchange(bystander, ec_sign_frame(ec_kp, 9))
            assert status == OK
            verify(ec_kp, sig)
        # the hostile connection itself is still served
        status, sig = exchange(hostile, rsa_sign_frame(rsa_kp, 10))
        assert status == OK
        verify(rsa_kp, sig)
    text = daemon.stderr_text()
    assert "refused request 1 from client pid" in text and "RSA decryption is never performed" in text, text


def test_many_clients_at_once(start_daemon: StartDaemon, pki: Pki, sockdir: Path) -> None:
    """50 connections with requests interleaved (all sent before any reply
    is read) are all answered, each with its own ids, signatures valid."""
    svc = service(sockdir, pki)
    start(start_daemon, svc)
    kp = pki["p256"]
    conns = [connect(svc.socket, timeout=30.0) for _ in range(50)]
    try:
        for round_ in range(3):
            for n, s in enumerate(conns):
                s.send(ec_sign_frame(kp, n * 10 + round_, MESSAGE + bytes([n])))
        for n, s in enumerate(conns):
            for round_ in range(3):
                reply = parse_reply(s.recv(65536))
                assert (reply.arg, reply.id) == (OK, n * 10 + round_)
                verify(kp, reply.payload, MESSAGE + bytes([n]))
    finally:
        for s in conns:
            s.close()


def test_clients_beyond_the_bound_are_closed(start_daemon: StartDaemon, pki: Pki, sockdir: Path) -> None:
    """A ca serves 1024 clients at once; the 1025th is accepted and closed
    (logged); once one leaves, a new client is served again."""
    svc = service(sockdir, pki, prefork=1)
    daemon = start(start_daemon, svc)
    ping = raw_frame(OP_PING, 0, 5, b"", b"")
    conns: list[socket.socket] = []
    try:
        for _ in range(1024):
            conns.append(connect(svc.socket, timeout=20.0))
        for s in conns:
            assert exchange(s, ping)[0] == OK
        with connect(svc.socket) as extra:
            try:
                extra.send(ping)
                assert extra.recv(65536) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass
        assert "1024 clients already" in daemon.stderr_text(), daemon.describe()
        conns.pop().close()

        def served_again() -> bool:
            # the ca may accept before it saw the hang-up: then this one
            # is closed too, and the next is served
            with connect(svc.socket) as again:
                try:
                    again.send(ping)
                    data = again.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    return False
                return bool(data) and parse_reply(data).arg == OK
        wait_until(served_again, 10.0, lambda: "a free place\n" + daemon.describe())
        assert all(exchange(s, ping)[0] == OK for s in conns[:10])
    finally:
        for s in conns:
            s.close()


def test_client_that_never_reads_is_dropped(start_daemon: StartDaemon, pki: Pki, sockdir: Path) -> None:
    """A client that floods requests and never reads its replies fills its
    socket; the (single) ca drops it and serves another client meanwhile."""
    svc = service(sockdir, pki, prefork=1)
    daemon = start(start_daemon, svc)
    flood = connect(svc.socket)
    flood.setblocking(False)
    frame = raw_frame(OP_PING, 0, 1, b"", b"")
    checked = False
    deadline = time.monotonic() + 20.0
    dropped = False
    while time.monotonic() < deadline and not dropped:
        try:
            flood.send(frame)
        except BlockingIOError:
            if not checked:             # the flood's socket is full now
                signs(svc.socket, pki["p256"])   # others are not blocked
                checked = True
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
    assert checked and dropped, daemon.describe()
    assert "does not read its replies, dropped" in daemon.stderr_text()
    signs(svc.socket, pki["rsa2048"])
    flood.close()


def test_killed_ca_is_restarted_and_clients_reconnect(start_daemon: StartDaemon, pki: Pki,
                                                      sockdir: Path) -> None:
    """SIGKILL to a service's only ca: its client's connection ends (at most
    its in-flight request fails), the parent restarts it through the normal
    path, a new connection and the old client's reconnection succeed, and
    `show summary` counts the restart."""
    svc = service(sockdir, pki, prefork=1)
    daemon = start(start_daemon, svc)
    kp = pki["rsa2048"]
    client = connect(svc.socket)
    status, _ = exchange(client, rsa_sign_frame(kp, 1))
    assert status == OK
    old = daemon.keyservice_pids("web")[1]
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: (p := daemon.keyservice_pids("web").get(1)) not in (None, old) and p, 15.0,
                     lambda: "the keyservice ca to be restarted\n" + daemon.describe())
    assert pid_alive(new)
    try:
        client.send(rsa_sign_frame(kp, 2))
        assert client.recv(65536) == b""        # the dead ca's connection is gone
    except (ConnectionResetError, BrokenPipeError):
        pass
    client.close()
    signs(svc.socket, kp, req_id=3)             # a new client
    signs(svc.socket, pki["p256"], req_id=4)    # the old one, reconnected
    summary = ctl(daemon, "show", "summary")
    [ks] = summary["keyservices"]  # type: ignore[misc]
    assert ks["name"] == "web" and ks["restarts"] == 1 and ks["cas_up"] == 1
    assert [c["pid"] for c in ks["cas"]] == [new]


def test_stopped_ca_is_replaced(start_daemon: StartDaemon, pki: Pki, sockdir: Path) -> None:
    """A stopped (SIGSTOP) keyservice ca is killed and replaced, as a
    relay's ca would be."""
    svc = service(sockdir, pki, prefork=1)
    daemon = start(start_daemon, svc)
    old = daemon.keyservice_pids("web")[1]
    os.kill(old, signal.SIGSTOP)
    wait_until(lambda: daemon.keyservice_pids("web").get(1) not in (None, old), 15.0,
               lambda: "the stopped ca to be replaced\n" + daemon.describe())
    signs(svc.socket, pki["p256"])


def test_memory_keys_only_in_their_cas(start_daemon: StartDaemon, pki: Pki, sockdir: Path,
                                       http_backend: HttpBackend) -> None:
    """Beside a relay: the parent and the relay hold no prime or private
    scalar; the service's ca holds its service's key and not the relay's,
    the relay's ca the relay's and not the service's."""
    if SANITIZED:
        pytest.skip("memory scan skipped in an AddressSanitizer run")
    svc = service(sockdir, pki, keys=("p256",), prefork=1)
    relay = simple_relay(pki, http_backend.port, key_names=("rsa2048",))
    daemon = start_daemon(DaemonConfig([relay], prefork=1, keyservices=[svc]))
    signs(svc.socket, pki["p256"])
    patterns = key_patterns([pki["rsa2048"], pki["p256"]])
    expected = {
        daemon.parent_pid: set(),
        daemon.relay_pids()[1]: set(),
        daemon.ca_pids()[1]: pki["rsa2048"].components(),
        daemon.keyservice_pids("web")[1]: pki["p256"].components(),
    }
    for pid, components in expected.items():
        result = scan_process_memory(pid, patterns)
        assert result.bytes_scanned > 4 * 1024 * 1024, result
        assert found_components(result.found) == components, (pid, result)


def test_processes_run_as_ca_user_under_the_filter(start_daemon: StartDaemon, pki: Pki, sockdir: Path) -> None:
    """Each service ca runs as `ca user`, not dumpable, with no_new_privs and
    a seccomp filter (and it still accepts and signs under it)."""
    if SANITIZED:
        pytest.skip("no seccomp filter in an AddressSanitizer run")
    svc = service(sockdir, pki)
    daemon = start(start_daemon, svc)
    uid = pwd.getpwnam(CA_USER).pw_uid

    def settled() -> bool:
        sts = [proc_status(p) for p in daemon.keyservice_pids("web").values()]
        return len(sts) == 2 and all(st["Uid"].split()[0] == str(uid) and st["Seccomp"] == "2" for st in sts)

    wait_until(settled, 10.0, lambda: "cas to drop privileges\n" + daemon.describe())
    for pid in daemon.keyservice_pids("web").values():
        st = proc_status(pid)
        assert st["NoNewPrivs"] == "1"
        assert Path(f"/proc/{pid}/root").resolve() == daemon.chroot.resolve()
        # not dumpable: the kernel gives its /proc files to root, not to its uid
        assert os.stat(f"/proc/{pid}/mem").st_uid == 0
        assert st["Groups"].split() == [str(pwd.getpwnam(CA_USER).pw_gid)]
    for _ in range(4):
        signs(svc.socket, pki["rsa2048"])
    assert daemon.seccomp_kills() == []


def test_ctl_show_keys_lists_service_keys(start_daemon: StartDaemon, pki: Pki, sockdir: Path) -> None:
    svc = service(sockdir, pki)
    daemon = start(start_daemon, svc)
    keys = ctl(daemon, "show", "keys")["keys"]
    listed = {(k["keyservice"], k["certificate"]) for k in keys}  # type: ignore[union-attr,index]
    assert listed == {("web", str(kp.cert_path)) for kp in svc.keypairs}
    pids = set(daemon.keyservice_pids("web").values())
    for k in keys:  # type: ignore[union-attr]
        assert k["socket"] == str(svc.socket) and set(k["ca_pids"]) == pids  # type: ignore[index]
    [ks] = ctl(daemon, "show", "summary")["keyservices"]  # type: ignore[misc]
    assert (ks["name"], ks["socket"], ks["cas_up"], ks["restarts"]) == ("web", str(svc.socket), 2, 0)
    assert {c["pid"] for c in ks["cas"]} == pids
    # the metrics are rendered from the same records
    from pyprivsep import metrics
    text = metrics.render([], [ks]).decode()
    assert 'pyprivsep_keyservice_cas_up{service="web"} 2.0' in text, text
    assert 'pyprivsep_keyservice_ca_restarts_total{service="web"} 0.0' in text, text


def test_reload_and_shutdown(start_daemon: StartDaemon, pki: Pki, sockdir: Path) -> None:
    """SIGHUP: a new generation of cas serves on the same socket, the old
    ones stop accepting and end with their last client (which is still
    served meanwhile); SIGTERM removes the socket."""
    svc = service(sockdir, pki, prefork=1)
    daemon = start(start_daemon, svc)
    old = daemon.keyservice_pids("web")[1]
    kept = connect(svc.socket)
    assert exchange(kept, ec_sign_frame(pki["p256"], 1))[0] == OK

    def sockets_of(pid: int) -> int:
        return sum(1 for target in open_fds(pid).values() if target.startswith("socket:"))
    before = sockets_of(old)                    # the listener and `kept`
    os.kill(daemon.parent_pid, signal.SIGHUP)
    # the old ca closes its listener (stops accepting), keeps its client
    wait_until(lambda: sockets_of(old) == before - 1, 15.0,
               lambda: f"the old ca to stop accepting: {open_fds(old)}\n" + daemon.describe())
    wait_until(lambda: any(p != old for p in _all_service_pids(daemon)), 15.0,
               lambda: "the new generation\n" + daemon.describe())
    signs(svc.socket, pki["rsa2048"])           # the new ca
    assert pid_alive(old)                       # draining, its client kept
    assert exchange(kept, ec_sign_frame(pki["p256"], 2))[0] == OK
    kept.close()
    wait_until(lambda: not pid_alive(old), 15.0, lambda: "the old ca to end\n" + daemon.describe())
    assert daemon.stop() == 0
    assert not svc.socket.exists()


def _all_service_pids(daemon: Daemon) -> list[int]:
    return list(daemon.keyservice_pids("web").values())


def test_live_socket_is_refused(start_daemon: StartDaemon, pki: Pki, sockdir: Path, tmp_path: Path) -> None:
    """A second daemon naming a socket another process listens on does not
    start; a stale socket file is replaced."""
    svc = service(sockdir, pki)
    svc.socket.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(svc.socket))
    stale.close()                               # a socket file nobody listens on
    daemon = start(start_daemon, svc)
    signs(svc.socket, pki["p256"])
    conf = tmp_path / "second.conf"
    conf.write_text(f'socket "{tmp_path / "ctl2.sock"}"\n'
                    + DaemonConfig([], keyservices=[svc], chroot=daemon.chroot).render())
    proc = run_pyprivsep("-d", "-f", str(conf))
    assert proc.returncode != 0 and "another process is listening on it" in proc.stderr, proc.stderr
    signs(svc.socket, pki["p256"])              # the first daemon's socket survived


@pytest.mark.parametrize("body, message", [
    ('allow user "root"\n tls certificate "{cert}" key "{key}"', 'has no "socket"'),
    ('socket "rel/web.sock"\n allow user "root"\n tls certificate "{cert}" key "{key}"',
     "is not an absolute path"),
    ('socket "/run/x.sock"\n tls certificate "{cert}" key "{key}"', "allows nobody"),
    ('socket "/run/x.sock"\n allow user "root"', "has no keypair"),
    ('socket "/run/x.sock"\n allow user "no-such-user-pps"\n tls certificate "{cert}" key "{key}"',
     'allow user "no-such-user-pps": no such user'),
    ('socket "/run/x.sock"\n allow group "no-such-group-pps"\n tls certificate "{cert}" key "{key}"',
     'allow group "no-such-group-pps": no such group'),
    ('socket "/run/x.sock"\n allow user "root"\n prefork 0\n tls certificate "{cert}" key "{key}"',
     "out of range"),
    ('socket "/run/x.sock"\n allow user "root"\n listen on 127.0.0.1 port 1 tls\n'
     ' tls certificate "{cert}" key "{key}"', "not allowed inside a keyservice block"),
    ('socket "/run/x.sock"\n allow user "root"\n tls certificate "{cert}" key "{mismatched}"', ""),
])
def test_check_mode_refuses_bad_blocks(pki: Pki, tmp_path: Path, body: str, message: str) -> None:
    kp = pki["rsa2048"]
    text = body.format(cert=kp.cert_path, key=kp.key_path, mismatched=pki.mismatched_key)
    conf = tmp_path / "bad.conf"
    conf.write_text(f'keyservice "web" {{\n {text}\n}}\n')
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode != 0, proc.stderr
    assert f"{conf}:" in proc.stderr and message in proc.stderr, proc.stderr


def test_check_mode_refuses_duplicates_and_accepts_a_good_block(pki: Pki, tmp_path: Path) -> None:
    kp = pki["p256"]
    block = ('keyservice "{name}" {{\n socket "{sock}"\n allow user "root"\n'
             f' tls certificate "{kp.cert_path}" key "{kp.key_path}"\n}}}}\n')
    conf = tmp_path / "c.conf"
    conf.write_text(block.format(name="a", sock="/run/a.sock"))
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 0, proc.stderr
    conf.write_text(block.format(name="a", sock="/run/a.sock") + block.format(name="a", sock="/run/b.sock"))
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode != 0 and 'duplicate keyservice name "a"' in proc.stderr, proc.stderr
    conf.write_text(block.format(name="a", sock="/run/a.sock") + block.format(name="b", sock="/run/a.sock"))
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode != 0 and "duplicate keyservice socket" in proc.stderr, proc.stderr
    # a key others may read is refused as for a relay
    loose = tmp_path / "loose.key"
    loose.write_bytes(kp.key_path.read_bytes())
    loose.chmod(0o644)
    conf.write_text(f'keyservice "a" {{\n socket "/run/a.sock"\n allow user "root"\n'
                    f' tls certificate "{kp.cert_path}" key "{loose}"\n}}\n')
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode != 0 and "chmod 600" in proc.stderr, proc.stderr


def test_reload_adds_and_removes_services(start_daemon: StartDaemon, pki: Pki, sockdir: Path) -> None:
    """A reload with another set of services: the new one's socket appears
    and serves, the removed one's socket goes; a reload naming an unknown
    user fails and keeps the running services."""
    web = service(sockdir, pki, keys=("p256",), prefork=1)
    daemon = start(start_daemon, web)
    mail = service(sockdir, pki, keys=("rsa2048",), name="mail", prefork=1)
    head = daemon.conf_path.read_text().split("keyservice", 1)[0]
    daemon.conf_path.write_text(head + "\n".join(mail.render()) + "\n")
    answer = ctl(daemon, "reload")
    assert "ok" in answer, answer
    wait_until(lambda: not web.socket.exists() and len(daemon.keyservice_pids("mail")) == 1, 15.0,
               lambda: "the new service\n" + daemon.describe())
    signs(mail.socket, pki["rsa2048"])
    wait_until(lambda: not daemon.keyservice_pids("web"), 15.0, lambda: "web's ca to end\n" + daemon.describe())
    bad = KeyServiceSpec("mail", mail.socket, mail.keypairs, users=("no-such-pps-user",))
    daemon.conf_path.write_text(head + "\n".join(bad.render()) + "\n")
    answer = ctl(daemon, "reload")
    assert 'allow user "no-such-pps-user": no such user' in str(answer.get("error")), answer
    signs(mail.socket, pki["rsa2048"])
    assert [k["name"] for k in ctl(daemon, "show", "summary")["keyservices"]] == ["mail"]  # type: ignore[union-attr,index]


def test_sigterm_ends_a_ca_promptly(start_daemon: StartDaemon, pki: Pki, sockdir: Path) -> None:
    """SIGTERM ends a service ca at once, idle or with clients connected and
    one whose socket is full (a reply waiting); the parent restarts it."""
    svc = service(sockdir, pki, prefork=1)
    daemon = start(start_daemon, svc)
    for busy in (False, True):
        pid = daemon.keyservice_pids("web")[1]
        conns = []
        if busy:
            conns = [connect(svc.socket) for _ in range(5)]
            for s in conns:
                assert exchange(s, raw_frame(OP_PING, 0, 1, b"", b""))[0] == OK
            flood = conns[0]
            flood.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    flood.send(raw_frame(OP_PING, 0, 2, b"", b""))
        start_time = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), 5.0, lambda: "the ca to end\n" + daemon.describe())
        assert time.monotonic() - start_time < 1.5
        wait_until(lambda: daemon.keyservice_pids("web").get(1) not in (None, pid), 15.0,
                   lambda: "the ca to be restarted\n" + daemon.describe())
        for s in conns:
            s.close()
    signs(svc.socket, pki["p256"])
