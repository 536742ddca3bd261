"""What of the OpenBSD build can be checked on Linux, before anyone runs it
on OpenBSD.

- The C: every file of src/_rsaengine compiles with -Wall -Wextra -Werror
  as on OpenBSD (-U__linux__ -D__OpenBSD__): the kqueue poller, pledge(2)
  in the sandbox, SO_PEERCRED into a struct sockpeercred, the plain send
  and recv where Linux batches.  tests/openbsd/ declares, with OpenBSD's
  prototypes, what glibc lacks (pledge, unveil, struct sockpeercred,
  <sys/event.h>).  The headers are still glibc's and the TLS library's the
  system's; it proves the OpenBSD branches are valid C with the right
  calls, not that they link or run there.
- contrib/pyprivsep.rc, the rc.d(8) script, parses (sh -n; and ksh -n where
  a ksh is installed: OpenBSD's /bin/ksh is a pdksh).

Each check is shown able to fail: a wrong pledge call does not compile
with the stubs, a broken script does not parse.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from basics import REPO_ROOT

SRC = REPO_ROOT / "src" / "_rsaengine"
STUBS = REPO_ROOT / "tests" / "openbsd"
RC_SCRIPT = REPO_ROOT / "contrib" / "pyprivsep.rc"

CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")

# What each file's OpenBSD branch must hold, and its Linux branch, which
# must be gone (seen in the preprocessed text), so that a compile that
# quietly took the other branch fails.
OPENBSD_CALLS = {
    "sandbox.c": ("pledge(", "prctl("),
    "poller.c": ("kevent(kq", "epoll_wait(pfd"),
    "ca.c": ("struct sockpeercred", "recvmmsg(io->fd"),
}


def openssl_cflags(package: str = "openssl") -> list[str]:
    try:
        out = subprocess.run(["pkg-config", "--cflags", package],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return shlex.split(out)


def as_on_openbsd(source: Path, *extra: str) -> list[str]:
    assert CC is not None
    return [CC, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2",
            "-U__linux__", "-D__OpenBSD__", f"-I{STUBS}",
            "-include", str(STUBS / "openbsd.h"), f"-I{SRC}",
            *openssl_cflags(), *openssl_cflags("p11-kit-1"),  # p11.c: p11-kit's pkcs11.h
            *extra, str(source)]


@needs_cc
@pytest.mark.parametrize("name", sorted(p.name for p in SRC.glob("*.c")))
def test_compiles_as_on_openbsd(name: str) -> None:
    source = SRC / name
    r = subprocess.run(as_on_openbsd(source, "-c", "-o", "/dev/null"),
                       capture_output=True, text=True)
    assert r.returncode == 0, f"{name} as on OpenBSD:\n{r.stderr}"
    if name in OPENBSD_CALLS:
        openbsd, linux = OPENBSD_CALLS[name]
        pre = subprocess.run(as_on_openbsd(source, "-E", "-P"),
                             capture_output=True, text=True, check=True).stdout
        assert openbsd in pre, f"{name}: its OpenBSD branch ({openbsd}) was not compiled"
        assert linux not in pre, f"{name}: its Linux branch ({linux}) was compiled"


@needs_cc
def test_the_stubs_catch_a_wrong_call(tmp_path: Path) -> None:
    """pledge() has OpenBSD's two arguments: a call with one is an error."""
    bad = tmp_path / "bad.c"
    bad.write_text('#include <unistd.h>\nint\nmain(void)\n{\n'
                   '\treturn pledge("stdio");\n}\n')
    r = subprocess.run(as_on_openbsd(bad, "-c", "-o", "/dev/null"),
                       capture_output=True, text=True)
    assert r.returncode != 0 and "pledge" in r.stderr, r.stderr


def shells() -> list[str]:
    return [sh for sh in ("sh", "ksh", "mksh") if shutil.which(sh)]


@pytest.mark.parametrize("shell", shells())
def test_rc_script_parses(shell: str, tmp_path: Path) -> None:
    r = subprocess.run([shell, "-n", str(RC_SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, f"{shell} -n {RC_SCRIPT}:\n{r.stderr}"
    broken = tmp_path / "broken.rc"
    broken.write_text(RC_SCRIPT.read_text() + "\nrc_reload() {\n\tif then\n")
    r = subprocess.run([shell, "-n", str(broken)], capture_output=True, text=True)
    assert r.returncode != 0, f"{shell} -n accepted a broken script"
