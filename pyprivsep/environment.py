"""The daemon's environment: only what it needs.

The relays and cas are forked, not executed, so whatever the daemon's
environment held (a DB_PASSWORD meant for another program) would be copied
into every child's memory, where a relay's memory leak could show it;
clearing os.environ after fork would not help, the strings stay on the
stack.  So the daemon executes itself again at start, same pid, with only
the variables below; and each child clears even those it does not use.

Kept (documented in pyprivsep(8), ENVIRONMENT):

- PATH, LANG, LC_*, TZ: the usual process context;
- OPENSSL_*: OPENSSL_CONF, OPENSSL_MODULES, ... for the TLS library;
- PYTHONPATH, PYTHONHOME: to find the package again; PYTHONUNBUFFERED;
- LD_LIBRARY_PATH, LD_PRELOAD, ASAN_OPTIONS, LSAN_OPTIONS: to find the
  libraries, and `make asan` runs the daemon with the sanitizer preloaded;
- SOFTHSM2_CONF: where SoftHSM, a `pkcs11 module`, finds its tokens (kept
  in the children too: a ca loads the module; a path, no secret).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

KEEP = frozenset({
    "PATH", "LANG", "TZ", "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "ASAN_OPTIONS", "LSAN_OPTIONS",
    "SOFTHSM2_CONF",
})
KEEP_PREFIXES = ("LC_", "OPENSSL_")

# What a child still reads after fork: OpenSSL loads its configuration in
# the relay, at its first SSL_CTX; syslog(3) stamps the time with TZ.
# Everything else goes.
CHILD_KEEP = frozenset({"TZ", "SOFTHSM2_CONF"})
CHILD_KEEP_PREFIXES = ("OPENSSL_",)


def kept(env: Mapping[str, str]) -> dict[str, str]:
    """The part of env the daemon runs with."""
    return {k: v for k, v in env.items()
            if k in KEEP or k.startswith(KEEP_PREFIXES)}


def reexec_clean(args: list[str]) -> None:
    """Execute the daemon again with only the kept variables, when the
    environment has any other; returns only when it has none.  execve keeps
    the pid, which the caller (a test, systemd, an rc script) tracks."""
    env = kept(os.environ)
    if env.keys() == os.environ.keys():
        return
    if not sys.executable:      # an embedded interpreter: nothing to execute
        raise SystemExit("pyprivsep: cannot execute itself again with a clean "
                         "environment: no sys.executable")
    # the same interpreter flags (-X, -W, -O, ...): the same Python
    flags = subprocess._args_from_interpreter_flags()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable,
              [sys.executable, *flags, "-m", "pyprivsep", *args], env)


def _clear_for_child() -> None:
    for name in list(os.environ):
        if name not in CHILD_KEEP and not name.startswith(CHILD_KEEP_PREFIXES):
            del os.environ[name]        # unsetenv(3) too


def clear_in_children() -> None:
    """Every process the daemon forks from now on (relays, cas, reload's
    key check) starts with an environment cleared of what it does not use."""
    os.register_at_fork(after_in_child=_clear_for_child)
