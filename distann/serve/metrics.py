"""The service's Prometheus metrics (``GET /metrics``), on a registry of its own.

=====================================  ==========  =============================================
metric                                 type        meaning
=====================================  ==========  =============================================
``distann_requests_total``             counter     requests by endpoint and HTTP status
``distann_request_seconds``            histogram   request latency by endpoint (server side)
``distann_batch_requests``             histogram   requests merged into one coordinator batch
``distann_batch_queries``              histogram   query vectors in one coordinator batch
``distann_shard_scan_seconds``         histogram   worker time of one shard scan task
``distann_shard_worker_seconds_total`` counter    worker scan time by shard
``distann_shards`` / ``_resident``     gauge       shards of the served generation / resident now
``distann_workers``                    gauge       workers of the cluster
``distann_generation``                 gauge       the generation being served
``distann_reloads_total``              counter     generation switches
=====================================  ==========  =============================================
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384, 65536)


class ServiceMetrics:
    def __init__(self, holder):
        self.holder = holder
        self.registry = r = CollectorRegistry()
        self.requests = Counter("distann_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("distann_request_seconds", "Request latency by endpoint (server side)",
                                 ["endpoint"], buckets=_LATENCY, registry=r)
        self.batch_requests = Histogram("distann_batch_requests", "Requests merged into one coordinator batch",
                                        buckets=_SIZES, registry=r)
        self.batch_queries = Histogram("distann_batch_queries", "Query vectors in one coordinator batch",
                                       buckets=_SIZES, registry=r)
        self.scan = Histogram("distann_shard_scan_seconds", "Worker time of one shard scan task",
                              buckets=_LATENCY, registry=r)
        self.scan_total = Counter("distann_shard_worker_seconds", "Worker scan time by shard", ["shard"], registry=r)
        self.reloads = Counter("distann_reloads", "Generation switches", registry=r)
        self._health: tuple[float, dict] = (0.0, {})
        Gauge("distann_shards", "Shards of the served generation", registry=r).set_function(
            lambda: self._state().get("shards", 0))
        Gauge("distann_shards_resident", "Shards with a copy in a worker's memory", registry=r).set_function(
            lambda: self._state().get("shards_resident", 0))
        Gauge("distann_workers", "Workers of the cluster", registry=r).set_function(
            lambda: self._state().get("workers", 0))
        Gauge("distann_generation", "Generation being served", registry=r).set_function(
            lambda: self.holder.current.generation)
        self._reloads_seen = 0

    def _state(self) -> dict:
        """The served index's health, asked of the scheduler at most once a second per scrape."""
        at, state = self._health
        if time.monotonic() - at > 1.0:
            try:
                state = self.holder.current.health()
            except Exception:  # noqa: BLE001 - a scrape must not fail while the cluster recovers
                state = {}
            self._health = (time.monotonic(), state)
        return state

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def batch(self, nrequests: int, nqueries: int) -> None:
        self.batch_requests.observe(nrequests)
        self.batch_queries.observe(nqueries)

    def shards(self, seconds: dict[str, float]) -> None:
        for name, s in seconds.items():
            self.scan.observe(s)
            self.scan_total.labels(name).inc(s)

    def render(self) -> tuple[bytes, str]:
        new = self.holder.reloads - self._reloads_seen
        if new > 0:
            self.reloads.inc(new)
            self._reloads_seen += new
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
