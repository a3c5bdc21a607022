"""Prometheus metrics, one registry per app instance (so tests and workers never collide).

With several workers (`app.workers`), each counts into the directory PROMETHEUS_MULTIPROC_DIR
names (prometheus_client's multiprocess mode), and `/metrics`, whichever worker answers it,
gives the sum over the workers: counters and histograms summed, each worker's gauges apart
(a `pid` label). The library's `process_*` and `python_info` series are then left out: they
would describe the one worker that answered.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

# Set (by the supervisor of several workers) before any worker imports prometheus_client.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# A gauge of a worker's own state: with several workers, one series each (`pid`), of the
# workers alive.
LIVE_PER_WORKER: Literal["liveall"] = "liveall"

# Recall is a few milliseconds; reloads and timeouts reach into seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Stages are per batch and often well under a millisecond.
STAGE_BUCKETS = (0.0001, 0.0002, 0.0005, *LATENCY_BUCKETS)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The `method` label's values; any other method is "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class Metrics:
    """All of the service's metrics. Stage names: `feature_fetch`, `encode`, `search`,
    `serialise` (one observation per batch of recalls)."""

    def __init__(self) -> None:
        disable_created_metrics()  # `*_created` series double the output and say little here
        self.multiprocess = MULTIPROCESS_DIR in os.environ
        self.served: str | None = None  # the version `model_info` names
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if not self.multiprocess:
            ProcessCollector(registry=r)  # CPU, memory, open fds of this worker
            PlatformCollector(registry=r)
        self.requests = Counter(
            "tower_recall_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "tower_recall_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stages = Histogram(
            "tower_recall_stage_duration_seconds",
            "Time per recall stage (one observation per batch)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tower_recall_batch_size",
            "Recalls served together by one fetch, encode and search (micro-batches of "
            "concurrent /v1/recall requests)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "tower_recall_model_info",
            "The serving bundle (1); under several workers, also each one served before (0)",
            ["version"],
            registry=r,
            multiprocess_mode=LIVE_PER_WORKER,
        )
        self.model_items = Gauge(
            "tower_recall_model_items",
            "Items in the index",
            registry=r,
            multiprocess_mode=LIVE_PER_WORKER,
        )
        self.reloads = Counter(
            "tower_recall_model_loads", "Bundle loads by outcome", ["outcome"], registry=r
        )
        self.redis_errors = Counter(
            "tower_recall_redis_errors", "Failed Redis calls", ["operation"], registry=r
        )
        self.redis_skipped = Counter(
            "tower_recall_redis_skipped",
            "Redis calls not made: their node failed less than REDIS_RETRY_AFTER_MS ago",
            ["operation"],
            registry=r,
        )
        self.unreadable_features = Counter(
            "tower_recall_unreadable_features",
            "Stored features values that are not a JSON object, read as no features",
            registry=r,
        )
        self.cache_hits = Counter("tower_recall_cache_hits", "Feature cache hits", registry=r)
        self.cache_misses = Counter("tower_recall_cache_misses", "Feature cache misses", registry=r)
        self.vector_cache = Counter(
            "tower_recall_vector_cache",
            "User-vector cache lookups (hit: no tower call for that user)",
            ["result"],
            registry=r,
        )
        self.feature_source = Counter(
            "tower_recall_feature_source", "Recalls by feature source", ["source"], registry=r
        )
        self.item_changes = Counter(
            "tower_recall_item_changes",
            "Item changes read from the change log and served, by op (put, delete)",
            ["op"],
            registry=r,
        )
        self.overlay_items = Gauge(
            "tower_recall_overlay_items",
            "Items added since the serving bundle, searched beside its index",
            registry=r,
            multiprocess_mode=LIVE_PER_WORKER,
        )
        self.masked_items = Gauge(
            "tower_recall_masked_items",
            "Catalogue items of the serving bundle deleted",
            registry=r,
            multiprocess_mode=LIVE_PER_WORKER,
        )
        self.filter_indexes = Gauge(
            "tower_recall_filter_indexes",
            "Filters searched often that have an index of their own rows in this worker",
            registry=r,
            multiprocess_mode=LIVE_PER_WORKER,
        )

        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}

    def child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: prometheus_client validates the labels and
        takes a lock on every call, several times per request on the hot path."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        # Any method the HTTP parser takes (PROPFIND, PURGE, …) would be a series of its own.
        method = method if method in METHODS else "other"
        self.child(self.requests, method, route, str(status)).inc()
        self.child(self.latency, method, route, str(status)).observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.child(self.stages, stage).observe(seconds)

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_stage(stage, time.perf_counter() - start)

    def set_model(self, version: str, n_items: int, filter_indexes: int) -> None:
        """The serving model's gauges (its index then sets `filter_indexes` as it changes).
        The version served before reads 0 under several workers: there a series once set
        stays in the worker's file (`clear()` only warns that it cannot); a single process
        drops it."""
        if self.multiprocess:
            if self.served not in (None, version):
                self.model_info.labels(self.served).set(0)
        else:
            self.model_info.clear()
        self.served = version
        self.model_info.labels(version).set(1)
        self.model_items.set(n_items)
        self.filter_indexes.set(filter_indexes)

    def set_overlay(self, added: int, masked: int) -> None:
        self.overlay_items.set(added)
        self.masked_items.set(masked)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        workers = CollectorRegistry()
        MultiProcessCollector(workers)  # reads every worker's files at each scrape
        return generate_latest(workers)
