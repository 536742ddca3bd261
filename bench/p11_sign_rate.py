"""Signatures per second of a SoftHSM token, loaded directly and reached
through `p11-kit server` on a UNIX socket: one process, one session, C_Sign
after C_SignInit in a loop for a fixed time, as a ca signs (CKM_RSA_PKCS
over a SHA-256 DigestInfo for RSA-2048, CKM_ECDSA over a SHA-256 digest for
P-256).  The README's "Running a fleet" quotes it: the ceiling of one
token session, and what the remote hop costs per signature.

    .venv/bin/python bench/p11_sign_rate.py [--seconds 3]

The token is made in a temporary directory by tests/softhsm.py, with keys
from bench/results/certs (made by bench/run.py, or here if missing).
ctypes calls the modules' functions (C_GetFunctionList's table); its own cost per call,
a few µs, is in the figures.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))

import run  # noqa: E402  bench/run.py: the certificates
import softhsm  # noqa: E402  tests/softhsm.py: the token and the server

CKF_SERIAL_SESSION = 0x4
CKU_USER = 1
CKO_PRIVATE_KEY = 3
CKA_CLASS = 0x0
CKA_LABEL = 0x3
CKM_RSA_PKCS = 0x1
CKM_ECDSA = 0x1041
ULONG = ctypes.c_ulong
# SHA-256 DigestInfo prefix (RFC 8017 9.2): what the ca hands CKM_RSA_PKCS
SHA256_DIGESTINFO = bytes.fromhex("3031300d060960864801650304020105000420")


class Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", ULONG), ("parameter", ctypes.c_void_p), ("parameter_len", ULONG)]


class Attribute(ctypes.Structure):
    _fields_ = [("type", ULONG), ("value", ctypes.c_void_p), ("value_len", ULONG)]


def check(rv: int, what: str) -> None:
    if rv != 0:
        raise RuntimeError(f"{what}: CKR 0x{rv:x}")


# CK_FUNCTION_LIST up to C_Sign, in the order of PKCS#11 2.40 (pkcs11.h);
# p11-kit's client module exports C_GetFunctionList only
FUNCTIONS = (
    "C_Initialize C_Finalize C_GetInfo C_GetFunctionList C_GetSlotList C_GetSlotInfo "
    "C_GetTokenInfo C_GetMechanismList C_GetMechanismInfo C_InitToken C_InitPIN C_SetPIN "
    "C_OpenSession C_CloseSession C_CloseAllSessions C_GetSessionInfo C_GetOperationState "
    "C_SetOperationState C_Login C_Logout C_CreateObject C_CopyObject C_DestroyObject "
    "C_GetObjectSize C_GetAttributeValue C_SetAttributeValue C_FindObjectsInit C_FindObjects "
    "C_FindObjectsFinal C_EncryptInit C_Encrypt C_EncryptUpdate C_EncryptFinal C_DecryptInit "
    "C_Decrypt C_DecryptUpdate C_DecryptFinal C_DigestInit C_Digest C_DigestUpdate C_DigestKey "
    "C_DigestFinal C_SignInit C_Sign").split()
CK_FUNC = ctypes.CFUNCTYPE(ULONG)       # arguments passed as ctypes objects


class FunctionList(ctypes.Structure):
    _fields_ = [("version", ctypes.c_ubyte * 2), *((f, CK_FUNC) for f in FUNCTIONS)]


def functions(module: Path) -> FunctionList:
    lib = ctypes.CDLL(str(module))
    table = ctypes.POINTER(FunctionList)()
    check(lib.C_GetFunctionList(ctypes.byref(table)), "C_GetFunctionList")
    return table.contents


def sign_rate(module: Path, pin: str, label: str, mechanism: int, data: bytes,
              seconds: float) -> float:
    f = functions(module)
    check(f.C_Initialize(ctypes.c_void_p()), "C_Initialize")
    try:
        count = ULONG(0)
        check(f.C_GetSlotList(ctypes.c_ubyte(1), ctypes.c_void_p(), ctypes.byref(count)),
              "C_GetSlotList")
        slots = (ULONG * count.value)()
        check(f.C_GetSlotList(ctypes.c_ubyte(1), slots, ctypes.byref(count)), "C_GetSlotList")
        session = ULONG()
        check(f.C_OpenSession(ULONG(slots[0]), ULONG(CKF_SERIAL_SESSION), ctypes.c_void_p(),
                              ctypes.c_void_p(), ctypes.byref(session)), "C_OpenSession")
        check(f.C_Login(session, ULONG(CKU_USER), ctypes.c_char_p(pin.encode()), ULONG(len(pin))),
              "C_Login")
        klass = ULONG(CKO_PRIVATE_KEY)
        name = ctypes.create_string_buffer(label.encode(), len(label))
        template = (Attribute * 2)(
            Attribute(CKA_CLASS, ctypes.addressof(klass), ctypes.sizeof(klass)),
            Attribute(CKA_LABEL, ctypes.addressof(name), len(label)))
        check(f.C_FindObjectsInit(session, template, ULONG(2)), "C_FindObjectsInit")
        key, found = ULONG(), ULONG()
        check(f.C_FindObjects(session, ctypes.byref(key), ULONG(1), ctypes.byref(found)),
              "C_FindObjects")
        f.C_FindObjectsFinal(session)
        if found.value != 1:
            raise RuntimeError(f"no private key {label}")
        mech = Mechanism(mechanism, None, 0)
        blob = ctypes.create_string_buffer(data, len(data))
        out = ctypes.create_string_buffer(512)
        n = 0
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            out_len = ULONG(len(out))
            check(f.C_SignInit(session, ctypes.byref(mech), key), "C_SignInit")
            check(f.C_Sign(session, blob, ULONG(len(data)), out, ctypes.byref(out_len)), "C_Sign")
            n += 1
        return n / (time.perf_counter() - start)
    finally:
        f.C_Finalize(ctypes.c_void_p())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per cell (default 3)")
    a = p.parse_args(argv)
    why = softhsm.missing(p11kit=True)
    if why:
        print(f"p11_sign_rate: {why}", file=sys.stderr)
        return 1
    certs = run.make_certs(["rsa2048", "p256"])
    digest = bytes(range(32))
    keys = {"rsa2048": ("RSA-2048", CKM_RSA_PKCS, SHA256_DIGESTINFO + digest),
            "p256": ("ECDSA P-256", CKM_ECDSA, digest)}
    client = softhsm.p11kit_client_module()
    assert client is not None
    print("| key | SoftHSM, loaded | SoftHSM through p11-kit server (UNIX socket) | µs added per signature |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="pps-p11rate-") as d:
        token = softhsm.make_token(Path(d, "hsm"))
        for n, name in enumerate(keys):
            token.import_key(certs[name]["key"], name, f"{n + 1:02x}")
        with softhsm.P11KitServer(token, Path(d, "p11kit.sock")) as server:
            for name, (title, mech, data) in keys.items():
                os.environ.update(token.env)
                local = sign_rate(softhsm.SOFTHSM_MODULE, token.pin, name, mech, data, a.seconds)
                os.environ.update(server.client_env())
                remote = sign_rate(client, token.pin, name, mech, data, a.seconds)
                print(f"| {title} | {local:.0f}/s | {remote:.0f}/s | "
                      f"{1e6 / remote - 1e6 / local:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
