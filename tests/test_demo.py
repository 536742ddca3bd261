"""`make run`: the demo serves, and a SIGTERM to it (as from `timeout`, a
service manager, a closed terminal's SIGHUP) stops the daemon and the
backend as Ctrl-C does, instead of leaving them running orphaned."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from basics import REPO_ROOT, wait_until
from tlsclients import curl

DEMO_PORTS = (8443, 8080)


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def session_members(sid: int) -> list[str]:
    """The processes of session sid still alive (not zombies): their names."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name_end = stat.rindex(")")
        fields = stat[name_end + 2:].split()
        # fields[0] state, [3] session
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(stat[stat.index("(") + 1:name_end])
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_demo_stops_everything(sig: signal.Signals, tmp_path: Path) -> None:
    busy = [p for p in DEMO_PORTS if port_busy(p)]
    if busy:
        pytest.skip(f"the demo's ports are in use here: {busy}")
    log = tmp_path / "demo.out"
    with log.open("w") as out:
        demo = subprocess.Popen([sys.executable, "-m", "pyprivsep.demo"], cwd=REPO_ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cafile = Path(REPO_ROOT, "demo", "ca.crt")
        wait_until(lambda: port_busy(8443) and port_busy(8080), 30, "the demo listening")
        r = curl(8443, "localhost", cacert=cafile)
        assert r.returncode == 0 and b"pyprivsep demo backend" in r.stdout, r
        assert len(session_members(demo.pid)) >= 5, "parent, relays, cas, backend"
        demo.send_signal(sig)
        demo.wait(timeout=30)
        wait_until(lambda: not session_members(demo.pid), 20,
                   lambda: f"the demo's processes to end: {session_members(demo.pid)}\n"
                           f"{log.read_text()}")
        assert not port_busy(8443) and not port_busy(8080)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
            try:
                if os.getsid(pid) == demo.pid:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
