"""The real Debian servers on loopback, each with a configuration of its own:
nginx, postfix (smtpd), dovecot (imap-login) and haproxy, given a certificate
and a private key file (or, in the integration tests, a key reference PEM
that an OpenSSL provider understands, pointed at by OPENSSL_CONF in ``env``).

Each server is a context manager: entering starts it (as root, from the
test) on free 127.0.0.1 ports in a work directory of its own and waits until
it accepts connections; leaving stops it cleanly, then kills whatever of its
processes is left and removes the work directory.  ``pids()`` lists all of
its processes at that moment (master and workers), for memory scans.

How each one gets ``env`` (e.g. OPENSSL_CONF) into its processes, checked
with gdb (``getenv``) on this Debian 12:

- nginx: the master keeps its whole environment; the workers get only TZ
  and the variables named by an ``env NAME;`` directive (without one they
  have no OPENSSL_CONF, though they inherit the OpenSSL state the master
  loaded before forking).  NginxServer writes ``env NAME;`` for each name
  in ``env``.  Workers run as ``nobody``.
- postfix: the ``postfix`` command and master(8) scrub the environment down
  to ``import_environment``; PostfixServer appends the names in ``env`` to
  Postfix's default list.  smtpd runs as ``postfix``, not chrooted
  (chroot ``n`` in master.cf, so that it sees the same files as root does),
  started by master per connection (2 at most); it loads the key when it
  starts and stays up idle for ``max_idle`` (100 s) after a connection.
- dovecot: the master passes ``import_environment`` only; DovecotServer
  lists TZ and the names in ``env``.  imap-login runs as ``dovenull`` in
  high-performance mode (``service_count = 0``, ``process_min_avail = 2``):
  two long-lived login processes that hold the key.  ``ssl_key = <FILE``:
  the config process (root) reads the file and hands it to the logins.
- haproxy: the environment passes through unchanged; one process, 2
  threads, ``user haproxy`` after binding and reading the certificates.

Where a key file's secrets end up in memory (the scanner, with RSA-2048 and
P-256): nginx, master and both workers (the master loads the key before
forking); postfix, smtpd only (master, tlsmgr, postlogd never read it);
dovecot, only an imap-login that has served a TLS connection (it loads
the key on its first), not the master or the config process (which holds
the PEM text only); haproxy, its one process.  ``handshake_pids()`` names
the processes doing handshakes; ``scan_processes()`` scans them all.

Work directories are made with ``tempfile.mkdtemp`` under /tmp (mode 0755),
not under pytest's tmp_path: postfix's and dovecot's unprivileged processes
must reach them (pytest's base directory is 0700), and dovecot's UNIX socket
paths must stay short.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self

from basics import LOCALHOST, free_port, wait_until
from procs import pid_alive

NGINX = "/usr/sbin/nginx"
POSTFIX = "/usr/sbin/postfix"
DOVECOT = "/usr/sbin/dovecot"
DOVECOT_IMAP_LOGIN = "/usr/lib/dovecot/imap-login"
HAPROXY = "/usr/sbin/haproxy"

# Postfix's own default import_environment (postconf -d import_environment).
POSTFIX_IMPORT_ENVIRONMENT = (
    "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ XAUTHORITY DISPLAY LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME"
)

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def missing_program(*paths: str) -> str | None:
    """Why a server cannot run here (its package is not installed), or None."""
    for path in paths:
        if not os.access(path, os.X_OK):
            return f"{path} not installed (`make testdeps` as root installs it)"
    return None


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (zombies excluded), root first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        if pid == root and not pid_alive(pid):
            continue
        tree.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return tree


def process_getenv(pid: int, name: str, timeout: float = 20.0) -> str | None:
    """``getenv(name)`` inside the running process ``pid``, asked through gdb.

    /proc/PID/environ does not answer for these servers: nginx and dovecot
    write their process titles over it, and nginx's workers build a new
    environment.  Needs gdb (and root).
    """
    gdb = shutil.which("gdb")
    if gdb is None:
        raise RuntimeError("gdb is not installed")
    out = subprocess.run(
        [gdb, "-p", str(pid), "-batch", "-nx", "-ex", f'print (char *) getenv("{name}")'],
        capture_output=True,
        text=True,
        timeout=timeout,
    ).stdout
    for line in out.splitlines():
        if line.startswith("$1 = "):
            value = line[len("$1 = ") :]
            if value.startswith("0x0") and '"' not in value:
                return None
            return value[value.index('"') + 1 : value.rindex('"')]
    raise RuntimeError(f"gdb could not read the environment of pid {pid}:\n{out}")


def port_accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOCALHOST, port), timeout=1):
        return True
    return False


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class TlsServer:
    """What every server here has: ports, processes, a work directory, logs.

    Subclasses write their configuration in ``_configure`` and start in
    ``_launch``; ``port`` is the TLS (or STARTTLS) port.
    """

    name: ClassVar[str] = "server"
    programs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cert_path: Path, key_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.cert_path = Path(cert_path)
        self.key_path = Path(key_path)
        self.env: dict[str, str] = dict(env or {})
        self.port = free_port()
        self.workdir = Path(".")
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen: set[int] = set()

    # -- what a test uses ------------------------------------------------------

    @property
    def root_pid(self) -> int | None:
        """The master process's pid (None before start or once it is gone)."""
        return self.proc.pid if self.proc is not None else None

    def pids(self) -> list[int]:
        """Every live process of the server now, master first."""
        root = self.root_pid
        if root is None:
            return []
        tree = process_tree(root)
        self._seen.update(tree)
        return tree

    def handshake_pids(self) -> list[int]:
        """The processes that do the TLS handshakes, and so the private-key
        operations (for the environment checks and memory scans)."""
        return self.pids()

    def log_text(self) -> str:
        """The server's own logs, for failure messages."""
        texts = []
        for path in sorted(self.workdir.glob("*.log")) + sorted(self.workdir.glob("*.out")):
            with contextlib.suppress(OSError):
                texts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(texts)

    def start(self) -> Self:
        reason = missing_program(*self.programs)
        if reason is not None:
            raise RuntimeError(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"pps-{self.name}-", dir="/tmp"))
        self.workdir.chmod(0o755)
        try:
            self._configure()
            self._launch()
            wait_until(self._ready, START_TIMEOUT, lambda: f"{self.name} on port {self.port}\n{self.log_text()}")
            self.pids()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop cleanly; then kill anything of the server still alive."""
        if self.workdir == Path("."):
            return
        self.pids()
        with contextlib.suppress(Exception):
            self._shutdown()
        leftovers = wait_until_gone(sorted(self._seen), STOP_TIMEOUT)
        kill_pids(leftovers)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT)
        self.stopped_cleanly = not leftovers
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = Path(".")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- for subclasses ------------------------------------------------------------

    stopped_cleanly: bool = False

    def _environment(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def _popen(self, args: list[str]) -> None:
        out = (self.workdir / f"{self.name}.out").open("wb")
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self._environment(), cwd=self.workdir
        )
        out.close()

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}\n{self.log_text()}")
        return port_accepts(self.port)

    def _configure(self) -> None:
        raise NotImplementedError

    def _launch(self) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()


def wait_until_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait for the processes to exit; return those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p)]
    return alive


class NginxServer(TlsServer):
    """nginx in the foreground (``daemon off``), 2 workers, HTTPS on ``port``:
    ``GET /`` answers 200 ``ok``.  ``reload()`` is ``nginx -s reload``."""

    name = "nginx"
    programs = (NGINX,)
    workers = 2

    def _configure(self) -> None:
        w = self.workdir
        env_lines = "".join(f"env {name};\n" for name in sorted(self.env))
        self.conf = w / "nginx.conf"
        self.conf.write_text(f"""\
worker_processes {self.workers};
pid {w}/nginx.pid;
error_log {w}/error.log info;
{env_lines}events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    server {{
        listen {LOCALHOST}:{self.port} ssl;
        # nginx before 1.23.4 leaves TLS 1.3 off unless told
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {self.cert_path};
        ssl_certificate_key {self.key_path};
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
}}
""")

    def _args(self) -> list[str]:
        return [NGINX, "-p", str(self.workdir), "-e", str(self.workdir / "error.log"), "-c", str(self.conf)]

    def _launch(self) -> None:
        self._popen([*self._args(), "-g", "daemon off;"])

    def _ready(self) -> bool:
        return super()._ready() and len(self.worker_pids()) == self.workers

    def worker_pids(self) -> list[int]:
        return self.pids()[1:]

    def handshake_pids(self) -> list[int]:
        return self.worker_pids()

    def reload(self) -> list[int]:
        """``nginx -s reload``; waits until a new set of workers replaced the old
        ones and returns the new workers' pids."""
        old = set(self.worker_pids())
        subprocess.run([*self._args(), "-s", "reload"], check=True, capture_output=True, env=self._environment(), timeout=20)

        def replaced() -> list[int] | None:
            now = self.worker_pids()
            return now if len(now) == self.workers and not old & set(now) else None

        return wait_until(replaced, START_TIMEOUT, lambda: f"nginx reload\n{self.log_text()}")


class PostfixServer(TlsServer):
    """A private Postfix instance (``postfix -c DIR start``; config, queue and
    data directories in the work directory; the system's /etc/postfix is not
    touched) whose smtpd offers STARTTLS on ``port``.

    ``chain_files=True`` gives the key and certificate as
    ``smtpd_tls_chain_files = KEY, CERT`` instead of
    ``smtpd_tls_cert_file``/``smtpd_tls_key_file``."""

    name = "postfix"
    programs = (POSTFIX,)

    def __init__(
        self,
        cert_path: Path,
        key_path: Path,
        env: Mapping[str, str] | None = None,
        *,
        chain_files: bool = False,
        smtpd_chroot: bool = False,
    ) -> None:
        super().__init__(cert_path, key_path, env)
        self.chain_files = chain_files
        self.smtpd_chroot = smtpd_chroot
        self.master_pid: int | None = None

    @property
    def config_dir(self) -> Path:
        return self.workdir / "etc"

    @property
    def root_pid(self) -> int | None:
        return self.master_pid

    def _configure(self) -> None:
        w = self.workdir
        for sub in ("etc", "queue", "data"):
            (w / sub).mkdir(mode=0o755)
        shutil.chown(w / "data", "postfix")
        if self.chain_files:
            tls = f"smtpd_tls_chain_files = {self.key_path}, {self.cert_path}"
        else:
            tls = f"smtpd_tls_cert_file = {self.cert_path}\nsmtpd_tls_key_file = {self.key_path}"
        imported = " ".join([POSTFIX_IMPORT_ENVIRONMENT, *sorted(self.env)])
        (self.config_dir / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {w}/queue
data_directory = {w}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = localhost.test
mydomain = test
mydestination =
local_recipient_maps =
inet_interfaces = {LOCALHOST}
inet_protocols = ipv4
maillog_file = {w}/maillog.log
maillog_file_prefixes = {w}
smtpd_tls_security_level = may
smtpd_tls_loglevel = 1
{tls}
import_environment = {imported}
""")
        # chroot n: smtpd sees the same files as root (the key, OPENSSL_CONF,
        # a keyservice socket, ...); smtpd_chroot=True: y, as Debian's
        # master.cf has it (chrooted to queue_directory)
        chroot = "y" if self.smtpd_chroot else "n"
        (self.config_dir / "master.cf").write_text(f"""\
{LOCALHOST}:{self.port} inet n - {chroot} - 2 smtpd
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
anvil     unix  -       -       n       -       1       anvil
proxymap  unix  -       -       n       -       -       proxymap
rewrite   unix  -       -       n       -       -       trivial-rewrite
postlog   unix-dgram n  -       n       -       1       postlogd
""")

    def _postfix(self, command: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=self._environment(),
            timeout=30,
        )

    def _launch(self) -> None:
        result = self._postfix("start")
        (self.workdir / "postfix-start.out").write_bytes(result.stdout + result.stderr)
        if result.returncode != 0:
            raise AssertionError(f"postfix start failed ({result.returncode})\n{self.log_text()}")
        pidfile = self.workdir / "queue" / "pid" / "master.pid"
        self.master_pid = wait_until(
            lambda: int(pidfile.read_text().split()[0]) if pidfile.exists() and pidfile.read_text().strip() else None,
            START_TIMEOUT,
            "postfix master.pid",
        )

    def _ready(self) -> bool:
        if self.master_pid is None or not pid_alive(self.master_pid):
            raise AssertionError(f"postfix master not running\n{self.log_text()}")
        return port_accepts(self.port)

    def _shutdown(self) -> None:
        self._postfix("stop")

    def handshake_pids(self) -> list[int]:
        """The smtpd processes alive now: master starts one per connection
        (2 at most), which stays idle for max_idle (100 s) after it."""
        return [p for p in self.pids() if _comm_title(p).startswith("smtpd")]


class DovecotServer(TlsServer):
    """dovecot (``dovecot -c CONF -F``), IMAP only: implicit TLS on ``port``
    (imaps) and STARTTLS on ``starttls_port`` (imap), two long-lived
    imap-login processes.  Nobody logs in: only handshakes are for."""

    name = "dovecot"
    programs = (DOVECOT, DOVECOT_IMAP_LOGIN)

    def __init__(
        self, cert_path: Path, key_path: Path, env: Mapping[str, str] | None = None, *, login_chroot: bool = True
    ) -> None:
        super().__init__(cert_path, key_path, env)
        self.starttls_port = free_port()
        self.login_chroot = login_chroot

    def _configure(self) -> None:
        w = self.workdir
        (w / "state").mkdir()
        imported = " ".join(["TZ", *sorted(self.env)])
        # imap-login chroots to base_dir/login by default; without it, it
        # can reach a keyservice socket outside (the provider connects at
        # the first signature, after the chroot)
        chroot = "" if self.login_chroot else "  chroot =\n"
        self.conf = w / "dovecot.conf"
        self.conf.write_text(f"""\
protocols = imap
listen = {LOCALHOST}
base_dir = {w}/run
state_dir = {w}/state
instance_name = {w.name}
log_path = {w}/dovecot.log
ssl = required
ssl_cert = <{self.cert_path}
ssl_key = <{self.key_path}
ssl_min_protocol = TLSv1.2
import_environment = {imported}
default_login_user = dovenull
default_internal_user = dovecot
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={w}/home
}}
service imap-login {{
{chroot}  service_count = 0
  process_min_avail = 2
  inet_listener imap {{
    address = {LOCALHOST}
    port = {self.starttls_port}
  }}
  inet_listener imaps {{
    address = {LOCALHOST}
    port = {self.port}
    ssl = yes
  }}
}}
""")

    def _launch(self) -> None:
        self._popen([DOVECOT, "-c", str(self.conf), "-F"])

    def login_pids(self) -> list[int]:
        return [p for p in self.pids() if "imap-login" in _comm_title(p)]

    def handshake_pids(self) -> list[int]:
        return self.login_pids()

    def _ready(self) -> bool:
        return super()._ready() and port_accepts(self.starttls_port) and len(self.login_pids()) >= 2


def scan_processes(server: TlsServer, patterns: Mapping[str, bytes]) -> dict[int, frozenset[str]]:
    """memscan.scan_process_memory over every process of ``server``: pid ->
    names of the patterns found there."""
    from memscan import scan_process_memory

    return {pid: scan_process_memory(pid, patterns).found for pid in server.pids() if pid_alive(pid)}


def _comm_title(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


class HaproxyServer(TlsServer):
    """haproxy in the foreground (``-db``), 2 threads, HTTPS on ``port``
    answering 200 ``ok`` itself (``http-request return``).

    haproxy 2.6 takes ``crt FILE`` with the key either in FILE or, if FILE
    holds no key, in ``FILE.key`` beside it (``ssl-load-extra-files``,
    default ``all``): the work directory gets ``site.pem`` (a copy of the
    certificate) and ``site.pem.key`` (a symlink to the key file)."""

    name = "haproxy"
    programs = (HAPROXY,)

    def _configure(self) -> None:
        w = self.workdir
        self.crt = w / "site.pem"
        shutil.copyfile(self.cert_path, self.crt)
        (w / "site.pem.key").symlink_to(self.key_path)
        self.conf = w / "haproxy.cfg"
        self.conf.write_text(f"""\
global
    nbthread 2
    user haproxy
    group haproxy
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend fe
    bind {LOCALHOST}:{self.port} ssl crt {self.crt} ssl-min-ver TLSv1.2
    http-request return status 200 content-type text/plain string "ok\\n"
""")

    def _launch(self) -> None:
        self._popen([HAPROXY, "-db", "-f", str(self.conf)])


SERVERS: dict[str, type[TlsServer]] = {
    cls.name: cls for cls in (NginxServer, PostfixServer, DovecotServer, HaproxyServer)
}


class StartServer(Protocol):
    def __call__(
        self, name: str, cert_path: Path, key_path: Path, env: Mapping[str, str] | None = None, **options: Any
    ) -> TlsServer: ...


@contextlib.contextmanager
def start_servers() -> Iterator[StartServer]:
    """A factory that starts servers by name (``SERVERS``) and stops them all
    when the block ends (the ``start_server`` fixture of conftest.py).  A
    server whose package is missing skips the test, saying which."""
    started: list[TlsServer] = []

    def start(
        name: str, cert_path: Path, key_path: Path, env: Mapping[str, str] | None = None, **options: Any
    ) -> TlsServer:
        cls = SERVERS[name]
        reason = missing_program(*cls.programs)
        if reason is not None:
            import pytest

            pytest.skip(reason)
        server = cls(cert_path, key_path, env, **options)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()
