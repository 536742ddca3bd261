"""pyprivsep ctl [-j] [-s socket] command: talk to a running pyprivsep."""
from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from pyprivsep.config import DEFAULT_SOCKET


def request(path: str, words: list[str], timeout: float = 10.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"cmd": words}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:        # e.g. the daemon's connection limit was reached
        raise ConnectionError("the daemon closed the connection unanswered")
    return dict(json.loads(data))


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in cells)


def human_summary(a: dict[str, Any]) -> str:
    t = a["totals"]
    lines = [f"pyprivsep {a['version']} ({a['library']}), generation "
             f"{a['generation']}, prefork {a['prefork']}, keys in "
             f"{'the relays' if a['keys'] == 'inprocess' else 'ca processes'}"]
    lines += [f"relay {x['relay']}: listen {x['listen']} -> {x['forward']}"
              for x in a["listeners"]]
    rows = []
    for r in a["relays"]:
        s = r.get("stats", {})
        rows.append([f"{r['relay']}{' (draining)' if r['draining'] else ''}",
                     r["pid"], r["ca_pid"] or "-", s.get("active", "?"),
                     s.get("hs_full", "?"), s.get("hs_resumed", "?"),
                     sum(s.get(k, 0) for k in ("fail_client", "fail_ca",
                                               "fail_timeout")),
                     s.get("keyops", "?"), s.get("keyop_fail", "?"),
                     r.get("error", "")])
    lines.append(table(rows, ["relay", "pid", "ca pid", "sessions", "full",
                              "resumed", "failed", "keyops", "keyop fail", ""]))
    lines.append(f"total: {t.get('active', 0)} sessions, "
                 f"{t.get('hs_full', 0)} full and {t.get('hs_resumed', 0)} "
                 f"resumed handshakes, failed: {t.get('fail_client', 0)} client, "
                 f"{t.get('fail_ca', 0)} ca, {t.get('fail_timeout', 0)} timeout; "
                 f"{t.get('fail_backend', 0)} backend failures; "
                 f"{t.get('bytes_in', 0)} bytes in, {t.get('bytes_out', 0)} out")
    return "\n".join(lines)


def staple(ocsp: dict[str, Any] | None) -> str:
    """A keypair's OCSP column: none, stapled until when, or not stapled."""
    if ocsp is None:
        return "-"
    if not ocsp["stapled"]:
        return "not stapled (out of date)"
    return f"stapled until {ocsp['next_update']}" if ocsp["next_update"] else "stapled"


def human(words: list[str], a: dict[str, Any]) -> str:
    if "error" in a:
        return f"error: {a['error']}"
    if "ok" in a:
        return str(a["ok"])
    if words == ["show", "summary"]:
        return human_summary(a)
    if words == ["show", "sessions"]:
        return table([[s["relay_process"], s["relay"], s["client"],
                       s.get("backend", ""), s["state"], s["age"], s["idle"],
                       s["bytes_in"], s["bytes_out"]]
                      for s in a["sessions"]],
                     ["process", "relay", "client", "backend", "state", "age",
                      "idle", "bytes in", "bytes out"])
    if words == ["show", "hosts"]:
        return table([[h["relay"], h["table"] + (" (fallback)" if h["fallback"] else ""),
                       h["host"], h["port"], h["check"], h["state"], h["reason"]]
                      for h in a["hosts"]],
                     ["relay", "table", "host", "port", "check", "state", "last check"])
    if words == ["show", "keys"]:
        return table([[k.get("relay", k.get("keyservice")), k["type"], k["subject"],
                       k["not_after"], k["key_id"], k["held_by"], staple(k.get("ocsp"))]
                      for k in a["keys"]],
                     ["relay", "key", "subject", "expires", "key id", "held by", "ocsp"])
    return json.dumps(a, indent=2)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="pyprivsep ctl", usage="pyprivsep ctl [-j] [-s socket] command",
        description="commands: show summary | show sessions | show keys | "
                    "show hosts | "
                    "reload | stop | log brief | log verbose")
    ap.add_argument("-j", action="store_true", help="answer in JSON")
    ap.add_argument("-s", default=DEFAULT_SOCKET, metavar="socket",
                    help=f"control socket (default {DEFAULT_SOCKET})")
    ap.add_argument("command", nargs="+")
    args = ap.parse_args(argv)
    try:
        answer = request(args.s, args.command)
    except OSError as e:
        print(f"pyprivsep ctl: {args.s}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2) if args.j else human(args.command, answer))
    return 1 if "error" in answer else 0
