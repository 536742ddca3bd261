"""Prometheus metrics (`metrics listen on ADDRESS port PORT`).

The parent serves them from a thread; each scrape asks every relay process
for its counters over the control channel.  Labels: `process` (relay
process number) and `generation` (which configuration it runs).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

if TYPE_CHECKING:
    from pyprivsep.parent import Parent

LABELS = ["process", "generation"]


class Collector:
    def __init__(self, parent: "Parent") -> None:
        self.parent = parent

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
        for r in self.parent.relay_stats():
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


class Server:
    def __init__(self, parent: "Parent", host: str, port: int) -> None:
        registry = CollectorRegistry()
        registry.register(Collector(parent))  # type: ignore[arg-type]
        self.httpd, self.thread = start_http_server(port, host, registry)

    def close(self) -> None:
        self.httpd.shutdown()
