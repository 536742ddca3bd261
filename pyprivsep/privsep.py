"""Privilege separation for the children: titles, descriptors, chroot,
a user per role (relays cfg.user, cas cfg.ca_user), and the sandbox."""
from __future__ import annotations

import logging
import os
import pwd
import resource

from pyprivsep import native
from pyprivsep.config import Config, ConfigError, Where

log = logging.getLogger("pyprivsep")

try:
    from setproctitle import setproctitle as _setproctitle
except ImportError:             # pragma: no cover - a plain name is enough
    _setproctitle = None


def set_title(title: str) -> None:
    """`pyprivsep: relay 1` in ps(1) and /proc/PID/cmdline."""
    if _setproctitle is not None:
        _setproctitle(f"pyprivsep: {title}")


def is_root() -> bool:
    return os.geteuid() == 0


def close_fds_except(keep: set[int]) -> None:
    """Close every descriptor above stderr that the process does not need."""
    fds = sorted(fd for fd in keep if fd > 2)
    low = 3
    for fd in fds:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def prepare_chroot(cfg: Config) -> None:
    """The parent makes sure the empty chroot directory exists (as root)."""
    if is_root() and not os.path.isdir(cfg.chroot):
        os.makedirs(cfg.chroot, mode=0o755)


# How to make a missing user; `make users` runs the same for both.
USERADD = ("useradd --system --user-group --no-create-home "
           "--home-dir /var/empty --shell /usr/sbin/nologin")


def role_user(cfg: Config, role: str) -> str:
    """The user a role runs as: relays cfg.user, cas (keyservice cas too)
    cfg.ca_user."""
    return cfg.ca_user if role in ("ca", "keyservice") else cfg.user


def check_users(cfg: Config) -> None:
    """As root, before anything forks: both users must exist, else a
    ConfigError saying which and how to create it (a child that cannot
    setuid would only die and be restarted, forever)."""
    if not is_root():
        return
    for user, where, what in ((cfg.user, cfg.user_where, "user"),
                              (cfg.ca_user, cfg.ca_user_where, "ca user")):
        try:
            pwd.getpwnam(user)
        except KeyError:
            w = where or Where(cfg.path, 0)
            raise ConfigError(w.file, w.line,
                              f'{what} "{user}" does not exist: create it '
                              f"with `make users` or `{USERADD} {user}`") from None


def drop_privileges(cfg: Config, role: str, chroot: bool = True) -> None:
    """chroot to the empty directory and become the role's user, when root.
    Relays and cas have users of their own: a relay cannot signal, trace
    or limit a ca, nor any other daemon's process.  A ca whose keys are in
    a PKCS#11 token (chroot False) stays out of the chroot, since the
    module reads its configuration and tokens (SoftHSM) or connects its
    server's socket (p11-kit-client) at every reopening, and keeps the
    supplementary groups of `ca user` (the softhsm group gives the tokens)."""
    if not is_root():
        return
    user = role_user(cfg, role)
    pw = pwd.getpwnam(user)
    if not chroot:
        os.chdir("/")
        os.initgroups(user, pw.pw_gid)
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
        if os.getresuid() != (pw.pw_uid,) * 3:        # pragma: no cover
            raise RuntimeError(f"could not become user {user}")
        return
    os.chroot(cfg.chroot)
    os.chdir("/")
    os.setgroups([pw.pw_gid])
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    if os.getresuid() != (pw.pw_uid,) * 3:        # pragma: no cover
        raise RuntimeError(f"could not become user {user}")


# A ca runs at a lower priority than the relays and programs it serves, so
# that one that has work (its other sessions' bytes) takes the CPU from a ca
# in the middle of a long signature (RSA-4096: milliseconds) at once: the
# signature is not late for it, the waiting session's round trip is.
# Relative to the daemon's own priority (os.nice), so that a daemon started
# niced (nice -n 19 make test) still can: a ca that is no longer root may
# raise its nice value but not lower it, and the kernel stops at 19.
CA_NICE = 10


def sandbox(role: str, pkcs11: bool = False) -> None:
    """The last step before a relay's or a ca's loop: from here on the
    process can do only what its role needs (src/_rsaengine/sandbox.c).
    After drop_privileges (setuid resets the dumpable flag the ca clears,
    and chroot needs a syscall the filter refuses)."""
    if role in ("ca", "keyservice"):
        os.nice(CA_NICE)
    native.sandbox(role, pkcs11)
