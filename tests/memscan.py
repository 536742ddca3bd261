"""Scanning a process's memory (/proc/PID/maps and /proc/PID/mem) for byte
patterns, e.g. a private key's secret components."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from basics import MIB
from keypairs import KeyPair, key_patterns

if TYPE_CHECKING:
    from daemonctl import Daemon

SKIPPED_REGIONS = frozenset({"[vvar]", "[vvar_vclock]", "[vsyscall]"})


@dataclass(frozen=True)
class MemoryRegion:
    start: int
    end: int
    perms: str
    path: str

    @property
    def readable(self) -> bool:
        return self.perms.startswith("r")


def memory_regions(pid: int) -> list[MemoryRegion]:
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in parts[0].split("-"))
        regions.append(MemoryRegion(start, end, parts[1], parts[5] if len(parts) > 5 else ""))
    return regions


@dataclass(frozen=True)
class ScanResult:
    found: frozenset[str]
    bytes_scanned: int
    regions_scanned: int
    regions_failed: int


def scan_process_memory(pid: int, patterns: Mapping[str, bytes], *, chunk_size: int = 8 * MIB) -> ScanResult:
    """Search the readable memory of ``pid`` for each pattern.

    Raises PermissionError if /proc/PID/mem cannot be opened at all (e.g. a
    non-dumpable process and no CAP_SYS_PTRACE); read errors of individual
    regions are counted and otherwise ignored.
    """
    if not patterns or any(not p for p in patterns.values()):
        raise ValueError("patterns must be non-empty byte strings")
    overlap = max(len(p) for p in patterns.values()) - 1
    remaining = dict(patterns)
    found: set[str] = set()
    scanned = regions_scanned = regions_failed = 0
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        tail, tail_end = b"", -1
        for region in memory_regions(pid):
            if not region.readable or region.path in SKIPPED_REGIONS:
                continue
            if region.start != tail_end:
                tail = b""  # only carry bytes across contiguous mappings
            address = region.start
            try:
                while address < region.end:
                    data = os.pread(fd, min(chunk_size, region.end - address), address)
                    if not data:
                        break
                    window = tail + data
                    for name, pattern in list(remaining.items()):
                        if pattern in window:
                            found.add(name)
                            del remaining[name]
                    tail = window[-overlap:] if overlap else b""
                    address += len(data)
                    scanned += len(data)
            except (OSError, OverflowError):
                regions_failed += 1
                tail = b""
            else:
                regions_scanned += 1
            tail_end = address
    finally:
        os.close(fd)
    return ScanResult(frozenset(found), scanned, regions_scanned, regions_failed)


def assert_keys_only_in_cas(daemon: Daemon, keypairs: Sequence[KeyPair], relays: int) -> None:
    """Every secret component of ``keypairs`` is in each ca process, and
    none in the ``relays`` relay processes or the parent (the ca side is the
    control: the scan finds what is there)."""
    patterns = key_patterns(keypairs)
    targets = {f"relay {i}": pid for i, pid in daemon.relay_pids().items()}
    targets["parent"] = daemon.parent_pid
    assert len(targets) == relays + 1, daemon.describe()
    leaks = {name: sorted(scan_process_memory(pid, patterns).found) for name, pid in targets.items()}
    assert leaks == {name: [] for name in targets}, "private key material outside the ca processes"
    cas = daemon.ca_pids()
    assert cas, daemon.describe()
    for index, pid in cas.items():
        found = scan_process_memory(pid, patterns).found
        assert {n.rsplit(":", 1)[0] for n in found} == {c for kp in keypairs for c in kp.components()}, index
