"""Build pyprivsep._rsaengine, the relay engine and key shim, with cffi.

API mode, out of line.  The cdef is src/_rsaengine/protocol.h and api.h
themselves (their integer #defines, structs and prototypes), so the wire
protocol and the C API are declared once, in C.

The TLS library: OPENSSL_PREFIX=/path builds against an OpenSSL or LibreSSL
installed there (PATH/include, PATH/lib, found again at run time through an
rpath); without it, the one pkg-config knows as "openssl"; without
pkg-config, the compiler's default.  The build says which library and
version it compiles against, and refuses one too old to work: OpenSSL
before 3.0 (1.1.1 is out of support and untested here), LibreSSL before 3.8.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "src", "_rsaengine")
_DEFINE = re.compile(r"#define\s+\w+\s+-?\d+\b")


def cdef_of(path: str) -> str:
    """A header as cffi's cdef accepts it: integer #defines and C, no other
    preprocessor lines, no comments (they may hold '#')."""
    with open(path, encoding="ascii") as f:
        text = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            m = _DEFINE.match(line.strip())
            if m is None:
                continue
            line = m.group(0)
        lines.append(line)
    return "\n".join(lines)


# The oldest libraries the C side works with (see README.md).
OPENSSL_MIN = (0x30000000, "3.0")
LIBRESSL_MIN = (0x30800000, "3.8")


def add_pkg_config(flags: dict[str, list[str]], out: str, *, libraries: bool) -> None:
    """`pkg-config --cflags --libs` output into flags: include and library
    directories (each with an rpath), the -l names when `libraries`, and
    any other compiler argument."""
    for arg in shlex.split(out):
        if arg.startswith("-I"):
            flags["include_dirs"].append(arg[2:])
        elif arg.startswith("-L"):
            flags["library_dirs"].append(arg[2:])
            flags["link_args"].append(f"-Wl,-rpath,{arg[2:]}")
        elif arg.startswith("-l"):
            if libraries:
                flags["libraries"].append(arg[2:])
        else:
            flags["compile_args"].append(arg)


def library_flags() -> tuple[dict[str, list[str]], str]:
    """Compiler and linker flags for the TLS library, and where it is from."""
    flags: dict[str, list[str]] = {"include_dirs": [], "library_dirs": [],
                                   "compile_args": [], "link_args": []}
    prefix = os.environ.get("OPENSSL_PREFIX")
    if prefix:
        prefix = os.path.abspath(prefix)
        if not os.path.isfile(os.path.join(prefix, "include", "openssl", "ssl.h")):
            sys.exit(f"build_ffi: OPENSSL_PREFIX={prefix}: no "
                     f"include/openssl/ssl.h there; point it at an installed "
                     f"OpenSSL or LibreSSL")
        lib = next((d for d in ("lib", "lib64")
                    if os.path.isdir(os.path.join(prefix, d))), "lib")
        libdir = os.path.join(prefix, lib)
        flags["include_dirs"].append(os.path.join(prefix, "include"))
        flags["library_dirs"].append(libdir)
        flags["link_args"].append(f"-Wl,-rpath,{libdir}")
        return flags, f"OPENSSL_PREFIX={prefix}"
    try:
        out = subprocess.run(["pkg-config", "--cflags", "--libs", "openssl"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return flags, "the compiler's default: no pkg-config openssl"
    add_pkg_config(flags, out, libraries=False)  # ssl and crypto, named below
    return flags, "pkg-config openssl"


_PROBE = r"""
#include <stdio.h>
#include <openssl/opensslv.h>
int
main(void)
{
#ifdef LIBRESSL_VERSION_NUMBER
	printf("LibreSSL\n%lx\n%s\n", (unsigned long)LIBRESSL_VERSION_NUMBER,
	    LIBRESSL_VERSION_TEXT);
#else
	printf("OpenSSL\n%lx\n%s\n", (unsigned long)OPENSSL_VERSION_NUMBER,
	    OPENSSL_VERSION_TEXT);
#endif
	return 0;
}
"""


def library_version(flags: dict[str, list[str]]) -> tuple[str, int, str]:
    """(OpenSSL or LibreSSL, version number, version text) from the headers
    the extension will be compiled with: a tiny program prints them."""
    cc = shlex.split(os.environ.get("CC") or
                     sysconfig.get_config_var("CC") or "cc")
    tmp = tempfile.mkdtemp(prefix="pyprivsep-probe-")
    try:
        src, exe = os.path.join(tmp, "probe.c"), os.path.join(tmp, "probe")
        with open(src, "w", encoding="ascii") as f:
            f.write(_PROBE)
        cmd = [*cc, *flags["compile_args"],
               *(f"-I{d}" for d in flags["include_dirs"]), src, "-o", exe]
        try:
            build = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            sys.exit(f"build_ffi: no C compiler: {e}")
        if build.returncode != 0:
            sys.exit("build_ffi: cannot compile against the TLS library's "
                     f"headers ({' '.join(cmd)}):\n{build.stderr}")
        kind, number, text = subprocess.run(
            [exe], capture_output=True, text=True, check=True
        ).stdout.splitlines()[:3]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kind, int(number, 16), text


# What a build depends on besides the sources: the library (which, which
# version, from where, with which flags) and the compiler settings and build
# choices from the environment.  setup.py builds everything again when this
# differs from the last build's, since file times cannot tell.
BUILD_ENV = ("CC", "CFLAGS", "CPPFLAGS", "LDFLAGS", "LDSHARED",
             "PYPRIVSEP_POLLER", "KQUEUE_PREFIX")


def library_identity(flags: dict[str, list[str]], origin: str) -> dict:
    return {"library": list(library_version(flags)), "origin": origin,
            "flags": flags, "env": {k: os.environ.get(k) for k in BUILD_ENV}}


# The library compiled against (src/_rsaengine/libversion.h) and the one
# loaded, for pyprivsep/native.py's check at import.
LIBVERSION_CDEF = """
#define PPS_BUILT_OPENSSL ...
#define PPS_BUILT_LIBRESSL ...
static const char *const PPS_BUILT_TEXT;
unsigned long OpenSSL_version_num(void);
"""


def check_library(flags: dict[str, list[str]], origin: str) -> None:
    """Say which library this is; refuse one too old."""
    kind, number, text = library_version(flags)
    least, name = LIBRESSL_MIN if kind == "LibreSSL" else OPENSSL_MIN
    if number < least:
        sys.exit(f"build_ffi: {text} ({origin}) is too old: pyprivsep needs "
                 f"{kind} {name} or later")
    print(f"build_ffi: compiling against {text} ({origin})", file=sys.stderr)


# The event loop's poller (src/_rsaengine/poller.c).  Chosen here and only
# here: PYPRIVSEP_POLLER (the Makefile's POLLER) "epoll" or "kqueue" becomes
# -DPPS_POLLER_EPOLL or -DPPS_POLLER_KQUEUE; unset, nothing is defined and
# engine.h takes the system's own (epoll on Linux, kqueue on the BSDs).
# kqueue where the system has none (Linux) needs a kqueue library, libkqueue:
# KQUEUE_PREFIX=/path (headers in PATH/include/kqueue, as libkqueue installs
# them, libraries in PATH/lib, found again at run time through an rpath),
# else `pkg-config libkqueue`.
def poller_flags() -> tuple[dict[str, list[str]], str]:
    flags: dict[str, list[str]] = {"include_dirs": [], "library_dirs": [],
                                   "libraries": [], "macros": [],
                                   "compile_args": [], "link_args": []}
    poller = os.environ.get("PYPRIVSEP_POLLER", "")
    if poller == "":
        return flags, "the system's (epoll on Linux, kqueue on the BSDs)"
    if poller not in ("epoll", "kqueue"):
        sys.exit(f"build_ffi: PYPRIVSEP_POLLER={poller}: epoll or kqueue")
    flags["macros"].append((f"PPS_POLLER_{poller.upper()}", "1"))
    if poller == "epoll" or not sys.platform.startswith("linux"):
        return flags, poller
    prefix = os.environ.get("KQUEUE_PREFIX")
    if prefix:
        prefix = os.path.abspath(prefix)
        inc = os.path.join(prefix, "include", "kqueue")
        if not os.path.isfile(os.path.join(inc, "sys", "event.h")):
            sys.exit(f"build_ffi: KQUEUE_PREFIX={prefix}: no "
                     "include/kqueue/sys/event.h there; point it at an "
                     "installed libkqueue")
        lib = next((d for d in ("lib", "lib64")
                    if os.path.isdir(os.path.join(prefix, d))), "lib")
        libdir = os.path.join(prefix, lib)
        flags["include_dirs"].append(inc)
        flags["library_dirs"].append(libdir)
        flags["link_args"].append(f"-Wl,-rpath,{libdir}")
        flags["libraries"].append("kqueue")
        return flags, f"kqueue, libkqueue from KQUEUE_PREFIX={prefix}"
    try:
        out = subprocess.run(["pkg-config", "--cflags", "--libs", "libkqueue"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        sys.exit("build_ffi: PYPRIVSEP_POLLER=kqueue on Linux needs libkqueue: "
                 "set KQUEUE_PREFIX to where it is installed, or make "
                 "`pkg-config libkqueue` find it (PKG_CONFIG_PATH)")
    add_pkg_config(flags, out, libraries=True)
    return flags, "kqueue, libkqueue from pkg-config libkqueue"


# PKCS#11 (src/_rsaengine/p11.c): the header of p11-kit (libp11-kit-dev),
# `pkg-config p11-kit-1 --cflags`; the module itself is dlopen()ed by a ca
# at run time, nothing is linked.
def pkcs11_include_dirs() -> list[str]:
    try:
        out = subprocess.run(["pkg-config", "--cflags", "p11-kit-1"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        if os.path.isfile("/usr/include/p11-kit-1/p11-kit/pkcs11.h"):
            return ["/usr/include/p11-kit-1"]
        sys.exit("build_ffi: no p11-kit/pkcs11.h: install libp11-kit-dev "
                 "(`pkg-config p11-kit-1` finds it)")
    return [a[2:] for a in shlex.split(out) if a.startswith("-I")]


ffibuilder = FFI()
ffibuilder.cdef(cdef_of(os.path.join(SRC, "protocol.h")) + "\n" +
                cdef_of(os.path.join(SRC, "api.h")) + LIBVERSION_CDEF)

flags, origin = library_flags()
check_library(flags, origin)
poller, poller_origin = poller_flags()
print(f"build_ffi: poller: {poller_origin}", file=sys.stderr)
ffibuilder.set_source(
    "pyprivsep._rsaengine",
    '#include "engine.h"\n#include "libversion.h"\n',
    sources=sorted(glob.glob(os.path.join("src", "_rsaengine", "*.c"))),
    include_dirs=([SRC] + flags["include_dirs"] + poller["include_dirs"] +
                  pkcs11_include_dirs()),
    library_dirs=flags["library_dirs"] + poller["library_dirs"],
    libraries=["ssl", "crypto"] + poller["libraries"],
    define_macros=poller["macros"],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-O2",
                        *flags["compile_args"], *poller["compile_args"]],
    extra_link_args=flags["link_args"] + poller["link_args"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
