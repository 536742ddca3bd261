"""The demo's certificate is a leaf, and no server keypair may be a CA.

The relays' key operations sign what the ca's policy lets through; were the
server key also a CA key, such a signature over a TBSCertificate would be a
certificate.  The demo used to make a self-signed CA certificate and the
README told users to trust it with `curl --cacert`: a certificate for
evil.example signed with the demo's server key verified against it.
"""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backends import HttpBackend
from basics import REPO_ROOT, free_port
from daemonctl import DaemonConfig, RelaySpec, StartDaemon, run_pyprivsep
from keypairs import KeyPair, PrivateKey, key_secrets, write_cert, write_key
from pyprivsep import demo
from tlsclients import curl


def openssl_verify(cafile: Path, cert: Path, untrusted: Path | None = None) -> subprocess.CompletedProcess[str]:
    args = ["openssl", "verify", "-CAfile", str(cafile)]
    if untrusted is not None:
        args += ["-untrusted", str(untrusted)]
    return subprocess.run([*args, str(cert)], capture_output=True, text=True, timeout=30)


def readme_trust_anchor(directory: Path) -> Path:
    """The file the README tells users to trust, `curl --cacert demo/X`,
    taken from where make_cert wrote the demo's files."""
    names = set(re.findall(r"curl --cacert demo/(\S+)", (REPO_ROOT / "README.md").read_text()))
    assert len(names) == 1, f"README: curl --cacert demo/... names {names}"
    return directory / names.pop()


def mint(signing_key: Path, issuer_cert: Path, out: Path) -> Path:
    """A certificate for evil.example, issued in the name of issuer_cert and
    signed with its key: what a signing oracle over that key could produce."""
    issuer = x509.load_pem_x509_certificate(issuer_cert.read_bytes())
    key = serialization.load_pem_private_key(signing_key.read_bytes(), password=None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil.example")])
    now = datetime.datetime.now(datetime.UTC)
    evil = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), critical=False)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    write_cert(out, evil)
    return out


def test_demo_certificate_is_a_leaf_signed_by_the_demo_ca(tmp_path: Path) -> None:
    demo.make_cert(str(tmp_path))
    anchor = readme_trust_anchor(tmp_path)
    server = tmp_path / "server.crt"
    assert anchor != server, "the README must not tell users to trust the server's own certificate"
    leaf = x509.load_pem_x509_certificate(server.read_bytes())
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    proc = openssl_verify(anchor, server)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # nothing but the three files: the CA's private key is never written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "server.crt", "server.key"]


def test_demo_server_key_cannot_mint_certificates(tmp_path: Path) -> None:
    """Sign a certificate for evil.example with the demo's server key: it
    verifies neither against what the README says to trust nor against the
    server certificate itself (nor with it given as an intermediate)."""
    demo.make_cert(str(tmp_path))
    anchor = readme_trust_anchor(tmp_path)
    server_crt, server_key = tmp_path / "server.crt", tmp_path / "server.key"
    evil = mint(server_key, server_crt, tmp_path / "evil.crt")
    for cafile, untrusted in ((anchor, None), (anchor, server_crt), (server_crt, None)):
        proc = openssl_verify(cafile, evil, untrusted)
        assert proc.returncode != 0, f"minted certificate verified with -CAfile {cafile} -untrusted {untrusted}:\n{proc.stdout}{proc.stderr}"


def test_minting_works_with_a_ca_keypair(tmp_path: Path) -> None:
    """Control for the test above: the same minting does verify when the
    server key is a CA's, so its failure there is the leaf's doing."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert, ca_key = tmp_path / "ca.crt", tmp_path / "ca.key"
    write_cert(ca_cert, certificate(key, ca=True))
    write_key(ca_key, key)
    proc = openssl_verify(ca_cert, mint(ca_key, ca_cert, tmp_path / "evil.crt"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_demo_configuration_passes_the_check(tmp_path: Path) -> None:
    shutil.copy(REPO_ROOT / "demo" / "pyprivsep.conf", tmp_path)
    demo.make_cert(str(tmp_path))
    proc = run_pyprivsep("-n", "-f", str(tmp_path / "pyprivsep.conf"))
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stderr


def test_demo_certificate_serves_clients_trusting_the_demo_ca(
    tmp_path: Path, start_daemon: StartDaemon, http_backend: HttpBackend
) -> None:
    """What the README says to run: curl --cacert <demo ca> https://localhost/."""
    demo.make_cert(str(tmp_path))
    leaf = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    kp = KeyPair("demo", "localhost", tmp_path / "server.crt", tmp_path / "server.key", leaf,
                 key_secrets(load_private_key_at(tmp_path / "server.key")))
    relay = RelaySpec("demo", free_port(), http_backend.port, [kp])
    start_daemon(DaemonConfig([relay], prefork=1))
    proc = curl(relay.listen_port, "localhost", cacert=readme_trust_anchor(tmp_path), timeout=20)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout == http_backend.page


def load_private_key_at(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey))
    return key


KEY_USAGE_FLAGS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                   "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")


def certificate(key: ec.EllipticCurvePrivateKey, *, ca: bool | None = None,
                usage: dict[str, bool] | None = None) -> x509.Certificate:
    """A self-signed certificate for bad.test with the given basicConstraints
    (None: none) and keyUsage (None: none; else the flags set)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bad.test")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bad.test")]), critical=False)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if usage is not None:
        flags = dict.fromkeys(KEY_USAGE_FLAGS, False) | usage
        builder = builder.add_extension(x509.KeyUsage(**flags), critical=True)
    return builder.sign(key, hashes.SHA256())


BAD_CERTIFICATES = {
    "ca-true": (dict(ca=True), "CA:TRUE"),
    "key-cert-sign-only": (dict(ca=False, usage={"key_cert_sign": True}), "without digitalSignature"),
    "key-cert-sign-no-constraints": (dict(usage={"digital_signature": True, "key_cert_sign": True}), "keyCertSign"),
}


@pytest.mark.parametrize("kind", BAD_CERTIFICATES, ids=list(BAD_CERTIFICATES))
def test_check_refuses_a_certificate_that_can_issue_or_cannot_sign(tmp_path: Path, kind: str) -> None:
    params, message = BAD_CERTIFICATES[kind]
    key = ec.generate_private_key(ec.SECP256R1())
    cert, key_path = tmp_path / "bad.crt", tmp_path / "bad.key"
    write_cert(cert, certificate(key, **params))  # type: ignore[arg-type]
    write_key(key_path, key)
    lines = [
        "# a keypair the check must refuse",
        "prefork 1",
        'relay "www" {',
        f"    listen on 127.0.0.1 port {free_port()} tls",
        f"    forward to 127.0.0.1 port {free_port()}",
        f'    tls certificate "{cert}" key "{key_path}"',
        "}",
    ]
    conf = tmp_path / "bad.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 1, proc.stderr
    assert f"{conf}:6: {cert}: " in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "configuration OK" not in proc.stderr


def test_check_accepts_the_test_pki_leaves(tmp_path: Path) -> None:
    """Control: a plain leaf with keyUsage digitalSignature passes."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert, key_path = tmp_path / "ok.crt", tmp_path / "ok.key"
    write_cert(cert, certificate(key, ca=False, usage={"digital_signature": True}))
    write_key(key_path, key)
    conf = tmp_path / "ok.conf"
    conf.write_text(
        f'relay "www" {{\n listen on 127.0.0.1 port {free_port()} tls\n'
        f" forward to 127.0.0.1 port {free_port()}\n"
        f' tls certificate "{cert}" key "{key_path}"\n}}\n'
    )
    proc = run_pyprivsep("-n", "-f", str(conf))
    assert proc.returncode == 0, proc.stderr
