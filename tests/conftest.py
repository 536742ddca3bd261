"""Fixtures for the pyprivsep end-to-end tests (helpers live in the modules
named by purpose beside it: basics, keypairs, backends, procs, daemonctl,
tlsclients, memscan, cawire, hosts)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from backends import EchoServer, HttpBackend
from daemonctl import Daemon, DaemonConfig, StartDaemon
from keypairs import KeyPair, Pki, generate_pki, make_keypair
from procs import Freezer
from servers import StartServer, start_servers
from softhsm import P11KitServer, Token, make_token, missing


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """RSA-2048/4096 and P-256/384 self-signed keypairs (+ a mismatched pair), once per session."""
    return generate_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def rsa8192(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """An RSA-8192 keypair, the slowest key a ca takes (~40 ms a signature),
    made once per session and only for the tests that ask for it."""
    return make_keypair(tmp_path_factory.mktemp("rsa8192"), "rsa8192")


@pytest.fixture
def http_backend() -> Iterator[HttpBackend]:
    with HttpBackend() as backend:
        yield backend


@pytest.fixture
def echo_backend() -> Iterator[EchoServer]:
    with EchoServer() as backend:
        yield backend


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """Factory: ``start_daemon(config, args=(), ready_timeout=20) -> Daemon`` (ready).

    Every daemon started through it is killed (with all its processes) at teardown.
    """
    daemons: list[Daemon] = []

    def start(
        config: DaemonConfig,
        *,
        args: Sequence[str] = (),
        ready_timeout: float = 20.0,
    ) -> Daemon:
        workdir = tmp_path / f"daemon{len(daemons)}"
        workdir.mkdir()
        daemon = Daemon(workdir, config, args=args)
        daemons.append(daemon)
        return daemon.start(ready_timeout)

    yield start
    for daemon in daemons:
        daemon.kill_all()
    # a syscall missing from a role's seccomp allowlist kills the process:
    # whatever the test checked, that is a failure
    killed = [line for daemon in daemons for line in daemon.seccomp_kills()]
    assert not killed, "relay or ca killed by its seccomp filter:\n" + "\n".join(killed)


@pytest.fixture
def freezer() -> Iterator[Freezer]:
    """Pauses processes without their parent seeing them stopped (a frozen
    cgroup); thaws them at teardown whatever happens.  Skips the test if
    the cgroup v1 freezer is not available."""
    with Freezer() as f:
        yield f


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Factory: ``start_server(name, cert_path, key_path, env=None, **options)
    -> TlsServer`` (started; name: nginx, postfix, dovecot, haproxy; see
    tests/servers.py).  Every server started through it is stopped, and its
    leftovers killed, at teardown."""
    with start_servers() as start:
        yield start


@pytest.fixture
def softhsm_token(tmp_path: Path) -> Token:
    """A fresh SoftHSM token "web" in tmp_path/hsm with a random PIN and its
    PIN file (tests/softhsm.py); skips when softhsm2 or opensc is missing."""
    why = missing()
    if why:
        pytest.skip(why)
    return make_token(tmp_path / "hsm")


@pytest.fixture
def start_p11kit(tmp_path: Path) -> Iterator[Callable[..., P11KitServer]]:
    """Factory: ``start_p11kit(token, user=None) -> P11KitServer``, a
    `p11-kit server` exporting the token on a UNIX socket in tmp_path
    (started, answering); every one is stopped at teardown.  Skips when
    p11-kit or its client module is missing."""
    why = missing(p11kit=True)
    if why:
        pytest.skip(why)
    servers: list[P11KitServer] = []

    def start(token: Token, user: str | None = None) -> P11KitServer:
        server = P11KitServer(token, tmp_path / f"p11kit{len(servers)}.sock", user=user)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
