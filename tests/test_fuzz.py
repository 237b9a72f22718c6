"""Fuzzing the public API with hypothesis: generated OIP requests get well-formed statuses, never INTERNAL.

A CI-sized run (500 requests) is part of `make test`; `TIERGATE_FUZZ_FULL=1` runs 10,000.
"""

from __future__ import annotations

import os
import struct

import grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from gateway.codec import decode_request
from proto.inference import grpc_service_pb2 as pb
from tests.conftest import Stack
from tests.test_gateway import infer_request
from tiergate.constants import MODEL_NAME
from tiergate.errors import TiergateError
from tiergate.settings import LimitSettings

FULL = os.environ.get("TIERGATE_FUZZ_FULL") == "1"
REQUESTS = 10_000 if FULL else 500
# What a caller may see; INTERNAL and UNKNOWN would be server faults.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}
DATATYPES = ["BYTES", "FP32", "INT64", "BOOL", "UINT8", "FP16", "", "bytes", "STRING"]

texts = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),  # invalid UTF-8 included
    st.just(b""),
    st.binary(min_size=2040, max_size=2100),  # around the row byte limit
)


def _raw(items: list[bytes], corrupt: int) -> bytes:
    data = b"".join(struct.pack("<I", len(i)) + i for i in items)
    return data[: max(0, len(data) - corrupt)] if corrupt else data


@st.composite
def requests(draw: st.DrawFn) -> tuple[pb.ModelInferRequest, list[tuple[str, str]]]:
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from([MODEL_NAME, MODEL_NAME, "", "no-such-model", "prodüct", MODEL_NAME * 40])),
        model_version=draw(st.sampled_from(["", "", "1", "latest", "\x00"])),
        id=draw(st.text(max_size=20)),
    )
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["text", "text", "TEXT", "ids", ""]))
        rows = draw(st.integers(0, 5))
        values = [
            v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass") for v in draw(st.lists(texts, max_size=5))
        ]
        shape = draw(
            st.sampled_from([[rows], [len(values)], [len(values), 1], [-1], [0], [2**40], [len(values), 2], []])
        )
        tensor = request.inputs.add(name=name, datatype=draw(st.sampled_from(DATATYPES)), shape=shape)
        how = draw(st.sampled_from(["bytes", "raw", "fp32", "none"]))
        if how == "bytes":
            tensor.contents.bytes_contents.extend(values)
        elif how == "raw":
            request.raw_input_contents.append(_raw(values, draw(st.integers(0, 3))))
        elif how == "fp32":
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=4)))
    for name in draw(st.lists(st.sampled_from(["label", "confidence", "tier", "logits", ""]), max_size=3)):
        request.outputs.add(name=name)
    hint = draw(st.sampled_from([None, "auto", "edge", "cloud", "fast", 3, True]))
    if isinstance(hint, str):
        request.parameters["tier"].string_param = hint
    elif isinstance(hint, bool):
        request.parameters["tier"].bool_param = hint
    elif isinstance(hint, int):
        request.parameters["tier"].int64_param = hint
    if draw(st.booleans()):
        request.parameters[draw(st.text(min_size=1, max_size=10))].string_param = draw(st.text(max_size=10))
    metadata = []
    if draw(st.booleans()):
        metadata.append(
            (
                "x-request-id",
                draw(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)),
            )
        )
    return request, metadata


def draw_requests(count: int) -> list[tuple[pb.ModelInferRequest, list[tuple[str, str]]]]:
    drawn: list[tuple[pb.ModelInferRequest, list[tuple[str, str]]]] = []

    @seed(20261202)
    @settings(max_examples=count, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests())
    def collect(example: tuple[pb.ModelInferRequest, list[tuple[str, str]]]) -> None:
        drawn.append(example)

    collect()
    return drawn


def rss_kib() -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@seed(20261203)
@settings(max_examples=500, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests())
def test_the_codec_raises_only_its_own_errors(example: tuple[pb.ModelInferRequest, list[tuple[str, str]]]) -> None:
    try:
        decode_request(example[0], LimitSettings(max_batch_rows=4, max_text_bytes=2048))
    except TiergateError as error:
        assert str(error)


async def test_generated_requests_get_well_formed_statuses_and_the_server_stays_up(stack: Stack) -> None:
    examples = draw_requests(REQUESTS)
    codes: dict[str, int] = {}
    half = len(examples) // 2
    rss = {}
    valid = infer_request(["Organic Greek Yogurt", "whole milk"])
    for i, (request, metadata) in enumerate(examples):
        if i in (half // 4, len(examples) - 1):
            rss[i] = rss_kib()
        if i % 5 == 0:  # well-formed requests in the mix must keep working, one answer per row
            reply = await stack.stub.ModelInfer(valid, timeout=10.0)
            assert len(reply.outputs[0].contents.bytes_contents) == 2
            codes["OK"] = codes.get("OK", 0) + 1
        try:
            reply = await stack.stub.ModelInfer(request, metadata=metadata, timeout=10.0)
        except grpc.aio.AioRpcError as error:
            assert error.code() in EXPECTED, (error.code(), error.details(), request)
            details = error.details() or ""
            assert details and "Traceback" not in details
            codes[error.code().name] = codes.get(error.code().name, 0) + 1
        else:
            assert reply.model_name == MODEL_NAME and reply.outputs
            codes["OK"] = codes.get("OK", 0) + 1
    assert codes.get("OK", 0) > 0 and codes.get("INVALID_ARGUMENT", 0) > 0, codes
    live = await stack.stub.ServerLive(pb.ServerLiveRequest(), timeout=5.0)
    assert live.live
    grown_mib = (rss[len(examples) - 1] - rss[half // 4]) / 1024
    assert grown_mib < 30, f"RSS grew {grown_mib:.1f} MiB over the run"
