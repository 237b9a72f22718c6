"""The OIP codec: contents and raw_input_contents in, mirrored outputs, and clear errors for bad input."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

import numpy as np
import pytest

from gateway.cascade import Cascade, CascadeResult, RowAnswer, TieredModel
from gateway.codec import decode_request, encode_metadata, encode_response
from gateway.routing import Hint, Reason, RoutingPolicy
from gateway.tier import Prediction
from proto.inference import grpc_service_pb2 as pb
from tiergate.errors import InvalidInputError, RequestTooLargeError
from tiergate.settings import LimitSettings

LIMITS = LimitSettings(max_batch_rows=4, max_text_bytes=32)


def _raw(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def request(values: list[bytes], *, raw: bool = False, shape: list[int] | None = None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="product-category")
    tensor = req.inputs.add(name="text", datatype="BYTES", shape=shape if shape is not None else [len(values)])
    if raw:
        req.raw_input_contents.append(_raw(values))
    else:
        tensor.contents.bytes_contents.extend(values)
    return req


@pytest.mark.parametrize("raw", [False, True])
def test_decode_both_encodings(raw: bool) -> None:
    batch = decode_request(request([b"milk", "café".encode()], raw=raw), LIMITS)
    assert batch.texts == ["milk", "café"]
    assert batch.raw_output is raw


def test_decode_n_by_1_shape_and_hint() -> None:
    req = request([b"milk"], shape=[1, 1])
    req.parameters["tier"].string_param = "cloud"
    assert decode_request(req, LIMITS).hint is Hint.CLOUD


@pytest.mark.parametrize("raw", [False, True])
def test_encode_mirrors_request(raw: bool) -> None:
    batch = decode_request(request([b"milk", b"chips"], raw=raw), LIMITS)
    result = CascadeResult(
        rows=[
            RowAnswer("dairy", 0.9, 0.85, "edge"),
            RowAnswer("snacks", 0.4, 0.05, "cloud", (Reason.LOW_CONFIDENCE, Reason.LONG_INPUT)),
        ]
    )
    resp = encode_response(batch, result, model_name="product-category", model_version="v1", signal="margin")
    assert [o.name for o in resp.outputs] == ["label", "confidence", "tier", "routing_signal"]
    assert resp.parameters["routing_signal_name"].string_param == "margin"
    assert json.loads(resp.parameters["escalation_reasons"].string_param) == ["", "low_confidence+long_input"]
    assert resp.parameters["edge_rows"].int64_param == 1 and resp.parameters["cloud_rows"].int64_param == 1
    if raw:
        assert len(resp.raw_output_contents) == 4
        assert np.frombuffer(resp.raw_output_contents[1], dtype="<f4").tolist() == pytest.approx([0.9, 0.4])
        assert np.frombuffer(resp.raw_output_contents[3], dtype="<f4").tolist() == pytest.approx([0.85, 0.05])
        assert resp.raw_output_contents[0] == _raw([b"dairy", b"snacks"])
    else:
        assert list(resp.outputs[2].contents.bytes_contents) == [b"edge", b"cloud"]
        assert list(resp.outputs[1].contents.fp32_contents) == pytest.approx([0.9, 0.4])
        assert list(resp.outputs[3].contents.fp32_contents) == pytest.approx([0.85, 0.05])


def _named(req: pb.ModelInferRequest, name: str) -> pb.ModelInferRequest:
    req.inputs[0].name = name
    return req


def _datatype(req: pb.ModelInferRequest, dtype: str) -> pb.ModelInferRequest:
    req.inputs[0].datatype = dtype
    return req


def _extra(req: pb.ModelInferRequest) -> pb.ModelInferRequest:
    req.inputs.add(name="extra", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    return req


def _outputs(req: pb.ModelInferRequest) -> pb.ModelInferRequest:
    req.outputs.add(name="embedding")
    return req


def _hint(req: pb.ModelInferRequest) -> pb.ModelInferRequest:
    req.parameters["tier"].string_param = "gpu"
    return req


def _both(req: pb.ModelInferRequest) -> pb.ModelInferRequest:
    req.raw_input_contents.append(_raw([b"milk"]))
    return req


@pytest.mark.parametrize(
    ("req", "error", "message"),
    [
        (_named(request([b"milk"]), "query"), InvalidInputError, "missing input 'text'"),
        (pb.ModelInferRequest(model_name="product-category"), InvalidInputError, "missing input 'text'"),
        (_extra(request([b"milk"])), InvalidInputError, "unexpected inputs ['extra']"),
        (_datatype(request([b"milk"]), "FP32"), InvalidInputError, "must have datatype BYTES"),
        (request([b"milk"], shape=[1, 2]), InvalidInputError, "must have shape [N] or [N, 1]"),
        (request([b"milk"], shape=[3]), InvalidInputError, "carries 1 elements"),
        (request([], shape=[0]), InvalidInputError, "empty batch"),
        (request([b"\xff\xfe"]), InvalidInputError, "row 0 of input 'text' is not valid UTF-8"),
        (request([b"milk", b"   "]), InvalidInputError, "row 1 of input 'text' is empty"),
        (request([b"x" * 33]), InvalidInputError, "limit is 32 bytes per row"),
        (request([b"a"] * 5), RequestTooLargeError, "exceeds the limit of 4"),
        (_outputs(request([b"milk"])), InvalidInputError, "unknown requested outputs ['embedding']"),
        (_hint(request([b"milk"])), InvalidInputError, "parameter 'tier' must be"),
        (_both(request([b"milk"])), InvalidInputError, "either contents or raw_input_contents"),
    ],
)
def test_bad_requests(req: pb.ModelInferRequest, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        decode_request(req, LIMITS)
    assert message in str(caught.value)


def test_truncated_raw_bytes() -> None:
    req = request([b"milk"], raw=True)
    req.raw_input_contents[0] = req.raw_input_contents[0][:-2]
    with pytest.raises(InvalidInputError, match="overruns the buffer"):
        decode_request(req, LIMITS)


class _NoTier:
    """A tier that is never asked: metadata needs the model's name and version only."""

    name = "edge"

    async def predict(self, texts: Sequence[str], deadline: float | None) -> list[Prediction]:
        raise AssertionError("metadata must not run the model")

    def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def test_encode_metadata() -> None:
    cascade = Cascade([_NoTier()], RoutingPolicy(threshold=0.5, max_edge_tokens=5, max_edge_batch=3))
    meta = encode_metadata(TieredModel("product-category", "v7", cascade))
    assert (meta.name, list(meta.versions), meta.platform) == ("product-category", ["v7"], "tiergate_tiered")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("label", "BYTES", [-1]),
        ("confidence", "FP32", [-1]),
        ("tier", "BYTES", [-1]),
        ("routing_signal", "FP32", [-1]),
    ]


@pytest.mark.parametrize(
    ("set_value", "said"),
    [
        (lambda p: setattr(p, "int64_param", 3), "got int64_param 3"),
        (lambda p: setattr(p, "bool_param", True), "got bool_param True"),
        (lambda p: setattr(p, "string_param", "fast"), "got 'fast'"),
    ],
)
def test_a_bad_tier_hint_says_what_was_sent(set_value: object, said: str) -> None:
    req = request([b"milk"])
    set_value(req.parameters["tier"])  # type: ignore[operator]
    with pytest.raises(InvalidInputError, match=said):
        decode_request(req, LIMITS)


def test_rows_per_tier_are_sent_for_every_tier_of_the_chain_zero_included() -> None:
    batch = decode_request(request([b"milk"]), LIMITS)
    result = CascadeResult(rows=[RowAnswer("dairy", 0.9, 0.8, "edge")])
    response = encode_response(batch, result, model_name="m", model_version="1", chain=["edge", "cloud"])
    assert response.parameters["edge_rows"].int64_param == 1
    assert "cloud_rows" in response.parameters and response.parameters["cloud_rows"].int64_param == 0
