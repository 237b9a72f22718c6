"""Fuzzing the public API with hypothesis: generated OIP requests get well-formed statuses, never INTERNAL.

The codec is the oracle: a request the gateway serves must get the status (and message) `decode_request`
gives it locally, and a request it accepts one answer per row. A CI-sized run (500 requests) is part of
`make test`; the full run (10,000) is marked slow and runs only with `TIERGATE_FUZZ_FULL=1`.
"""

from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from gateway.codec import decode_request
from proto.inference import grpc_service_pb2 as pb
from tests.conftest import Stack
from tiergate.constants import INPUT_DATATYPE, INPUT_NAME, MODEL_NAME, OUTPUTS
from tiergate.errors import InvalidInputError, RequestTooLargeError, TiergateError
from tiergate.settings import LimitSettings

FULL_RUN = os.environ.get("TIERGATE_FUZZ_FULL") == "1"
CI_REQUESTS = 500
FULL_REQUESTS = 10_000
CONCURRENCY = 8
RSS_GROWTH_LIMIT_MIB = 30
# What a caller may see; INTERNAL and UNKNOWN would be server faults.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
OIP_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
OIP_DATATYPES += ["FP16", "FP32", "FP64", "BF16", "BYTES"]
DATATYPES = st.one_of(st.sampled_from(OIP_DATATYPES), st.text(max_size=8))
RARELY = st.sampled_from([True] + [False] * 9)  # one draw in ten
TYPED_FIELDS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
}
# Printable ASCII: what a client can put in a text metadata value (non-ASCII travels only in `-bin` keys).
ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
METADATA_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=20)

# Row contents: plain and odd unicode, random bytes (invalid UTF-8 included), blanks, and sizes around
# the 2048-byte row limit.
ROW = st.one_of(
    st.text(alphabet=st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=30).map(str.encode),
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=40),
    st.sampled_from([b"", b" ", b"\t\n", b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", "caf\u00e9 \U0001f95b".encode()]),
    st.integers(2040, 2100).map(lambda n: b"x" * n),
    st.integers(680, 700).map(lambda n: "\u20ac".encode() * n),  # 3 bytes a character
)
VALID_ROW = st.text(alphabet=st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=30)
Metadata = list[tuple[str, str | bytes]]


@dataclass(frozen=True)
class Case:
    request: pb.ModelInferRequest
    metadata: Metadata
    valid: bool  # built to succeed: it must come back OK with one answer per row


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


@st.composite
def raw_contents(draw: st.DrawFn, items: list[bytes]) -> bytes:
    """Well-formed length-prefixed bytes, or corrupted: truncated, a lying prefix, or random bytes."""
    data = length_prefixed(items)
    how = draw(st.sampled_from(["good", "good", "truncate", "prefix", "random"]))
    if how == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "prefix":
        lie = draw(st.sampled_from([0, 1, 3, 2**31, 2**32 - 1]))
        return data + struct.pack("<I", lie) + draw(st.binary(max_size=8))
    if how == "random":
        return draw(st.binary(max_size=64))
    return data


@st.composite
def shapes(draw: st.DrawFn, count: int) -> list[int]:
    rows = draw(st.one_of(st.integers(-3, 70), st.sampled_from([-(2**63), -1, 0, 65, 100, 2**31, 2**63 - 1])))
    good = [[count], [count], [rows], [rows], [count, 1], [rows, 1]]
    return draw(st.sampled_from([*good, [count, 2], [1, count], [], [count, 1, 1]]))


@st.composite
def parameters(draw: st.DrawFn, message: pb.ModelInferRequest) -> None:
    """The `tier` hint as any parameter type (or a valid value), plus unknown parameters."""
    kind = draw(st.sampled_from(["none", "none", "good", "string", "int64", "bool", "double", "uint64", "empty"]))
    hint = message.parameters["tier"] if kind != "none" else None
    if hint is not None:
        if kind == "good":
            hint.string_param = draw(st.sampled_from(["auto", "edge", "cloud"]))
        elif kind == "string":
            hint.string_param = draw(st.one_of(st.sampled_from(["", "AUTO", "Edge", "cloud "]), st.text(max_size=12)))
        elif kind == "int64":
            hint.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif kind == "bool":
            hint.bool_param = draw(st.booleans())
        elif kind == "double":
            hint.double_param = draw(st.floats())
        elif kind == "uint64":
            hint.uint64_param = draw(st.integers(0, 2**64 - 1))
        else:
            hint.SetInParent()  # a parameter with no value set
    for name in draw(st.lists(st.text(min_size=1, max_size=12).filter(lambda n: n != "tier"), max_size=2)):
        message.parameters[name].string_param = draw(st.text(max_size=20))


@st.composite
def metadata(draw: st.DrawFn) -> Metadata:
    """`x-request-id` (plain, odd, up to 4000 characters, or as bytes) and random keys, under 8 KiB in all."""
    pairs: Metadata = []
    request_id = draw(
        st.one_of(
            st.none(),
            st.text(alphabet="abcdefABCDEF0123456789-._:", min_size=1, max_size=40),
            st.text(alphabet=ASCII, max_size=300),
            st.integers(129, 4000).map(lambda n: "r" * n),
        )
    )
    if request_id is not None:
        pairs.append(("x-request-id", request_id))
    if draw(st.booleans()):
        pairs.append(("x-request-id-bin", draw(st.binary(max_size=40))))
    for key in draw(st.lists(METADATA_KEY, max_size=3)):
        if key.endswith("-bin"):
            pairs.append((key, draw(st.binary(max_size=100))))
        else:
            pairs.append((key, draw(st.text(alphabet=ASCII, max_size=100))))
    return pairs


@st.composite
def valid_cases(draw: st.DrawFn) -> Case:
    """Requests built to succeed: 1..5 rows in contents or raw, a valid hint, some of the outputs."""
    texts = [t.encode() for t in draw(st.lists(VALID_ROW, min_size=1, max_size=5))]
    request = pb.ModelInferRequest(model_name=MODEL_NAME, id=draw(st.text(max_size=20)))
    tensor = request.inputs.add(name=INPUT_NAME, datatype=INPUT_DATATYPE, shape=draw(st.sampled_from([[1], [1, 1]])))
    tensor.shape[0] = len(texts)
    if draw(st.booleans()):
        request.raw_input_contents.append(length_prefixed(texts))
    else:
        tensor.contents.bytes_contents.extend(texts)
    for name in draw(st.lists(st.sampled_from(list(OUTPUTS)), unique=True, max_size=3)):
        request.outputs.add(name=name)
    hint = draw(st.sampled_from([None, "auto", "edge", "cloud"]))
    if hint is not None:
        request.parameters["tier"].string_param = hint
    return Case(request, draw(metadata()), valid=True)


@st.composite
def random_cases(draw: st.DrawFn) -> Case:
    """Requests of any shape: names, versions, inputs, datatypes, shapes, contents, outputs, parameters."""
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["", "nope", MODEL_NAME.upper()])) if draw(RARELY) else MODEL_NAME,
        model_version=draw(st.sampled_from(["1", "latest", "\x00"])) if draw(RARELY) else "",
        id=draw(st.text(max_size=40)),
    )
    if draw(RARELY):
        request.model_name = draw(st.text(max_size=300))  # weird unicode, very long
    for _ in range(draw(st.sampled_from([1, 1, 1, 1, 1, 0, 2, 3]))):
        name = draw(st.one_of(st.sampled_from([INPUT_NAME] * 3 + ["TEXT", "ids", "", "text "]), st.text(max_size=8)))
        items = draw(st.lists(ROW, max_size=5))
        datatype = draw(DATATYPES) if draw(RARELY) or draw(RARELY) else INPUT_DATATYPE
        tensor = request.inputs.add(name=name, datatype=datatype, shape=draw(shapes(len(items))))
        where = draw(st.sampled_from(["bytes", "bytes", "raw", "raw", "typed", "both", "none"]))
        if where in ("bytes", "both"):
            tensor.contents.bytes_contents.extend(items)
        if where in ("raw", "both"):
            request.raw_input_contents.append(draw(raw_contents(items)))
        if where == "typed":
            field = draw(st.sampled_from(sorted(TYPED_FIELDS)))
            getattr(tensor.contents, field).extend(draw(st.lists(TYPED_FIELDS[field], max_size=4)))
    if draw(RARELY):  # raw entries that belong to no input
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=16), min_size=1, max_size=2)))
    for name in draw(st.lists(st.sampled_from([*OUTPUTS, "logits", "", "LABEL"]), max_size=4)):
        request.outputs.add(name=name)
    draw(parameters(request))
    return Case(request, draw(metadata()), valid=False)


@st.composite
def oversized_cases(draw: st.DrawFn) -> Case:
    """A valid request whose shape claims more rows than the gateway's limit (64 in the test stack)."""
    case = draw(valid_cases())
    case.request.inputs[0].shape[0] = draw(st.one_of(st.integers(65, 5000), st.just(2**63 - 1)))
    return Case(case.request, case.metadata, valid=False)


CASES = st.one_of(random_cases(), random_cases(), random_cases(), valid_cases(), oversized_cases())


def draw_cases(count: int, fixed_seed: int) -> list[Case]:
    """`count` generated cases, the same ones on every run."""
    drawn: list[Case] = []

    @seed(fixed_seed)
    @settings(max_examples=count, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(CASES)
    def collect(case: Case) -> None:
        drawn.append(case)

    collect()
    return drawn


def rss_kib() -> int:
    """This process's resident set; the servers run in it."""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def answers(reply: pb.ModelInferResponse) -> dict[str, int]:
    """How many elements each output carries, in contents or in raw_output_contents."""
    counts: dict[str, int] = {}
    for index, output in enumerate(reply.outputs):
        if reply.raw_output_contents:
            raw = reply.raw_output_contents[index]
            if output.datatype == "BYTES":
                count, offset = 0, 0
                while offset < len(raw):
                    offset += 4 + struct.unpack_from("<I", raw, offset)[0]
                    count += 1
                counts[output.name] = count
            else:
                counts[output.name] = len(raw) // 4
        else:
            contents = output.contents
            counts[output.name] = len(contents.bytes_contents) or len(contents.fp32_contents)
    return counts


def expected_outcome(case: Case, limits: LimitSettings, version: str) -> tuple[grpc.StatusCode, str | int]:
    """What the gateway must answer: the code and message of the local refusal, or OK and the row count."""
    request = case.request
    if request.model_name != MODEL_NAME or request.model_version not in ("", version):
        return grpc.StatusCode.NOT_FOUND, ""
    try:
        batch = decode_request(request, limits)
    except InvalidInputError as error:
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    except RequestTooLargeError as error:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    return grpc.StatusCode.OK, len(batch.texts)


async def call(stack: Stack, case: Case) -> tuple[grpc.StatusCode, str, pb.ModelInferResponse | None]:
    try:
        reply = await stack.stub.ModelInfer(case.request, metadata=case.metadata, timeout=10.0)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", None
    return grpc.StatusCode.OK, "", reply


async def fuzz_gateway(stack: Stack, count: int) -> tuple[dict[str, int], dict[str, int]]:
    """Send `count` generated requests, CONCURRENCY at a time; check each status against the codec.

    Returns the count of each status code and the RSS (KiB) after warm-up, at half-time and at the end.
    """
    cases = draw_cases(count, fixed_seed=20261202)
    limits = stack.gateway.settings.limits
    metadata_reply = await stack.stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME), timeout=5.0)
    version = metadata_reply.versions[0]
    codes: dict[str, int] = {}
    valid_ok = 0
    warm_up, half = count // 5, count // 2
    rss: dict[str, int] = {}
    for start in range(0, count, CONCURRENCY):
        if start >= warm_up and "warm" not in rss:
            rss["warm"] = rss_kib()
        if start >= half and "half" not in rss:
            rss["half"] = rss_kib()
        chunk = cases[start : start + CONCURRENCY]
        results = await asyncio.gather(*(call(stack, case) for case in chunk))
        for case, (code, details, reply) in zip(chunk, results, strict=True):
            codes[code.name] = codes.get(code.name, 0) + 1
            context = (code, details, case.request, case.metadata)
            assert code in EXPECTED, context
            want_code, want = expected_outcome(case, limits, version)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                # Only an accepted request reaches a tier that can be down or slow.
                assert want_code is grpc.StatusCode.OK and details, context
                continue
            assert code == want_code, (want_code, want, *context)
            if reply is None:
                assert details and "Traceback" not in details and "Exception" not in details, context
                if isinstance(want, str) and want:
                    assert details == want, context
                continue
            requested = [o.name for o in case.request.outputs] or list(OUTPUTS)
            assert reply.model_name == MODEL_NAME and reply.id == case.request.id, context
            assert answers(reply) == dict.fromkeys(requested, want), (answers(reply), want, *context)
            valid_ok += case.valid
    rss["end"] = rss_kib()
    assert valid_ok == sum(case.valid for case in cases) > 0, codes
    assert codes.get("INVALID_ARGUMENT", 0) > count // 4 and codes.get("NOT_FOUND", 0) > 0, codes
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0, codes

    # The server is still alive and serving, and still answers well-formed requests.
    assert (await stack.stub.ServerLive(pb.ServerLiveRequest(), timeout=5.0)).live
    assert (await stack.stub.ServerReady(pb.ServerReadyRequest(), timeout=5.0)).ready
    health = await health_pb2_grpc.HealthStub(stack.channel).Check(health_pb2.HealthCheckRequest(), timeout=5.0)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    well_formed = next(case for case in cases if case.valid)
    rows = expected_outcome(well_formed, limits, version)[1]
    reply = await stack.stub.ModelInfer(well_formed.request, timeout=10.0)
    assert answers(reply) == dict.fromkeys([o.name for o in well_formed.request.outputs] or list(OUTPUTS), rows)
    grown_mib = (rss["end"] - rss["warm"]) / 1024
    assert grown_mib < RSS_GROWTH_LIMIT_MIB, f"RSS grew {grown_mib:.1f} MiB after warm-up: {rss}"
    return codes, rss


async def test_generated_requests_get_the_codecs_status_and_the_server_stays_up(stack: Stack) -> None:
    await fuzz_gateway(stack, CI_REQUESTS)


@pytest.mark.slow
@pytest.mark.skipif(not FULL_RUN, reason="the 10,000-request run needs TIERGATE_FUZZ_FULL=1")
async def test_full_fuzz_run(stack: Stack) -> None:
    codes, rss = await fuzz_gateway(stack, FULL_REQUESTS)
    print(f"\nFUZZ requests={FULL_REQUESTS} codes={dict(sorted(codes.items()))} rss_kib={rss}")


async def test_oversized_metadata_is_refused_as_resource_exhausted_and_the_server_stays_up(stack: Stack) -> None:
    case = draw_cases(1, fixed_seed=1)[0]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.stub.ModelInfer(case.request, metadata=[("x-request-id", "r" * 20_000)], timeout=5.0)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await stack.stub.ServerLive(pb.ServerLiveRequest(), timeout=5.0)).live


async def test_unparseable_request_bytes_are_invalid_argument(stack: Stack) -> None:
    infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = stack.channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer"
    )
    # A truncated field; model_name (a proto3 string) holding invalid UTF-8; an impossible wire type.
    for wire in (b"\x0a\x05ab", b"\x0a\x02\xc3\x28", b"\xff\xff\xff"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await infer(wire, timeout=5.0)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert (await stack.stub.ServerLive(pb.ServerLiveRequest(), timeout=5.0)).live


@seed(20261203)
@settings(max_examples=300, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(CASES, st.integers(1, 70), st.integers(1, 3000))
def test_the_codec_raises_only_its_own_errors(case: Case, max_rows: int, max_bytes: int) -> None:
    limits = LimitSettings(max_batch_rows=max_rows, max_text_bytes=max_bytes)
    try:
        batch = decode_request(case.request, limits)
    except TiergateError as error:
        assert str(error) and "Traceback" not in str(error)
        return
    assert 1 <= len(batch.texts) <= max_rows
    assert all(text.strip() and len(text.encode()) <= max_bytes for text in batch.texts)
    assert set(batch.outputs) <= set(OUTPUTS)
