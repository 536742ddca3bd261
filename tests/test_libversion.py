"""The library you build against is the library you run (issue 15).

At import, pyprivsep.native refuses an extension that runs with another
TLS library than it was compiled against (check_library); a build for
another library compiles and links everything again, where setuptools used
to keep the last library's objects and .so in build/ (setup.py BuildExt).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pyprivsep import _rsaengine, native
from pyprivsep.native import LibraryMismatch, check_library

ROOT = Path(__file__).resolve().parents[1]

OPENSSL_3_0_19 = (0x30000130, "OpenSSL 3.0.19 27 Jan 2026")
OPENSSL_3_0_20 = (0x30000140, "OpenSSL 3.0.20 1 Jul 2026")
OPENSSL_3_5_9 = (0x30500090, "OpenSSL 3.5.9 1 Oct 2026")
OPENSSL_4_0_2 = (0x40000020, "OpenSSL 4.0.2 25 Aug 2026")
LIBRESSL_FIXED = 0x20000000          # LibreSSL's OpenSSL_version_num()
LIBRESSL_4_3_2 = (0x4030200f, "LibreSSL 4.3.2")


def built_openssl(version: tuple[int, str]) -> tuple[int, int, str]:
    return version[0], 0, version[1]


def built_libressl(version: tuple[int, str]) -> tuple[int, int, str]:
    return LIBRESSL_FIXED, version[0], version[1]


@pytest.mark.parametrize("built, loaded_number, loaded_text", [
    (built_openssl(OPENSSL_4_0_2), *OPENSSL_3_0_19),
    (built_openssl(OPENSSL_3_0_19), *OPENSSL_4_0_2),
    (built_openssl(OPENSSL_3_0_19), *OPENSSL_3_5_9),
    (built_openssl(OPENSSL_3_5_9), *OPENSSL_3_0_19),
    (built_openssl(OPENSSL_3_0_19), LIBRESSL_FIXED, "LibreSSL 4.3.2"),
    (built_libressl(LIBRESSL_4_3_2), *OPENSSL_3_0_19),
    (built_libressl(LIBRESSL_4_3_2), LIBRESSL_FIXED, "LibreSSL 4.2.0"),
    (built_libressl(LIBRESSL_4_3_2), LIBRESSL_FIXED, "LibreSSL 3.8.4"),
], ids=["4.0-on-3.0", "3.0-on-4.0", "3.0-on-3.5", "3.5-on-3.0",
        "openssl-on-libressl", "libressl-on-openssl",
        "libressl-4.3-on-4.2", "libressl-4.3-on-3.8"])
def test_check_library_refuses_another_library(
        built: tuple[int, int, str], loaded_number: int,
        loaded_text: str) -> None:
    with pytest.raises(LibraryMismatch) as e:
        check_library(*built, loaded_number, loaded_text)
    message = str(e.value)
    assert f"compiled against {built[2]} but runs with {loaded_text}" in message
    assert "build it again" in message
    assert isinstance(e.value, ImportError)


@pytest.mark.parametrize("built, loaded_number, loaded_text", [
    (built_openssl(OPENSSL_3_0_19), *OPENSSL_3_0_19),
    (built_openssl(OPENSSL_3_0_19), *OPENSSL_3_0_20),   # a patch release
    (built_openssl(OPENSSL_4_0_2), 0x40000010, "OpenSSL 4.0.1 1 Jul 2026"),
    (built_libressl(LIBRESSL_4_3_2), LIBRESSL_FIXED, "LibreSSL 4.3.2"),
    (built_libressl(LIBRESSL_4_3_2), LIBRESSL_FIXED, "LibreSSL 4.3.3"),
], ids=["3.0.19", "3.0.19-on-3.0.20", "4.0.2-on-4.0.1", "libressl-4.3.2",
        "libressl-4.3.2-on-4.3.3"])
def test_check_library_passes_the_same_release(
        built: tuple[int, int, str], loaded_number: int,
        loaded_text: str) -> None:
    check_library(*built, loaded_number, loaded_text)


def test_the_real_module_passes_its_check() -> None:
    """The extension that this suite imported passed the check at import;
    its compile-time constants come from the library's headers."""
    lib, ffi = _rsaengine.lib, _rsaengine.ffi
    built_text = ffi.string(lib.PPS_BUILT_TEXT).decode()
    check_library(lib.PPS_BUILT_OPENSSL, lib.PPS_BUILT_LIBRESSL, built_text,
                  lib.OpenSSL_version_num(), native.library_version())
    assert re.match(r"(OpenSSL|LibreSSL) \d+\.\d+", built_text)
    assert bool(lib.PPS_BUILT_LIBRESSL) == built_text.startswith("LibreSSL")


# ---- a real module with another library under it ----------------------

def _needed(so: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", so], capture_output=True,
                         text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def _runpath(so: str) -> str:
    out = subprocess.run(["readelf", "-d", so], capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library (?:run)?path: \[(.+?)\]", out)
    return m.group(1) if m else ""


def _resolved(so: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """ldd: soname -> the file it resolves to."""
    out = subprocess.run(["ldd", so], capture_output=True, text=True,
                         check=True, env=env).stdout
    return dict(re.findall(r"^\s*(\S+) => (\S+)", out, flags=re.M))


def _lib_dirs() -> list[str]:
    """Directories that may hold an OpenSSL: the system's and /opt/*/lib."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [os.path.join("/usr/lib", multiarch), "/usr/lib", "/usr/local/lib"]
    return [os.path.realpath(d) for d in dirs + sorted(glob.glob("/opt/*/lib"))
            if os.path.isdir(d)]


def _release_of(libcrypto: str) -> str:
    """What a libcrypto file says it is, asked in a process of its own."""
    code = ("import ctypes, sys; c = ctypes.CDLL(sys.argv[1]); "
            "c.OpenSSL_version.restype = ctypes.c_char_p; "
            "print(c.OpenSSL_version(0).decode())")
    return subprocess.run([sys.executable, "-c", code, libcrypto],
                          capture_output=True, text=True,
                          check=True).stdout.strip()


def _release(text: str) -> str:
    m = re.match(r"(\S+) (\d+\.\d+)", text)
    assert m, text
    return f"{m.group(1)} {m.group(2)}"


def test_import_refuses_another_library_under_the_module() -> None:
    """LD_LIBRARY_PATH puts another release's libssl/libcrypto (same
    soname) under the extension: importing pyprivsep.native fails, naming
    both versions."""
    so = _rsaengine.__file__
    crypto = next(n for n in _needed(so) if n.startswith("libcrypto"))
    ours = native.library_version()
    own_dir = os.path.dirname(os.path.realpath(_resolved(so)[crypto]))
    other = None
    for d in _lib_dirs():
        path = os.path.join(d, crypto)
        if (d != own_dir and os.path.exists(path) and
                os.path.exists(os.path.join(d, crypto.replace("crypto", "ssl")))):
            text = _release_of(path)
            if _release(text) != _release(ours):
                other = (d, text)
                break
    if other is None:
        pytest.skip(f"no other release's {crypto} on this machine "
                    f"(looked in {', '.join(_lib_dirs())})")
    env = dict(os.environ, LD_LIBRARY_PATH=other[0])
    r = subprocess.run([sys.executable, "-c", "import pyprivsep.native"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode != 0, r.stdout
    assert "LibraryMismatch" in r.stderr, r.stderr
    assert f"compiled against {ours} but runs with {other[1]}" in r.stderr, r.stderr


# ---- a build for another library builds again ---------------------------

def _other_prefix(ours: str) -> tuple[str, str] | None:
    """An OpenSSL installed under /opt of another release than ours:
    (prefix, its version text), or None."""
    for prefix in sorted(glob.glob("/opt/*")):
        tool = os.path.join(prefix, "bin", "openssl")
        if (os.path.isfile(os.path.join(prefix, "include", "openssl", "ssl.h"))
                and os.access(tool, os.X_OK)):
            text = _tool_version(tool)
            if text.startswith("OpenSSL") and _release(text) != _release(ours):
                return prefix, text
    return None


def _tool_version(tool: str) -> str:
    """`openssl version` without its "(Library: ...)"."""
    out = subprocess.run([tool, "version"], capture_output=True,
                         text=True).stdout.strip()
    return out.split(" (Library:")[0]


def test_a_build_for_another_library_builds_again(tmp_path: Path) -> None:
    """`setup.py build` (what pip does, in the tree) against the system's
    OpenSSL, then in the same tree against another: the second build
    compiles and links again, its .so files link the other library (rpath,
    ldd) and `pyprivsep -V` names it; then back to the system's.  Without
    another OpenSSL under /opt, the second identity is the system's headers
    through OPENSSL_PREFIX=/usr, which only adds an rpath."""
    pytest.importorskip("setuptools")
    system = _tool_version("openssl")
    if not system.startswith("OpenSSL"):
        pytest.skip(f"the system's openssl is {system}")
    if not os.path.isfile("/usr/include/openssl/ssl.h"):
        pytest.skip("no system OpenSSL headers (libssl-dev)")
    tree = tmp_path / "tree"
    tree.mkdir()
    ignore = shutil.ignore_patterns("*.so", "*.o", "__pycache__",
                                    "_rsaengine.c")
    for name in ("setup.py", "build_ffi.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, tree / name)
    for name in ("src", "pyprivsep", "man"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    other = _other_prefix(system)
    prefix, other_text = other if other else ("/usr", system)
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("OPENSSL_PREFIX", "LD_LIBRARY_PATH", "PYTHONPATH")}

    def build(openssl_prefix: str | None) -> tuple[str, str, str]:
        env = dict(base_env)
        if openssl_prefix:
            env["OPENSSL_PREFIX"] = openssl_prefix
        r = subprocess.run(["nice", "-n", "19", sys.executable, "setup.py",
                            "build"], cwd=tree, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        (build_lib,) = glob.glob(str(tree / "build" / "lib.*"))
        (ext,) = glob.glob(os.path.join(build_lib, "pyprivsep", "_rsaengine*.so"))
        run = subprocess.run([sys.executable, "-m", "pyprivsep", "-V"],
                             cwd=tmp_path, capture_output=True, text=True,
                             env=dict(base_env, PYTHONPATH=build_lib))
        assert run.returncode == 0, run.stderr
        return ext, run.stdout.strip(), r.stderr

    ext, version, _ = build(None)
    provider = os.path.join(os.path.dirname(ext), "pyprivsep-provider.so")
    assert version.endswith(system), version
    system_runpath = {so: _runpath(so) for so in (ext, provider)}
    for so, runpath in system_runpath.items():
        assert os.path.join(prefix, "lib") not in runpath.split(":"), so

    ext, version, log = build(prefix)
    libdir = os.path.join(prefix, "lib")
    for so in (ext, provider):
        assert libdir in _runpath(so).split(":"), so
        if other:
            resolved = _resolved(so)
            crypto = next(n for n in _needed(so) if n.startswith("libcrypto"))
            assert resolved[crypto].startswith(libdir + "/"), resolved
    assert version.endswith(other_text), version
    assert "building everything again" in log

    ext, version, log = build(None)
    assert version.endswith(system), version
    for so in (ext, provider):
        assert _runpath(so) == system_runpath[so], so
    assert "building everything again" in log
