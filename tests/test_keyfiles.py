"""What the configuration check refuses in a keypair's files.

Key files: group- or world-accessible, or owned by someone other than root
or the user running pyprivsep, are refused as sshd refuses them.
Every case runs the real `pyprivsep -n` (and one the daemon itself).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from basics import free_port
from daemonctl import run_pyprivsep
from keypairs import KeyPair, Pki


def write_config(tmp_path: Path, cert: Path, key: Path) -> tuple[Path, int]:
    """A one-relay configuration; returns it and the keypair's line."""
    lines = [
        "# key file checks",
        "prefork 1",
        'relay "www" {',
        f"    listen on 127.0.0.1 port {free_port()} tls",
        f"    forward to 127.0.0.1 port {free_port()}",
        f'    tls certificate "{cert}" key "{key}"',
        "}",
    ]
    conf = tmp_path / "keys.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf, 6


def copy_key(kp: KeyPair, tmp_path: Path, mode: int) -> Path:
    key = tmp_path / "copy.key"
    shutil.copyfile(kp.key_path, key)
    os.chmod(key, mode)
    return key


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def assert_refused(proc: subprocess.CompletedProcess[str], conf: Path, line: int, *names: str) -> None:
    assert proc.returncode == 1, describe(proc)
    assert re.search(rf"{re.escape(str(conf))}:{line}: ", proc.stderr), describe(proc)
    for name in names:
        assert name in proc.stderr, describe(proc)
    assert "configuration OK" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("mode", [0o644, 0o666, 0o640, 0o604, 0o620], ids=lambda m: f"{m:04o}")
def test_check_refuses_key_readable_by_others(pki: Pki, tmp_path: Path, mode: int) -> None:
    kp = pki["rsa2048"]
    key = copy_key(kp, tmp_path, mode)
    conf, line = write_config(tmp_path, kp.cert_path, key)
    assert_refused(run_pyprivsep("-n", "-f", str(conf)), conf, line, str(key), f"mode {mode:04o}")


@pytest.mark.parametrize("mode", [0o600, 0o400], ids=lambda m: f"{m:04o}")
def test_check_accepts_key_only_its_owner_reads(pki: Pki, tmp_path: Path, mode: int) -> None:
    kp = pki["p256"]
    key = copy_key(kp, tmp_path, mode)
    conf, _ = write_config(tmp_path, kp.cert_path, key)
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 0, describe(proc)
    assert "configuration OK" in proc.stderr, describe(proc)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_check_refuses_key_owned_by_another_user(pki: Pki, tmp_path: Path) -> None:
    kp = pki["rsa2048"]
    key = copy_key(kp, tmp_path, 0o600)
    nobody = pwd.getpwnam("nobody")
    os.chown(key, nobody.pw_uid, nobody.pw_gid)
    conf, line = write_config(tmp_path, kp.cert_path, key)
    assert_refused(run_pyprivsep("-n", "-f", str(conf)), conf, line, str(key), "owned by nobody")


def test_daemon_refuses_to_start_with_a_world_readable_key(pki: Pki, tmp_path: Path) -> None:
    """The ca processes read the keys through the same check: the daemon
    stops with the error instead of serving with an exposed key."""
    kp = pki["rsa2048"]
    key = copy_key(kp, tmp_path, 0o644)
    conf, line = write_config(tmp_path, kp.cert_path, key)
    (tmp_path / "empty").mkdir()
    with conf.open("a") as f:
        f.write(f'chroot "{tmp_path / "empty"}"\nsocket "{tmp_path / "ctl.sock"}"\n')
    proc = run_pyprivsep("-d", "-f", str(conf), timeout=30)
    assert_refused(proc, conf, line, str(key), "mode 0644")
