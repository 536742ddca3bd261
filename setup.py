"""pyprivsep: the C extension is built by build_ffi.py (cffi, API mode).

Next to it, pyprivsep/pyprivsep-provider.so: an OpenSSL 3 provider module
(src/provider/), a plain shared object loaded by libcrypto, not a Python
module, so it is built with its own fixed file name.  LibreSSL has no
providers: there it is not built.
"""
import glob
import json
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_ffi import library_flags, library_identity, library_version  # noqa: E402

PROVIDER = "pyprivsep.pyprivsep-provider"
PROVIDER_FILE = os.path.join("pyprivsep", "pyprivsep-provider.so")


class BuildExt(build_ext):
    """The provider keeps its plain name (no ABI tag, no PyInit_).

    A build for another TLS library (or other flags) compiles and links
    everything again: build_ext only compares the sources' times with the
    finished .so files, so against another library it kept the objects and
    the .so in build/ that the last one made (pip builds in the tree).  The
    last build's library and destination are in BUILD_TEMP/tls-library.json.
    """

    def run(self):
        stamp = os.path.join(self.build_temp, "tls-library.json")
        this = json.dumps({"library": library_identity(*library_flags()),
                           "inplace": bool(self.inplace),
                           "build_lib": os.path.abspath(self.build_lib)},
                          sort_keys=True)
        try:
            with open(stamp, encoding="utf-8") as f:
                last = f.read()
        except OSError:
            last = None
        if last != this:
            if last is not None and not self.force:
                print("setup.py: the last build here was for another library "
                      "or flags: building everything again", file=sys.stderr)
            self.force = True
        super().run()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w", encoding="utf-8") as f:
            f.write(this)

    def get_ext_filename(self, fullname):
        # called with the full name and with its last part alone
        if fullname == PROVIDER:
            return PROVIDER_FILE
        if fullname == PROVIDER.rsplit(".", 1)[1]:
            return os.path.basename(PROVIDER_FILE)
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext):
        if ext.name == PROVIDER:
            return ["OSSL_provider_init"]
        return super().get_export_symbols(ext)


def provider_extensions():
    flags, _ = library_flags()
    if library_version(flags)[0] == "LibreSSL":
        print("setup.py: LibreSSL has no providers: "
              "pyprivsep-provider.so is not built", file=sys.stderr)
        return []
    return [Extension(
        PROVIDER,
        sources=sorted(glob.glob(os.path.join("src", "provider", "*.c"))),
        include_dirs=[os.path.join("src", "provider"),
                      os.path.join("src", "_rsaengine")] + flags["include_dirs"],
        library_dirs=flags["library_dirs"],
        libraries=["crypto"],
        extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-O2",
                            "-fvisibility=hidden", *flags["compile_args"]],
        extra_link_args=[*flags["link_args"], "-pthread"],
    )]


setup(
    name="pyprivsep",
    version="0.1.0",
    description="TLS relay whose private keys live only in per-relay ca "
                "processes (the OpenBSD relayd model)",
    python_requires=">=3.9",
    packages=["pyprivsep"],
    setup_requires=["cffi>=1.15"],
    cffi_modules=["build_ffi.py:ffibuilder"],
    ext_modules=provider_extensions(),
    cmdclass={"build_ext": BuildExt},
    install_requires=["cffi>=1.15", "cryptography>=41", "setproctitle>=1.3",
                      "prometheus_client>=0.17"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
    entry_points={"console_scripts": ["pyprivsep=pyprivsep.cli:main"]},
    data_files=[("share/man/man5", ["man/pyprivsep.conf.5"]),
                ("share/man/man8", ["man/pyprivsep.8"])],
)
