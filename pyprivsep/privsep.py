"""Privilege separation for the children: titles, descriptors, chroot,
unprivileged user, and the ca's extra hardening."""
from __future__ import annotations

import logging
import os
import pwd
import resource

from pyprivsep import native
from pyprivsep.config import Config

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


def drop_privileges(cfg: Config) -> None:
    """chroot to the empty directory and become cfg.user, when root."""
    if not is_root():
        return
    pw = pwd.getpwnam(cfg.user)
    os.chroot(cfg.chroot)
    os.chdir("/")
    os.setgroups([pw.pw_gid])
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    if os.getresuid() != (pw.pw_uid,) * 3:        # pragma: no cover
        raise RuntimeError(f"could not become user {cfg.user}")


def harden() -> None:
    """The ca: no core dumps, not dumpable or traceable, pledged on OpenBSD
    (after setuid, which resets the dumpable flag)."""
    native.harden()
