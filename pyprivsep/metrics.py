"""Prometheus metrics (`metrics listen on ADDRESS port PORT`).

The parent serves them from its own loop, no thread: anyone on the host
may connect, so the work is bounded (netserve: 16 connections at a time,
the request read within two seconds, the answer written within five).
Each scrape gathers every relay process's counters over the control
channels (two seconds at most) and formats them with prometheus_client.
Labels: `process` (relay process number) and `generation` (which
configuration it runs).
"""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from pyprivsep import netserve

if TYPE_CHECKING:
    from pyprivsep.parent import Parent

LABELS = ["process", "generation"]


class Collector:
    """The counters of one scrape, gathered before formatting."""

    def __init__(self, relays: list[dict[str, Any]],
                 services: list[dict[str, Any]] | None = None) -> None:
        self.relays = relays
        self.services = services or []

    def collect(self) -> Iterator[Any]:
        from pyprivsep.parent import LATENCY_BOUNDS_US
        accepted = CounterMetricFamily(
            "pyprivsep_connections_accepted", "Connections accepted", labels=LABELS)
        active = GaugeMetricFamily(
            "pyprivsep_sessions_active", "Connections open now", labels=LABELS)
        done = CounterMetricFamily(
            "pyprivsep_handshakes", "Handshakes completed",
            labels=LABELS + ["kind"])
        failed = CounterMetricFamily(
            "pyprivsep_handshakes_failed", "Handshakes failed, by reason",
            labels=LABELS + ["reason"])
        backend = CounterMetricFamily(
            "pyprivsep_backend_failures", "Backend connections refused or "
            "unreachable", labels=LABELS)
        keyops = CounterMetricFamily(
            "pyprivsep_keyops", "Private-key operations asked of the ca",
            labels=LABELS + ["result"])
        latency = HistogramMetricFamily(
            "pyprivsep_keyop_latency_seconds", "Key operation round trip to "
            "the ca (answered operations)", labels=LABELS)
        traffic = CounterMetricFamily(
            "pyprivsep_bytes", "Bytes relayed", labels=LABELS + ["direction"])
        for r in self.relays:
            s = r.get("stats")
            if s is None:
                continue
            lv = [str(r["relay"]), str(r["generation"])]
            accepted.add_metric(lv, s["accepted"])
            active.add_metric(lv, s["active"])
            done.add_metric(lv + ["full"], s["hs_full"])
            done.add_metric(lv + ["resumed"], s["hs_resumed"])
            for reason in ("client", "ca", "timeout"):
                failed.add_metric(lv + [reason], s[f"fail_{reason}"])
            backend.add_metric(lv, s["fail_backend"])
            keyops.add_metric(lv + ["ok"], s["keyops"] - s["keyop_fail"])
            keyops.add_metric(lv + ["timeout"], s["keyop_timeout"])
            keyops.add_metric(lv + ["failed"], s["keyop_fail"] - s["keyop_timeout"])
            buckets, total = [], 0
            bounds = [str(b / 1e6) for b in LATENCY_BOUNDS_US] + ["+Inf"]
            for bound, count in zip(bounds, s["keyop_lat"]):
                total += count
                buckets.append((bound, total))
            latency.add_metric(lv, buckets, s["keyop_lat_sum"] / 1e6)
            traffic.add_metric(lv + ["in"], s["bytes_in"])
            traffic.add_metric(lv + ["out"], s["bytes_out"])
        yield from (accepted, active, done, failed, backend, keyops, latency,
                    traffic)
        up = GaugeMetricFamily(
            "pyprivsep_keyservice_cas_up", "Keyservice cas running (current "
            "generation)", labels=["service"])
        restarts = CounterMetricFamily(
            "pyprivsep_keyservice_ca_restarts", "Keyservice cas restarted",
            labels=["service"])
        for svc in self.services:
            up.add_metric([svc["name"]], svc["cas_up"])
            restarts.add_metric([svc["name"]], svc["restarts"])
        yield from (up, restarts)


def render(relays: list[dict[str, Any]],
           services: list[dict[str, Any]] | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(relays, services))  # type: ignore[arg-type]
    return bytes(generate_latest(registry))


def http(status: str, body: bytes, ctype: str = "text/plain") -> bytes:
    return (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode() + body


def listen(host: str, port: int) -> socket.socket:
    family, stype, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, stype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


class Server(netserve.Server):
    MAX_CONNS = 16

    def __init__(self, parent: "Parent", host: str, port: int) -> None:
        super().__init__(listen(host, port), "metrics",
                         max_conns=self.MAX_CONNS, max_request=8192,
                         read_timeout=2.0, write_timeout=5.0)
        self.parent = parent

    def complete(self, data: bytes) -> bool:
        return b"\r\n\r\n" in data or b"\n\n" in data

    def handle(self, request: bytes, reply: netserve.Reply) -> None:
        method = request.split(b" ", 1)[0]
        if method not in (b"GET", b"HEAD"):
            reply(http("405 Method Not Allowed", b"GET only\n"))
            return

        def answer(relays: list[dict[str, Any]]) -> None:
            from pyprivsep.control import keyservices
            body = render(relays, keyservices(self.parent))
            out = http("200 OK", body, CONTENT_TYPE_LATEST)
            reply(out[:len(out) - len(body)] if method == b"HEAD" else out)
        self.parent.relay_stats(answer)
