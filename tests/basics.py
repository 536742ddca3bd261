"""Basics every helper and test uses: the repository root, the loopback
address, polling until something holds, free ports and hashing."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
MIB = 1024 * 1024

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
) -> T:
    """Call ``predicate`` until it returns a truthy value and return that value.

    Raises AssertionError naming ``what`` (a string, or a callable producing
    one lazily, e.g. with the daemon's stderr) when ``timeout`` expires.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            description = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {description}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def pattern_bytes(n: int) -> bytes:
    """Deterministic pseudo-random bytes served by the HTTP backend's /bytes/N."""
    return hashlib.shake_256(b"pyprivsep backend bytes").digest(n)
