"""`make bench`: pyprivsep side by side with nginx, haproxy and hitch.

One plain-HTTP backend (nginx's http module, or pyprivsep's demo backend
when nginx is missing) listens on loopback.  In front of it, each relay
under test terminates TLS with the same certificate and two workers:

    pps-async      pyprivsep, prefork 2, ca processes, keyops async
    pps-blocking   pyprivsep, prefork 2, ca processes, keyops blocking
    pps-inprocess  pyprivsep, prefork 2, keys inprocess (no privsep: baseline)
    nginx          nginx stream module with ssl, 2 workers, shared session cache
    nginx-keyservice  the same nginx, its key a reference to a pyprivsep key
                   service (pyprivsep's OpenSSL provider; the daemon with only
                   a keyservice block, 2 cas, is counted with nginx)
    haproxy        haproxy mode tcp, nbthread 2
    hitch          hitch, 2 workers
    pps-async-p1, pps-blocking-p1   the same with prefork 1 (handshakes only)

For each certificate (RSA-2048, ECDSA P-256) and relay, parallel clients
load it for a fixed time per cell and the relay's whole process tree's CPU
time (utime+stime of every process, from /proc; for nginx-keyservice also the
key service daemon's tree: its cas do the signing) is read before and after:

    full      `openssl s_time -new -www /`      handshakes/s, server CPU us per handshake
    resumed   `openssl s_time -reuse -www /`    the same, resumed (the 'r's are counted)
    mib       curl, keep-alive, /bytes/1048576  MB/s, server CPU us per MiB

On a 2-core machine the clients compete with the server for CPU, so the
comparable figure is CPU per operation, not operations per second.  Every
cell is repeated and the median shown.  The repeats are interleaved (round
1 of every relay, then round 2, ...) with all relays of one certificate
started up front, idle while another is measured, so that a burst of load
from elsewhere on the machine does not land on one relay only.

Prints a markdown table, writes bench/results/<timestamp>.json and .png.
Every load loop is bounded in time; all traffic stays on 127.0.0.1.
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
import time
from pathlib import Path
from typing import Callable

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
PPS_RELAYS = {
    # name: (prefork, keyops, inprocess)
    "pps-async": (2, "async", False),
    "pps-blocking": (2, "blocking", False),
    "pps-inprocess": (2, None, True),
    "pps-async-p1": (1, "async", False),
    "pps-blocking-p1": (1, "blocking", False),
}
ALL_RELAYS = ["pps-async", "pps-blocking", "pps-inprocess", "nginx", "nginx-keyservice",
              "haproxy", "hitch", "pps-async-p1", "pps-blocking-p1"]
# nginx-keyservice: the key service's cas, one per nginx worker
KEYSERVICE_CAS = 2
MEASURES = ["full", "resumed", "mib"]
# the prefork-1 rows compare the two ways of waiting for the ca: handshakes
MEASURES_P1 = ["full", "resumed"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    return m.group(1) if m else os.path.basename(title.split(" ", 1)[0]) or "?"


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


def tls_probe(port: int, cafile: Path, tls: str = "default") -> str | None:
    """One HTTPS request through the relay, the certificate checked;
    returns the protocol and cipher negotiated, or None."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    if TLS_MAX[tls]:
        ctx.maximum_version = TLS_MAX[tls]
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

def make_certs() -> dict[str, dict[str, Path]]:
    """RSA-2048 and P-256 server certificates for localhost and 127.0.0.1,
    each with the throwaway CA that signed it (the clients trust that, NAME-ca.crt),
    made once into bench/results/certs."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from pyprivsep.demo import leaf_certificate, write_key

    CERT_DIR.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in CERTS:
        crt, key, pem, ca = (CERT_DIR / f"{name}.crt", CERT_DIR / f"{name}.key",
                             CERT_DIR / f"{name}.pem", CERT_DIR / f"{name}-ca.crt")
        # no NAME-ca.crt: made by an older run as a self-signed CA, which
        # pyprivsep refuses as a server certificate
        if not (crt.exists() and key.exists() and pem.exists() and ca.exists()):
            if name == "rsa2048":
                priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
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

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.na: str | None = None        # why it cannot run, if it cannot

    def popen(self, cmd: list[str], **kw: object) -> None:
        self.errlog = self.workdir / f"{self.name}.log"
        with open(self.errlog, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err,
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
    """A TLS relay in front of the backend, listening on self.port."""

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


class PyprivsepRelay(Relay):
    def launch(self) -> None:
        prefork, keyops, inprocess = PPS_RELAYS[self.name]
        empty = self.workdir / "empty"
        empty.mkdir(mode=0o755, exist_ok=True)
        lines = [f"prefork {prefork}", f'chroot "{empty}"',
                 f'socket "{self.workdir / "control.sock"}"']
        if keyops:
            lines.append(f"keyops {keyops}")
        if inprocess:
            lines.append("keys inprocess")
        lines += [
            'relay "bench" {',
            f"    listen on 127.0.0.1 port {self.port} tls",
            f"    forward to 127.0.0.1 port {self.backend_port}",
            f'    tls certificate "{self.cert["crt"]}" key "{self.cert["key"]}"',
            "}",
        ]
        conf = self.workdir / f"{self.name}.conf"
        conf.write_text("\n".join(lines) + "\n")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.popen([PYTHON, "-m", "pyprivsep", "-d", "-f", str(conf)], cwd=REPO, env=env)

    def start(self) -> None:
        super().start()
        # every relay (and ca) up: the handshake above may have hit the first
        prefork, _, inprocess = PPS_RELAYS[self.name]
        want = prefork * (1 if inprocess else 2) + 1
        wait_until(lambda: len(process_tree(self.pid)) >= want, 15,
                   f"{self.name}: {want} processes", self.alive)


class NginxRelay(Relay):
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
worker_processes 2;
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


class KeyserviceDaemon(Server):
    """pyprivsep with only a keyservice block: KEYSERVICE_CAS cas serving the
    certificate's key on workdir/run/bench.sock to `allow_user`."""

    name = "keyservice"

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
    bind 127.0.0.1:{self.port} ssl crt {self.cert["pem"]}
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
workers = 2
daemon = off
{'user = "nobody"' if os.getuid() == 0 else ""}
ocsp-dir = "{self.workdir}"
""")
        self.popen(["hitch", f"--config={conf}"])


def make_relay(name: str, workdir: Path, cert: dict[str, Path], backend_port: int) -> Relay:
    if name in PPS_RELAYS:
        return PyprivsepRelay(name, workdir, cert, backend_port)
    cls = {"nginx": NginxRelay, "nginx-keyservice": NginxKeyserviceRelay,
           "haproxy": HaproxyRelay, "hitch": HitchRelay}[name]
    return cls(name, workdir, cert, backend_port)


def nginx_worker_user() -> str:
    """Who nginx's workers run as: NGINX_USER when started as root, else us."""
    return NGINX_USER if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


def missing_tool(name: str) -> str | None:
    tool = {"nginx": "nginx", "nginx-keyservice": "nginx", "haproxy": "haproxy",
            "hitch": "hitch"}.get(name)
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


def run_cell(relay: Relay, measure: str, duration: float, clients: int,
             tls_args: list[str], workdir: Path) -> dict:
    """One measurement: `clients` loaders for `duration` seconds against the
    relay; its process tree's CPU time before and after."""
    port = relay.port
    procs: list[subprocess.Popen[str]] = []
    outs = [workdir / f"client{i}.out" for i in range(clients)]
    if measure in ("full", "resumed"):
        cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}",
               "-new" if measure == "full" else "-reuse",
               "-time", str(max(1, round(duration))), "-www", "/", *tls_args]
    else:
        # the same URL again and again over one connection: the glob is in
        # the fragment, which curl does not send
        url = f"https://127.0.0.1:{port}/bytes/{MIB}#[1-1000000]"
        # -w to stderr, which is unbuffered: curl is stopped by a signal
        cmd = ["curl", "-sS", "--http1.1", "--cacert", str(relay.cert["ca"]),
               "--max-time", str(int(duration) + 30), "-o", "/dev/null",
               "-w", "%{stderr}%{size_download}\n", *curl_tls(tls_args), url]
    busy0, total0 = machine_cpu()
    cpu0, roles0 = tree_cpu(*relay.cpu_roots())
    t0 = time.monotonic()
    files = [open(o, "w") for o in outs]
    try:
        for f in files:
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f,
                                          stderr=subprocess.STDOUT, text=True))
        if measure == "mib":
            time.sleep(duration)
            for p in procs:
                p.terminate()
        deadline = time.monotonic() + duration + 30
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        for p in procs:                     # interrupted: no client outlives the cell
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
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
    head = ("| cert | relay | full hs/s | CPU µs/full | resumed hs/s | CPU µs/resumed "
            "| resumed | MB/s | CPU µs/MiB |")
    lines = [head, "|------|-------|---:|---:|---:|---:|---:|---:|---:|"]
    for cert in certs:
        for relay in relays:
            r = results[cert][relay]
            if r.get("na"):
                lines.append(f"| {CERTS[cert]} | {relay} | n/a: {r['na']} |||||||")
                continue
            m = r["summary"]

            def cell(measure: str, key: str, spec: str = ".0f") -> str:
                if measure not in m:
                    return "–"                      # not measured
                return fmt(m[measure].get(key), spec)

            lines.append(
                f"| {CERTS[cert]} | {relay} | {cell('full', 'rate')} | "
                f"{cell('full', 'cpu_us_per_op')} | {cell('resumed', 'rate')} | "
                f"{cell('resumed', 'cpu_us_per_op')} | {cell('resumed', 'reused_fraction', '.0%')} | "
                f"{cell('mib', 'rate')} | {cell('mib', 'cpu_us_per_op')} |")
    return "\n".join(lines)


def roles_table(results: dict, relays: list[str], certs: list[str]) -> str:
    """pyprivsep's CPU per full handshake, split between its processes; for
    nginx-keyservice (and nginx, to compare) nginx's master and workers are
    the relay processes, the key service's cas and parent the others."""
    split = set(PPS_RELAYS) | ({"nginx", "nginx-keyservice"} if "nginx-keyservice" in relays
                               else set())
    lines = ["| cert | relay | relay processes µs | ca processes µs | parent µs | all µs |",
             "|---|---|---:|---:|---:|---:|"]
    for cert in certs:
        for relay in relays:
            r = results[cert][relay]
            full = {} if r.get("na") or relay not in split else r["summary"].get("full")
            if not full:
                continue
            by = full.get("cpu_us_per_op_by_role", {})
            own = (by.get("relay") if relay in PPS_RELAYS
                   else sum(v for k, v in by.items() if k not in ("ca", "parent")))
            lines.append(f"| {CERTS[cert]} | {relay} | {fmt(own)} | "
                         f"{fmt(by.get('ca')) if 'ca' in by else '–'} | "
                         f"{fmt(by.get('parent')) if 'parent' in by else '–'} | "
                         f"{fmt(full.get('cpu_us_per_op'))} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def targets(results: dict, certs: list[str]) -> tuple[str, dict]:
    """The issue's targets, reported (not asserted)."""
    def cpu(cert: str, relay: str, measure: str) -> float | None:
        r = results.get(cert, {}).get(relay)
        if not r or r.get("na"):
            return None
        return r["summary"].get(measure, {}).get("cpu_us_per_op")

    out, data = [], {}
    limits = {"rsa2048": 2.0, "p256": 10.0}
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
            ng = cpu(cert, "nginx", measure)
            v = cpu(cert, "pps-async", measure)
            if v is not None and ng:
                ratio = v / ng
                data[f"pps_async_vs_nginx_{measure}_{cert}"] = ratio
                out.append(f"| pps-async CPU per {label} / nginx's, {CERTS[cert]} | "
                           f"{ratio:.2f}× | ≈ 1× |")
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
               title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("full", "server CPU µs per full handshake"),
              ("resumed", "server CPU µs per resumed handshake"),
              ("mib", "server CPU µs per MiB downloaded")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(9, 1.3 * len(relays) + 2), 12))
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
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


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
    p.add_argument("--tls", default=env_default("BENCH_TLS", "default"),
                   choices=["default", "1.2", "1.3"], help="client TLS version (env BENCH_TLS)")
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
    a.relays = [r for r in a.relays.split(",") if r]
    a.certs = [c for c in a.certs.split(",") if c]
    a.measures = [m for m in a.measures.split(",") if m]
    for r in a.relays:
        if r not in ALL_RELAYS:
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
    for key in ("table", "targets_table", "roles_table"):
        if doc.get(key):
            print(doc[key], end="\n\n")
    png = path.with_suffix(".png")
    draw_chart(results, meta["relays"], meta["certs"], png,
               f"pyprivsep benchmark {meta['time']}\n{doc.get('header', '')}\n"
               "(bars: median; whiskers: min and max of the repeats; lower is better)")
    print(f"chart: {png}")
    return 0


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
    certs = make_certs()
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
        "versions": {
            "openssl": tool_version(["openssl", "version"]),
            "nginx": tool_version(["nginx", "-v"]),
            "haproxy": tool_version(["haproxy", "-v"]),
            "hitch": tool_version(["hitch", "--version"]),
            "curl": tool_version(["curl", "--version"]),
            "pyprivsep": tool_version([PYTHON, "-m", "pyprivsep", "-V"]),
        },
        "uid": os.getuid(),
    }
    n_cells = sum(len(a.measures if r not in ("pps-async-p1", "pps-blocking-p1")
                      else [m for m in a.measures if m in MEASURES_P1])
                  for r in a.relays) * a.repeats * len(a.certs)
    log(f"bench: {len(a.relays)} relays x {len(a.certs)} certs, {n_cells} cells of "
        f"{a.duration:g} s, {a.clients} clients; work dir {workdir}")
    results: dict[str, dict[str, dict]] = {c: {} for c in a.certs}
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
        log(f"backend: {backend.name} on 127.0.0.1:{backend.port}")
        for cert in a.certs:
            running: dict[str, Relay] = {}
            for name in a.relays:
                res = results[cert][name] = {"cells": []}
                why = missing_tool(name)
                if why:
                    res["na"] = why
                    log(f"{name}: n/a: {why}")
                    continue
                rdir = workdir / f"{cert}-{name}"
                rdir.mkdir()
                rdir.chmod(0o755)
                relay = make_relay(name, rdir, certs[cert], backend.port)
                servers.append(relay)
                try:
                    relay.start()
                except Exception as e:              # noqa: BLE001
                    tail = relay.log_tail()
                    res["na"] = f"could not start: {e}" + (f" ({tail.splitlines()[-1]})" if tail else "")
                    log(f"{name}: n/a: {res['na']}")
                    relay.stop()
                    continue
                running[name] = relay
                res["port"] = relay.port
                res["negotiated"] = tls_probe(relay.port, relay.cert["ca"], a.tls)
                # warm up: the first connections (imports, caches) are not measured
                run_cell(relay, "full", 1, 1, tls_args, cells_dir)
            log(f"{CERTS[cert]}: running {', '.join(f'{n}:{r.port}' for n, r in running.items())}")
            for rep in range(a.repeats):
                for name, relay in running.items():
                    measures = a.measures if name not in ("pps-async-p1", "pps-blocking-p1") \
                        else [m for m in a.measures if m in MEASURES_P1]
                    for measure in measures:
                        if not relay.alive():
                            results[cert][name]["na"] = "relay exited: " + relay.log_tail(200)
                            break
                        cell = run_cell(relay, measure, a.duration, a.clients, tls_args, cells_dir)
                        cell.update(measure=measure, repeat=rep)
                        results[cert][name]["cells"].append(cell)
                        extra = (f", {cell.get('reused_fraction', 0):.0%} resumed"
                                 if measure == "resumed" else "")
                        unit = "MB/s" if measure == "mib" else "hs/s"
                        log(f"  {CERTS[cert]:11s} {name:15s} {measure:7s} #{rep + 1}: "
                            f"{cell['rate']:8.1f} {unit}, "
                            f"{fmt(cell['cpu_us_per_op'], '.0f'):>6s} µs CPU/op{extra}"
                            f"  (machine {cell['machine_busy']:.0%} busy)")
                        time.sleep(0.2)
            for name, relay in running.items():
                relay.stop()
                servers.remove(relay)
                text = relay.log_tail(4000)
                if "Traceback" in text or "ERROR" in text:
                    results[cert][name]["log_tail"] = text[-1500:]
    finally:
        stop_all()

    for cert in a.certs:
        for name in a.relays:
            r = results[cert][name]
            r["summary"] = summarize(r["cells"])
            if not r.get("na") and not r["cells"]:
                r["na"] = "no measurement"
    table = markdown_table(results, a.relays, a.certs)
    target_table, target_data = targets(results, a.certs)
    busy = median([c["machine_busy"] for cert in a.certs for r in results[cert].values()
                   for c in r["cells"]])
    openssl = " ".join((meta["versions"]["openssl"] or "openssl ?").split()[:2])
    header = (f"{a.clients} clients, {a.duration:g} s per cell, median of {a.repeats}; "
              f"backend {meta['backend']}; TLS {a.tls}; {openssl}; {os.cpu_count()} CPUs")
    print()
    print(f"### pyprivsep benchmark {stamp}: {header}")
    print()
    print(table)
    print()
    print(target_table)
    print()
    split = roles_table(results, a.relays, a.certs)
    if split:
        print("pyprivsep's CPU per full handshake by process (medians; for nginx, its "
              "master and workers are the relay processes):")
        print()
        print(split)
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
           "header": header, "table": table, "targets_table": target_table, "roles_table": split,
           "micro": micro}
    out_json.write_text(json.dumps(doc, indent=1, default=str))
    try:
        draw_chart(results, a.relays, a.certs, png, f"pyprivsep benchmark {stamp}\n{header}\n"
                   "(bars: median; whiskers: min and max of the repeats; lower is better)")
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
