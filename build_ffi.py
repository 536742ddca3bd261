"""Build pyprivsep._rsaengine, the relay engine and key shim, with cffi.

API mode, out of line.  The cdef is src/_rsaengine/protocol.h and api.h
themselves (their integer #defines, structs and prototypes), so the wire
protocol and the C API are declared once, in C.

OPENSSL_PREFIX=/path builds against an OpenSSL or LibreSSL installed there
instead of the system's library.
"""
from __future__ import annotations

import glob
import os
import re

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


def library_flags() -> dict[str, list[str]]:
    prefix = os.environ.get("OPENSSL_PREFIX")
    if not prefix:
        return {"include_dirs": [], "library_dirs": [], "extra_link_args": []}
    lib = next((d for d in ("lib", "lib64")
                if os.path.isdir(os.path.join(prefix, d))), "lib")
    libdir = os.path.join(prefix, lib)
    return {
        "include_dirs": [os.path.join(prefix, "include")],
        "library_dirs": [libdir],
        "extra_link_args": [f"-Wl,-rpath,{libdir}"],
    }


ffibuilder = FFI()
ffibuilder.cdef(cdef_of(os.path.join(SRC, "protocol.h")) + "\n" +
                cdef_of(os.path.join(SRC, "api.h")))

flags = library_flags()
ffibuilder.set_source(
    "pyprivsep._rsaengine",
    '#include "engine.h"\n',
    sources=sorted(glob.glob(os.path.join("src", "_rsaengine", "*.c"))),
    include_dirs=[SRC] + flags["include_dirs"],
    library_dirs=flags["library_dirs"],
    libraries=["ssl", "crypto"],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-O2"],
    extra_link_args=flags["extra_link_args"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
