"""ModelStreamInfer: each request of a bidirectional stream answered like ModelInfer, in order, errors in place."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from gateway.auth import NO_TOKEN, AuthInterceptor
from gateway.server import AUDITED_METHODS, SERVICE_NAME
from gateway.servicer import request_id_of
from proto.inference import grpc_service_pb2 as pb
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT, Stack, StackFactory
from tests.otlp import OtlpReceiver
from tests.test_gateway import infer_request, rows
from tests.test_tracing import exporting_to
from tiergate.audit import AuditLog, verify
from tiergate.constants import MODEL_NAME, REQUEST_ID_METADATA
from tiergate.rpc import INTERNAL_MESSAGE, UNDECODABLE_MESSAGE, AuditInterceptor, ManagedServer, answer_each
from tiergate.settings import AuditSettings
from tiergate.tokens import add as add_token

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
TEXTS = ["whole milk", "sourdough bread", "free range eggs", "greek yogurt", "baby spinach", "cheddar cheese"]
# A truncated length-delimited field: bytes no ModelInferRequest parses from.
UNDECODABLE_BYTES = b"\x0a\x05ab"
SENT_ID = "stream-req-7"


def numbered(number: int) -> pb.ModelInferRequest:
    """Request `number`: one to three rows, its own id."""
    request = infer_request([TEXTS[(number + k) % len(TEXTS)] for k in range(1 + number % 3)])
    request.id = f"r{number}"
    return request


def wrong_datatype() -> pb.ModelInferRequest:
    request = infer_request(["milk"])
    request.inputs[0].datatype = "FP32"
    return request


def unknown_model() -> pb.ModelInferRequest:
    request = infer_request(["milk"])
    request.model_name = "no-such-model"
    return request


def raw_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable[bytes, pb.ModelStreamInferResponse]:
    """ModelStreamInfer sending bytes as given, so a test can put bytes that do not parse on the stream."""
    return channel.stream_stream(
        STREAM, request_serializer=None, response_deserializer=pb.ModelStreamInferResponse.FromString
    )


async def stream(
    stack: Stack, requests: Iterable[pb.ModelInferRequest | bytes], metadata: Sequence[tuple[str, str]] = ()
) -> tuple[list[pb.ModelStreamInferResponse], grpc.aio.Metadata | None]:
    """Send `requests` on one stream; its responses and trailing metadata."""

    async def sent() -> AsyncIterator[bytes]:
        for request in requests:
            yield request if isinstance(request, bytes) else request.SerializeToString()

    call = raw_stream(stack.channel)(sent(), metadata=tuple(metadata), timeout=30.0)
    responses = [response async for response in call]
    return responses, await call.trailing_metadata()


def rpc_errors(stack: Stack, method: str, code: str) -> float:
    value = stack.gateway.metrics.registry.get_sample_value(
        "tiergate_rpc_errors_total", {"method": method, "code": code}
    )
    return value or 0.0


async def test_a_stream_answers_in_order_and_a_bad_request_fails_alone(start_stack: StackFactory) -> None:
    stack = await start_stack()
    good = [numbered(n) for n in range(30)]
    too_many = infer_request(["milk"] * 65)  # over limits.max_batch_rows (64)
    bad_hint = infer_request(["milk"], tier="gpu")
    sent: list[pb.ModelInferRequest | bytes] = [
        *good[:10],
        wrong_datatype(),
        *good[10:20],
        unknown_model(),
        UNDECODABLE_BYTES,
        too_many,
        bad_hint,
        *good[20:],
    ]
    responses, trailing = await stream(stack, sent, metadata=[(REQUEST_ID_METADATA, SENT_ID)])

    assert len(responses) == len(sent), "one response per request"
    answered = [r for r in responses if not r.error_message]
    assert [r.infer_response.id for r in answered] == [f"r{n}" for n in range(30)], "in request order"
    errors = [r.error_message for r in responses if r.error_message]
    wanted = "INVALID_ARGUMENT: input 'text' must have datatype BYTES, got 'FP32'; "
    assert errors[0] == wanted + "this model takes 'text' (BYTES, shape [-1])"
    assert errors[1] == ("NOT_FOUND: model 'no-such-model' is not served here; available models: product-category")
    assert errors[2] == f"INVALID_ARGUMENT: {UNDECODABLE_MESSAGE}"
    assert errors[3] == "RESOURCE_EXHAUSTED: batch of 65 rows exceeds the limit of 64; split it"
    assert errors[4] == "INVALID_ARGUMENT: parameter 'tier' must be one of auto, edge, cloud; got 'gpu'"
    assert len(errors) == 5
    assert not any(r.infer_response.outputs for r in responses if r.error_message)
    assert dict(trailing or ()) == {REQUEST_ID_METADATA: SENT_ID}

    # Counted like ModelInfer: errors by method and code; rows by the tiered model, whichever RPC asked.
    assert rpc_errors(stack, "ModelStreamInfer", "INVALID_ARGUMENT") == 3
    assert rpc_errors(stack, "ModelStreamInfer", "NOT_FOUND") == 1
    assert rpc_errors(stack, "ModelStreamInfer", "RESOURCE_EXHAUSTED") == 1
    registry = stack.gateway.metrics.registry
    counted = sum(
        registry.get_sample_value("tiergate_rows_total", {"model": MODEL_NAME, "tier": tier}) or 0.0
        for tier in ("edge", "cloud")
    )
    assert counted == sum(len(r.inputs[0].contents.bytes_contents) for r in good)

    # Each streamed answer is the unary answer to the same request: its own rows, nobody else's.
    for request, response in zip(good, answered, strict=True):
        unary = await stack.stub.ModelInfer(request, timeout=10.0)
        assert rows(response.infer_response) == rows(unary)
        assert len(rows(response.infer_response)) == len(request.inputs[0].contents.bytes_contents)


async def test_streams_do_not_mix_and_an_empty_stream_ends_cleanly(start_stack: StackFactory) -> None:
    stack = await start_stack()
    first, second, empty = await asyncio.gather(
        stream(stack, [numbered(n) for n in range(20)]),
        stream(stack, [numbered(n) for n in range(100, 120)]),
        stream(stack, []),
    )
    assert [r.infer_response.id for r in first[0]] == [f"r{n}" for n in range(20)]
    assert [r.infer_response.id for r in second[0]] == [f"r{n}" for n in range(100, 120)]
    assert empty[0] == []
    # The caller sent no request id: the gateway names each stream, and says so.
    assert len({dict(first[1] or ())[REQUEST_ID_METADATA], dict(second[1] or ())[REQUEST_ID_METADATA]}) == 2


async def test_a_secured_gateway_refuses_a_stream_without_a_token_and_permission_fails_in_stream(
    start_stack: StackFactory, key_dir: Path
) -> None:
    token = add_token(key_dir / "tokens.json", f"streamer-{uuid.uuid4().hex[:8]}", [MODEL_NAME])
    other_name = f"other-{uuid.uuid4().hex[:8]}"
    other = add_token(key_dir / "tokens.json", other_name, ["query-intent"])
    stack = await start_stack(keys=key_dir, token=token)

    # Refused before any request is read: the refused streams send none, as a client that writes after the
    # status has arrived sees grpcio's own "Internal error from Core" instead of it.
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stream(stack, [])
    assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert missing.value.details() == NO_TOKEN
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stream(stack, [], metadata=[("authorization", "Bearer not-a-token")])
    assert unknown.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "not accepted" in (unknown.value.details() or "")

    # Permission is per request, as in Triton's stream: each refused in place, and the stream stays open.
    denied, _ = await stream(stack, [numbered(1), numbered(2)], metadata=[("authorization", f"Bearer {other}")])
    assert [r.error_message for r in denied] == [
        f"PERMISSION_DENIED: client {other_name!r} may not call model {MODEL_NAME!r}; "
        "ask the operator to add it to the client's models"
    ] * 2
    allowed, _ = await stream(stack, [numbered(1), numbered(2)], metadata=[("authorization", f"Bearer {token}")])
    assert [r.infer_response.id for r in allowed] == ["r1", "r2"] and not any(r.error_message for r in allowed)


async def test_the_audit_log_has_a_line_per_streamed_request_and_one_per_refused_stream(
    start_stack: StackFactory, key_dir: Path, tmp_path: Path
) -> None:
    name = f"audited-{uuid.uuid4().hex[:8]}"
    token = add_token(key_dir / "tokens.json", name, [MODEL_NAME])
    stack = await start_stack(keys=key_dir, token=token)
    gateway = stack.gateway
    # The gateway's servicer and interceptors as the gateway wires them, with ModelStreamInfer audited.
    log = AuditLog(AuditSettings(path=tmp_path / "audit.log"))
    assert gateway.clients is not None
    interceptors = [
        AuditInterceptor(log, [*AUDITED_METHODS, "ModelStreamInfer"], request_id_of),
        AuthInterceptor(gateway.settings.auth, lambda: gateway.clients),  # type: ignore[arg-type, return-value]
    ]

    def register(server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(gateway.servicer, server)
        return [SERVICE_NAME]

    audited = ManagedServer(register, max_message_bytes=1 << 22, inner_interceptors=interceptors)
    port = await audited.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = raw_stream(channel)
            authorized = (("authorization", f"Bearer {token}"), (REQUEST_ID_METADATA, SENT_ID))

            async def sent() -> AsyncIterator[bytes]:
                for request in (numbered(0), wrong_datatype(), numbered(1)):
                    yield request.SerializeToString()

            responses = [r async for r in call(sent(), metadata=authorized, timeout=30.0)]
            assert [bool(r.error_message) for r in responses] == [False, True, False]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [r async for r in call(iter(()), timeout=30.0)]  # no token; no request (see above)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await audited.stop(0)
        log.close()

    assert verify(tmp_path / "audit.log").ok
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(line["request_id"], line["status"]) for line in lines] == [
        (f"{SENT_ID}.1", "OK"),
        (f"{SENT_ID}.2", "INVALID_ARGUMENT"),
        (f"{SENT_ID}.3", "OK"),
        (lines[3]["request_id"], "UNAUTHENTICATED"),
    ]
    assert {line["method"] for line in lines} == {"ModelStreamInfer"}
    first, _, third, stream_line = lines
    assert first["client"] == name and first["model"] == MODEL_NAME and first["rows"] == 1
    assert first["tiers"] and first["latency_ms"] > 0
    assert third["rows"] == 2
    assert stream_line["messages"] == 0 and "client" not in stream_line, "refused before any request"
    assert "whole milk" not in (tmp_path / "audit.log").read_text(), "never the payload"


# A stand-alone service for what the kernel does with streams it knows nothing about.
ECHO = "tiergate.test.Echo"
_Health = health_pb2.HealthCheckRequest


async def _plain_stream(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[Any]:
    async for request in requests:
        if request.service == "boom":
            raise KeyError("/secret/path/to/keys")
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _each_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    async def answer(request: Any) -> Any:
        if request.service == "boom":
            raise KeyError("/secret/path/to/keys")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def refusal(code: grpc.StatusCode, message: str) -> Any:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async for response in answer_each(requests, answer, refusal):
        yield response


@pytest.fixture
async def echo() -> AsyncIterator[tuple[grpc.aio.Channel, list[tuple[str, str]]]]:
    failures: list[tuple[str, str]] = []
    handlers = {
        "Plain": grpc.stream_stream_rpc_method_handler(
            _plain_stream, _Health.FromString, health_pb2.HealthCheckResponse.SerializeToString
        ),
        "Each": grpc.stream_stream_rpc_method_handler(
            _each_stream, _Health.FromString, health_pb2.HealthCheckResponse.SerializeToString
        ),
    }

    def register(server: grpc.aio.Server) -> list[str]:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO, handlers),))
        return []

    server = ManagedServer(register, max_message_bytes=1 << 20, on_error=lambda m, c: failures.append((m, c)))
    port = await server.start("127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, failures
    await server.stop(0)


async def _echo(channel: grpc.aio.Channel, method: str, sent: list[bytes]) -> list[Any]:
    call: grpc.aio.StreamStreamMultiCallable[bytes, Any] = channel.stream_stream(
        f"/{ECHO}/{method}", request_serializer=None, response_deserializer=health_pb2.HealthCheckResponse.FromString
    )

    async def requests() -> AsyncIterator[bytes]:
        for request in sent:
            yield request

    return [response.status async for response in call(requests(), timeout=10.0)]


# `service` is a proto3 string: invalid UTF-8 in it does not parse.
_INVALID_UTF8 = b"\x0a\x02\xc3\x28"


async def test_the_kernel_never_leaks_internals_from_a_stream(
    echo: tuple[grpc.aio.Channel, list[tuple[str, str]]], caplog: pytest.LogCaptureFixture
) -> None:
    channel, failures = echo
    ok, boom = _Health(service="ok").SerializeToString(), _Health(service="boom").SerializeToString()
    serving, unknown = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

    # A stream answered message by message: the failing and the undecodable ones are answered, the rest go on.
    assert await _echo(channel, "Each", [ok, boom, _INVALID_UTF8, ok]) == [serving, unknown, unknown, serving]
    assert failures == [("Each", "INTERNAL"), ("Each", "INVALID_ARGUMENT")]
    assert "KeyError" in caplog.text, "the server log has the details"

    # Any other stream ends with the status, never the exception's text.
    with pytest.raises(grpc.aio.AioRpcError) as crashed:
        await _echo(channel, "Plain", [ok, boom, ok])
    assert crashed.value.code() is grpc.StatusCode.INTERNAL
    assert crashed.value.details() == INTERNAL_MESSAGE
    with pytest.raises(grpc.aio.AioRpcError) as undecodable:
        await _echo(channel, "Plain", [ok, _INVALID_UTF8])
    assert undecodable.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert undecodable.value.details() == UNDECODABLE_MESSAGE
    assert failures[2:] == [("Plain", "INTERNAL"), ("Plain", "INVALID_ARGUMENT")]


async def test_a_traced_stream_is_one_server_span_with_the_requests_inside(
    start_stack: StackFactory, receiver: OtlpReceiver
) -> None:
    stack = await start_stack(gateway_tracing=exporting_to(receiver, "tiergate-gateway"))
    responses, _ = await stream(
        stack, [numbered(0), wrong_datatype(), numbered(1)], metadata=[(REQUEST_ID_METADATA, SENT_ID)]
    )
    assert [r.infer_response.id for r in responses] == ["r0", "", "r1"]
    assert responses[1].error_message.startswith("INVALID_ARGUMENT: ")

    def streamed(spans: list[Any]) -> bool:
        return any(s.name == STREAM for s in spans)

    spans = await receiver.wait_for(streamed)
    (root,) = [s for s in spans if s.name == STREAM]
    assert root.attributes["tiergate.request_id"] == SENT_ID
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    children = await receiver.wait_for(
        lambda spans: sum(s.trace_id == root.trace_id and s.parent_span_id == root.span_id for s in spans) >= 2
    )
    assert {s.name for s in children if s.parent_span_id == root.span_id} >= {"tiergate.route"}


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    running = OtlpReceiver()
    await running.start()
    yield running
    await running.stop()


@pytest.mark.slow
async def test_tritonclient_stream_unmodified(start_stack: StackFactory, key_dir: Path) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    token = add_token(key_dir / "tokens.json", f"triton-{uuid.uuid4().hex[:8]}", ["*"])
    other_name = f"other-{uuid.uuid4().hex[:8]}"
    other = add_token(key_dir / "tokens.json", other_name, ["query-intent"])
    stack = await start_stack(keys=key_dir, token=token)
    # tritonclient's descriptors clash with ours, so it runs in a process of its own; the gateway serves it
    # from this event loop meanwhile.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO_ROOT / "tests" / "scripts" / "triton_stream.py"),
        stack.target,
        *TEXTS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TIERGATE_TOKEN": token, "TIERGATE_OTHER_TOKEN": other},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=180.0)
    assert process.returncode == 0, err.decode()
    seen = json.loads(out)

    replies = seen["stream"]
    assert len(replies) == 100, "every request answered"
    assert replies[40] == {
        "error": (
            "INVALID_ARGUMENT: input 'text' must have datatype BYTES, got 'FP32'; "
            "this model takes 'text' (BYTES, shape [-1])"
        ),
        "status": None,
    }
    assert replies[41] == {
        "error": "NOT_FOUND: model 'no-such-model' is not served here; available models: product-category",
        "status": None,
    }
    answered = [reply for number, reply in enumerate(replies) if number not in (40, 41)]
    assert [reply["id"] for reply in answered] == [f"r{n}" for n in range(100) if n not in (40, 41)]
    for number, reply in zip([n for n in range(100) if n not in (40, 41)], answered, strict=True):
        assert len(reply["label"]) == 1 + number % 3, "its own rows"
        assert set(reply["tier"]) <= {"edge", "cloud"}
    assert [reply["label"] for reply in answered] == seen["unary_labels"], "as ModelInfer answers them"

    refused = seen["no_token"]
    assert refused["status"] == "StatusCode.UNAUTHENTICATED"
    assert refused["error"] == NO_TOKEN
    denied = f"PERMISSION_DENIED: client {other_name!r} may not call model {MODEL_NAME!r}; "
    assert [reply["error"].startswith(denied) for reply in seen["other_token"]] == [True, True]
