"""Tracing end to end: gateway and cloud export to a real OTLP receiver, and an escalated request is one trace."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.conftest import Stack, StackFactory
from tests.otlp import OtlpReceiver, ReceivedSpan
from tests.test_gateway import infer_request
from tiergate.constants import REQUEST_ID_METADATA
from tiergate.settings import TracingSettings
from tiergate.telemetry import Tracing, resolve

GATEWAY_INFER = "/inference.GRPCInferenceService/ModelInfer"
CLOUD_INFER = "/tiergate.cloud.v1.CloudInference/Infer"
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
STATUS_ERROR = trace_pb2.Status.STATUS_CODE_ERROR


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    running = OtlpReceiver()
    await running.start()
    yield running
    await running.stop()


def exporting_to(receiver: OtlpReceiver, service: str, **overrides: object) -> Tracing:
    """Tracing that exports to `receiver` over OTLP/gRPC, quickly, whatever OTEL_* the environment holds."""
    settings = TracingSettings(endpoint=receiver.endpoint, schedule_delay_s=0.05, export_timeout_s=1.0)
    for name, value in overrides.items():
        setattr(settings, name, value)
    return Tracing(resolve(settings, service, env={}))


async def traced_stack(start_stack: StackFactory, receiver: OtlpReceiver, **options: object) -> Stack:
    return await start_stack(
        gateway_tracing=exporting_to(receiver, "tiergate-gateway"),
        cloud_tracing=exporting_to(receiver, "tiergate-cloud"),
        **options,  # type: ignore[arg-type]
    )


async def infer(stack: Stack, text: str, request_id: str, **parameters: str) -> None:
    await stack.stub.ModelInfer(
        infer_request([text], **parameters), timeout=10.0, metadata=((REQUEST_ID_METADATA, request_id),)
    )


def root_of(spans: list[ReceivedSpan], request_id: str) -> ReceivedSpan:
    (root,) = [
        s
        for s in spans
        if s.name == GATEWAY_INFER and s.kind == SERVER and s.attributes.get("tiergate.request_id") == request_id
    ]
    return root


def by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {span.name: span for span in spans}


async def test_an_escalated_request_is_one_trace_across_both_tiers(
    start_stack: StackFactory, receiver: OtlpReceiver, tiny_rows: list[tuple[str, str]]
) -> None:
    # Threshold 1.0: every edge answer is unsure, so the auto request climbs to the cloud.
    stack = await traced_stack(start_stack, receiver, threshold=1.0)
    text = tiny_rows[0][0]
    await infer(stack, text, "req-escalated")
    await infer(stack, text, "req-edge", tier="edge")

    def complete(spans: list[ReceivedSpan]) -> bool:
        names = {(s.service, s.name) for s in spans}
        return ("tiergate-cloud", "tiergate.seal") in names and sum(s.name == GATEWAY_INFER for s in spans) == 2

    spans = await receiver.wait_for(complete)
    root = root_of(spans, "req-escalated")
    trace_spans = [s for s in spans if s.trace_id == root.trace_id]
    gateway = by_name([s for s in trace_spans if s.service == "tiergate-gateway"])
    cloud = by_name([s for s in trace_spans if s.service == "tiergate-cloud"])

    # The root: OTel rpc conventions from the instrumentation, server/network ones, and ours.
    assert root.parent_span_id == ""
    assert root.attributes["rpc.system"] == "grpc"
    assert root.attributes["rpc.service"] == "inference.GRPCInferenceService"
    assert root.attributes["rpc.method"] == "ModelInfer"
    assert root.attributes["server.address"] == "127.0.0.1"
    assert root.attributes["server.port"] == int(stack.target.rsplit(":", 1)[1])
    assert root.attributes["network.peer.address"] == "127.0.0.1"
    assert root.attributes["tiergate.cloud_rows"] == 1
    assert root.attributes["tiergate.escalations.low_confidence"] == 1
    assert root.attributes["tiergate.cost.cloud_only"] > 0

    edge = gateway["tiergate.edge.infer"]
    assert edge.parent_span_id == root.span_id
    assert edge.attributes["tiergate.edge.backend"] == "onnxruntime"
    assert edge.attributes["tiergate.rows"] == 1 and edge.attributes["tiergate.batch_size"] == 1

    route = gateway["tiergate.route"]
    assert route.parent_span_id == root.span_id
    assert route.attributes["tiergate.routing.threshold"] == 1.0
    assert route.attributes["tiergate.routing.signal"] in ("max_prob", "margin", "entropy")
    assert route.attributes["tiergate.routing.escalated_rows"] == 1
    assert route.attributes["tiergate.routing.reasons"] == "low_confidence=1"

    for name in ("tiergate.seal", "tiergate.open"):
        assert gateway[name].attributes["tiergate.envelope.bytes"] > 0
        assert gateway[name].attributes["tiergate.duration_us"] > 0

    # The hop: a client span at the gateway, and the cloud's server span is its child, in the same trace.
    client = gateway[CLOUD_INFER]
    assert client.kind == CLIENT and client.parent_span_id == root.span_id
    assert client.attributes["server.address"] == "127.0.0.1"
    cloud_root = cloud[CLOUD_INFER]
    assert cloud_root.kind == SERVER and cloud_root.parent_span_id == client.span_id
    assert cloud_root.attributes["tiergate.request_id"] == "req-escalated"
    assert cloud["tiergate.cloud.infer"].attributes["tiergate.rows"] == 1
    for name in ("tiergate.open", "tiergate.cloud.infer", "tiergate.seal"):
        assert cloud[name].parent_span_id == cloud_root.span_id

    # The request the edge answered never reached the cloud.
    edge_root = root_of(spans, "req-edge")
    edge_trace = [s for s in spans if s.trace_id == edge_root.trace_id]
    assert {s.service for s in edge_trace} == {"tiergate-gateway"}
    assert {s.name for s in edge_trace} == {GATEWAY_INFER, "tiergate.edge.infer", "tiergate.route"}
    assert by_name(edge_trace)["tiergate.route"].attributes["tiergate.routing.escalated_rows"] == 0


async def test_health_is_not_traced_and_only_server_faults_are_errors(
    start_stack: StackFactory, receiver: OtlpReceiver
) -> None:
    stack = await traced_stack(start_stack, receiver)
    health = health_pb2_grpc.HealthStub(stack.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    bad = infer_request(["milk"])
    bad.inputs[0].datatype = "FP32"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.stub.ModelInfer(bad, metadata=((REQUEST_ID_METADATA, "req-bad"),))
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    spans = await receiver.wait_for(lambda spans: any(s.name == GATEWAY_INFER for s in spans))
    await asyncio.sleep(0.2)  # anything a health check exported would have arrived with it
    assert not [s for s in receiver.spans if "Health" in s.name or "reflection" in s.name]
    root = root_of(spans, "req-bad")
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert root.status_code != STATUS_ERROR, "a caller's mistake is not a server fault"


async def test_a_dead_cloud_makes_the_hop_span_an_error(start_stack: StackFactory, receiver: OtlpReceiver) -> None:
    stack = await start_stack(
        with_cloud=False,
        cloud_target="127.0.0.1:1",
        threshold=1.0,
        gateway_tracing=exporting_to(receiver, "tiergate-gateway"),
    )
    await infer(stack, "whole milk", "req-degraded")
    spans = await receiver.wait_for(lambda spans: any(s.name == GATEWAY_INFER for s in spans))
    root = root_of(spans, "req-degraded")
    assert root.attributes["tiergate.degraded"] is True
    assert root.status_code != STATUS_ERROR, "the caller got an answer"
    (client,) = [s for s in spans if s.name == CLOUD_INFER]
    assert client.status_code == STATUS_ERROR and client.trace_id == root.trace_id


async def test_a_collector_that_dies_mid_traffic_costs_no_request(
    start_stack: StackFactory, receiver: OtlpReceiver, tiny_rows: list[tuple[str, str]]
) -> None:
    stack = await traced_stack(start_stack, receiver, threshold=1.0)
    texts = [text for text, _ in tiny_rows[:20]]
    for i, text in enumerate(texts[:10]):
        await infer(stack, text, f"before-{i}")
    await receiver.wait_for(lambda spans: sum(s.name == GATEWAY_INFER for s in spans) >= 1)
    await receiver.stop()
    for i, text in enumerate(texts[10:]):
        await infer(stack, text, f"after-{i}")  # raises on any failed request
    # Shutting down flushes into a dead collector: bounded by the export timeout, not hung.
    loop = asyncio.get_running_loop()
    started = loop.time()
    await loop.run_in_executor(None, stack.gateway.tracing.shutdown)
    assert loop.time() - started < 10.0


def test_no_endpoint_means_no_provider_and_no_interceptor() -> None:
    tracing = Tracing(resolve(TracingSettings(), "tiergate-gateway", env={}))
    assert not tracing.active
    assert tracing.server_interceptors() == [] and tracing.client_interceptors("127.0.0.1:1") == []


def test_the_standard_variables_configure_tracing() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "edge-eu-1",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.namespace=search",
    }
    config = resolve(TracingSettings(endpoint="http://ignored:4317"), "tiergate-gateway", env=env)
    assert config.endpoint == "http://collector:4318/v1/traces"
    assert config.protocol == "http/protobuf"
    assert config.service_name == "edge-eu-1"
    assert (config.sampler, config.sampler_arg) == ("parentbased_traceidratio", 0.1)
    assert config.resource_attributes == {"deployment.environment": "prod", "service.namespace": "search"}
    assert config.exporting
    assert not resolve(TracingSettings(endpoint="http://c:4317"), "g", env={"OTEL_SDK_DISABLED": "true"}).exporting
    tracing = Tracing(config)
    assert tracing.provider is not None
    assert tracing.provider.resource.attributes["service.name"] == "edge-eu-1"
    assert tracing.provider.resource.attributes["deployment.environment"] == "prod"
    tracing.shutdown()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "zipkin"}, "protocol 'zipkin' is not supported"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "sampler 'sometimes' is not supported"),
        ({"OTEL_TRACES_SAMPLER_ARG": "lots"}, "must be a number in"),
        ({"OTEL_TRACES_SAMPLER_ARG": "2"}, "within [0, 1]"),
    ],
)
def test_bad_tracing_configuration_is_refused_with_a_reason(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        resolve(TracingSettings(), "tiergate-gateway", env=env)
