"""The cloud tier's Prometheus metrics: latency, rows, work in flight, and refused envelopes by cause."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tiergate.metrics import LATENCY_BUCKETS, ROW_BUCKETS


class CloudMetrics:
    """Every cloud metric, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "tiergate_cloud_request_duration_seconds",
            "Infer latency at the cloud tier (open, model, seal), by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter(
            "tiergate_cloud_rows_total", "Rows the cloud model answered, by model.", ["model"], registry=r
        )
        self.batch_rows = Histogram(
            "tiergate_cloud_batch_rows", "Rows per cloud model call.", ["model"], buckets=ROW_BUCKETS, registry=r
        )
        self.rows_dropped = Counter(
            "tiergate_cloud_rows_dropped_total",
            "Rows not computed because their caller had gone (cancelled) or its deadline had passed, by reason.",
            ["model", "reason"],
            registry=r,
        )
        self.envelope_rejections = Counter(
            "tiergate_cloud_envelope_rejections_total", "Sealed requests refused, by cause.", ["cause"], registry=r
        )
        # What an autoscaler reads beside CPU (deploy/k8s/components/custom-metrics-hpa): requests and rows the
        # admission bound holds, read when scraped.
        self.inflight_requests = Gauge(
            "tiergate_cloud_inflight_requests", "Infer calls admitted and not yet answered.", registry=r
        )
        self.inflight_rows = Gauge("tiergate_cloud_inflight_rows", "Rows of the calls in flight.", registry=r)
        self.rpc_errors = Counter(
            "tiergate_cloud_rpc_errors_total",
            "RPCs that ended with an error status, by method and code.",
            ["method", "code"],
            registry=r,
        )

    def rpc_failed(self, method: str, code: str) -> None:
        self.rpc_errors.labels(method=method, code=code).inc()
