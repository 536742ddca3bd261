"""The fleet simulation of the README's "Running a fleet": three pyprivsep
instances, each in a network namespace this test makes, each with its own
loopback and backend, behind one address (haproxy, mode tcp, balance
roundrobin, in the root namespace; tests/fleet.py).  All read one `tls
ticket keys` file, so a session one instance made resumes on every other,
over TLS 1.3 and 1.2; without the file it does not.  With PKCS#11 keys in
pyprivsep, every instance signs through one shared `p11-kit server`
(tests/softhsm.py); that part skips, saying why, while `pyprivsep -n`
refuses the `pkcs11` directive."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import fleet as fleetmod
import softhsm
from basics import wait_until
from daemonctl import CA_USER, SANITIZED, DaemonConfig, RelaySpec, run_pyprivsep
from fleet import Fleet, with_key
from keypairs import KeyPair, Pki
from test_ticketfile import key, ticket_key_name, write_keys
from tlsclients import HTTP_GET_ROOT, TLS13_RESUMES, TlsVersion, s_client

VERSIONS: tuple[TlsVersion, ...] = ("1.3", "1.2")
INSTANCES = 3
# connections resuming one session after it was made: each instance twice
RESUMPTIONS = 2 * INSTANCES


@pytest.fixture(autouse=True)
def fleet_possible() -> None:
    why = fleetmod.missing()
    if why:
        pytest.skip(why)


@pytest.fixture
def ticket_file(tmp_path: Path) -> Path:
    path = tmp_path / "ticket.keys"
    write_keys(path, [key(b"fleet-sealing-k1"), key(b"fleet-opening-k0")])
    return path


@pytest.fixture
def cleanup_check() -> Iterator[None]:
    """No namespace or link of this test is left behind."""
    yield
    mine = f"pps-fleet-{os.getpid()}-"
    left = {n for n in fleetmod.namespaces() if n.startswith(mine)}
    prefix = fleetmod.Netns.plan(0).host_if[:-2]
    left |= {name for name in fleetmod.links() if name.startswith(prefix)}
    assert not left, f"left behind: {sorted(left)}"


def connect(fleet: Fleet, version: TlsVersion, *, sess_in: Path | None = None,
            sess_out: Path | None = None) -> tuple[int, bool]:
    """One connection to the fleet's address: (the instance that served it,
    whether the session resumed)."""
    r = s_client(fleet.port, servername=fleet.server_name, version=version, sess_in=sess_in,
                 sess_out=sess_out, request=HTTP_GET_ROOT)
    assert r.handshake_ok, r.describe()
    served = re.search(r"served by fleet instance (\d+)", r.stdout)
    assert served, f"no instance's page\n{r.describe()}"
    return int(served[1]), bool(r.reused)


def summary(instance: fleetmod.Instance) -> dict[str, Any]:
    proc = run_pyprivsep("ctl", "-s", str(instance.ctl_socket), "-j", "show", "summary")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    answer = json.loads(proc.stdout)
    assert isinstance(answer, dict)
    return answer


def counter(instance: fleetmod.Instance, name: str) -> int:
    return sum(int(r["stats"][name]) for r in summary(instance)["relays"])


def resume_across(fleet: Fleet, version: TlsVersion, tmp_path: Path) -> Counter[int]:
    """A session made on one instance, then RESUMPTIONS connections resuming
    it, each on the next instance: all resume.  The instances that served
    them, counted."""
    session = tmp_path / f"session-{version}.pem"
    before = {i.index: counter(i, "hs_resumed") for i in fleet.instances}
    origin, reused = connect(fleet, version, sess_out=session)
    assert not reused
    served: Counter[int] = Counter()
    for n in range(RESUMPTIONS):
        where, reused = connect(fleet, version, sess_in=session)
        assert reused, (f"TLS {version}: a session made on instance {origin} did not resume on "
                        f"instance {where} (connection {n + 1})\n{fleet.describe()}")
        served[where] += 1
    # roundrobin: every instance, the one that made the session and the others
    assert set(served) == set(range(INSTANCES)), served

    # each instance counts exactly the resumptions the pages say it served
    def counted() -> dict[int, int] | None:
        now = {i.index: counter(i, "hs_resumed") - before[i.index] for i in fleet.instances}
        return now if now == dict(served) else None

    wait_until(counted, 20, lambda: f"hs_resumed per instance to be {dict(served)}")
    return served


@pytest.mark.usefixtures("cleanup_check")
def test_sessions_resume_on_every_instance_behind_one_address(
        pki: Pki, tmp_path: Path, ticket_file: Path) -> None:
    with Fleet(tmp_path / "fleet", [pki["rsa2048"], pki["p256"]], count=INSTANCES,
               globals=[f'tls ticket keys "{ticket_file}"']) as fleet:
        assert len({i.netns.addr for i in fleet.instances}) == INSTANCES
        for version in VERSIONS:
            if version == "1.3" and not TLS13_RESUMES:
                continue
            served = resume_across(fleet, version, tmp_path)
            assert sum(served.values()) == RESUMPTIONS
        session = tmp_path / "session-1.2.pem"
        assert ticket_key_name(session) == b"fleet-sealing-k1", "not sealed by the file's first key"


@pytest.mark.usefixtures("cleanup_check")
def test_without_the_shared_file_a_session_resumes_only_where_it_was_made(
        pki: Pki, tmp_path: Path) -> None:
    """The control: each instance's own generated ticket keys."""
    with Fleet(tmp_path / "fleet", [pki["rsa2048"]], count=INSTANCES) as fleet:
        session = tmp_path / "session.pem"
        origin, reused = connect(fleet, "1.2", sess_out=session)
        assert not reused
        outcome = {}
        for _ in range(INSTANCES):
            where, reused = connect(fleet, "1.2", sess_in=session)
            outcome[where] = reused
        assert outcome == {i: i == origin for i in range(INSTANCES)}, outcome


# -- every instance signing through one p11-kit server ------------------------

P11_KEYS = {"rsa2048": ("www-rsa", "01"), "p256": ("www-ec", "02")}
# (version, the key's name in the pki: its certificate is chosen by SNI, sigalg)
FULL_HANDSHAKES: tuple[tuple[TlsVersion, str, str], ...] = (
    ("1.3", "rsa2048", "rsa_pss_rsae_sha256"), ("1.3", "p256", "ecdsa_secp256r1_sha256"),
    ("1.2", "rsa2048", "RSA+SHA256"), ("1.2", "p256", "ECDSA+SHA256"))


def pkcs11_supported(workdir: Path, line: str, keypairs: Sequence[KeyPair]) -> str | None:
    """None when `pyprivsep -n` takes the configuration; the reason to skip
    when it does not know the `pkcs11` directive.  Any other refusal fails."""
    workdir.mkdir(exist_ok=True)
    conf = workdir / "probe.conf"
    relay = RelaySpec("www", 8443, 8080, keypairs)
    config = DaemonConfig([relay], prefork=1, globals=[line])
    if SANITIZED:       # as the fleet's daemons run (daemonctl.Daemon)
        config = replace(config, user="root", ca_user="root")
    conf.write_text(config.render())
    check = run_pyprivsep("-n", "-f", str(conf))
    if 'unknown directive "pkcs11"' in check.stderr:
        return ("this pyprivsep takes no PKCS#11 keys yet (`pyprivsep -n`: "
                f"{check.stderr.strip().splitlines()[-1]})")
    assert check.returncode == 0, f"pyprivsep -n refused a fleet's PKCS#11 config:\n{check.stderr}"
    return None


@pytest.fixture
def p11_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory the cas' user can reach (pytest's base directory is 0700)
    for the token and the p11-kit server's socket."""
    path = Path(tempfile.mkdtemp(prefix="pps-fleet-p11-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.usefixtures("cleanup_check")
def test_every_instance_signs_through_one_p11kit_server(
        pki: Pki, tmp_path: Path, ticket_file: Path, p11_dir: Path) -> None:
    why = softhsm.missing(p11kit=True)
    if why:
        pytest.skip(why)
    token = softhsm.make_token(p11_dir / "hsm")
    keypairs = []
    for name, (label, key_id) in P11_KEYS.items():
        keypairs.append(with_key(pki[name], token.import_key(pki[name].key_path, label, key_id)))
    # the socket the cas' user's, and no other uid let in (-u, -g): the
    # cas, and pyprivsep's key checks (-n, reload), which run as that user
    with softhsm.P11KitServer(token, p11_dir / "p11kit.sock", user=CA_USER) as server:
        line = token.pkcs11_line(server)
        why = pkcs11_supported(tmp_path / "probe", line, keypairs)
        if why:
            pytest.skip(why)
        with Fleet(tmp_path / "fleet", keypairs, count=INSTANCES,
                   globals=[line, f'tls ticket keys "{ticket_file}"']) as fleet:
            assert not any(str(kp.key_path).startswith("/") for kp in keypairs)
            # full handshakes: every instance signs, with either key
            for version, name, sigalg in FULL_HANDSHAKES:
                before = {i.index: counter(i, "keyops") for i in fleet.instances}
                for _ in range(INSTANCES):
                    r = s_client(fleet.port, servername=pki[name].dns_name, version=version,
                                 request=HTTP_GET_ROOT, extra=["-sigalgs", sigalg])
                    assert r.handshake_ok and not r.reused, r.describe()
                wait_until(lambda: all(counter(i, "keyops") > before[i.index] for i in fleet.instances),
                           20, lambda: f"a signature on every instance ({sigalg})\n{fleet.describe()}")
            # resumed across instances, no key involved
            for version in VERSIONS:
                if version == "1.3" and not TLS13_RESUMES:
                    continue
                resume_across(fleet, version, tmp_path)

            # the token's server gone: a resumption still works everywhere (no
            # signature), a full handshake fails, and no ca dies of it
            server.stop()
            cas = {i.index: i.daemon.ca_pids() for i in fleet.instances}
            session = tmp_path / "session-1.2.pem"
            for _ in range(INSTANCES):
                assert connect(fleet, "1.2", sess_in=session)[1] is True
            r = s_client(fleet.port, servername=fleet.server_name, version="1.2", request=HTTP_GET_ROOT)
            assert not r.handshake_ok, "a full handshake with the token unreachable"
            # back: every ca reopens its session and signs again
            server.start()
            signed: set[int] = set()

            def all_signed() -> bool:
                r = s_client(fleet.port, servername=fleet.server_name, version="1.2",
                             request=HTTP_GET_ROOT)
                served = re.search(r"served by fleet instance (\d+)", r.stdout)
                if r.handshake_ok and served:
                    signed.add(int(served[1]))
                return len(signed) == INSTANCES

            wait_until(all_signed, 60, lambda: f"full handshakes on every instance after the "
                                               f"p11-kit server came back (so far {signed})\n{fleet.describe()}")
            assert {i.index: i.daemon.ca_pids() for i in fleet.instances} == cas, "a ca restarted"
