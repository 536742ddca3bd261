"""The SoftHSM and p11-kit fixtures themselves (tests/softhsm.py): a key
imported into the token signs, directly and through `p11-kit server`, and
the signature verifies with the certificate's public key."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from keypairs import Pki
from softhsm import SOFTHSM_MODULE, P11KitServer, Token, p11kit_client_module

# SoftHSM has no CKM_ECDSA_SHA256: ECDSA signs a digest (CKM_ECDSA), as the ca does
MECHANISMS = {"rsa2048": "SHA256-RSA-PKCS", "p256": "ECDSA"}


def sign(module: Path, env: dict[str, str], token: Token, key_id: str, mechanism: str,
         data: Path, out: Path) -> None:
    args = ["pkcs11-tool", "--module", str(module), "--token-label", token.label, "--login",
            "--pin", token.pin, "--sign", "--id", key_id, "--mechanism", mechanism,
            "--input-file", str(data), "--output-file", str(out)]
    if mechanism == "ECDSA":
        args += ["--signature-format", "openssl"]       # DER, as openssl reads it
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def verifies(pki: Pki, name: str, data: Path, signature: Path, tmp_path: Path) -> bool:
    pub = tmp_path / f"{name}.pub.pem"
    subprocess.run(["openssl", "x509", "-in", str(pki[name].cert_path), "-noout", "-pubkey",
                    "-out", str(pub)], check=True)
    if pki[name].is_rsa:        # SHA256-RSA-PKCS: the token hashed the data
        args = ["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature", str(signature),
                str(data)]
    else:                       # ECDSA: the data is the digest
        args = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-in", str(data),
                "-sigfile", str(signature)]
    proc = subprocess.run(args, capture_output=True, text=True)
    return proc.returncode == 0


@pytest.mark.parametrize("name", ["rsa2048", "p256"])
def test_an_imported_key_signs_directly_and_through_p11kit(
        softhsm_token: Token, start_p11kit: Callable[..., P11KitServer], pki: Pki,
        tmp_path: Path, name: str) -> None:
    token = softhsm_token
    assert token.pin_file.stat().st_mode & 0o777 == 0o600
    assert token.pin_file.read_text() == token.pin
    uri = token.import_key(pki[name].key_path, "www", "0a")
    assert uri == "pkcs11:token=web;object=www;type=private"
    data = tmp_path / "data"
    data.write_bytes(hashlib.sha256(b"signed by the token\n").digest())

    direct = tmp_path / "direct.sig"
    sign(SOFTHSM_MODULE, token.full_env(), token, "0a", MECHANISMS[name], data, direct)
    assert verifies(pki, name, data, direct, tmp_path)

    server = start_p11kit(token)
    client = p11kit_client_module()
    assert client is not None
    remote = tmp_path / "remote.sig"
    sign(client, {"P11_KIT_SERVER_ADDRESS": server.address, "PATH": "/usr/bin:/bin"}, token,
         "0a", MECHANISMS[name], data, remote)
    assert verifies(pki, name, data, remote, tmp_path)
    # and a signature of other data does not verify: the check can fail
    data.write_bytes(hashlib.sha256(b"something else\n").digest())
    assert not verifies(pki, name, data, remote, tmp_path)


def test_a_generated_key_is_never_extractable(softhsm_token: Token) -> None:
    spki = softhsm_token.generate_key("p256", "gen", "0b")
    assert spki.startswith(b"\x30")                      # DER SubjectPublicKeyInfo
    listing = softhsm_token.objects()
    private = listing.split("Private Key Object")[1]
    assert "label:      gen" in private and "never extractable" in private, listing


def test_the_server_stops_and_removes_its_socket(softhsm_token: Token,
                                                 start_p11kit: Callable[..., P11KitServer]) -> None:
    server = start_p11kit(softhsm_token)
    assert server.socket.is_socket() and server.answers()
    server.stop()
    assert not server.socket.exists() and not server.answers()


def test_who_may_connect(softhsm_token: Token, tmp_path: Path) -> None:
    """-u/-g: the ca's user alone (root is refused); mode 0666 without -u:
    anyone who reaches the directory.  The socket's directory is made
    reachable (pytest's base directory is root's, 0700).  A P11KitServer
    not started is only a client here (listing, answers)."""
    if os.geteuid() != 0:
        pytest.skip("connecting as another user needs root")
    try:
        pwd.getpwnam("_pyprivsep_ca")
    except KeyError:
        pytest.skip("no user _pyprivsep_ca (make users)")
    public = Path(tempfile.mkdtemp(prefix="pps-softhsm-"))
    try:
        public.chmod(0o755)
        with P11KitServer(softhsm_token, public / "ca.sock", user="_pyprivsep_ca") as only_ca:
            assert only_ca.answers()                        # as _pyprivsep_ca
            assert "web" not in P11KitServer(softhsm_token, only_ca.socket).listing()  # as root
        with P11KitServer(softhsm_token, public / "all.sock", mode=0o666) as anyone:
            assert anyone.answers()                         # as root
            assert P11KitServer(softhsm_token, anyone.socket, user="_pyprivsep_ca").answers()
    finally:
        shutil.rmtree(public, ignore_errors=True)
