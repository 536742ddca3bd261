"""Keys in a SoftHSM2 token with certificates from a test issuer, as
KeyPairs: what the PKCS#11 tests (tests/test_pkcs11.py) sign with.

The token and the `p11-kit server` are tests/softhsm.py's (made with
SOFTHSM2_CONF naming the token's own directory: the machine's /etc/softhsm
and /var/lib/softhsm are never touched); this adds the rest.  A directory
under /tmp (``token_directory``) holds the issuer, the certificates and the
token (hsm/).  Keys go in imported from a key the test made (it knows their
primes, to scan memory for them; the PEM the import read is deleted right
after) or generated in the token, sensitive and never extractable (nobody
knows them), and each gets a certificate from the issuer.  The cas open
the token after dropping privileges, as ``daemonctl.CA_USER`` (root under
`make asan`): ``give_to_ca_user`` hands them its files, ``p11kit_server``
is a server that lets in that user alone.

    token = make_token_keys(token_directory())
    kp = token.import_key("imported-rsa", 1, "rsa2048")     # a KeyPair: key_path is the URI
    kp = token.generate_key("always-auth", 5, "rsa2048", always_auth=True)
    token.give_to_ca_user()
    token.hsm.pkcs11_line()                                 # softhsm.Token
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import softhsm
from daemonctl import CA_USER
from keypairs import Issuer, KeyPair, issue_certificate, make_issued_keypair, make_issuer


def token_directory() -> Path:
    """Under /tmp, not pytest's 0700 tmp tree, and 0755: the cas' user must
    reach the token in it (and the p11-kit server's socket)."""
    directory = Path(tempfile.mkdtemp(prefix="pps-p11-", dir="/tmp"))
    directory.chmod(0o755)
    return directory


@dataclass
class TokenKeys:
    directory: Path         # the issuer, the certificates, the token's hsm/
    hsm: softhsm.Token
    issuer: Issuer
    keys: dict[str, KeyPair] = field(default_factory=dict)  # name -> keypair, key_path its URI

    def import_key(self, name: str, key_id: int, kind: softhsm.KeyKind) -> KeyPair:
        """A key the test makes, with its certificate, imported into the
        token as ``name`` with CKA_ID ``key_id``."""
        made = make_issued_keypair(self.directory, name, self.issuer, key_name=kind)
        try:
            self.hsm.import_key(made.key_path, name, f"{key_id:02x}")
        finally:
            made.key_path.unlink()
        return self._add(replace(made, key_path=Path(self.hsm.uri(name, f"{key_id:02x}"))))

    def generate_key(self, name: str, key_id: int, kind: softhsm.KeyKind, *,
                     always_auth: bool = False) -> KeyPair:
        """A key made in the token (softhsm.Token.generate_key), and a
        certificate for the public key it gives back."""
        der = self.hsm.generate_key(kind, name, f"{key_id:02x}", always_auth=always_auth)
        public = serialization.load_der_public_key(der)
        assert isinstance(public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)), public
        cert, cert_path = issue_certificate(self.directory, name, self.issuer, public)
        return self._add(KeyPair(name, f"{name}.test", cert_path, Path(self.hsm.uri(name, f"{key_id:02x}")),
                                 cert, {}))

    def _add(self, keypair: KeyPair) -> KeyPair:
        self.keys[keypair.name] = keypair
        return keypair

    def give_to_ca_user(self) -> None:
        """The token's files to the cas' user (as root; after every change
        to the token: SoftHSM writes them as whoever runs it)."""
        if os.geteuid() == 0:
            self.hsm.give_to(CA_USER)

    def p11kit_server(self, socket: Path) -> softhsm.P11KitServer:
        """A `p11-kit server` (not started) exporting the token on
        ``socket``, for the cas' user alone (as root; -u and -g: it lets no
        other uid in, not even root), as a ca and `pyprivsep -n` reach it."""
        return softhsm.P11KitServer(self.hsm, socket, user=CA_USER if os.geteuid() == 0 else None)


def make_token_keys(directory: Path) -> TokenKeys:
    """An empty token "web" (a random PIN, its 0600 PIN file) in
    directory/hsm, and an issuer in ``directory``."""
    return TokenKeys(directory, softhsm.make_token(directory / "hsm"), make_issuer(directory, "p11"))
