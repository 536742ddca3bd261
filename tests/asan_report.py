"""Judge AddressSanitizer reports written by `make asan`.

Every memory error fails, and so does a LeakSanitizer that could not run.
A leak fails when our C code (src/_rsaengine/) is on its allocation stack:
the Python interpreter's own allocations are not what the target checks,
and LeakSanitizer cannot tell them apart.
"""
from __future__ import annotations

import glob
import re
import sys

# the extension's sources: src/_rsaengine/, and the one file of src/provider
# built into it (build_ffi.py)
OURS = ("src/_rsaengine/", "src/provider/pubhalf.c")


def findings(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n(?==+\n==\d+==ERROR)|\n\n(?=(?:Direct|Indirect) leak)", text):
        if "LeakSanitizer has encountered a fatal error" in block:
            out.append(block.strip())
            continue
        if "LeakSanitizer" in block and "leak of" not in block:
            continue
        if "leak of" in block:
            if any(ours in block for ours in OURS):
                out.append(block.strip())
        elif "ERROR: AddressSanitizer" in block:
            out.append(block.strip())
    return out


def main(directory: str) -> int:
    bad = []
    for path in sorted(glob.glob(f"{directory}/asan.*")):
        with open(path, errors="replace") as f:
            bad += [f"{path}:\n{b}" for b in findings(f.read())]
    for b in bad:
        print(b, end="\n\n")
    print(f"AddressSanitizer: {len(bad)} finding(s) in our code")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
