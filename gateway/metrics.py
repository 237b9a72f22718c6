"""The gateway's Prometheus metrics: what was answered where, why it escalated, what failed and what it cost.

Label values come from bounded sets (model and tier names, reasons, status codes, causes); no request
text or id ever becomes a label.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics import MetricWrapperBase

from gateway.cost import Cost
from tiergate.metrics import LATENCY_BUCKETS, ROW_BUCKETS


class GatewayMetrics:
    """Every gateway metric, in a registry of its own (two servers in one process never share one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Labelled children by metric and label values: looking one up anew costs microseconds per request.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.request_seconds = Histogram(
            "tiergate_request_duration_seconds",
            "ModelInfer latency at the gateway, by model and by the last tier that answered a row of it.",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rpc_errors = Counter(
            "tiergate_rpc_errors_total",
            "RPCs that ended with an error status, by method and code.",
            ["method", "code"],
            registry=r,
        )
        self.rows = Counter("tiergate_rows_total", "Rows answered, by model and tier.", ["model", "tier"], registry=r)
        self.escalations = Counter(
            "tiergate_escalations_total",
            "Rows sent past the first tier, by model and reason.",
            ["model", "reason"],
            registry=r,
        )
        self.degraded = Counter(
            "tiergate_degraded_responses_total",
            "Responses where a later tier failed and earlier answers were returned instead.",
            ["model"],
            registry=r,
        )
        self.hop_errors = Counter(
            "tiergate_hop_errors_total",
            "Failed calls to a remote tier, by tier and status code.",
            ["tier", "code"],
            registry=r,
        )
        self.envelope_rejections = Counter(
            "tiergate_envelope_rejections_total",
            "Sealed responses from a remote tier that were refused, by cause.",
            ["tier", "cause"],
            registry=r,
        )
        self.tier_ready = Gauge(
            "tiergate_tier_ready", "1 while a remote tier's own health service reports SERVING.", ["tier"], registry=r
        )
        self.breaker_state = Gauge(
            "tiergate_breaker_state", "A remote tier's circuit: 0 closed, 1 half-open, 2 open.", ["tier"], registry=r
        )
        self.breaker_transitions = Counter(
            "tiergate_breaker_transitions_total",
            "Circuit state changes, by tier and new state.",
            ["tier", "state"],
            registry=r,
        )
        self.inflight = Gauge(
            "tiergate_inflight_requests", "ModelInfer calls in progress, by model.", ["model"], registry=r
        )
        self.edge_batch_rows = Histogram(
            "tiergate_edge_batch_rows", "Rows per edge model call.", ["tier"], buckets=ROW_BUCKETS, registry=r
        )
        self.hop_call_rows = Histogram(
            "tiergate_hop_call_rows",
            "Rows per sealed call to a remote tier (a shared call holds the rows of several requests).",
            ["tier"],
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.hop_call_requests = Histogram(
            "tiergate_hop_call_requests",
            "Gateway requests whose rows one sealed call to a remote tier carries.",
            ["tier"],
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "tiergate_cache_lookups_total",
            "Rows looked up in the response cache, by model and result (hit or miss).",
            ["model", "result"],
            registry=r,
        )
        self.cache_entries = Gauge(
            "tiergate_cache_entries", "Answers held in the response cache, by model.", ["model"], registry=r
        )
        self.cache_bytes = Gauge(
            "tiergate_cache_bytes", "Bytes the response cache accounts for, by model.", ["model"], registry=r
        )
        self.cost_spent = Counter(
            "tiergate_cost_spent_total",
            "What the tiers' work cost, in the configured currency (label), by model.",
            ["model", "currency"],
            registry=r,
        )
        self.cost_cloud_only = Counter(
            "tiergate_cost_cloud_only_total",
            "What the same rows would have cost sent straight to the last tier.",
            ["model", "currency"],
            registry=r,
        )
        self.cost_saved = Counter(
            "tiergate_cost_saved_total",
            "What rows the edge answered saved against the last tier's price.",
            ["model", "currency"],
            registry=r,
        )
        self.cost_overspent = Counter(
            "tiergate_cost_overspent_total",
            "The edge's price of rows that escalated anyway; net saving = saved - overspent = cloud_only - spent.",
            ["model", "currency"],
            registry=r,
        )
        self.drift_agreement = Gauge(
            "tiergate_drift_agreement",
            "Share of shadow-sampled edge answers the last tier agrees with, over the drift window.",
            ["model"],
            registry=r,
        )
        self.drift_label_agreement = Gauge(
            "tiergate_drift_label_agreement",
            "Edge/cloud agreement over the drift window, per edge label.",
            ["model", "label"],
            registry=r,
        )
        self.drift_alarm = Gauge(
            "tiergate_drift_alarm", "1 while drift agreement is below its alarm level.", ["model"], registry=r
        )
        self.drift_alarm_level = Gauge(
            "tiergate_drift_alarm_agreement",
            "The agreement below which the drift alarm fires (settings, or calibrated agreement less a margin).",
            ["model"],
            registry=r,
        )
        self.drift_sampled = Counter(
            "tiergate_drift_sampled_rows_total", "Edge answers queued for a shadow comparison.", ["model"], registry=r
        )
        self.drift_compared = Counter(
            "tiergate_drift_compared_rows_total", "Shadow comparisons made.", ["model"], registry=r
        )
        self.drift_dropped = Counter(
            "tiergate_drift_dropped_rows_total",
            "Samples dropped because the drift queue was full.",
            ["model"],
            registry=r,
        )
        self.drift_failed = Counter(
            "tiergate_drift_failed_rows_total", "Samples lost because the shadow call failed.", ["model"], registry=r
        )
        self.model_info = Info(
            "tiergate_model",
            "The served model: version, routing signal, calibrated threshold, tier chain.",
            ["model"],
            registry=r,
        )

    def describe_model(self, model: str, *, version: str, signal: str, threshold: float, chain: list[str]) -> None:
        self.model_info.labels(model=model).info(
            {"version": version, "signal": signal, "threshold": f"{threshold:.6g}", "chain": ",".join(chain)}
        )

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """`metric.labels(*values)`, remembered (label values come from bounded sets, so this stays small)."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def answered(
        self,
        model: str,
        *,
        seconds: float,
        tiers: Mapping[str, int],
        reasons: Mapping[str, int],
        degraded: bool,
        cost: Cost,
        currency: str,
        top_tier: str,
    ) -> None:
        """Record one answered ModelInfer: `tiers` rows per answering tier, `reasons` escalations by reason."""
        child = self.child
        child(self.request_seconds, model, top_tier).observe(seconds)
        for tier, count in tiers.items():
            child(self.rows, model, tier).inc(count)
        for reason, count in reasons.items():
            child(self.escalations, model, reason).inc(count)
        if degraded:
            child(self.degraded, model).inc()
        child(self.cost_spent, model, currency).inc(cost.spent)
        child(self.cost_cloud_only, model, currency).inc(cost.cloud_only)
        child(self.cost_saved, model, currency).inc(cost.saved)
        child(self.cost_overspent, model, currency).inc(cost.overspent)

    def rpc_failed(self, method: str, code: str) -> None:
        self.rpc_errors.labels(method=method, code=code).inc()
