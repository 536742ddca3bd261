"""pyprivsep: the C extension is built by build_ffi.py (cffi, API mode)."""
from setuptools import setup

setup(
    name="pyprivsep",
    version="0.1.0",
    description="TLS relay whose private keys live only in per-relay ca "
                "processes (the OpenBSD relayd model)",
    python_requires=">=3.9",
    packages=["pyprivsep"],
    setup_requires=["cffi>=1.15"],
    cffi_modules=["build_ffi.py:ffibuilder"],
    install_requires=["cffi>=1.15", "cryptography>=41", "setproctitle>=1.3",
                      "prometheus_client>=0.17"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
    entry_points={"console_scripts": ["pyprivsep=pyprivsep.cli:main"]},
    data_files=[("share/man/man5", ["man/pyprivsep.conf.5"]),
                ("share/man/man8", ["man/pyprivsep.8"])],
)
