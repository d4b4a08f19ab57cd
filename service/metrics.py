"""Prometheus metrics of one server (own registry, so several apps can live in one process).

Names follow Prometheus conventions: prefix ``dymu_``, base units (seconds, bytes, FLOPs),
counters end in ``_total``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

# No ``*_created`` series: they double the exposition and no dashboard uses them.
disable_created_metrics()

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
MODEL_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric the service exports; ``render()`` gives the exposition text."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "dymu_http_requests_total",
            "HTTP requests by endpoint (route template), method and status code",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "dymu_http_request_duration_seconds",
            "HTTP request latency by endpoint, method and status code",
            ["endpoint", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "dymu_model_inference_seconds",
            "Model time of one batch (the sub-network's forward), by backend",
            ["backend"],
            buckets=MODEL_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "dymu_images_total", "Images predicted, by backend", ["backend"], registry=r
        )
        self.flops = Counter(
            "dymu_flops_total",
            "FLOPs served (1 multiply-add = 2 FLOPs; conv and linear layers)",
            registry=r,
        )
        self.batch_size = Histogram(
            "dymu_batch_size", "Images per model batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("dymu_queue_depth", "Images waiting for a model batch", registry=r)
        self.queue_rejections = Counter(
            "dymu_queue_rejections_total",
            "Predictions refused with 503 because the queue was full",
            registry=r,
        )
        self.degraded = Counter(
            "dymu_degraded_requests_total",
            "Predictions served at the degrade c or budget instead of their own preference "
            "(DYMU_OVERLOAD=degrade), by reason: queue (over the threshold) or full (admitted "
            "past the limit instead of a 503)",
            ["reason"],
            registry=r,
        )
        self.timeouts = Counter(
            "dymu_request_timeouts_total", "Predictions that ran past the timeout", registry=r
        )
        self.cache_hits = Counter(
            "dymu_preference_cache_hits_total", "Preference lookups served from the cache",
            registry=r,
        )  # fmt: skip
        self.cache_misses = Counter(
            "dymu_preference_cache_misses_total",
            "Preference lookups that computed the preference (once per concurrent group)",
            registry=r,
        )
        self.cache_evictions = Counter(
            "dymu_preference_cache_evictions_total", "Preferences evicted by the LRU", registry=r
        )
        self.cache_entries = Gauge(
            "dymu_preference_cache_entries", "Preferences in the cache", registry=r
        )
        self.cache_bytes = Gauge(
            "dymu_preference_cache_bytes", "Bytes of weights held by the cache", registry=r
        )
        self.materialize_seconds = Histogram(
            "dymu_materialization_seconds",
            "Time to compute a preference: hypernets, tree, BN deltas, copy and fold",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.onnx_export_seconds = Histogram(
            "dymu_onnx_export_seconds",
            "Time to export a tree to ONNX and create its ONNX Runtime session",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.onnx_sessions = Gauge(
            "dymu_onnx_sessions", "ONNX Runtime sessions held (one per tree)", registry=r
        )
        self.ready = Gauge("dymu_ready", "1 when the model is loaded and warmed up", registry=r)
        self.model_info = Info("dymu_model", "The model being served", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
