"""OpenTelemetry tracing for both servers: the provider, its OTLP exporter and the gRPC interceptors.

Configured by the standard `OTEL_*` variables, over the `tracing` settings section (the variables
win, as over the rest of the settings file). With no endpoint, or with the SDK disabled, nothing is
exported and no interceptor is installed, so an untraced server pays nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from tiergate import __version__
from tiergate.settings import TracingSettings

logger = logging.getLogger(__name__)

TRACER_NAME = "tiergate"
PROTOCOLS = ("grpc", "http/protobuf")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
# Health checks and reflection are polled by balancers and tools; tracing them is noise.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")


@dataclass(frozen=True)
class TracingConfig:
    """Tracing settings resolved against the environment: what a server actually does."""

    enabled: bool
    endpoint: str | None
    protocol: str
    service_name: str
    sampler: str
    sampler_arg: float | None
    resource_attributes: dict[str, str]
    max_queue_size: int
    max_export_batch_size: int
    schedule_delay_s: float
    export_timeout_s: float

    @property
    def exporting(self) -> bool:
        return self.enabled and bool(self.endpoint)


def _parse_attributes(raw: str | None) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for item in (raw or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = value.strip()
    return attributes


def resolve(settings: TracingSettings, default_service: str, env: Mapping[str, str] | None = None) -> TracingConfig:
    """The effective configuration: `OTEL_*` variables over the settings section over defaults."""
    env = os.environ if env is None else env

    def pick(name: str, configured: Any) -> Any:
        value = env.get(name, "").strip()
        return value if value else configured

    disabled = str(pick("OTEL_SDK_DISABLED", "false")).lower() == "true"
    protocol = str(pick("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", pick("OTEL_EXPORTER_OTLP_PROTOCOL", settings.protocol)))
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTLP protocol {protocol!r} is not supported; use one of {', '.join(PROTOCOLS)}")
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or None
    if endpoint is None:
        base = pick("OTEL_EXPORTER_OTLP_ENDPOINT", settings.endpoint)
        # The generic endpoint is a base URL; over HTTP the traces path is appended to it.
        if base and protocol == "http/protobuf" and not str(base).rstrip("/").endswith("/v1/traces"):
            base = str(base).rstrip("/") + "/v1/traces"
        endpoint = base or None
    sampler = str(pick("OTEL_TRACES_SAMPLER", settings.sampler)).lower()
    if sampler not in SAMPLERS:
        raise ValueError(f"trace sampler {sampler!r} is not supported; use one of {', '.join(SAMPLERS)}")
    raw_arg = pick("OTEL_TRACES_SAMPLER_ARG", settings.sampler_arg)
    try:
        sampler_arg = None if raw_arg is None else float(raw_arg)
    except ValueError:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a number in [0, 1], got {raw_arg!r}") from None
    if sampler_arg is not None and not 0.0 <= sampler_arg <= 1.0:
        raise ValueError(f"the trace sampler argument must be within [0, 1], got {sampler_arg}")
    attributes = _parse_attributes(settings.resource_attributes)
    attributes.update(_parse_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES")))
    service = str(pick("OTEL_SERVICE_NAME", settings.service_name or attributes.get("service.name") or default_service))
    return TracingConfig(
        enabled=settings.enabled and not disabled,
        endpoint=endpoint,
        protocol=protocol,
        service_name=service,
        sampler=sampler,
        sampler_arg=sampler_arg,
        resource_attributes=attributes,
        max_queue_size=settings.max_queue_size,
        max_export_batch_size=min(settings.max_export_batch_size, settings.max_queue_size),
        schedule_delay_s=settings.schedule_delay_s,
        export_timeout_s=settings.export_timeout_s,
    )


def make_sampler(name: str, arg: float | None) -> Sampler:
    ratio = TraceIdRatioBased(1.0 if arg is None else arg)
    roots: dict[str, Sampler] = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF, "traceidratio": ratio}
    if name.startswith("parentbased_"):
        return ParentBased(roots[name.removeprefix("parentbased_")])
    return roots[name]


def make_exporter(config: TracingConfig) -> SpanExporter:
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        endpoint = config.endpoint or ""
        insecure = endpoint.startswith("http://") or "://" not in endpoint
        return GrpcExporter(endpoint=endpoint, insecure=insecure, timeout=config.export_timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=config.endpoint, timeout=config.export_timeout_s)


class Tracing:
    """One server's tracer provider and the interceptors that put its RPCs into traces."""

    def __init__(self, config: TracingConfig, *, processor: SpanProcessor | None = None) -> None:
        """`processor` replaces the OTLP batch exporter (tests hand in an in-memory one)."""
        self.config = config
        self.provider: TracerProvider | None = None
        self._shut_down = False
        if processor is None and config.exporting:
            processor = BatchSpanProcessor(
                make_exporter(config),
                max_queue_size=config.max_queue_size,
                max_export_batch_size=config.max_export_batch_size,
                schedule_delay_millis=config.schedule_delay_s * 1000.0,
                export_timeout_millis=config.export_timeout_s * 1000.0,
            )
        if processor is not None and config.enabled:
            resource = Resource.create(
                {**config.resource_attributes, "service.name": config.service_name, "service.version": __version__}
            )
            self.provider = TracerProvider(resource=resource, sampler=make_sampler(config.sampler, config.sampler_arg))
            self.provider.add_span_processor(processor)
            logger.info(
                "tracing: exporting %s spans over OTLP %s to %s (sampler %s)",
                config.service_name,
                config.protocol,
                config.endpoint or "an in-process processor",
                config.sampler + ("" if config.sampler_arg is None else f" {config.sampler_arg}"),
            )
        self.tracer: trace.Tracer = (
            self.provider.get_tracer(TRACER_NAME, __version__) if self.provider is not None else trace.NoOpTracer()
        )

    @classmethod
    def from_settings(cls, settings: TracingSettings, default_service: str) -> Tracing:
        return cls(resolve(settings, default_service))

    @property
    def active(self) -> bool:
        return self.provider is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The server-span interceptor, health and reflection left out; none when tracing is off."""
        if self.provider is None:
            return []
        untraced = filters.any_of(
            filters.service_name(UNTRACED_SERVICES[0]), filters.service_prefix(UNTRACED_SERVICES[1])
        )
        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(
            self.provider, filter_=filters.negate(untraced)
        )
        return [interceptor]

    def client_interceptors(self, server_address: str) -> list[grpc.aio.ClientInterceptor]:
        """Client spans for calls to `server_address` (HOST:PORT), carrying W3C trace context in metadata."""
        if self.provider is None:
            return []
        host, _, port = server_address.rpartition(":")

        def annotate(span: trace.Span, request: object) -> None:
            span.set_attribute("server.address", host or server_address)
            if port.isdigit():
                span.set_attribute("server.port", int(port))

        # The gateway's own watch of the cloud's health is not traced either.
        untraced = filters.negate(filters.service_name(UNTRACED_SERVICES[0]))
        interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(
            self.provider, filter_=untraced, request_hook=annotate
        )
        return interceptors

    def shutdown(self) -> None:
        """Flush what is queued (bounded by the export timeout) and stop exporting; later calls do nothing."""
        if self.provider is not None and not self._shut_down:
            self._shut_down = True
            self.provider.shutdown()


def annotate_server_span(context: grpc.aio.ServicerContext[Any, Any], host: str, port: int) -> trace.Span:
    """Add the semantic-convention `server.*` and `network.*` attributes to the current server span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return span
    span.set_attribute("server.address", host)
    span.set_attribute("server.port", port)
    span.set_attribute("network.transport", "tcp")
    peer = context.peer() or ""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        ip, _, peer_port = address.rpartition(":")
        span.set_attribute("network.type", kind)
        span.set_attribute("network.peer.address", ip.strip("[]"))
        if peer_port.isdigit():
            span.set_attribute("network.peer.port", int(peer_port))
    return span


@contextmanager
def timed_span(tracer: trace.Tracer, name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[trace.Span]:
    """A child span that also records its own duration in microseconds as `tiergate.duration_us`."""
    started = time.perf_counter()
    with tracer.start_as_current_span(name, attributes=dict(attributes or {})) as span:
        try:
            yield span
        finally:
            if span.is_recording():
                span.set_attribute("tiergate.duration_us", round((time.perf_counter() - started) * 1e6, 1))
