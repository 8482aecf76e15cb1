"""Prometheus metrics of one app (own registry, so several apps in one process never collide)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from clipsearch.errors import ConfigError

logger = logging.getLogger(__name__)

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

STEPS = ("encode", "search", "filter", "metadata", "hygiene", "fetch", "queue", "decode")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        #: called before every scrape (registered first, so it runs before the gauges are read)
        self.before_collect: Callable[[], None] | None = None
        r.register(_BeforeCollect(self))
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
        self.decodes = Gauge(
            "clipsearch_image_decodes",
            "Query image decodes admitted (in_flight) and waiting for a slot (waiting)",
            ["state"],
            registry=r,
        )
        self.decode_bytes = Gauge(
            "clipsearch_image_decode_reserved_bytes", "Estimated memory of the decodes in flight", registry=r
        )
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


class _BeforeCollect:
    """A collector without metrics: refreshes the live gauges when a scrape starts."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        hook = self.metrics.before_collect
        if hook is not None:
            try:
                hook()
            except Exception:  # a scrape must not fail because a gauge could not be read
                logger.exception("refreshing the metrics gauges failed")
        return iter(())


def start_metrics_server(metrics: Metrics, host: str, port: int) -> Any:
    """Serve `metrics` at http://host:port/metrics from a daemon thread (prometheus_client's WSGI server);
    returns the server (call .shutdown() to stop it). ConfigError when the address cannot be bound."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        raise ConfigError(
            f"cannot listen for metrics on {host}:{port}: {e.strerror or e}",
            hint="--metrics-host HOST --metrics-port PORT with a free port",
        ) from None
    logger.info(
        "metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", server.server_port
    )
    return server
