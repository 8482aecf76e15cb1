"""Prometheus metrics of one app (own registry, so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

STEPS = ("encode", "search", "filter", "metadata", "hygiene", "fetch", "queue", "decode")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "clipsearch_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "clipsearch_request_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.step = Histogram(
            "clipsearch_step_seconds",
            "Latency of each /knn step: encode, search, filter, metadata, hygiene, fetch, decode",
            ["step"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "clipsearch_encode_batch_size",
            "Texts encoded together by the micro-batcher",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.removed = Counter(
            "clipsearch_results_removed", "Results removed by result hygiene", ["reason"], registry=r
        )
        self.plans = Counter("clipsearch_search_plans", "Search plans chosen", ["plan"], registry=r)
        self.vectors = Gauge("clipsearch_index_vectors", "Vectors served", ["index", "modality"], registry=r)
        for s in STEPS:
            self.step.labels(s)
        for reason in ("duplicate", "unsafe"):
            self.removed.labels(reason)

    def observe_steps(self, timings: dict[str, float]) -> None:
        for name, seconds in timings.items():
            if name in STEPS:
                self.step.labels(name).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
