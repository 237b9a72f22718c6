"""Hop batching: escalated rows of concurrent requests share sealed cloud calls, each request keeps its own
deadline, and a call whose every request has gone is cancelled. Real servers on port 0, real tiny models; the
cloud model is slowed through the servicer's model seam where timing matters."""

from __future__ import annotations

import asyncio

import pytest

from gateway.breaker import State
from gateway.cloud_tier import KEEPALIVE_OPTIONS, CloudTier
from gateway.routing import Reason
from tests.conftest import Stack, StackFactory
from tests.test_cancellation import CHUNK_S, slow_cloud, texts
from tests.test_gateway import infer_request, rows
from tests.test_metrics import scrape, value
from tiergate.errors import TierDeadlineError
from tiergate.settings import CloudSettings, GatewaySettings

MODEL = "product-category"


def gather_for(delay_us: int, *, enabled: bool = True, inflight: int = 4, chunk_rows: int = 8):  # type: ignore[no-untyped-def]
    def configure(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.hop_batching.enabled = enabled
        gateway.hop_batching.max_queue_delay_us = delay_us
        gateway.hop_batching.max_inflight_calls = inflight
        cloud.model_chunk_rows = chunk_rows

    return configure


def hop_of(stack: Stack) -> CloudTier:
    hop = stack.gateway.tiers[-1]
    assert isinstance(hop, CloudTier)
    return hop


async def cloud_calls(stack: Stack) -> float:
    assert stack.cloud is not None
    return value(await scrape(stack.cloud.metrics_port), "tiergate_cloud_request_duration_seconds_count", model=MODEL)


def requests_of(tiny_rows: list[tuple[str, str]], count: int, size: int) -> list[list[str]]:
    distinct = sorted({text for text, _ in tiny_rows})
    assert len(distinct) >= count * size
    return [distinct[i * size : (i + 1) * size] for i in range(count)]


async def test_concurrent_escalations_share_few_sealed_calls_and_each_gets_its_own_answers(
    start_stack: StackFactory, tiny_rows: list[tuple[str, str]]
) -> None:
    requests = requests_of(tiny_rows, 32, 2)
    alone = await start_stack(configure=gather_for(0, enabled=False))
    expected = [
        [row[:3] for row in rows(await alone.stub.ModelInfer(infer_request(texts_, tier="cloud"), timeout=10.0))]
        for texts_ in requests
    ]
    assert all(tier == "cloud" for answer in expected for _, _, tier in answer)

    stack = await start_stack(configure=gather_for(20_000))
    replies = await asyncio.gather(
        *(stack.stub.ModelInfer(infer_request(texts_, tier="cloud"), timeout=10.0) for texts_ in requests)
    )
    got = [[row[:3] for row in rows(reply)] for reply in replies]
    assert [[label for label, _, _ in answer] for answer in got] == [
        [label for label, _, _ in answer] for answer in expected
    ], "a request got another request's answers, or its own out of order"
    for mine, theirs in zip(got, expected, strict=True):
        assert [confidence for _, confidence, _ in mine] == pytest.approx(
            [confidence for _, confidence, _ in theirs], abs=1e-4
        )
        assert all(tier == "cloud" for _, _, tier in mine)
    calls = await cloud_calls(stack)
    assert calls <= 8, f"{calls:.0f} sealed calls for 32 concurrent escalations"
    samples = await scrape(stack.gateway.metrics_port)
    assert value(samples, "tiergate_hop_call_requests_sum", tier="cloud") == 32
    assert value(samples, "tiergate_hop_call_rows_sum", tier="cloud") == 64
    assert value(samples, "tiergate_hop_call_requests_count", tier="cloud") == calls
    assert await cloud_calls(alone) == 32, "without hop batching each request is a sealed call of its own"


async def test_a_tight_deadline_gets_the_edge_answer_alone_while_its_call_answers_the_others(
    start_stack: StackFactory, tiny_rows: list[tuple[str, str]]
) -> None:
    stack = await start_stack(configure=gather_for(20_000, chunk_rows=64))
    slow_cloud(stack, delay_s=0.4)
    requests = requests_of(tiny_rows, 6, 2)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def tight() -> tuple[float, list[tuple[str, float, str, str]]]:
        reply = await stack.stub.ModelInfer(infer_request(requests[0], tier="cloud"), timeout=0.2)
        return loop.time() - started, rows(reply)

    patient = [stack.stub.ModelInfer(infer_request(texts_, tier="cloud"), timeout=10.0) for texts_ in requests[1:]]
    (took, answer), *others = await asyncio.gather(tight(), *patient)
    assert took < 0.2, f"the tight request was answered after {took:.3f}s"
    expected = f"{Reason.CLIENT_HINT.value}+{Reason.DEADLINE.value}"
    assert [(tier, reason) for _, _, tier, reason in answer] == [("edge", expected)] * 2
    for reply in others:
        assert [tier for _, _, tier, _ in rows(reply)] == ["cloud", "cloud"]
    assert await cloud_calls(stack) == 1, "the requests did not share one call"
    samples = await scrape(stack.gateway.metrics_port)
    assert value(samples, "tiergate_hop_call_requests_sum", tier="cloud") == 6
    hop = hop_of(stack)
    assert hop.breaker.state is State.CLOSED
    assert value(samples, "tiergate_hop_errors_total", tier="cloud", code="DEADLINE_EXCEEDED") == 0


async def test_a_member_whose_deadline_passes_fails_alone_and_the_breaker_does_not_count_it(
    start_stack: StackFactory,
) -> None:
    stack = await start_stack(configure=gather_for(20_000))
    slow_cloud(stack)  # 8-row chunks, CHUNK_S each
    hop = hop_of(stack)
    loop = asyncio.get_running_loop()
    patient = asyncio.ensure_future(hop.predict(texts(24), None))  # three chunks
    with pytest.raises(TierDeadlineError):
        await hop.predict(texts(8), loop.time() + 2 * CHUNK_S)
    assert len(await patient) == 24
    assert await cloud_calls(stack) == 1
    assert hop.breaker.state is State.CLOSED and hop.expected_latency_s() is None
    assert len(hop._latencies) == 1, "one shared call is one sample of the hop's latency"


async def test_cancelling_every_member_stops_the_cloud_work(start_stack: StackFactory) -> None:
    stack = await start_stack(configure=gather_for(20_000))
    slow = slow_cloud(stack)
    hop = hop_of(stack)
    members = [asyncio.ensure_future(hop.predict(texts(20), None)) for _ in range(3)]  # 60 rows: 8 chunks
    await asyncio.sleep(4 * CHUNK_S)
    members[0].cancel()
    await asyncio.sleep(2 * CHUNK_S)
    assert stack.cloud is not None
    assert len(slow.calls) >= 4, "the call stopped while two of its requests still waited"
    for member in members[1:]:
        member.cancel()
    for member in members:
        with pytest.raises(asyncio.CancelledError):
            await member
    await asyncio.sleep(2 * CHUNK_S)
    computed = len(slow.calls)
    await asyncio.sleep(4 * CHUNK_S)
    assert len(slow.calls) == computed, "the cloud went on computing after every member had gone"
    assert computed < 8
    assert await hop.predict(texts(2), None), "the hop answers the next request"


async def test_one_member_going_away_leaves_the_call_to_the_others(start_stack: StackFactory) -> None:
    stack = await start_stack(configure=gather_for(20_000))
    slow_cloud(stack)
    hop = hop_of(stack)
    leaving = asyncio.ensure_future(hop.predict(texts(8), None))
    staying = asyncio.ensure_future(hop.predict(texts(16), None))
    await asyncio.sleep(2 * CHUNK_S)
    leaving.cancel()
    assert len(await staying) == 16
    assert await cloud_calls(stack) == 1


async def test_requests_larger_than_a_shared_call_keep_the_chunked_path(start_stack: StackFactory) -> None:
    def chunked(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.limits.hop_chunk_rows = 64
        gateway.hop_batching.max_queue_delay_us = 20_000

    stack = await start_stack(configure=chunked, max_batch_rows=512)
    hop = hop_of(stack)
    answers = await asyncio.gather(hop.predict(texts(130), None), hop.predict(texts(3), None))
    assert [len(answer) for answer in answers] == [130, 3]
    samples = await scrape(stack.gateway.metrics_port)
    # 130 rows as three chunks of one request each, and the small request in a call of its own.
    assert value(samples, "tiergate_hop_call_requests_count", tier="cloud") == 4
    assert value(samples, "tiergate_hop_call_requests_sum", tier="cloud") == 4


async def test_a_failing_row_fails_only_its_request_in_a_shared_call(start_stack: StackFactory) -> None:
    stack = await start_stack(configure=gather_for(20_000))
    bad = texts(10)[7]
    slow_cloud(stack, poison=bad, delay_s=0.0)
    hop = hop_of(stack)
    good = texts(5)
    answers = await asyncio.gather(
        hop.predict(good, None), hop.predict([bad], None), hop.predict(good, None), return_exceptions=True
    )
    assert [len(answer) for answer in answers if isinstance(answer, list)] == [5, 5]
    assert not isinstance(answers[1], list)


def test_the_hop_channel_keeps_its_connection_alive() -> None:
    options = dict(KEEPALIVE_OPTIONS)
    assert options["grpc.keepalive_time_ms"] > options["grpc.keepalive_timeout_ms"] > 0
    assert options["grpc.keepalive_permit_without_calls"] == 1
