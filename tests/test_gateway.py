"""The gateway end to end on real servers (127.0.0.1, port 0) with real tiny ONNX models and real sealing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_runtime.model import EdgeModel
from proto.inference import grpc_service_pb2 as pb
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tests.conftest import Stack, StackFactory
from tests.tap import TapProxy
from tiergate.constants import (
    CONFIDENCE_OUTPUT,
    DEGRADED_PARAMETER,
    INPUT_DATATYPE,
    INPUT_NAME,
    LABEL_OUTPUT,
    MODEL_NAME,
    OUTPUTS,
    REASONS_PARAMETER,
    TIER_OUTPUT,
)


def infer_request(texts: list[str], **parameters: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL_NAME, id="req-1")
    tensor = request.inputs.add(name=INPUT_NAME, datatype=INPUT_DATATYPE, shape=[len(texts)])
    tensor.contents.bytes_contents.extend(t.encode() for t in texts)
    for key, value in parameters.items():
        request.parameters[key].string_param = value
    return request


def rows(reply: pb.ModelInferResponse) -> list[tuple[str, float, str, str]]:
    out = {o.name: o for o in reply.outputs}
    reasons = json.loads(reply.parameters[REASONS_PARAMETER].string_param)
    return [
        (label.decode(), conf, tier.decode(), reason)
        for label, conf, tier, reason in zip(
            out[LABEL_OUTPUT].contents.bytes_contents,
            out[CONFIDENCE_OUTPUT].contents.fp32_contents,
            out[TIER_OUTPUT].contents.bytes_contents,
            reasons,
            strict=True,
        )
    ]


async def test_health_reflection_and_metadata(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.channel)
    for service in ("", "inference.GRPCInferenceService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert (await stack.stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stack.stub.ServerReady(pb.ServerReadyRequest())).ready
    assert (await stack.stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME))).ready
    meta = await stack.stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME))
    assert (meta.name, meta.platform) == ("product-category", "tiergate_tiered")
    assert len(meta.versions) == 1 and meta.versions[0]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("label", "BYTES", [-1]),
        ("confidence", "FP32", [-1]),
        ("tier", "BYTES", [-1]),
        ("routing_signal", "FP32", [-1]),
    ]
    server = await stack.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "tiergate"


async def test_confident_row_at_edge_unsure_row_escalates(
    start_stack: StackFactory, sure_and_unsure: tuple[str, str, float]
) -> None:
    sure, unsure, threshold = sure_and_unsure
    stack = await start_stack(threshold=threshold)
    reply = await stack.stub.ModelInfer(infer_request([sure, unsure]))
    (_, c0, tier0, why0), (_, _, tier1, why1) = rows(reply)
    assert (tier0, why0) == ("edge", "")
    assert c0 >= threshold
    assert (tier1, why1) == ("cloud", "low_confidence")
    assert reply.parameters["edge_rows"].int64_param == 1
    assert reply.parameters["cloud_rows"].int64_param == 1
    assert reply.parameters[DEGRADED_PARAMETER].bool_param is False
    assert reply.id == "req-1" and reply.model_name == MODEL_NAME


async def test_heavy_rows_go_to_cloud(stack: Stack, sure_and_unsure: tuple[str, str, float]) -> None:
    sure = sure_and_unsure[0]
    long_text = " ".join([sure] * 30)
    reply = await stack.stub.ModelInfer(infer_request([sure, long_text]))
    assert [(tier, why) for _, _, tier, why in rows(reply)][1] == ("cloud", "long_input")

    reply = await stack.stub.ModelInfer(infer_request([sure], tier="cloud"))
    assert [(tier, why) for _, _, tier, why in rows(reply)] == [("cloud", "client_hint")]

    big = await stack.stub.ModelInfer(infer_request([sure] * 17))  # max_edge_batch is 16 in the fixture
    assert {(tier, why) for _, _, tier, why in rows(big)} == {("cloud", "large_batch")}

    edge_only = await stack.stub.ModelInfer(infer_request([long_text], tier="edge"))
    assert [(tier, why) for _, _, tier, why in rows(edge_only)] == [("edge", "")]


async def test_cloud_hop_is_sealed_on_the_wire(start_stack: StackFactory, tiny_models: Path) -> None:
    plain = await start_stack()
    assert plain.cloud is not None
    tap = TapProxy(plain.cloud.managed.port)
    tap_port = await tap.start()
    marker = "Zebra Marker Oatmilk Crunch 7731"
    try:
        tapped = await start_stack(with_cloud=False, cloud_target=f"127.0.0.1:{tap_port}")
        reply = await tapped.stub.ModelInfer(infer_request([marker], tier="cloud"))
        assert rows(reply)[0][2] == "cloud"
    finally:
        # Both stacks first (the tapped gateway before the cloud behind the tap), then the tap.
        await start_stack.stop_all()
        await tap.close()
    assert b"test-key" in tap.to_upstream, "the envelope header (key id) should cross the hop"
    assert marker.encode() not in tap.to_upstream, "the query text crossed the cloud hop in plaintext"
    assert b"Oatmilk" not in tap.to_upstream
    # The answer travels sealed too: no label of the model appears in what came back.
    labels = json.loads((tiny_models / "manifest.json").read_text())["labels"]
    assert tap.to_client and not any(label.encode() in tap.to_client for label in labels)


async def test_cloud_down_answers_degraded_from_edge(
    start_stack: StackFactory, sure_and_unsure: tuple[str, str, float]
) -> None:
    sure, unsure, threshold = sure_and_unsure
    stack = await start_stack(with_cloud=False, cloud_target="127.0.0.1:1", threshold=threshold)
    reply = await stack.stub.ModelInfer(infer_request([sure, unsure, " ".join([sure] * 30)]))
    answered = rows(reply)
    assert [tier for _, _, tier, _ in answered] == ["edge", "edge", "edge"]
    assert [why for _, _, _, why in answered] == ["", "low_confidence+tier_unavailable", "long_input+tier_unavailable"]
    assert reply.parameters[DEGRADED_PARAMETER].bool_param is True


def _split_raw(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor in raw contents: each one a 4-byte little-endian length, then the bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset : offset + 4], "little")
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


async def test_raw_contents_roundtrip(stack: Stack, sure_and_unsure: tuple[str, str, float]) -> None:
    sure, unsure, _ = sure_and_unsure
    # A confident row, an unsure one, a heavy one (cloud) and a non-ASCII one: both tiers answer.
    texts = [sure, unsure, " ".join([sure] * 30), "Crème brûlée, 2×120 g"]
    typed = await stack.stub.ModelInfer(infer_request(texts))

    request = pb.ModelInferRequest(model_name=MODEL_NAME, id="req-1")
    request.inputs.add(name=INPUT_NAME, datatype=INPUT_DATATYPE, shape=[len(texts), 1])
    encoded = [text.encode() for text in texts]
    request.raw_input_contents.append(b"".join(len(item).to_bytes(4, "little") + item for item in encoded))
    raw = await stack.stub.ModelInfer(request)

    # Raw in, raw out: the same outputs in the same order, as raw contents only.
    assert [(o.name, o.datatype, list(o.shape)) for o in raw.outputs] == [
        (name, datatype, [len(texts)]) for name, datatype in OUTPUTS.items()
    ]
    assert not any(o.HasField("contents") for o in raw.outputs)
    assert len(raw.raw_output_contents) == len(OUTPUTS)
    columns = dict(zip(OUTPUTS, raw.raw_output_contents, strict=True))
    raw_rows = list(
        zip(
            [label.decode() for label in _split_raw(columns[LABEL_OUTPUT])],
            np.frombuffer(columns[CONFIDENCE_OUTPUT], dtype="<f4").tolist(),
            [tier.decode() for tier in _split_raw(columns[TIER_OUTPUT])],
            json.loads(raw.parameters[REASONS_PARAMETER].string_param),
            strict=True,
        )
    )
    typed_rows = rows(typed)
    assert raw_rows == typed_rows
    assert {tier for _, _, tier, _ in typed_rows} == {"edge", "cloud"}
    assert dict(raw.parameters) == dict(typed.parameters)
    assert raw.parameters[DEGRADED_PARAMETER].bool_param is False
    assert (raw.model_name, raw.model_version, raw.id) == (typed.model_name, typed.model_version, typed.id)

    # A requested subset of outputs comes back alone, still raw.
    request.outputs.add(name=CONFIDENCE_OUTPUT)
    subset = await stack.stub.ModelInfer(request)
    assert [o.name for o in subset.outputs] == [CONFIDENCE_OUTPUT]
    confidence = np.frombuffer(subset.raw_output_contents[0], dtype="<f4").tolist()
    assert confidence == [conf for _, conf, _, _ in typed_rows]


def _bad(mutate: Callable[[pb.ModelInferRequest], object]) -> pb.ModelInferRequest:
    request = infer_request(["organic milk"])
    mutate(request)
    return request


def _extra_input(request: pb.ModelInferRequest) -> None:
    request.inputs.add(name="x", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a")


def _empty_batch(request: pb.ModelInferRequest) -> None:
    request.inputs[0].contents.ClearField("bytes_contents")
    request.inputs[0].shape[0] = 0


NOT_FOUND, INVALID, EXHAUSTED = (
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
BAD_INPUTS = [
    pytest.param(
        _bad(lambda r: setattr(r, "model_name", "nope")),
        NOT_FOUND,
        f"model 'nope' is not served here; available models: {MODEL_NAME}",
        id="unknown model",
    ),
    pytest.param(
        _bad(lambda r: setattr(r, "model_version", "99")), NOT_FOUND, "has no version '99'", id="unknown version"
    ),
    pytest.param(
        _bad(lambda r: setattr(r.inputs[0], "name", "query")), INVALID, "missing input 'text'", id="missing input"
    ),
    pytest.param(_bad(_extra_input), INVALID, "unexpected inputs ['x']", id="extra input"),
    pytest.param(
        _bad(lambda r: setattr(r.inputs[0], "datatype", "INT32")),
        INVALID,
        "must have datatype BYTES",
        id="wrong datatype",
    ),
    pytest.param(_bad(lambda r: r.inputs[0].shape.__setitem__(0, 2)), INVALID, "carries 1 elements", id="wrong shape"),
    pytest.param(
        _bad(lambda r: r.inputs[0].contents.bytes_contents.__setitem__(0, b"\xc3\x28")),
        INVALID,
        "not valid UTF-8",
        id="non-utf8",
    ),
    pytest.param(_bad(_empty_batch), INVALID, "empty batch", id="empty batch"),
    pytest.param(infer_request(["milk"] * 65), EXHAUSTED, "exceeds the limit of 64", id="too many rows"),
    pytest.param(infer_request(["milk"], tier="gpu"), INVALID, "parameter 'tier'", id="bad hint"),
]


@pytest.mark.parametrize(("request_pb", "code", "message"), BAD_INPUTS)
async def test_bad_input_statuses(
    stack: Stack, request_pb: pb.ModelInferRequest, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.ModelInfer(request_pb)
    assert caught.value.code() is code
    assert message in (caught.value.details() or "")
    # The server is still serving afterwards.
    assert (await stack.stub.ServerLive(pb.ServerLiveRequest())).live


async def test_oversized_message_is_resource_exhausted(stack: Stack) -> None:
    huge = infer_request(["x" * (5 * 1024 * 1024)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.ModelInfer(huge)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server's transport refuses it (limits.max_message_bytes, 4 MiB by default) before the servicer runs.
    assert "Received message larger than max" in (caught.value.details() or "")


async def test_model_ready_unknown_is_not_found(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.ModelReady(pb.ModelReadyRequest(name="other"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == f"model 'other' is not served here; available models: {MODEL_NAME}"


async def test_cloud_rejects_unsealed_and_foreign_envelopes(stack: Stack) -> None:
    assert stack.cloud is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.cloud.managed.port}") as channel:
        cloud = cloud_pb2_grpc.CloudInferenceStub(channel)
        forged = cloud_pb2.Envelope(
            version=1, key_id="test-key", nonce=b"0" * 12, request_id="r", ciphertext=b"garbage!" * 4
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cloud.Infer(forged)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "failed authentication" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cloud.Infer(cloud_pb2.Envelope(version=1, key_id="someone-else", nonce=b"0" * 12))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "unknown key id" in (caught.value.details() or "")


async def test_draining_refuses_new_inference(stack: Stack) -> None:
    stack.gateway.servicer.draining = True
    assert not (await stack.stub.ServerReady(pb.ServerReadyRequest())).ready
    assert not (await stack.stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME))).ready
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.ModelInfer(infer_request(["milk"]))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "the gateway is shutting down; retry on another instance" in (caught.value.details() or "")


async def test_stop_turns_health_not_serving_before_closing(stack: Stack) -> None:
    watch = health_pb2_grpc.HealthStub(stack.channel).Watch(
        health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
    )
    try:
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(stack.gateway.stop(1.0))
        # Balancers watching health see NOT_SERVING while the server drains.
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping
    finally:
        watch.cancel()


async def test_renamed_model_reaches_a_cloud_configured_alike(start_stack: StackFactory) -> None:
    stack = await start_stack(model_name="shelf-aisle")
    request = infer_request(["organic milk"], tier="cloud")
    request.model_name = "shelf-aisle"
    reply = await stack.stub.ModelInfer(request)
    assert reply.model_name == "shelf-aisle"
    assert reply.parameters[DEGRADED_PARAMETER].bool_param is False
    assert [o.contents.bytes_contents[0] for o in reply.outputs if o.name == TIER_OUTPUT] == [b"cloud"]


async def test_confidence_is_the_calibrated_probability_and_routing_signal_drives_escalation(
    start_stack: StackFactory, tiny_models: Path, sure_and_unsure: tuple[str, str, float]
) -> None:
    from tiergate.scoring import softmax

    sure, unsure, threshold = sure_and_unsure
    model = EdgeModel.load(tiny_models)
    texts = [sure, unsure]
    probs = softmax(model.logits(texts), model.temperature)
    signals = model.predict(texts).signal
    model.close()
    stack = await start_stack(threshold=threshold)
    edge_only = await stack.stub.ModelInfer(infer_request(texts, tier="edge"), timeout=10.0)
    out = {o.name: o for o in edge_only.outputs}
    np.testing.assert_allclose(list(out["confidence"].contents.fp32_contents), probs.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(list(out["routing_signal"].contents.fp32_contents), signals, rtol=1e-5)
    assert edge_only.parameters["routing_signal_name"].string_param == model.signal
    # Escalation follows the signal against the threshold, row by row.
    auto = await stack.stub.ModelInfer(infer_request(texts), timeout=10.0)
    tiers = [tier.decode() for tier in {o.name: o for o in auto.outputs}["tier"].contents.bytes_contents]
    assert tiers == ["cloud" if signal < threshold else "edge" for signal in signals] == ["edge", "cloud"]
