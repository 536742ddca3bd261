"""`make bench`: pyprivsep side by side with nginx, haproxy, hitch and h2o.

One plain-HTTP backend (nginx's http module, or pyprivsep's demo backend
when nginx is missing) listens on loopback.  In front of it, each relay
under test terminates TLS (1.2 and 1.3 enabled in every one) with the same
certificate and two workers:

    pps-async      pyprivsep, prefork 2, ca processes, keyops async
    pps-blocking   pyprivsep, prefork 2, ca processes, keyops blocking
    pps-inprocess  pyprivsep, prefork 2, keys inprocess (no privsep: baseline)
    nginx          nginx stream module with ssl, 2 workers, shared session cache
    nginx-keyservice  the same nginx, its key a reference to a pyprivsep key
                   service (pyprivsep's OpenSSL provider; the daemon with only
                   a keyservice block, 2 cas, is counted with nginx)
    haproxy        haproxy mode tcp, nbthread 2
    hitch          hitch, 2 workers
    h2o            h2o, an HTTP reverse proxy (proxy.reverse.url), num-threads 2,
                   its key in its neverbleed process (counted with it)
    pps-async-p1, pps-blocking-p1   the same with prefork 1 (handshakes only)
    pps-async-softhsm  pps-async, its key in a SoftHSM token made for the run
                   (`pkcs11 module` libsofthsm2.so, loaded by the cas)
    pps-async-p11kit   pps-async, the same token reached through `p11-kit
                   server` on a UNIX socket (the cas load p11-kit's client
                   module; the server and the p11-kit-remote it forks for
                   each ca are counted with the relay, pinned with it):
                   both handshakes only; n/a, saying why, without softhsm2
                   and p11-kit, or while pyprivsep takes no pkcs11 keys

With 2 CPUs or more, every process of the relay under test runs on CPU 1
(`taskset -c 1` at its start; the affinity of every thread is checked) and
this script, its clients and the backend on CPU 0; on one CPU nothing is
pinned.  The clients ask for TLS 1.3 (--tls).  For each certificate
(RSA-2048, ECDSA P-256) and relay, parallel clients load it for a fixed
time per cell and the relay's whole process tree's CPU time (utime+stime
of every process, from /proc; for nginx-keyservice also the key service
daemon's tree: its cas do the signing) is read before and after:

    full      `openssl s_time -new -www /`      handshakes/s, server CPU us per handshake
    resumed   `openssl s_time -reuse -www /`    the same, resumed (the 'r's are counted)
    mib       curl, keep-alive, /bytes/1048576  MB/s, server CPU us per MiB

On a 2-core machine the clients compete with the server for CPU, so the
comparable figure is CPU per operation, not operations per second.  Every
cell is repeated and the median shown, with each relay's ratio to the best
peer.  The repeats are interleaved (round 1 of every relay, then round 2,
...) with all relays of one certificate started up front, idle while
another is measured, so that a burst of load from elsewhere on the machine
does not land on one relay only.  Then, per certificate, `strace -c -f`
attached to every process of each relay while s_time makes full, then
resumed connections: system calls per connection.

Last, the latency cell: pyprivsep (prefork 1, keyops async) and nginx (1
worker) with an RSA-4096 certificate; while 2 `s_time -new` clients flood
full handshakes, one TLS session sends small requests to the backend, one
at a time: p50 and p99 of those round trips (interleaved rounds, pooled).

Prints markdown tables, writes bench/results/<timestamp>.json and .png
(CPU per operation and the latency cell).  Every load loop is bounded in
time; all traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, Callable, Iterator

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
CERT_DIR = RESULTS / "certs"
PYTHON = sys.executable
MIB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
# nginx's workers' user when it runs as root (no `user` directive): Debian's
# nginx is built without --user, so nginx's default
NGINX_USER = "nobody"

CERTS = {"rsa2048": "RSA-2048", "p256": "ECDSA P-256"}
# the latency cell's flood: full handshakes against an RSA-4096 certificate
LATENCY_CERT = "rsa4096"
CERT_LABELS = {**CERTS, LATENCY_CERT: "RSA-4096"}
PPS_RELAYS = {
    # name: (prefork, keyops, inprocess)
    "pps-async": (2, "async", False),
    "pps-blocking": (2, "blocking", False),
    "pps-inprocess": (2, None, True),
    "pps-async-p1": (1, "async", False),
    "pps-blocking-p1": (1, "blocking", False),
    "pps-async-softhsm": (2, "async", False),
    "pps-async-p11kit": (2, "async", False),
}
# the key in a PKCS#11 token (tests/softhsm.py makes it): the cas load
# SoftHSM itself, or reach it through a p11-kit server
PKCS11_RELAYS = {"pps-async-softhsm": "softhsm", "pps-async-p11kit": "p11kit"}
ALL_RELAYS = ["pps-async", "pps-blocking", "pps-inprocess", "nginx", "nginx-keyservice",
              "haproxy", "hitch", "h2o", "pps-async-p1", "pps-blocking-p1",
              "pps-async-softhsm", "pps-async-p11kit"]
# the programs pyprivsep is compared with ("the best peer": the lowest CPU
# per operation among them)
PEERS = ["nginx", "haproxy", "hitch", "h2o"]
# the latency cell: one process doing TLS each, pyprivsep's relay with its
# ca against nginx's single worker
LATENCY_RELAYS = ["pps-async-p1", "nginx-1w"]
# nginx-keyservice: the key service's cas, one per nginx worker
KEYSERVICE_CAS = 2
MEASURES = ["full", "resumed", "mib"]
# the prefork-1 rows compare the two ways of waiting for the ca, the token
# rows the ways of reaching the key: handshakes
MEASURES_P1 = ["full", "resumed"]
HANDSHAKES_ONLY = {"pps-async-p1", "pps-blocking-p1", *PKCS11_RELAYS}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# pinning: the server under test on one CPU, everything else on another
# ---------------------------------------------------------------------------

SERVER_CPU, CLIENT_CPU = 1, 0


class Pinning:
    """With 2 CPUs or more, every process of the relay under test runs on
    SERVER_CPU (`taskset -c` at its start, inherited by what it forks), and
    this script, the clients and the backend on CLIENT_CPU; on one CPU,
    nothing is pinned."""

    on = False

    @classmethod
    def setup(cls) -> str:
        if (os.cpu_count() or 1) < 2 or not {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0):
            return "no pinning (fewer than 2 CPUs available): clients and servers share the CPU"
        if not shutil.which("taskset"):
            return "no pinning (taskset not installed)"
        cls.on = True
        os.sched_setaffinity(0, {CLIENT_CPU})       # the clients and the backend inherit it
        return (f"pinned: the relay under test on CPU {SERVER_CPU}, the clients and the "
                f"backend on CPU {CLIENT_CPU}")

    @classmethod
    def prefix(cls, cpu: int) -> list[str]:
        return ["taskset", "-c", str(cpu)] if cls.on else []


def affinity(roots: list[int], cpu: int, repin: bool = False) -> dict:
    """The CPUs every thread of the roots' process trees may run on: how
    many processes and threads, and those not pinned to `cpu`; with
    `repin`, those are moved to `cpu` (hitch binds its worker N to CPU N
    itself) and listed as "repinned"."""
    pids, threads, off, repinned = process_tree(*roots), 0, [], []
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    cpus = os.sched_getaffinity(int(tid))
                    threads += 1
                    if cpus == {cpu}:
                        continue
                    what = f"{role(pid)} {pid}/{tid}: CPUs {sorted(cpus)}"
                    if repin:
                        os.sched_setaffinity(int(tid), {cpu})
                        repinned.append(what)
                    else:
                        off.append(what)
    return {"cpu": cpu, "processes": len(pids), "threads": threads, "off": off,
            "repinned": repinned}


# ---------------------------------------------------------------------------
# CPU accounting from /proc
# ---------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command may hold spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def process_tree(*roots: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def role(pid: int) -> str:
    """'relay', 'ca', 'parent' for pyprivsep's processes (from the process
    title), else the command name."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return "?"
    # a key service's ca: "pyprivsep: keyservice NAME ca N"
    m = re.match(r"pyprivsep: (?:keyservice \S+ )?(\w+)", title)
    if m:
        return m.group(1)
    m = re.match(r"nginx: (\w+)", title)
    if m:
        return m.group(1)
    name = os.path.basename(title.split(" ", 1)[0]) or "?"
    # h2o's neverbleed, which holds its keys: an h2o forked by h2o
    fields = _stat(pid)
    if name == "h2o" and fields and role(int(fields[1])) in ("h2o", "neverbleed"):
        return "neverbleed"
    return name


def tree_cpu(*roots: int) -> tuple[float, dict[str, float]]:
    """CPU seconds used by the roots and every descendant: utime+stime of the
    live processes plus cutime+cstime (the children they have reaped); in all
    and by role."""
    total, by_role = 0, {}
    for pid in process_tree(*roots):
        fields = _stat(pid)
        if fields:
            # after the command: state ppid ... utime(11) stime(12) cutime(13) cstime(14)
            ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
            total += ticks
            r = role(pid)
            by_role[r] = by_role.get(r, 0) + ticks / TICK
    return total / TICK, by_role


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], bool], timeout: float, what: str,
               alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"{what}: process exited")
        with contextlib.suppress(Exception):
            if pred():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")


TLS_MAX = {"default": None, "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def tls_context(cafile: Path, tls: str) -> ssl.SSLContext:
    """A client context trusting cafile; "1.3" asks for TLS 1.3 only, "1.2"
    for at most 1.2."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    if TLS_MAX[tls]:
        ctx.maximum_version = TLS_MAX[tls]
    if tls == "1.3":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def tls_probe(port: int, cafile: Path, tls: str = "default") -> str | None:
    """One HTTPS request through the relay, the certificate checked;
    returns the protocol and cipher negotiated, or None."""
    ctx = tls_context(cafile, tls)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            if not s.recv(12).startswith(b"HTTP/1."):
                return None
            return f"{s.version()} {s.cipher()[0]}"


def http_ready(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return s.recv(12).startswith(b"HTTP/1.")


def tool_version(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else None


# ---------------------------------------------------------------------------
# certificates
# ---------------------------------------------------------------------------

def make_certs(names: list[str]) -> dict[str, dict[str, Path]]:
    """Server certificates (RSA-2048, P-256, RSA-4096) for localhost and
    127.0.0.1, each with the throwaway CA that signed it (the clients trust
    that, NAME-ca.crt), made once into bench/results/certs."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from pyprivsep.demo import leaf_certificate, write_key

    CERT_DIR.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        crt, key, pem, ca = (CERT_DIR / f"{name}.crt", CERT_DIR / f"{name}.key",
                             CERT_DIR / f"{name}.pem", CERT_DIR / f"{name}-ca.crt")
        # no NAME-ca.crt: made by an older run as a self-signed CA, which
        # pyprivsep refuses as a server certificate
        if not (crt.exists() and key.exists() and pem.exists() and ca.exists()):
            if name.startswith("rsa"):
                priv = rsa.generate_private_key(public_exponent=65537, key_size=int(name[3:]))
            else:
                priv = ec.generate_private_key(ec.SECP256R1())
            leaf, ca_cert = leaf_certificate(priv, days=3650)
            crt_pem = leaf.public_bytes(serialization.Encoding.PEM)
            write_key(str(key), priv)
            crt.write_bytes(crt_pem)
            write_key(str(pem), priv)
            with pem.open("ab") as f:               # hitch, haproxy: key + cert
                f.write(crt_pem)
            ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        out[name] = {"crt": crt, "key": key, "pem": pem, "ca": ca}
    return out


# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------

class Server:
    """A process (tree) started in its own session, stopped with SIGTERM."""

    name = "server"
    cpu = CLIENT_CPU                    # where Pinning puts it

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.na: str | None = None        # why it cannot run, if it cannot

    def popen(self, cmd: list[str], **kw: object) -> None:
        self.errlog = self.workdir / f"{self.name}.log"
        with open(self.errlog, "wb") as err:
            self.proc = subprocess.Popen(Pinning.prefix(self.cpu) + cmd,
                                         stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=err, start_new_session=True,
                                         **kw)  # type: ignore[arg-type]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 600) -> str:
        with contextlib.suppress(OSError):
            return self.errlog.read_text(errors="replace")[-n:].strip()
        return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        # whatever is left in its session (a worker that outlived it)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None


class NginxBackend(Server):
    name = "backend-nginx"

    def start(self) -> None:
        www = self.workdir / "www"
        (www / "bytes").mkdir(parents=True, exist_ok=True)
        (www / "index.html").write_bytes(b"hello from the benchmark backend\n")
        (www / "bytes" / str(MIB)).write_bytes(os.urandom(MIB))
        self.port = free_port()
        conf = self.workdir / "backend-nginx.conf"
        conf.write_text(f"""
worker_processes 1;
pid {self.workdir}/backend-nginx.pid;
error_log {self.workdir}/backend-nginx.err warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {self.workdir}/b-body;
    proxy_temp_path {self.workdir}/b-proxy;
    fastcgi_temp_path {self.workdir}/b-fcgi;
    uwsgi_temp_path {self.workdir}/b-uwsgi;
    scgi_temp_path {self.workdir}/b-scgi;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        root {www};
    }}
}}
""")
        self.popen(["nginx", "-p", str(self.workdir), "-e", str(self.workdir / "backend-nginx.err"),
                    "-c", str(conf), "-g", "daemon off;"])
        wait_until(lambda: http_ready(self.port), 15, "nginx backend", self.alive)


class DemoBackend(Server):
    name = "backend-demo"

    def start(self) -> None:
        self.port = free_port()
        self.popen([PYTHON, "-m", "pyprivsep.demo", "backend", str(self.port)], cwd=REPO)
        wait_until(lambda: http_ready(self.port), 15, "demo backend", self.alive)


class Relay(Server):
    """A TLS relay in front of the backend, listening on self.port; the
    server under test, pinned with all its processes to SERVER_CPU."""

    cpu = SERVER_CPU

    def __init__(self, name: str, workdir: Path, cert: dict[str, Path],
                 backend_port: int) -> None:
        super().__init__(workdir)
        self.name = name
        self.cert = cert
        self.backend_port = backend_port

    def start(self) -> None:
        self.port = free_port()
        self.launch()
        wait_until(lambda: bool(tls_probe(self.port, self.cert["ca"])), 30,
                   f"{self.name} on port {self.port}", self.alive)

    def launch(self) -> None:
        raise NotImplementedError

    def cpu_roots(self) -> list[int]:
        """The processes whose trees' CPU time is the relay's."""
        return [self.pid]


# --tree LABEL=DIR: relays named pyprivsep-relay@LABEL run the pyprivsep of
# DIR (another checkout, e.g. `git worktree add DIR COMMIT`), so that two
# builds are measured side by side in one run.
TREES: dict[str, Path] = {}


def build_tree(tree: Path) -> None:
    """The extension built in tree, as `make asan` builds its copy."""
    if not list((tree / "pyprivsep").glob("_rsaengine*.so")):
        log(f"bench: building the extension in {tree}")
        subprocess.run([PYTHON, "build_ffi.py"], cwd=tree, check=True,
                       stdout=subprocess.DEVNULL)


class PyprivsepRelay(Relay):
    @property
    def kind(self) -> str:
        return self.name.split("@")[0]

    @property
    def tree(self) -> Path:
        return TREES[self.name.split("@")[1]] if "@" in self.name else REPO

    def launch(self) -> None:
        build_tree(self.tree)
        prefork, keyops, inprocess = PPS_RELAYS[self.kind]
        empty = self.workdir / "empty"
        empty.mkdir(mode=0o755, exist_ok=True)
        lines = [f"prefork {prefork}", f'chroot "{empty}"',
                 f'socket "{self.workdir / "control.sock"}"']
        if keyops:
            lines.append(f"keyops {keyops}")
        if inprocess:
            lines.append("keys inprocess")
        env = dict(os.environ, PYTHONPATH=str(self.tree))
        key = str(self.cert["key"])
        if self.kind in PKCS11_RELAYS:
            key, line, more_env = self.token_key(PKCS11_RELAYS[self.kind])
            lines.append(line)
            env.update(more_env)
        lines += [
            'relay "bench" {',
            f"    listen on 127.0.0.1 port {self.port} tls",
            f"    forward to 127.0.0.1 port {self.backend_port}",
            f'    tls certificate "{self.cert["crt"]}" key "{key}"',
            "}",
        ]
        conf = self.workdir / f"{self.name}.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.popen([PYTHON, "-m", "pyprivsep", "-d", "-f", str(conf)], cwd=self.tree, env=env)

    def start(self) -> None:
        super().start()
        # every relay (and ca) up: the handshake above may have hit the first
        prefork, _, inprocess = PPS_RELAYS[self.kind]
        want = prefork * (1 if inprocess else 2) + 1
        wait_until(lambda: len(process_tree(self.pid)) >= want, 15,
                   f"{self.name}: {want} processes", self.alive)

    p11kit: Any = None  # a tests/softhsm.P11KitServer, for pps-async-p11kit

    def token_key(self, via: str) -> tuple[str, str, dict[str, str]]:
        """The certificate's key imported into a SoftHSM token made in the
        work dir: (its URI, the `pkcs11` line, the daemon's environment).
        The cas open the token as their user, out of the chroot: the token's
        files are theirs (SoftHSM), or the p11-kit server's socket is theirs
        and lets in their uid only (pyprivsep checks the keys as that user
        too), in the 0755 work dir."""
        softhsm = tests_module("softhsm")
        token = softhsm.make_token(self.workdir / "hsm")
        uri = token.import_key(self.cert["key"], "bench", "01")
        if via == "softhsm":
            if os.getuid() == 0:
                token.give_to(CA_USER)
            return uri, token.pkcs11_line(), token.env
        self.p11kit = softhsm.P11KitServer(token, self.workdir / "p11kit.sock",
                                           user=CA_USER if os.getuid() == 0 else None,
                                           prefix=Pinning.prefix(SERVER_CPU))
        self.p11kit.start()
        return uri, token.pkcs11_line(self.p11kit), {}

    def cpu_roots(self) -> list[int]:
        return [self.pid] + ([self.p11kit.pid] if self.p11kit and self.p11kit.proc else [])

    def alive(self) -> bool:
        return super().alive() and (self.p11kit is None or self.p11kit.proc is not None
                                    and self.p11kit.proc.poll() is None)

    def stop(self) -> None:
        super().stop()
        if self.p11kit:
            self.p11kit.stop()


class NginxRelay(Relay):
    workers = 2

    def launch(self) -> None:
        self.popen_nginx(self.write_conf(self.cert["key"]))

    def write_conf(self, key: Path, main: str = "") -> Path:
        """nginx's configuration, with `key` as ssl_certificate_key and `main`
        added to the main context."""
        if not os.path.exists(STREAM_MODULE):
            raise RuntimeError(f"{STREAM_MODULE} missing (libnginx-mod-stream)")
        w = self.workdir
        conf = w / "nginx-stream.conf"
        conf.write_text(f"""
load_module {STREAM_MODULE};
{main}
worker_processes {self.workers};
pid {w}/nginx-stream.pid;
error_log {w}/nginx-stream.err warn;
events {{ worker_connections 8192; }}
stream {{
    server {{
        listen 127.0.0.1:{self.port} ssl backlog=4096;
        # nginx before 1.23.4 leaves TLS 1.3 off unless told
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {self.cert["crt"]};
        ssl_certificate_key {key};
        ssl_session_cache shared:bench:10m;
        proxy_pass 127.0.0.1:{self.backend_port};
    }}
}}
""")
        return conf

    def popen_nginx(self, conf: Path, **kw: object) -> None:
        w = self.workdir
        self.popen(["nginx", "-p", str(w), "-e", str(w / "nginx-stream.err"),
                    "-c", str(conf), "-g", "daemon off;"], **kw)


class NginxOneWorkerRelay(NginxRelay):
    """nginx with a single worker: the latency cell's peer."""

    workers = 1


class KeyserviceDaemon(Server):
    """pyprivsep with only a keyservice block: KEYSERVICE_CAS cas serving the
    certificate's key on workdir/run/bench.sock to `allow_user`."""

    name = "keyservice"
    cpu = SERVER_CPU                    # counted with nginx: pinned with it

    def __init__(self, workdir: Path, cert: dict[str, Path], allow_user: str) -> None:
        super().__init__(workdir)
        self.cert = cert
        self.allow_user = allow_user
        # the parent makes run/ (0755) in the relay's 0755 work dir: nginx's
        # workers can reach the socket
        self.socket = workdir / "run" / "bench.sock"

    def start(self) -> None:
        empty = self.workdir / "empty"
        empty.mkdir(mode=0o755, exist_ok=True)
        conf = self.workdir / "keyservice.conf"
        conf.write_text("\n".join([
            f'chroot "{empty}"',
            f'socket "{self.workdir / "control.sock"}"',
            'keyservice "bench" {',
            f'    socket "{self.socket}"',
            f'    allow user "{self.allow_user}"',
            f"    prefork {KEYSERVICE_CAS}",
            f'    tls certificate "{self.cert["crt"]}" key "{self.cert["key"]}"',
            "}",
        ]) + "\n")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.popen([PYTHON, "-m", "pyprivsep", "-d", "-f", str(conf)], cwd=REPO, env=env)
        try:
            wait_until(lambda: self.socket.is_socket()
                       and len(process_tree(self.pid)) >= 1 + KEYSERVICE_CAS,
                       15, f"key service: socket and {KEYSERVICE_CAS} cas", self.alive)
        except RuntimeError as e:
            tail = self.log_tail().splitlines()
            raise RuntimeError(f"{e}" + (f" ({tail[-1]})" if tail else "")) from None

    def pyprivsep(self, *args: str) -> str:
        """The output of `pyprivsep ARGS` (keyref, openssl-conf)."""
        return subprocess.run([PYTHON, "-m", "pyprivsep", *args], cwd=REPO, check=True,
                              capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, PYTHONPATH=str(REPO))).stdout


class NginxKeyserviceRelay(NginxRelay):
    """nginx as above, its key file replaced by a key reference to a
    pyprivsep key service (the OpenSSL provider signs through the cas); the
    key service daemon's CPU is counted with nginx's."""

    keyservice: KeyserviceDaemon | None = None

    def launch(self) -> None:
        w = self.workdir
        self.keyservice = KeyserviceDaemon(w, self.cert, nginx_worker_user())
        self.keyservice.start()
        ref = w / "key.ref.pem"
        ref.write_text(self.keyservice.pyprivsep("keyref", "-s", str(self.keyservice.socket),
                                                 str(self.cert["crt"])))
        cnf = w / "openssl.cnf"
        cnf.write_text(self.keyservice.pyprivsep("openssl-conf"))
        # the master loads the provider from OPENSSL_CONF; `env` keeps it
        # in the workers' environment, which nginx otherwise clears
        self.popen_nginx(self.write_conf(ref, main="env OPENSSL_CONF;"),
                         env=dict(os.environ, OPENSSL_CONF=str(cnf)))

    def cpu_roots(self) -> list[int]:
        return [self.pid] + ([self.keyservice.pid] if self.keyservice else [])

    def alive(self) -> bool:
        return super().alive() and (self.keyservice is None or self.keyservice.alive())

    def stop(self) -> None:
        super().stop()
        if self.keyservice:
            self.keyservice.stop()


class HaproxyRelay(Relay):
    def launch(self) -> None:
        conf = self.workdir / "haproxy.cfg"
        conf.write_text(f"""
global
    nbthread 2
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{self.port} ssl crt {self.cert["pem"]} ssl-min-ver TLSv1.2 ssl-max-ver TLSv1.3
    default_backend be
backend be
    server s1 127.0.0.1:{self.backend_port}
""")
        self.popen(["haproxy", "-db", "-f", str(conf)])


class HitchRelay(Relay):
    def launch(self) -> None:
        conf = self.workdir / "hitch.conf"
        conf.write_text(f"""
frontend = "[127.0.0.1]:{self.port}"
backend = "[127.0.0.1]:{self.backend_port}"
pem-file = "{self.cert["pem"]}"
tls-protos = TLSv1.2 TLSv1.3
workers = 2
daemon = off
{'user = "nobody"' if os.getuid() == 0 else ""}
ocsp-dir = "{self.workdir}"
""")
        self.popen(["hitch", f"--config={conf}"])


class H2oRelay(Relay):
    """h2o, an HTTP reverse proxy (it has no TCP proxy) to the same
    backend, num-threads 2; its key lives in its neverbleed process, a
    child of h2o's, counted with it."""

    def launch(self) -> None:
        conf = self.workdir / "h2o.conf"
        # as root h2o wants a user to run as (neverbleed too)
        user = f"user: {NGINX_USER}\n" if os.getuid() == 0 else ""
        conf.write_text(f"""{user}num-threads: 2
listen:
  host: 127.0.0.1
  port: {self.port}
  ssl:
    certificate-file: {self.cert["crt"]}
    key-file: {self.cert["key"]}
    minimum-version: TLSv1.2
    max-version: TLSv1.3
    ocsp-update-interval: 0
    neverbleed: ON
hosts:
  default:
    paths:
      "/":
        proxy.reverse.url: http://127.0.0.1:{self.backend_port}/
""")
        self.popen(["h2o", "-c", str(conf)])


def make_relay(name: str, workdir: Path, cert: dict[str, Path], backend_port: int) -> Relay:
    if name.split("@")[0] in PPS_RELAYS:
        return PyprivsepRelay(name, workdir, cert, backend_port)
    cls = {"nginx": NginxRelay, "nginx-keyservice": NginxKeyserviceRelay,
           "nginx-1w": NginxOneWorkerRelay, "haproxy": HaproxyRelay, "hitch": HitchRelay,
           "h2o": H2oRelay}[name]
    return cls(name, workdir, cert, backend_port)


def nginx_worker_user() -> str:
    """Who nginx's workers run as: NGINX_USER when started as root, else us."""
    return NGINX_USER if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


def tests_module(name: str) -> ModuleType:
    """A helper module of tests/ (softhsm: the token and p11-kit server the
    tests sign with, one owner for both)."""
    import importlib
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    return importlib.import_module(name)


# the cas' user when root (pyprivsep.conf(5) `ca user`'s default)
CA_USER = "_pyprivsep_ca"
_PKCS11_SUPPORT: dict[Path, str | None] = {}


def pkcs11_unsupported(tree: Path) -> str | None:
    """Why the pyprivsep of `tree` takes no `pkcs11` line (its `-n` does not
    know the directive), or None; asked once per tree."""
    if tree not in _PKCS11_SUPPORT:
        with tempfile.TemporaryDirectory() as d:
            conf = Path(d, "probe.conf")
            conf.write_text('pkcs11 module "/nonexistent.so" pin "file:/nonexistent"\n')
            out = subprocess.run([PYTHON, "-m", "pyprivsep", "-n", "-f", str(conf)], cwd=tree,
                                 env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True,
                                 text=True, timeout=60).stderr
        _PKCS11_SUPPORT[tree] = ("this pyprivsep takes no pkcs11 keys"
                                 if 'unknown directive "pkcs11"' in out else None)
    return _PKCS11_SUPPORT[tree]


def missing_tool(name: str) -> str | None:
    base, _, label = name.partition("@")
    if base in PKCS11_RELAYS:
        why = tests_module("softhsm").missing(p11kit=PKCS11_RELAYS[base] == "p11kit")
        return why or pkcs11_unsupported(TREES[label] if label else REPO)
    tool = {"nginx": "nginx", "nginx-keyservice": "nginx", "nginx-1w": "nginx",
            "haproxy": "haproxy", "hitch": "hitch", "h2o": "h2o"}.get(name)
    if tool and not shutil.which(tool):
        return f"{tool} not installed"
    if tool == "nginx" and not os.path.exists(STREAM_MODULE):
        return "libnginx-mod-stream not installed"
    if name == "nginx-keyservice":
        from pyprivsep.keyref import provider_path
        if not provider_path().exists():
            return f"{provider_path().name} not built (make build)"
    return None


# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------

S_TIME_LINE = re.compile(r"(\d+) connections in (\d+) real seconds")


def client_cmd(relay: Relay, measure: str, duration: float, tls_args: list[str]) -> list[str]:
    """One loader: s_time for handshakes, curl for MiB downloads."""
    port = relay.port
    if measure in ("full", "resumed"):
        return ["openssl", "s_time", "-connect", f"127.0.0.1:{port}",
                "-new" if measure == "full" else "-reuse",
                "-time", str(max(1, round(duration))), "-www", "/", *tls_args]
    # the same URL again and again over one connection: the glob is in
    # the fragment, which curl does not send
    url = f"https://127.0.0.1:{port}/bytes/{MIB}#[1-1000000]"
    # -w to stderr, which is unbuffered: curl is stopped by a signal
    return ["curl", "-sS", "--http1.1", "--cacert", str(relay.cert["ca"]),
            "--max-time", str(int(duration) + 30), "-o", "/dev/null",
            "-w", "%{stderr}%{size_download}\n", *curl_tls(tls_args), url]


@contextlib.contextmanager
def clients(cmd: list[str], outs: list[Path]) -> Iterator[list[subprocess.Popen[str]]]:
    """len(outs) copies of cmd on CLIENT_CPU, each writing to its file; none
    outlives the block."""
    procs: list[subprocess.Popen[str]] = []
    files = [open(o, "w") for o in outs]
    try:
        for f in files:
            procs.append(subprocess.Popen(Pinning.prefix(CLIENT_CPU) + cmd,
                                          stdin=subprocess.DEVNULL, stdout=f,
                                          stderr=subprocess.STDOUT, text=True))
        yield procs
    finally:
        for p in procs:                     # interrupted: no client outlives the cell
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()


def wait_clients(procs: list[subprocess.Popen[str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def s_time_counts(texts: list[str], measure: str) -> tuple[int, int, int]:
    """Connections, resumed ones and errors in s_time outputs."""
    conns, reused, errors = 0, 0, 0
    for t in texts:
        found = S_TIME_LINE.findall(t)
        if found:
            conns += int(found[-1][0])
        errors += t.count("ERROR") + t.count("error")
        if measure == "resumed":
            # one progress character per connection: 'r' when resumed
            marks = "".join(line for line in t.splitlines()
                            if re.fullmatch(r"[r*0-9tse]+", line or "-"))
            reused += marks.count("r")
    return conns, reused, errors


def run_cell(relay: Relay, measure: str, duration: float, clients_n: int,
             tls_args: list[str], workdir: Path) -> dict:
    """One measurement: `clients_n` loaders for `duration` seconds against the
    relay; its process tree's CPU time before and after."""
    outs = [workdir / f"client{i}.out" for i in range(clients_n)]
    cmd = client_cmd(relay, measure, duration, tls_args)
    busy0, total0 = machine_cpu()
    cpu0, roles0 = tree_cpu(*relay.cpu_roots())
    t0 = time.monotonic()
    with clients(cmd, outs) as procs:
        if measure == "mib":
            time.sleep(duration)
            for p in procs:
                p.terminate()
        wait_clients(procs, duration + 30)
    wall = time.monotonic() - t0
    cpu1, roles1 = tree_cpu(*relay.cpu_roots())
    busy1, total1 = machine_cpu()
    cell = {"wall_s": wall, "server_cpu_s": cpu1 - cpu0,
            "cpu_s_by_role": {r: v - roles0.get(r, 0) for r, v in roles1.items()},
            "machine_busy": (busy1 - busy0) / max(1, total1 - total0),
            "client_rc": [p.returncode for p in procs]}
    texts = [o.read_text(errors="replace") for o in outs]
    if measure == "mib":
        sizes = [int(x) for t in texts for x in t.split() if x.isdigit()]
        done = sum(1 for s in sizes if s == MIB)
        cell.update(ops=done, bad=len(sizes) - done, bytes=done * MIB)
        cell["mb_per_s"] = done * MIB / 1e6 / wall
        cell["cpu_us_per_op"] = cell["server_cpu_s"] * 1e6 / done if done else None
        cell["rate"] = cell["mb_per_s"]
    else:
        conns, reused, errors = s_time_counts(texts, measure)
        cell.update(ops=conns, errors=errors)
        cell["rate"] = conns / wall
        cell["cpu_us_per_op"] = cell["server_cpu_s"] * 1e6 / conns if conns else None
        if measure == "resumed":
            cell["reused"] = reused
            cell["reused_fraction"] = reused / conns if conns else 0.0
        if not conns:
            cell["client_output"] = texts[0][-400:]
    return cell


def curl_tls(tls_args: list[str]) -> list[str]:
    return {"-tls1_2": ["--tlsv1.2", "--tls-max", "1.2"],
            "-tls1_3": ["--tlsv1.3"]}.get(tls_args[0], []) if tls_args else []


# ---------------------------------------------------------------------------
# the latency cell: round trips on an established session during a flood
# ---------------------------------------------------------------------------

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
# the pause between two round trips, s
LATENCY_GAP = 0.002


def read_response(f: BinaryIO) -> None:
    """One HTTP/1.1 response with a Content-Length, read to its end."""
    length = None
    status = f.readline()
    if not status.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"backend answered {status[:40]!r}")
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise RuntimeError("response without Content-Length")
    if len(f.read(length)) != length:
        raise RuntimeError("response cut short")


def round_trips(port: int, cafile: Path, tls: str, seconds: float,
                count: int) -> tuple[list[float], str | None]:
    """Small requests on one TLS session, one at a time, LATENCY_GAP
    apart, until `count` or `seconds` (after a first one, not timed): each
    round trip in µs, and the error that stopped them, if one did."""
    rtts: list[float] = []
    deadline = time.monotonic() + seconds
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                tls_context(cafile, tls).wrap_socket(raw, server_hostname="localhost") as s, \
                s.makefile("rb") as f:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # not timed: the first request also makes the relay's connection
            # to the backend
            s.sendall(REQUEST)
            read_response(f)
            while len(rtts) < count and time.monotonic() < deadline:
                t0 = time.perf_counter()
                s.sendall(REQUEST)
                read_response(f)
                rtts.append((time.perf_counter() - t0) * 1e6)
                time.sleep(LATENCY_GAP)
    except (OSError, RuntimeError, ValueError) as e:
        return rtts, f"{type(e).__name__}: {e}"
    return rtts, None


def latency_cell(relay: Relay, seconds: float, count: int, flooders: int, tls: str,
                 tls_args: list[str], workdir: Path) -> dict:
    """Round trips on an established session while `flooders` s_time -new
    clients make full handshakes against the relay (its certificate: RSA-4096)."""
    outs = [workdir / f"flood{i}.out" for i in range(flooders)]
    # the flood outlasts the round trips: it starts first, and ends by itself
    cmd = client_cmd(relay, "full", seconds + 1.5, tls_args)
    cpu0, _ = tree_cpu(*relay.cpu_roots())
    with clients(cmd, outs) as procs:
        time.sleep(0.5)
        rtts, error = round_trips(relay.port, relay.cert["ca"], tls, seconds, count)
        wait_clients(procs, seconds + 30)
    cpu1, _ = tree_cpu(*relay.cpu_roots())
    conns, _, _ = s_time_counts([o.read_text(errors="replace") for o in outs], "full")
    return {"rtt_us": rtts, "error": error, "flood_handshakes": conns,
            "server_cpu_s": cpu1 - cpu0}


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-th percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize_latency(cells: list[dict]) -> dict:
    rtts = [v for c in cells for v in c["rtt_us"]]
    return {"round_trips": len(rtts), "p50_us": percentile(rtts, 50),
            "p99_us": percentile(rtts, 99), "max_us": max(rtts, default=None),
            "p50_us_by_round": [percentile(c["rtt_us"], 50) for c in cells],
            "p99_us_by_round": [percentile(c["rtt_us"], 99) for c in cells],
            "flood_handshakes": sum(c["flood_handshakes"] for c in cells),
            "errors": [c["error"] for c in cells if c["error"]]}


# ---------------------------------------------------------------------------
# system calls per connection: strace -c -f on the relay's processes
# ---------------------------------------------------------------------------

def traced(pid: int) -> bool:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return line.split()[1] != "0"
    return True                                 # gone: nothing to wait for


def parse_strace_counts(text: str) -> dict[str, int]:
    """`strace -c -U name,calls` output: calls per system call (and 'total')."""
    calls = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            calls[parts[0]] = int(parts[1])
    return calls


def syscall_cell(relay: Relay, seconds: float, clients_n: int, tls_args: list[str],
                 workdir: Path) -> dict:
    """strace -c -f attached to every process of the relay (every thread:
    -f) while s_time makes full, then resumed connections for `seconds`
    each: system calls per connection."""
    pids = process_tree(*relay.cpu_roots())
    out = workdir / f"strace-{relay.name}.txt"
    cmd = ["strace", "-c", "-f", "-U", "name,calls", "-o", str(out)]
    for pid in pids:
        cmd += ["-p", str(pid)]
    with open(workdir / f"strace-{relay.name}.err", "w") as err:
        tracer = subprocess.Popen(Pinning.prefix(CLIENT_CPU) + cmd, stdin=subprocess.DEVNULL,
                                  stdout=err, stderr=err)
    try:
        wait_until(lambda: all(traced(p) for p in pids), 15, "strace attaching",
                   lambda: tracer.poll() is None)
        conns = {m: run_cell(relay, m, seconds, clients_n, tls_args, workdir)["ops"]
                 for m in ("full", "resumed")}
    finally:
        tracer.send_signal(signal.SIGINT)           # detaches, writes the summary
        try:
            tracer.wait(30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    total = sum(conns.values())
    calls = parse_strace_counts(out.read_text(errors="replace")) if out.exists() else {}
    return {"processes": len(pids), "connections": conns, "calls": calls,
            "per_connection": {k: v / total for k, v in calls.items()} if total else {}}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(cells: list[dict]) -> dict:
    s: dict[str, dict] = {}
    for c in cells:
        s.setdefault(c["measure"], {}).setdefault("runs", []).append(c)
    for m, d in s.items():
        runs = d["runs"]
        d["rate"] = median([r["rate"] for r in runs])
        d["cpu_us_per_op"] = median([r["cpu_us_per_op"] for r in runs])
        d["cpu_us_min"] = min((r["cpu_us_per_op"] for r in runs
                               if r["cpu_us_per_op"] is not None), default=None)
        d["cpu_us_max"] = max((r["cpu_us_per_op"] for r in runs
                               if r["cpu_us_per_op"] is not None), default=None)
        if m == "resumed":
            d["reused_fraction"] = median([r.get("reused_fraction", 0) for r in runs])
        d["machine_busy"] = median([r["machine_busy"] for r in runs])
        roles = {k for r in runs for k in r.get("cpu_s_by_role", {})}
        d["cpu_us_per_op_by_role"] = {
            k: median([r["cpu_s_by_role"].get(k, 0) * 1e6 / r["ops"] for r in runs if r["ops"]])
            for k in sorted(roles)}
        d["repeats"] = len(runs)
        del d["runs"]
    return s


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown_table(results: dict, relays: list[str], certs: list[str]) -> str:
    head = ("| cert | relay | TLS | full hs/s | CPU µs/full | resumed hs/s | CPU µs/resumed "
            "| resumed | MB/s | CPU µs/MiB |")
    lines = [head, "|------|-------|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cert in certs:
        for relay in relays:
            r = results[cert][relay]
            if r.get("na"):
                lines.append(f"| {CERTS[cert]} | {relay} | n/a: {r['na']} ||||||||")
                continue
            m = r["summary"]

            def cell(measure: str, key: str, spec: str = ".0f") -> str:
                if measure not in m:
                    return "–"                      # not measured
                return fmt(m[measure].get(key), spec)

            # the version the probe negotiated ("TLSv1.3 TLS_AES_...")
            tls = (r.get("negotiated") or "?").split(" ", 1)[0]
            lines.append(
                f"| {CERTS[cert]} | {relay} | {tls} | {cell('full', 'rate')} | "
                f"{cell('full', 'cpu_us_per_op')} | {cell('resumed', 'rate')} | "
                f"{cell('resumed', 'cpu_us_per_op')} | {cell('resumed', 'reused_fraction', '.0%')} | "
                f"{cell('mib', 'rate')} | {cell('mib', 'cpu_us_per_op')} |")
    return "\n".join(lines)


def roles_table(results: dict, relays: list[str], certs: list[str]) -> str:
    """pyprivsep's CPU per full handshake, split between its processes; for
    nginx-keyservice (and nginx, to compare) nginx's master and workers are
    the relay processes, the key service's cas and parent the others."""
    split = set(PPS_RELAYS) | {"h2o"} | ({"nginx", "nginx-keyservice"}
                                         if "nginx-keyservice" in relays else set())
    lines = ["| cert | relay | relay processes µs | ca (h2o: neverbleed) µs | parent µs | all µs |",
             "|---|---|---:|---:|---:|---:|"]
    for cert in certs:
        for relay in relays:
            r = results[cert][relay]
            base = relay.split("@")[0]
            full = {} if r.get("na") or base not in split else r["summary"].get("full")
            if not full:
                continue
            by = dict(full.get("cpu_us_per_op_by_role", {}))
            if "neverbleed" in by:                  # h2o's key holder, its "ca"
                by["ca"] = by.pop("neverbleed")
            own = (by.get("relay") if base in PPS_RELAYS
                   else sum(v for k, v in by.items() if k not in ("ca", "parent")))
            lines.append(f"| {CERTS[cert]} | {relay} | {fmt(own)} | "
                         f"{fmt(by.get('ca')) if 'ca' in by else '–'} | "
                         f"{fmt(by.get('parent')) if 'parent' in by else '–'} | "
                         f"{fmt(full.get('cpu_us_per_op'))} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def best_peer_table(results: dict, relays: list[str], certs: list[str]) -> str:
    """Each relay's CPU per operation divided by the best peer's (the
    lowest among PEERS measured) for that certificate and measure."""
    measures = [("full", "full"), ("resumed", "resumed"), ("mib", "MiB")]
    lines = ["| cert | relay | " + " | ".join(f"{label} / best peer" for _, label in measures)
             + " |", "|---|---|" + "---:|" * len(measures)]
    for cert in certs:
        def cpu(relay: str, measure: str) -> float | None:
            r = results[cert].get(relay)
            return None if not r or r.get("na") else \
                r["summary"].get(measure, {}).get("cpu_us_per_op")

        best = {m: min(((cpu(p, m), p) for p in PEERS if cpu(p, m)), default=None)
                for m, _ in measures}
        lines.append(f"| {CERTS[cert]} | (best peer) | " + " | ".join(
            f"{b[1]} {b[0]:.0f} µs" if b else "n/a" for b in best.values()) + " |")
        for relay in relays:
            cells = []
            for m, _ in measures:
                v, b = cpu(relay, m), best[m]
                cells.append(f"{v / b[0]:.2f}×" if v and b else "–")
            lines.append(f"| {CERTS[cert]} | {relay} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_table(latency: dict) -> str:
    lines = ["| relay (RSA-4096, 2 clients flooding full handshakes) | round trips "
             "| p50 µs | p99 µs | max µs | flood handshakes/s | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in latency.get("relays", {}).items():
        if r.get("na"):
            lines.append(f"| {name} | n/a: {r['na']} ||||||")
            continue
        s = r["summary"]
        rate = s["flood_handshakes"] / max(1e-9, r["flood_seconds"])
        lines.append(f"| {name} | {s['round_trips']} | {fmt(s['p50_us'])} | {fmt(s['p99_us'])} "
                     f"| {fmt(s['max_us'])} | {rate:.0f} | {'; '.join(s['errors'])[:120]} |")
    return "\n".join(lines)


def syscall_table(syscalls: dict, relays: list[str], top: int = 14) -> str:
    """System calls per connection: a column per relay, the `top` calls
    most frequent in any relay, and the total."""
    tables = []
    for cert, by_relay in syscalls.items():
        cols = [r for r in relays if r in by_relay]
        per = {r: by_relay[r].get("per_connection", {}) for r in cols}
        names = sorted({k for d in per.values() for k in d if k != "total"},
                       key=lambda k: -max(d.get(k, 0) for d in per.values()))[:top]
        lines = [f"| {CERTS[cert]}: calls per connection | " + " | ".join(cols) + " |",
                 "|---|" + "---:|" * len(cols),
                 "| connections (full + resumed) | " + " | ".join(
                     "n/a" if by_relay[r].get("na") else
                     "+".join(str(n) for n in by_relay[r]["connections"].values())
                     for r in cols) + " |"]
        for k in names + ["total"]:
            lines.append(f"| {k} | " + " | ".join(
                f"{per[r][k]:.1f}" if k in per[r] else "–" for r in cols) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def targets(results: dict, certs: list[str], latency: dict | None = None) -> tuple[str, dict]:
    """The goals of the performance issue, reported (not asserted): CPU per
    operation against the best peer, the cost of privilege separation, and
    the latency cell against nginx."""
    def cpu(cert: str, relay: str, measure: str) -> float | None:
        r = results.get(cert, {}).get(relay)
        if not r or r.get("na"):
            return None
        return r["summary"].get(measure, {}).get("cpu_us_per_op")

    out, data = [], {}
    limits = {"rsa2048": 1.0, "p256": 3.0}
    out.append("| target | measured | goal |")
    out.append("|---|---:|---:|")
    for cert in certs:
        base = cpu(cert, "pps-inprocess", "full")
        for relay in ("pps-async", "pps-blocking"):
            v = cpu(cert, relay, "full")
            if v is not None and base:
                pct = (v / base - 1) * 100
                data[f"privsep_overhead_{relay}_{cert}_pct"] = pct
                out.append(f"| privsep CPU overhead per full handshake, {relay} vs "
                           f"pps-inprocess, {CERTS[cert]} | {pct:+.1f}% | ≤ {limits[cert]:.0f}% |")
    for cert in certs:
        for measure, label in (("full", "full handshake"), ("resumed", "resumed handshake"),
                               ("mib", "MiB")):
            v = cpu(cert, "pps-async", measure)
            best = min(((c, p) for p in PEERS if (c := cpu(cert, p, measure))), default=None)
            if v is not None and best:
                ratio = v / best[0]
                data[f"pps_async_vs_best_peer_{measure}_{cert}"] = ratio
                out.append(f"| pps-async CPU per {label} / the best peer's ({best[1]}), "
                           f"{CERTS[cert]} | {ratio:.2f}× | ≤ 0.8× |")
    lat = {n: r["summary"] for n, r in (latency or {}).get("relays", {}).items()
           if not r.get("na") and r.get("summary")}
    pps = next((n for n in lat if n.startswith("pps")), None)
    ng = next((n for n in lat if n.startswith("nginx")), None)
    if pps and ng and lat[ng].get("p99_us") and lat[pps].get("p99_us") is not None:
        ratio = lat[pps]["p99_us"] / lat[ng]["p99_us"]
        data["latency_p99_vs_nginx"] = ratio
        out.append(f"| latency cell: {pps} p99 / {ng} p99 | {ratio:.2f}× | ≤ 0.1× |")
    # the key service's cost to nginx: its workers' provider and round trips
    # plus the cas' signing, against nginx signing in its workers
    ks_limits = {"rsa2048": "≤ +5%", "p256": "reported"}
    for cert in certs:
        ng = cpu(cert, "nginx", "full")
        v = cpu(cert, "nginx-keyservice", "full")
        if v is not None and ng:
            pct = (v / ng - 1) * 100
            data[f"nginx_keyservice_vs_nginx_full_{cert}_pct"] = pct
            out.append(f"| nginx-keyservice / nginx CPU per full handshake, {CERTS[cert]} | "
                       f"{v / ng:.2f}× ({pct:+.1f}%) | {ks_limits[cert]} |")
    return "\n".join(out), data


def draw_chart(results: dict, relays: list[str], certs: list[str], png: Path,
               title: str, latency: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("full", "server CPU µs per full handshake"),
              ("resumed", "server CPU µs per resumed handshake"),
              ("mib", "server CPU µs per MiB downloaded")]
    lat = {n: r["summary"] for n, r in (latency or {}).get("relays", {}).items()
           if not r.get("na")}
    fig, axes = plt.subplots(len(panels) + bool(lat), 1,
                             figsize=(max(9, 1.3 * len(relays) + 2), 12 + 4 * bool(lat)))
    width = 0.8 / max(1, len(certs))
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    for ax, (measure, title_) in zip(axes, panels):
        xs = range(len(relays))
        for j, cert in enumerate(certs):
            vals, errs_lo, errs_hi = [], [], []
            for relay in relays:
                r = results[cert][relay]
                d = {} if r.get("na") else r["summary"].get(measure, {})
                if not r.get("na") and measure not in r["summary"]:
                    d = {"not_run": True}
                v = d.get("cpu_us_per_op")
                vals.append(v or 0)
                errs_lo.append((v - d["cpu_us_min"]) if v and d.get("cpu_us_min") else 0)
                errs_hi.append((d["cpu_us_max"] - v) if v and d.get("cpu_us_max") else 0)
            pos = [x + (j - (len(certs) - 1) / 2) * width for x in xs]
            bars = ax.bar(pos, vals, width, label=CERTS[cert], color=colors[j % len(colors)],
                          yerr=[errs_lo, errs_hi], capsize=2, ecolor="#555")
            for b, v, hi, relay in zip(bars, vals, errs_hi, relays):
                r = results[cert][relay]
                text = (f"{v:.0f}" if v else "n/a" if r.get("na") or measure in r["summary"]
                        else "not run")
                ax.annotate(text, (b.get_x() + b.get_width() / 2, v + hi),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                            textcoords="offset points")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(relays, fontsize=8)
        ax.set_ylabel("µs")
        ax.set_title(title_, fontsize=10)
        ax.margins(y=0.12)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    if lat:
        draw_latency(axes[-1], lat)
    title = "\n".join(textwrap.fill(line, 120) for line in title.splitlines())
    fig.suptitle(title, fontsize=10)
    # room at the top for the title's lines
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.011 * (title.count("\n") + 1)))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def draw_latency(ax: object, lat: dict[str, dict]) -> None:
    """The latency cell: p50 and p99 round trip per relay, in ms."""
    names = list(lat)
    for j, (key, label, color) in enumerate((("p50_us", "p50", "#4C72B0"),
                                             ("p99_us", "p99", "#C44E52"))):
        vals = [(lat[n][key] or 0) / 1000 for n in names]
        bars = ax.bar([x + (j - 0.5) * 0.35 for x in range(len(names))], vals, 0.35,
                      label=label, color=color)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(list(range(len(names))))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("round trip on an established session while 2 clients flood full "
                 "RSA-4096 handshakes (lower is better)", fontsize=10)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def env_default(name: str, default: str) -> str:
    return os.environ.get(name) or default


def parse_args(argv: list[str]) -> argparse.Namespace:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", default=quick,
                   help="1 s cells, 1 repeat (env BENCH_QUICK=1)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per cell (env BENCH_DURATION; default 3, quick 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per cell, median shown (env BENCH_REPEATS; default 3, quick 1)")
    p.add_argument("--clients", type=int, default=int(env_default("BENCH_CLIENTS", "2")),
                   help="client processes in parallel (env BENCH_CLIENTS; default 2)")
    p.add_argument("--relays", default=env_default("BENCH_RELAYS", ",".join(ALL_RELAYS)),
                   help="comma-separated, from: " + ",".join(ALL_RELAYS) + " (env BENCH_RELAYS)")
    p.add_argument("--certs", default=env_default("BENCH_CERTS", ",".join(CERTS)),
                   help="comma-separated, from: rsa2048,p256 (env BENCH_CERTS)")
    p.add_argument("--measures", default=env_default("BENCH_MEASURES", ",".join(MEASURES)),
                   help="comma-separated, from: full,resumed,mib (env BENCH_MEASURES)")
    p.add_argument("--tls", default=env_default("BENCH_TLS", "1.3"),
                   choices=["default", "1.2", "1.3"],
                   help="client TLS version: 1.3 (default), 1.2, or default: the "
                        "clients' highest (env BENCH_TLS)")
    p.add_argument("--latency-time", type=float, default=None,
                   help="seconds of round trips per relay and round in the latency cell, "
                        "0 skips it (env BENCH_LATENCY_TIME; default 5, quick 2)")
    p.add_argument("--latency-requests", type=int,
                   default=int(env_default("BENCH_LATENCY_REQUESTS", "2000")),
                   help="at most this many round trips per relay and round "
                        "(env BENCH_LATENCY_REQUESTS; default 2000)")
    p.add_argument("--syscall-time", type=float,
                   default=float(env_default("BENCH_SYSCALL_TIME", "1")),
                   help="seconds of full, then of resumed connections under strace -c -f per "
                        "relay, 0 skips the system call table (env BENCH_SYSCALL_TIME; default 1)")
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                   help="another checkout to measure beside this one: relays named "
                        "pps-async@LABEL (any pps-* relay) run DIR's pyprivsep, its extension "
                        "built there if missing (env BENCH_TREES, comma-separated)")
    p.add_argument("--backend", default=env_default("BENCH_BACKEND", "auto"),
                   choices=["auto", "nginx", "demo"], help="plain-HTTP backend (env BENCH_BACKEND)")
    p.add_argument("--micro-json", default=None,
                   help="pytest-benchmark JSON to include in the results")
    p.add_argument("--out", default=None, help="results file (default bench/results/<ts>.json)")
    p.add_argument("--redraw", metavar="JSON", default=None,
                   help="only redraw the chart (JSON's .png) and reprint the tables of a results file")
    a = p.parse_args(argv)
    if a.duration is None:
        a.duration = float(env_default("BENCH_DURATION", "1" if a.quick else "3"))
    if a.repeats is None:
        a.repeats = int(env_default("BENCH_REPEATS", "1" if a.quick else "3"))
    if a.latency_time is None:
        a.latency_time = float(env_default("BENCH_LATENCY_TIME", "2" if a.quick else "5"))
    a.relays = [r for r in a.relays.split(",") if r]
    a.certs = [c for c in a.certs.split(",") if c]
    a.measures = [m for m in a.measures.split(",") if m]
    for t in a.tree + [t for t in env_default("BENCH_TREES", "").split(",") if t]:
        label, sep, path = t.partition("=")
        if not sep or not label or not Path(path, "build_ffi.py").is_file():
            p.error(f"--tree {t!r}: LABEL=DIR, DIR a pyprivsep checkout")
        TREES[label] = Path(path).resolve()
    for r in a.relays:
        base, at, label = r.partition("@")
        if base not in ALL_RELAYS or (at and (base not in PPS_RELAYS or label not in TREES)):
            p.error(f"unknown relay {r!r}")
    for c in a.certs:
        if c not in CERTS:
            p.error(f"unknown cert {c!r}")
    for m in a.measures:
        if m not in MEASURES:
            p.error(f"unknown measure {m!r}")
    return a


def start_backend(kind: str, workdir: Path) -> Server:
    if kind in ("auto", "nginx") and shutil.which("nginx"):
        b: Server = NginxBackend(workdir)
        try:
            b.start()
            return b
        except Exception as e:                  # noqa: BLE001
            b.stop()
            if kind == "nginx":
                raise
            log(f"nginx backend failed ({e}); using the demo backend")
    b = DemoBackend(workdir)
    b.start()
    return b


def redraw(path: Path) -> int:
    doc = json.loads(path.read_text())
    meta, results = doc["meta"], doc["results"]
    for key in ("table", "best_peer_table", "targets_table", "roles_table", "latency_table",
                "syscall_table"):
        if doc.get(key):
            print(doc[key], end="\n\n")
    png = path.with_suffix(".png")
    draw_chart(results, meta["relays"], meta["certs"], png,
               f"pyprivsep benchmark {meta['time']}\n{doc.get('header', '')}\n"
               "(bars: median; whiskers: min and max of the repeats; lower is better)",
               doc.get("latency"))
    print(f"chart: {png}")
    return 0


def start_relay(name: str, cert: dict[str, Path], backend: Server, workdir: Path,
                tls: str, tls_args: list[str], res: dict) -> Relay | None:
    """The relay started, probed, its pinning checked and warmed up; None,
    with res["na"] saying why, when it cannot run."""
    why = missing_tool(name)
    if why:
        res["na"] = why
        log(f"{name}: n/a: {why}")
        return None
    rdir = workdir / f"{cert['crt'].stem}-{name}"
    rdir.mkdir()
    rdir.chmod(0o755)
    relay = make_relay(name, rdir, cert, backend.port)
    try:
        relay.start()
    except Exception as e:              # noqa: BLE001
        tail = relay.log_tail()
        res["na"] = f"could not start: {e}" + (f" ({tail.splitlines()[-1]})" if tail else "")
        log(f"{name}: n/a: {res['na']}")
        relay.stop()
        return None
    res["port"] = relay.port
    res["negotiated"] = tls_probe(relay.port, relay.cert["ca"], tls)
    # warm up: the first connections (imports, caches) are not measured
    run_cell(relay, "full", 1, 1, tls_args, workdir / "cells")
    if Pinning.on:
        # a program that sets its own affinity (hitch) is moved back, then checked
        moved = affinity(relay.cpu_roots(), SERVER_CPU, repin=True)["repinned"]
        aff = res["affinity"] = affinity(relay.cpu_roots(), SERVER_CPU)
        aff["repinned"] = moved
        log(f"{name}: {aff['processes']} processes, {aff['threads']} threads"
            + (f"; NOT on CPU {SERVER_CPU}: {', '.join(aff['off'])}" if aff["off"]
               else f", all on CPU {SERVER_CPU}")
            + (f" (re-pinned, had set their own: {', '.join(moved)})" if moved else ""))
    return relay


def measure_rounds(running: dict[str, Relay], cert: str, a: argparse.Namespace,
                   tls_args: list[str], results: dict, cells_dir: Path) -> None:
    """a.repeats rounds, each measuring every relay in turn (interleaved)."""
    for rep in range(a.repeats):
        for name, relay in running.items():
            measures = a.measures if name.split("@")[0] not in HANDSHAKES_ONLY \
                else [m for m in a.measures if m in MEASURES_P1]
            for measure in measures:
                if not relay.alive():
                    results[name]["na"] = "relay exited: " + relay.log_tail(200)
                    break
                cell = run_cell(relay, measure, a.duration, a.clients, tls_args, cells_dir)
                cell.update(measure=measure, repeat=rep)
                results[name]["cells"].append(cell)
                extra = (f", {cell.get('reused_fraction', 0):.0%} resumed"
                         if measure == "resumed" else "")
                unit = "MB/s" if measure == "mib" else "hs/s"
                log(f"  {CERTS[cert]:11s} {name:16s} {measure:7s} #{rep + 1}: "
                    f"{cell['rate']:8.1f} {unit}, "
                    f"{fmt(cell['cpu_us_per_op'], '.0f'):>6s} µs CPU/op{extra}"
                    f"  (machine {cell['machine_busy']:.0%} busy)")
                time.sleep(0.2)


def measure_syscalls(running: dict[str, Relay], cert: str, a: argparse.Namespace,
                     tls_args: list[str], cells_dir: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, relay in running.items():
        try:
            out[name] = syscall_cell(relay, a.syscall_time, a.clients, tls_args, cells_dir)
        except Exception as e:                      # noqa: BLE001
            out[name] = {"na": str(e)}
        per = out[name].get("per_connection", {})
        log(f"  {CERTS[cert]:11s} {name:16s} strace: {fmt(per.get('total'), '.1f')} "
            f"system calls per connection ({out[name].get('connections', out[name].get('na'))})")
    return out


def measure_latency(a: argparse.Namespace, cert: dict[str, Path], backend: Server,
                    workdir: Path, tls_args: list[str], servers: list[Server]) -> dict:
    """The latency cell, LATENCY_RELAYS with an RSA-4096 certificate,
    a.repeats interleaved rounds, round trips pooled."""
    # and the other trees' pps-async-p1 (--tree), for an A/B of the cell
    names = LATENCY_RELAYS + [r for r in a.relays if r.startswith(LATENCY_RELAYS[0] + "@")]
    lat: dict = {"relays": {n: {"cells": []} for n in names},
                 "flooders": 2, "seconds": a.latency_time, "max_requests": a.latency_requests}
    running: dict[str, Relay] = {}
    for name in names:
        relay = start_relay(name, cert, backend, workdir, a.tls, tls_args, lat["relays"][name])
        if relay:
            servers.append(relay)
            running[name] = relay
    for rep in range(a.repeats):
        for name, relay in running.items():
            cell = latency_cell(relay, a.latency_time, a.latency_requests, lat["flooders"],
                                a.tls, tls_args, workdir / "cells")
            lat["relays"][name]["cells"].append(cell)
            log(f"  latency {name:14s} #{rep + 1}: {len(cell['rtt_us'])} round trips, p50 "
                f"{fmt(percentile(cell['rtt_us'], 50))} µs, p99 "
                f"{fmt(percentile(cell['rtt_us'], 99))} µs; {cell['flood_handshakes']} "
                f"RSA-4096 handshakes{'; ' + cell['error'] if cell['error'] else ''}")
    for name, relay in running.items():
        relay.stop()
        servers.remove(relay)
        r = lat["relays"][name]
        r["summary"] = summarize_latency(r["cells"])
        # s_time's own count covers seconds + 1.5 per round (client_cmd rounds it)
        r["flood_seconds"] = len(r["cells"]) * max(1, round(a.latency_time + 1.5))
    return lat


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.redraw:
        return redraw(Path(a.redraw))
    tls_args = {"default": [], "1.2": ["-tls1_2"], "1.3": ["-tls1_3"]}[a.tls]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = Path(a.out) if a.out else RESULTS / f"{stamp}.json"
    stamp = out_json.stem
    png = out_json.with_suffix(".png")
    pinning = Pinning.setup()
    certs = make_certs(a.certs + ([LATENCY_CERT] if a.latency_time > 0 else []))
    strace_ok = a.syscall_time > 0 and shutil.which("strace") is not None
    # readable by the unprivileged workers of nginx (they run as nobody)
    workdir = Path(tempfile.mkdtemp(prefix="pyprivsep-bench-"))
    workdir.chmod(0o755)
    cells_dir = workdir / "cells"
    cells_dir.mkdir()
    meta = {
        "time": stamp, "host": platform.node(), "cpus": os.cpu_count(),
        "kernel": platform.release(), "python": platform.python_version(),
        "duration_s": a.duration, "repeats": a.repeats, "clients": a.clients,
        "tls": a.tls, "relays": a.relays, "certs": a.certs, "measures": a.measures,
        "pinning": pinning, "latency_time_s": a.latency_time,
        "latency_requests": a.latency_requests, "syscall_time_s": a.syscall_time,
        "versions": {
            "openssl": tool_version(["openssl", "version"]),
            "nginx": tool_version(["nginx", "-v"]),
            "haproxy": tool_version(["haproxy", "-v"]),
            "hitch": tool_version(["hitch", "--version"]),
            "h2o": tool_version(["h2o", "--version"]),
            "strace": tool_version(["strace", "-V"]),
            "curl": tool_version(["curl", "--version"]),
            "pyprivsep": tool_version([PYTHON, "-m", "pyprivsep", "-V"]),
        },
        "uid": os.getuid(),
    }
    n_cells = sum(len(a.measures if r.split("@")[0] not in HANDSHAKES_ONLY
                      else [m for m in a.measures if m in MEASURES_P1])
                  for r in a.relays) * a.repeats * len(a.certs)
    log(f"bench: {len(a.relays)} relays x {len(a.certs)} certs, {n_cells} cells of "
        f"{a.duration:g} s, {a.clients} clients; work dir {workdir}")
    log(f"bench: {pinning}")
    if a.syscall_time > 0 and not strace_ok:
        log("bench: strace not installed: no system call table")
    results: dict[str, dict[str, dict]] = {c: {} for c in a.certs}
    syscalls: dict[str, dict[str, dict]] = {}
    latency: dict = {}
    servers: list[Server] = []

    def stop_all(*_: object) -> None:
        for s in servers:
            s.stop()
        servers.clear()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        backend = start_backend(a.backend, workdir)
        servers.append(backend)
        meta["backend"] = backend.name
        if Pinning.on:
            meta["backend_affinity"] = affinity([backend.pid], CLIENT_CPU)
        log(f"backend: {backend.name} on 127.0.0.1:{backend.port}")
        for cert in a.certs:
            running: dict[str, Relay] = {}
            for name in a.relays:
                res = results[cert][name] = {"cells": []}
                relay = start_relay(name, certs[cert], backend, workdir, a.tls, tls_args, res)
                if relay:
                    servers.append(relay)
                    running[name] = relay
            log(f"{CERTS[cert]}: running {', '.join(f'{n}:{r.port}' for n, r in running.items())}")
            measure_rounds(running, cert, a, tls_args, results[cert], cells_dir)
            if strace_ok:
                syscalls[cert] = measure_syscalls(running, cert, a, tls_args, cells_dir)
            for name, relay in running.items():
                relay.stop()
                servers.remove(relay)
                text = relay.log_tail(4000)
                if "Traceback" in text or "ERROR" in text:
                    results[cert][name]["log_tail"] = text[-1500:]
        if a.latency_time > 0:
            latency = measure_latency(a, certs[LATENCY_CERT], backend, workdir, tls_args, servers)
    finally:
        stop_all()

    for cert in a.certs:
        for name in a.relays:
            r = results[cert][name]
            r["summary"] = summarize(r["cells"])
            if not r.get("na") and not r["cells"]:
                r["na"] = "no measurement"
    table = markdown_table(results, a.relays, a.certs)
    peer_table = best_peer_table(results, a.relays, a.certs)
    target_table, target_data = targets(results, a.certs, latency)
    lat_table = latency_table(latency) if latency else ""
    sys_table = syscall_table(syscalls, a.relays) if syscalls else ""
    busy = median([c["machine_busy"] for cert in a.certs for r in results[cert].values()
                   for c in r["cells"]])
    openssl = " ".join((meta["versions"]["openssl"] or "openssl ?").split()[:2])
    header = (f"{a.clients} clients, {a.duration:g} s per cell, median of {a.repeats} "
              f"interleaved rounds; backend {meta['backend']}; TLS {a.tls}; {openssl}; "
              f"{os.cpu_count()} CPUs, {pinning}")
    print()
    print(f"### pyprivsep benchmark {stamp}: {header}")
    print()
    print(table)
    print()
    print("Server CPU per operation / the best peer's (the lowest of "
          f"{', '.join(PEERS)}; lower is better):")
    print()
    print(peer_table)
    print()
    print(target_table)
    print()
    split = roles_table(results, a.relays, a.certs)
    if split:
        print("pyprivsep's CPU per full handshake by process (medians; for nginx, its "
              "master and workers are the relay processes; for h2o, its neverbleed "
              "is in the ca column):")
        print()
        print(split)
        print()
    if lat_table:
        print(f"Latency: {latency['seconds']:g} s (at most {latency['max_requests']} "
              f"requests) per relay and round, {a.repeats} interleaved rounds pooled, one "
              "TLS session making small requests one at a time while 2 s_time -new clients "
              "flood full RSA-4096 handshakes:")
        print()
        print(lat_table)
        print()
    if sys_table:
        print(f"System calls per connection (strace -c -f on every process of the relay; "
              f"{a.syscall_time:g} s of full then {a.syscall_time:g} s of resumed "
              f"connections, {a.clients} clients; the calls divided by all connections):")
        print()
        print(sys_table)
        print()
    if busy is not None:
        print(f"(machine busy during the cells: median {busy:.0%} of all CPUs; "
              "CPU µs are the relay's own processes only, and nginx-keyservice's key "
              "service)")
    micro = None
    if a.micro_json and Path(a.micro_json).exists():
        micro = micro_summary(Path(a.micro_json))
        print()
        print(micro["table"])
    doc = {"meta": meta, "results": results, "targets": target_data,
           "header": header, "table": table, "best_peer_table": peer_table,
           "targets_table": target_table, "roles_table": split, "latency": latency,
           "latency_table": lat_table, "syscalls": syscalls, "syscall_table": sys_table,
           "micro": micro}
    out_json.write_text(json.dumps(doc, indent=1, default=str))
    try:
        draw_chart(results, a.relays, a.certs, png, f"pyprivsep benchmark {stamp}\n{header}\n"
                   "(bars: median; whiskers: min and max of the repeats; lower is better)",
                   latency)
        print(f"\nresults: {out_json}\nchart:   {png}")
    except Exception as e:                          # noqa: BLE001
        print(f"\nresults: {out_json}\nchart: not drawn ({e})")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def micro_summary(path: Path) -> dict:
    data = json.loads(path.read_text())
    rows = ["| microbenchmark | median µs | mean µs | rounds |", "|---|---:|---:|---:|"]
    items = {}
    for b in data.get("benchmarks", []):
        st = b["stats"]
        items[b["name"]] = {"median_us": st["median"] * 1e6, "mean_us": st["mean"] * 1e6,
                            "rounds": st["rounds"]}
        rows.append(f"| {b['name']} | {st['median'] * 1e6:.1f} | {st['mean'] * 1e6:.1f} | "
                    f"{st['rounds']} |")
    return {"file": str(path), "benchmarks": items, "table": "\n".join(rows)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
