"""Running pyprivsep under test: its configuration (DaemonConfig, RelaySpec),
the daemon as a process group (Daemon), and one-shot ``python3 -m pyprivsep``
runs."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Self

from basics import LOCALHOST, REPO_ROOT, free_port, wait_until
from keypairs import KeyPair, Pki
from procs import TITLE_RE, ChildProcess, child_pids, pid_alive, proc_title
from tlsclients import handshake_succeeds

@dataclass(frozen=True)
class RelaySpec:
    name: str
    listen_port: int
    forward_port: int
    keypairs: Sequence[KeyPair]
    listen_host: str = LOCALHOST  # rendered verbatim, so "$macro" works
    forward_options: str = ""  # after "forward to ... port N": "proxy protocol v2"
    options: Sequence[str] = ()  # more lines of the block: "tls alpn ...", "listen on ..."
    forward_host: str = LOCALHOST
    forward_tls: bool = False  # "forward with tls to ..."

    def render(self) -> list[str]:
        forward = "forward with tls to" if self.forward_tls else "forward to"
        lines = [
            f'relay "{self.name}" {{',
            f"    listen on {self.listen_host} port {self.listen_port} tls",
            f"    {forward} {self.forward_host} port {self.forward_port} {self.forward_options}".rstrip(),
            *(f"    {line}" for line in self.options),
        ]
        lines += [f'    tls certificate "{kp.cert_path}" key "{kp.key_path}"' for kp in self.keypairs]
        lines.append("}")
        return lines


@dataclass(frozen=True)
class KeyServiceSpec:
    """A keyservice block: its socket, who it allows, its keypairs."""

    name: str
    socket: Path
    keypairs: Sequence[KeyPair]
    users: Sequence[str] = ("root",)
    groups: Sequence[str] = ()
    prefork: int | None = None  # None: the daemon's default

    @property
    def cas(self) -> int:
        return 2 if self.prefork is None else self.prefork

    def render(self) -> list[str]:
        lines = [f'keyservice "{self.name}" {{', f'    socket "{self.socket}"']
        lines += [f'    allow user "{u}"' for u in self.users]
        lines += [f'    allow group "{g}"' for g in self.groups]
        if self.prefork is not None:
            lines.append(f"    prefork {self.prefork}")
        lines += [f'    tls certificate "{kp.cert_path}" key "{kp.key_path}"' for kp in self.keypairs]
        lines.append("}")
        return lines


KS_TITLE_RE = re.compile(r"^pyprivsep: keyservice (?P<name>\S+) ca (?P<index>\d+)(?=\s|$)")


@dataclass(frozen=True)
class DaemonConfig:
    relays: Sequence[RelaySpec]
    prefork: int = 2
    keys_inprocess: bool = False
    chroot: Path | None = None
    user: str | None = None  # the relays' (None: the default, _pyprivsep)
    ca_user: str | None = None  # the cas' (None: the default, _pyprivsep_ca)
    # the global `timeout`: health checks, ms (relayd); refused without a
    # `check` (a session's idle timeout is RelaySpec's "session timeout")
    timeout: int | None = None
    keyservices: Sequence[KeyServiceSpec] = ()
    globals: Sequence[str] = ()  # more top-level lines: "table <web> { ... }", "interval 1"

    def render(self) -> str:
        lines = [f"prefork {self.prefork}", *self.globals]
        if self.timeout is not None:
            lines.append(f"timeout {self.timeout}")
        if self.chroot is not None:
            lines.append(f'chroot "{self.chroot}"')
        if self.user is not None:
            lines.append(f'user "{self.user}"')
        if self.ca_user is not None:
            lines.append(f'ca user "{self.ca_user}"')
        if self.keys_inprocess:
            lines.append("keys inprocess")
        for relay in self.relays:
            lines += ["", *relay.render()]
        for service in self.keyservices:
            lines += ["", *service.render()]
        return "\n".join(lines) + "\n"

    @property
    def expected_relays(self) -> int:
        """No relay blocks (keyservices alone): no relay processes."""
        return self.prefork if self.relays else 0

    @property
    def expected_cas(self) -> int:
        return 0 if self.keys_inprocess else self.expected_relays

    @property
    def probes(self) -> list[tuple[int, str]]:
        """(port, SNI name) per relay block, used to detect readiness."""
        return [(relay.listen_port, relay.keypairs[0].dns_name) for relay in self.relays]


def simple_relay(
    pki: Pki, backend_port: int, key_names: Sequence[str] = ("rsa2048", "p256"), name: str = "www"
) -> RelaySpec:
    """One relay block on a fresh port forwarding to ``backend_port``."""
    return RelaySpec(name, free_port(), backend_port, [pki[key] for key in key_names])


# `make asan`: the daemon runs with the AddressSanitizer runtime preloaded.
SANITIZED = bool(os.environ.get("PYPRIVSEP_DAEMON_PRELOAD"))
# the user a Daemon's cas run as: the daemon's default `ca user`, or root
# under `make asan` (Daemon keeps every child root then)
CA_USER = "root" if SANITIZED else "_pyprivsep_ca"


def pyprivsep_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # `make asan`: the daemon alone runs with the sanitizer's runtime
    preload = os.environ.get("PYPRIVSEP_DAEMON_PRELOAD")
    if preload:
        env["LD_PRELOAD"] = preload
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pyprivsep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyprivsep", *args]


def run_pyprivsep(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``python3 -m pyprivsep ARGS`` to completion (e.g. ``-n -f conf``)."""
    proc = subprocess.run(
        pyprivsep_command(*args),
        cwd=REPO_ROOT,
        env=pyprivsep_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    keep_asan_report(proc.stderr, f"run.{os.getpid()}.{time.monotonic_ns()}")
    return proc


def keep_asan_report(stderr: str, name: str) -> None:
    """`make asan`: sanitizer reports go to the daemon's stderr (its children
    are chrooted and cannot open a log file); keep that for the judge,
    tests/asan_report.py."""
    directory = os.environ.get("PYPRIVSEP_ASAN_REPORTS")
    if directory and "Sanitizer" in stderr:
        Path(directory, f"asan.{name}").write_text(stderr)


class Daemon:
    """``python3 -m pyprivsep -d -f CONF`` running in its own process group."""

    # a command the daemon runs under (tests/fleet.py: ``ip netns exec NS``)
    command_prefix: Sequence[str] = ()

    def __init__(
        self,
        workdir: Path,
        config: DaemonConfig,
        *,
        args: Sequence[str] = (),
    ) -> None:
        self.chroot: Path = config.chroot or workdir / "empty"
        self.chroot.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.workdir = workdir
        self.config = replace(config, chroot=self.chroot)
        if SANITIZED:
            # LeakSanitizer needs /proc and a dumpable process: children stay
            # root (setuid would clear "dumpable") in chroot "/".
            self.config = replace(self.config, chroot=Path("/"), user="root", ca_user="root")
        self.conf_path = workdir / "pyprivsep.conf"
        # each daemon its own control socket (a test may name another)
        self.conf_path.write_text(f'socket "{workdir / "ctl.sock"}"\n'
                                  + self.config.render())
        self.stderr_path = workdir / "daemon.stderr"
        self.args = list(args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._seen_pids: set[int] = set()
        self.started_at = 0.0  # CLOCK_MONOTONIC, the kernel log's clock

    # -- lifecycle ---------------------------------------------------------

    def start(self, ready_timeout: float = 20.0) -> Self:
        self.started_at = time.monotonic()
        with self.stderr_path.open("wb") as stderr, (self.workdir / "daemon.stdout").open("wb") as out:
            self._proc = subprocess.Popen(
                [*self.command_prefix, *pyprivsep_command("-d", "-f", str(self.conf_path), *self.args)],
                cwd=REPO_ROOT,
                env=pyprivsep_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=stderr,
                start_new_session=True,
            )
        self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every relay/ca process is up and each listen port handshakes."""

        def ready() -> bool:
            self._check_running()
            if len(self.processes("relay")) != self.config.expected_relays:
                return False
            if len(self.processes("ca")) != self.config.expected_cas:
                return False
            for service in self.config.keyservices:
                if len(self.keyservice_pids(service.name)) != service.cas:
                    return False
            return all(self.probe(port, name) for port, name in self.config.probes)

        wait_until(ready, timeout, lambda: f"daemon to become ready\n{self.describe()}", interval=0.1)

    def probe(self, port: int, name: str) -> bool:
        """Whether a relay block's port handshakes (readiness)."""
        return handshake_succeeds(port, name, timeout=2.0)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the parent and return its exit code."""
        proc = self.proc
        self._remember_children()
        proc.send_signal(sig)
        return proc.wait(timeout)

    def kill_all(self) -> None:
        """Teardown: stop the parent as an operator would (SIGTERM), then
        SIGKILL the parent, its process group and any child seen."""
        if self._proc is None:
            return
        self._remember_children()
        if self._proc.poll() is None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
        if self._proc.poll() is None:
            self._proc.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        for pid in self._seen_pids:
            title = proc_title(pid) or ""
            if pid_alive(pid) and title.startswith("pyprivsep:"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._proc.wait(timeout=10)
        keep_asan_report(self.stderr_text(), f"daemon.{self._proc.pid}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill_all()

    # -- introspection -----------------------------------------------------

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("daemon not started")
        return self._proc

    @property
    def parent_pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        """Diagnostics for assertion messages: exit status, processes, stderr."""
        code = self._proc.poll() if self._proc else None
        children = [(pid, proc_title(pid)) for pid in child_pids(self._proc.pid)] if self._proc else []
        stderr = self.stderr_text()
        if len(stderr) > 8000:
            stderr = "...\n" + stderr[-8000:]
        return f"exit code: {code}\nchildren: {children}\n--- daemon stderr ---\n{stderr}"

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited prematurely\n{self.describe()}")

    def _remember_children(self) -> None:
        if self._proc is not None:
            self._seen_pids.update(child_pids(self._proc.pid))

    def children(self) -> list[ChildProcess]:
        """Live relay and ca processes (direct children titled by role)."""
        found = []
        for pid in child_pids(self.parent_pid):
            self._seen_pids.add(pid)
            match = TITLE_RE.match(proc_title(pid) or "")
            if match and match["role"] != "parent" and match["index"]:
                found.append(ChildProcess(pid, match["role"], int(match["index"])))
        return found

    def seccomp_kills(self) -> list[str]:
        """Children of this daemon that its seccomp filter killed: the
        parent's "killed by signal 31" lines, and the kernel's audit lines
        (type=1326, sig=31) for any pid it ever had, which also catch a
        child that died during shutdown, when the parent logs no deaths.
        The kernel log needs root; without it only the daemon's log counts."""
        self._remember_children()
        found = [line for line in self.stderr_text().splitlines()
                 if f"killed by signal {int(signal.SIGSYS)}" in line]
        pids = self._seen_pids | ({self._proc.pid} if self._proc else set())
        return found + [line for line in kernel_seccomp_kills(self.started_at - 1.0)
                        if int(line.split(" pid=")[1].split()[0]) in pids]

    def processes(self, role: str) -> list[ChildProcess]:
        return [child for child in self.children() if child.role == role]

    def keyservice_pids(self, name: str) -> dict[int, int]:
        """index -> pid of the keyservice `name`'s cas."""
        found = {}
        for pid in child_pids(self.parent_pid):
            self._seen_pids.add(pid)
            match = KS_TITLE_RE.match(proc_title(pid) or "")
            if match and match["name"] == name:
                found[int(match["index"])] = pid
        return found

    def relay_pids(self) -> dict[int, int]:
        """index -> pid of the relay processes."""
        return {child.index: child.pid for child in self.processes("relay")}

    def ca_pids(self) -> dict[int, int]:
        """index -> pid of the ca processes."""
        return {child.index: child.pid for child in self.processes("ca")}


_AUDIT_SECCOMP = re.compile(r"^\[\s*(?P<t>\d+\.\d+)\].*type=1326 .* pid=\d+ .*\bsig=31\b")


def kernel_seccomp_kills(since: float) -> list[str]:
    """Kernel log lines of processes a seccomp filter killed (SIGSYS) from
    `since` on (CLOCK_MONOTONIC seconds, what dmesg's stamps count); empty
    when the kernel log cannot be read (not root, dmesg_restrict)."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in out.splitlines()
            if (m := _AUDIT_SECCOMP.match(line)) and float(m["t"]) >= since]


# Signature of the conftest ``start_daemon`` fixture:
# start_daemon(config, *, args=(), ready_timeout=20.0) -> Daemon
StartDaemon = Callable[..., Daemon]


@dataclass(frozen=True)
class TunedConfig(DaemonConfig):
    """DaemonConfig plus the global directives the failure/client tests tune
    (None: the directive is left out and the daemon's default applies)."""

    keyop_timeout_ms: int | None = None  # tls keyop timeout MS
    handshake_timeout: int | None = None  # tls handshake timeout S
    max_connections: int | None = None  # max connections N

    def render(self) -> str:
        extra = []
        if self.keyop_timeout_ms is not None:
            extra.append(f"tls keyop timeout {self.keyop_timeout_ms}")
        if self.handshake_timeout is not None:
            extra.append(f"tls handshake timeout {self.handshake_timeout}")
        if self.max_connections is not None:
            extra.append(f"max connections {self.max_connections}")
        return "".join(line + "\n" for line in extra) + super().render()


def ca_config_text(keypairs: Sequence[KeyPair]) -> str:
    """A daemon configuration whose one relay block names ``keypairs``
    (for pyprivsep.ca.load_keys; nothing listens on its ports)."""
    return DaemonConfig([RelaySpec("ca-test", 8443, 8080, list(keypairs))], prefork=1).render()
