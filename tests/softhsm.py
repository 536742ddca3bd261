"""A SoftHSM token made in a directory, and a `p11-kit server` exporting it
on a UNIX socket: what the PKCS#11 tests, the fleet simulation and the
bench's token rows sign with.

Standard library only (bench/run.py imports it too).  Debian's softhsm2
(softhsm2-util, libsofthsm2.so), opensc (pkcs11-tool) and p11-kit
(p11-kit, p11-kit-modules' client module); ``missing()`` says which is
absent, for a skip.

    token = make_token(tmp_path / "hsm")            # label "web", a random PIN
    uri = token.import_key(key_pem, "www")          # a PKCS#8 PEM key file
    spki = token.generate_key("p256", "gen")        # made on the token, never extractable
    token.pkcs11_line()                             # pyprivsep's `pkcs11` line for it
    with P11KitServer(token, tmp_path / "p11.sock") as server:
        server.address                              # "unix:path=/.../p11.sock"
        token.pkcs11_line(server)                   # the line through the server

The token's files live in ``token.directory``; a process using the token
through SoftHSM directly needs ``token.env`` (SOFTHSM2_CONF) and read and
write access to them (``token.give_to(user)``); through p11-kit it needs
only to connect to the socket (``P11KitServer``'s ``user`` and ``mode``).
tests/tokenkeys.py adds what the PKCS#11 tests need on top (certificates
from a test issuer, KeyPairs).
"""

from __future__ import annotations

import contextlib
import glob
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
# p11-kit's client module: the PKCS#11 module a process loads to reach a
# `p11-kit server` (P11_KIT_SERVER_ADDRESS names the server)
P11KIT_CLIENT_GLOB = "/usr/lib/*/pkcs11/p11-kit-client.so"
TOKEN_LABEL = "web"

KeyKind = Literal["rsa2048", "p256"]
_PKCS11_TOOL_TYPES: dict[str, str] = {"rsa2048": "rsa:2048", "p256": "EC:prime256v1"}


def p11kit_client_module() -> Path | None:
    found = sorted(glob.glob(P11KIT_CLIENT_GLOB))
    return Path(found[0]) if found else None


def missing(*, p11kit: bool = False) -> str | None:
    """Why a token (and, with p11kit, a p11-kit server and its client
    module) cannot be made here; None when it can."""
    if not SOFTHSM_MODULE.exists() or shutil.which("softhsm2-util") is None:
        return "softhsm2 is not installed (apt-get install softhsm2)"
    if shutil.which("pkcs11-tool") is None:
        return "pkcs11-tool is not installed (apt-get install opensc)"
    if p11kit:
        if shutil.which("p11-kit") is None:
            return "p11-kit is not installed (apt-get install p11-kit)"
        if p11kit_client_module() is None:
            return f"p11-kit's client module is not installed ({P11KIT_CLIENT_GLOB}; p11-kit-modules)"
    return None


def _run(args: list[str], env: dict[str, str], what: str) -> str:
    proc = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): $ {' '.join(args)}\n"
                           f"{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


@dataclass(frozen=True)
class Token:
    """An initialised SoftHSM token in ``directory`` (its softhsm2.conf, its
    token files under tokens/, the PIN in pin.txt, mode 0600)."""

    directory: Path
    label: str
    pin: str

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def pin_file(self) -> Path:
        return self.directory / "pin.txt"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that loads SoftHSM for this token."""
        return {"SOFTHSM2_CONF": str(self.conf)}

    def full_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def uri(self, label: str, key_id: str | None = None) -> str:
        """The RFC 7512 URI of the private key labelled ``label`` (and, given,
        with CKA_ID ``key_id``, hex)."""
        uri = f"pkcs11:token={self.label};object={label}"
        if key_id is not None:      # percent-encoded bytes
            uri += ";id=" + "".join(f"%{key_id[i:i + 2]}" for i in range(0, len(key_id), 2))
        return uri + ";type=private"

    def tool(self, *args: str) -> str:
        """pkcs11-tool on the token, through SoftHSM, logged in: its output."""
        return _run(["pkcs11-tool", "--module", str(SOFTHSM_MODULE), "--token-label", self.label,
                     "--login", "--pin", self.pin, *args], self.full_env(), f"pkcs11-tool {args[0]}")

    def pkcs11_line(self, server: P11KitServer | None = None) -> str:
        """pyprivsep's `pkcs11` line for this token: SoftHSM loaded in the
        ca, or through ``server`` with p11-kit's client module."""
        if server is None:
            return f'pkcs11 module "{SOFTHSM_MODULE}" pin "file:{self.pin_file}"'
        return (f'pkcs11 module "{p11kit_client_module()}" pin "file:{self.pin_file}" '
                f'server "{server.address}"')

    def import_key(self, key_pem: Path, label: str, key_id: str = "01") -> str:
        """Imports a PKCS#8 PEM private key (unencrypted) as ``label`` with
        CKA_ID ``key_id`` (hex); returns its URI."""
        _run(["softhsm2-util", "--import", str(key_pem), "--token", self.label, "--label", label,
              "--id", key_id, "--pin", self.pin], self.full_env(), f"importing {key_pem}")
        return self.uri(label)

    def generate_key(self, kind: KeyKind, label: str, key_id: str = "02", *,
                     always_auth: bool = False) -> bytes:
        """A key pair made on the token (sensitive, never extractable; with
        ``always_auth`` CKA_ALWAYS_AUTHENTICATE: a login for each
        signature); returns the public key as DER SubjectPublicKeyInfo (for
        a certificate of it)."""
        self.tool("--keypairgen", "--key-type", _PKCS11_TOOL_TYPES[kind], "--label", label,
                  "--id", key_id, "--usage-sign", "--sensitive", *(["--always-auth"] if always_auth else []))
        out = self.directory / f"{label}.pub.der"
        self.tool("--read-object", "--type", "pubkey", "--id", key_id, "-o", str(out))
        return out.read_bytes()

    def objects(self) -> str:
        """pkcs11-tool's listing of the token's objects (for messages)."""
        return self.tool("--list-objects")

    def give_to(self, user: str) -> None:
        """The token's directory and files owned by ``user`` (SoftHSM opens
        and locks the token files for every session), reachable by it."""
        entry = pwd.getpwnam(user)
        for root, dirs, files in os.walk(self.directory):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, entry.pw_uid, entry.pw_gid)
        os.chown(self.pin_file, 0, 0)     # the PIN is read by the parent, as root


def make_token(directory: Path, label: str = TOKEN_LABEL, pin: str | None = None) -> Token:
    """A fresh SoftHSM token in ``directory`` (made if missing): its
    configuration, an initialised token ``label`` with a random user PIN and
    SO PIN, and the PIN file (0600, no newline)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokens").mkdir(mode=0o700, exist_ok=True)
    token = Token(directory, label, pin or secrets.token_hex(8))
    token.conf.write_text(f"directories.tokendir = {directory / 'tokens'}\n"
                          "objectstore.backend = file\nlog.level = ERROR\n")
    fd = os.open(token.pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token.pin)
    _run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", token.pin,
          "--so-pin", secrets.token_hex(8)], token.full_env(), f"initialising token {label}")
    return token


class P11KitServer:
    """``p11-kit server -f`` exporting ``token`` on the UNIX socket
    ``socket``: started by ``start()`` or ``with``, ready when the socket
    answers; ``stop()`` ends it and every p11-kit-remote it forked, and
    removes the socket.

    p11-kit makes the socket mode 0600 (its umask) and root's, or, given
    ``user``, that user's and its group's (``-u`` and ``-g``), and then
    lets no other uid in (it checks the peer's credentials: not even
    root).  ``mode``: the socket's mode, set once it listens (0o666: any
    uid may connect, root and a ca's user alike; who can reach the socket's
    directory is then the only limit).  Whoever connects needs to reach the
    socket's directory."""

    def __init__(self, token: Token, socket: Path, *, user: str | None = None,
                 mode: int | None = None, provider: Path = SOFTHSM_MODULE,
                 prefix: list[str] | None = None) -> None:
        self.token = token
        self.socket = socket
        self.user = user
        self.mode = mode
        self.provider = provider
        self.prefix = prefix or []      # e.g. taskset -c 1
        self.proc: subprocess.Popen[str] | None = None
        self.log = socket.with_name(socket.name + ".log")

    @property
    def address(self) -> str:
        """P11_KIT_SERVER_ADDRESS for a client module."""
        return f"unix:path={self.socket}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client_env(self) -> dict[str, str]:
        return {"P11_KIT_SERVER_ADDRESS": self.address}

    def start(self, timeout: float = 30.0) -> Self:
        args = [*self.prefix, "p11-kit", "server", "-f", "--provider", str(self.provider),
                "-n", str(self.socket)]
        if self.user:
            # -u and -g both, or the socket is not given to the user (and
            # stays root's, mode 0711: no one else can connect)
            group = grp.getgrgid(pwd.getpwnam(self.user).pw_gid).gr_name
            args += ["-u", self.user, "-g", group]
        args.append(f"pkcs11:token={self.token.label}")
        self.socket.unlink(missing_ok=True)     # a crashed run's: p11-kit would not bind
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(args, env=self.token.full_env(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        # it prints P11_KIT_SERVER_ADDRESS=unix:path=SOCKET once listening
        while f"P11_KIT_SERVER_ADDRESS={self.address}" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text()
                self.stop()
                raise RuntimeError(f"p11-kit server did not start: $ {' '.join(args)}\n{text}")
            time.sleep(0.05)
        if self.mode is not None:
            self.socket.chmod(self.mode)
        if not self.answers():
            listing = self.listing()
            self.stop()
            raise RuntimeError(f"p11-kit server on {self.socket} lists no token {self.token.label}:\n"
                               f"{listing}\n{self.log.read_text()}")
        return self

    def answers(self) -> bool:
        """Whether a client through p11-kit's client module sees the token
        (a client running as ``user`` when given: the server lets only one
        uid in, root by default)."""
        return re.search(rf"token label\s*:\s*{re.escape(self.token.label)}\s*$",
                         self.listing(), re.M) is not None

    def listing(self) -> str:
        """pkcs11-tool's list of the slots the server exports."""
        client = p11kit_client_module()
        if client is None:
            return "no p11-kit client module"
        prefix = ([] if self.user is None else
                  ["setpriv", f"--reuid={self.user}", f"--regid={pwd.getpwnam(self.user).pw_gid}",
                   "--clear-groups"])
        proc = subprocess.run([*prefix, "pkcs11-tool", "--module", str(client), "--list-token-slots"],
                              env={**os.environ, **self.client_env()}, capture_output=True,
                              text=True, timeout=60)
        return proc.stdout + proc.stderr

    def stop(self) -> None:
        """The server and the p11-kit-remote it forked for each client (its
        process group; they would go on serving the clients connected):
        an outage for every client.  SIGTERM, then SIGKILL for what is
        left; returns once no process of the group is left (RuntimeError
        if one outlives 30 s), and removes the socket."""
        if self.proc is not None:
            proc, pgid = self.proc, self.proc.pid
            self.proc = None
            _killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            deadline = time.monotonic() + 30
            while _group_alive(pgid):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"p11-kit server {pgid}: its process group outlived SIGKILL")
                _killpg(pgid, signal.SIGKILL)
                time.sleep(0.05)
                proc.poll()         # the server's zombie, reaped, leaves the group
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
