"""Looking at processes: /proc introspection (liveness, children, titles,
RSS, open fds), a helper Python process, and freezing a process without its
parent seeing it stopped."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from basics import wait_until

TITLE_RE = re.compile(r"^pyprivsep: (?P<role>parent|relay|ca)(?: (?P<index>\d+))?(?=\s|$)")


def _read_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) from /proc/PID/stat, or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    stat = _read_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def child_pids(ppid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None and stat[1] == ppid and stat[0] not in ("Z", "X"):
                children.append(int(entry))
    return sorted(children)


def proc_title(pid: int) -> str | None:
    """The process title as shown by ps (cmdline with NULs as spaces)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def proc_status(pid: int) -> dict[str, str]:
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return status


@dataclass(frozen=True)
class ChildProcess:
    pid: int
    role: str  # "relay" or "ca"
    index: int


def vm_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (VmRSS of /proc/PID/status)."""
    value, unit = proc_status(pid)["VmRSS"].split()
    assert unit == "kB", unit
    return int(value) * 1024


def open_fds(pid: int) -> dict[int, str]:
    """fd -> readlink target of every open descriptor of ``pid``."""
    fds = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            fds[int(entry)] = os.readlink(f"/proc/{pid}/fd/{entry}")
    return fds


@contextlib.contextmanager
def python_process(code: str, *args: str, ready_line: bytes = b"ready") -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python3 -c CODE ARGS`` until it prints ``ready_line``; kill it on exit."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != ready_line:
            raise AssertionError(f"helper process did not get ready: {line!r}, exit code {proc.poll()}")
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


# Pausing a process without its parent seeing it stopped:
# SIGSTOP shows in the parent's waitpid(WUNTRACED), and the parent kills and
# replaces a stopped child.  A task in a frozen cgroup (v1 freezer) is paused
# just the same, but nothing tells its parent: the way to make a child that
# simply stops answering.

FREEZER_ROOT = Path("/sys/fs/cgroup/freezer")


def freezer_unavailable() -> str | None:
    """Why the cgroup v1 freezer cannot be used here, or None."""
    if not (FREEZER_ROOT / "tasks").exists():
        return f"no cgroup v1 freezer mounted at {FREEZER_ROOT}"
    if not os.access(FREEZER_ROOT, os.W_OK):
        return f"{FREEZER_ROOT} is not writable (needs root)"
    return None


class Freezer:
    """Freezes processes in a cgroup of its own; close() thaws them all and
    removes the cgroup (teardown, whatever happened)."""

    _count = 0

    def __init__(self) -> None:
        Freezer._count += 1
        self.path = FREEZER_ROOT / f"pyprivsep-test-{os.getpid()}-{Freezer._count}"
        self.pids: list[int] = []

    def _state(self, state: str) -> None:
        (self.path / "freezer.state").write_text(state)
        wait_until(lambda: (self.path / "freezer.state").read_text().strip() == state, 10.0, f"cgroup {state}")

    def freeze(self, pid: int) -> None:
        """Pause `pid` (it stays in the cgroup until thaw or close)."""
        reason = freezer_unavailable()
        if reason is not None:
            import pytest

            pytest.skip(reason)
        self.path.mkdir(exist_ok=True)
        (self.path / "cgroup.procs").write_text(str(pid))
        self.pids.append(pid)
        self._state("FROZEN")

    def thaw(self, pid: int | None = None) -> None:
        """Let the cgroup's processes run again; `pid` (or all) leave it."""
        if not self.path.exists():
            return
        self._state("THAWED")
        for p in self.pids if pid is None else [pid]:
            with contextlib.suppress(OSError):  # it may have died meanwhile
                (FREEZER_ROOT / "cgroup.procs").write_text(str(p))
        self.pids = [] if pid is None else [p for p in self.pids if p != pid]
        if self.pids:
            self._state("FROZEN")

    def close(self) -> None:
        if not self.path.exists():
            return
        self.thaw()
        wait_until(lambda: not (self.path / "cgroup.procs").read_text().strip(), 10.0, "frozen processes to leave")
        self.path.rmdir()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """`pid` frozen for the block (see Freezer)."""
    with Freezer() as freezer:
        freezer.freeze(pid)
        yield
