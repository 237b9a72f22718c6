"""The gateway end to end on real servers (127.0.0.1, port 0) with real tiny ONNX models and real sealing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_runtime.model import EdgeModel
from proto.inference import grpc_service_pb2 as pb
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tests.conftest import Stack, start_stack, stop_stack
from tests.tap import TapProxy

MODEL = "product-category"


def infer_request(texts: list[str], **parameters: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, id="req-1")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    tensor.contents.bytes_contents.extend(t.encode() for t in texts)
    for key, value in parameters.items():
        request.parameters[key].string_param = value
    return request


def rows(reply: pb.ModelInferResponse) -> list[tuple[str, float, str, str]]:
    out = {o.name: o for o in reply.outputs}
    reasons = json.loads(reply.parameters["escalation_reasons"].string_param)
    return [
        (label.decode(), conf, tier.decode(), reason)
        for label, conf, tier, reason in zip(
            out["label"].contents.bytes_contents,
            out["confidence"].contents.fp32_contents,
            out["tier"].contents.bytes_contents,
            reasons,
            strict=True,
        )
    ]


@pytest.fixture(scope="module")
def sure_and_unsure(tiny_models: Path, tiny_rows: list[tuple[str, str]]) -> tuple[str, str, float]:
    """The edge's most and least confident held-out rows, and a threshold between them."""
    model = EdgeModel.load(tiny_models)
    texts = sorted({text for text, _ in tiny_rows if len(text.split()) <= 8})
    confidence = model.predict(texts).confidence
    model.close()
    order = np.argsort(confidence)
    low, high = float(confidence[order[0]]), float(confidence[order[-1]])
    assert high > low, "the tiny edge model should not be equally sure of every row"
    return texts[order[-1]], texts[order[0]], (low + high) / 2


async def test_health_reflection_and_metadata(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.channel)
    for service in ("", "inference.GRPCInferenceService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert (await stack.stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stack.stub.ServerReady(pb.ServerReadyRequest())).ready
    assert (await stack.stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready
    meta = await stack.stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("text", "BYTES", [-1])]
    assert [t.name for t in meta.outputs] == ["label", "confidence", "tier"]
    server = await stack.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "tiergate"


async def test_confident_row_at_edge_unsure_row_escalates(
    tiny_models: Path, keyring_path: Path, sure_and_unsure: tuple[str, str, float]
) -> None:
    sure, unsure, threshold = sure_and_unsure
    stack = await start_stack(tiny_models, keyring_path, threshold=threshold)
    try:
        reply = await stack.stub.ModelInfer(infer_request([sure, unsure]))
        (_, c0, tier0, why0), (_, c1, tier1, why1) = rows(reply)
        assert (tier0, why0) == ("edge", "")
        assert c0 >= threshold
        assert (tier1, why1) == ("cloud", "low_confidence")
        assert reply.parameters["edge_rows"].int64_param == 1
        assert reply.parameters["cloud_rows"].int64_param == 1
        assert reply.parameters["degraded"].bool_param is False
        assert reply.id == "req-1" and reply.model_name == MODEL
    finally:
        await stop_stack(stack)


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


async def test_cloud_hop_is_sealed_on_the_wire(
    tiny_models: Path, keyring_path: Path, sure_and_unsure: tuple[str, str, float]
) -> None:
    plain = await start_stack(tiny_models, keyring_path)
    assert plain.cloud is not None
    tap = TapProxy(plain.cloud.managed.port)
    tap_port = await tap.start()
    tapped = await start_stack(tiny_models, keyring_path, with_cloud=False, cloud_target=f"127.0.0.1:{tap_port}")
    marker = "Zebra Marker Oatmilk Crunch 7731"
    try:
        reply = await tapped.stub.ModelInfer(infer_request([marker], tier="cloud"))
        assert rows(reply)[0][2] == "cloud"
    finally:
        await stop_stack(tapped)
        await stop_stack(plain)
        await tap.close()
    assert b"test-key" in tap.to_upstream, "the envelope header (key id) should cross the hop"
    assert marker.encode() not in tap.to_upstream, "the query text crossed the cloud hop in plaintext"
    assert b"Oatmilk" not in tap.to_upstream
    # The answer travels sealed too: no label of the model appears in what came back.
    labels = json.loads((tiny_models / "manifest.json").read_text())["labels"]
    assert tap.to_client and not any(label.encode() in tap.to_client for label in labels)


async def test_cloud_down_answers_degraded_from_edge(
    tiny_models: Path, keyring_path: Path, sure_and_unsure: tuple[str, str, float]
) -> None:
    sure, unsure, threshold = sure_and_unsure
    stack = await start_stack(tiny_models, keyring_path, with_cloud=False, cloud_target="127.0.0.1:1", threshold=threshold)
    try:
        reply = await stack.stub.ModelInfer(infer_request([sure, unsure, " ".join([sure] * 30)]))
    finally:
        await stop_stack(stack)
    answered = rows(reply)
    assert [tier for _, _, tier, _ in answered] == ["edge", "edge", "edge"]
    assert [why for _, _, _, why in answered] == ["", "low_confidence+tier_unavailable", "long_input+tier_unavailable"]
    assert reply.parameters["degraded"].bool_param is True


async def test_raw_contents_roundtrip(stack: Stack, sure_and_unsure: tuple[str, str, float]) -> None:
    sure = sure_and_unsure[0].encode()
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="text", datatype="BYTES", shape=[2, 1])
    request.raw_input_contents.append(b"".join(len(t).to_bytes(4, "little") + t for t in (sure, sure)))
    request.outputs.add(name="confidence")
    reply = await stack.stub.ModelInfer(request)
    assert [o.name for o in reply.outputs] == ["confidence"]
    confidence = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
    assert confidence.shape == (2,) and np.all((confidence >= 0) & (confidence <= 1))


def _bad(mutate) -> pb.ModelInferRequest:  # type: ignore[no-untyped-def]
    request = infer_request(["organic milk"])
    mutate(request)
    return request


BAD_INPUTS = [
    ("unknown model", _bad(lambda r: setattr(r, "model_name", "nope")), grpc.StatusCode.NOT_FOUND, "model 'nope' is not served here"),
    ("unknown version", _bad(lambda r: setattr(r, "model_version", "99")), grpc.StatusCode.NOT_FOUND, "has no version '99'"),
    ("missing input", _bad(lambda r: r.inputs[0].__setattr__("name", "query")), grpc.StatusCode.INVALID_ARGUMENT, "missing input 'text'"),
    ("extra input", _bad(lambda r: r.inputs.add(name="x", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a")), grpc.StatusCode.INVALID_ARGUMENT, "unexpected inputs ['x']"),
    ("wrong datatype", _bad(lambda r: r.inputs[0].__setattr__("datatype", "INT32")), grpc.StatusCode.INVALID_ARGUMENT, "must have datatype BYTES"),
    ("wrong shape", _bad(lambda r: r.inputs[0].shape.__setitem__(0, 2)), grpc.StatusCode.INVALID_ARGUMENT, "carries 1 elements"),
    ("non-utf8", _bad(lambda r: r.inputs[0].contents.bytes_contents.__setitem__(0, b"\xc3\x28")), grpc.StatusCode.INVALID_ARGUMENT, "not valid UTF-8"),
    ("empty batch", _bad(lambda r: (r.inputs[0].contents.ClearField("bytes_contents"), r.inputs[0].shape.__setitem__(0, 0))), grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    ("too many rows", infer_request(["milk"] * 65), grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds the limit of 64"),
    ("bad hint", infer_request(["milk"], tier="gpu"), grpc.StatusCode.INVALID_ARGUMENT, "parameter 'tier'"),
]


@pytest.mark.parametrize(("case", "request_pb", "code", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
async def test_bad_input_statuses(stack: Stack, case: str, request_pb: pb.ModelInferRequest, code: grpc.StatusCode, message: str) -> None:
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


async def test_model_ready_unknown_is_not_found(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.ModelReady(pb.ModelReadyRequest(name="other"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_cloud_rejects_unsealed_and_foreign_envelopes(stack: Stack) -> None:
    assert stack.cloud is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.cloud.managed.port}") as channel:
        cloud = cloud_pb2_grpc.CloudInferenceStub(channel)
        forged = cloud_pb2.Envelope(version=1, key_id="test-key", nonce=b"0" * 12, request_id="r", ciphertext=b"garbage!" * 4)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cloud.Infer(forged)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "failed authentication" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cloud.Infer(cloud_pb2.Envelope(version=1, key_id="someone-else", nonce=b"0" * 12))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "unknown key id" in (caught.value.details() or "")


async def test_draining_refuses_new_inference(tiny_models: Path, keyring_path: Path) -> None:
    stack = await start_stack(tiny_models, keyring_path)
    try:
        stack.gateway.servicer.draining = True
        assert not (await stack.stub.ServerReady(pb.ServerReadyRequest())).ready
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.ModelInfer(infer_request(["milk"]))
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (caught.value.details() or "")
    finally:
        await stop_stack(stack)


async def test_stop_turns_health_not_serving_before_closing(tiny_models: Path, keyring_path: Path) -> None:
    stack = await start_stack(tiny_models, keyring_path)
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
        await stack.channel.close()
        assert stack.cloud is not None
        await stack.cloud.stop(0)


async def test_renamed_model_reaches_a_cloud_configured_alike(tiny_models: Path, keyring_path: Path) -> None:
    from cloud_runtime.server import CloudServer
    from gateway.server import GatewayServer
    from proto.inference import grpc_service_pb2_grpc as pb_grpc
    from tiergate.envelope import Keyring
    from tiergate.settings import CloudSettings, GatewaySettings

    keyring = Keyring.load(keyring_path)
    cloud = CloudServer(CloudSettings(port=0, models_dir=tiny_models, model_name="shelf-aisle"), keyring)
    cloud_port = await cloud.start()
    gateway = GatewayServer(
        GatewaySettings(port=0, models_dir=tiny_models, model_name="shelf-aisle", cloud_target=f"127.0.0.1:{cloud_port}"),
        keyring,
    )
    port = await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = infer_request(["organic milk"], tier="cloud")
            request.model_name = "shelf-aisle"
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    finally:
        await gateway.stop(0)
        await cloud.stop(0)
    assert reply.parameters["degraded"].bool_param is False
    assert [o.contents.bytes_contents[0] for o in reply.outputs if o.name == "tier"] == [b"cloud"]
