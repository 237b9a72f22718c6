"""Abandoned work is dropped: the cloud runs a request in chunks and stops once its caller has gone, and the
gateway splits large escalations into bounded chunks. Real servers on port 0; the cloud model is slowed by a
wrapper installed through the servicer's model seam."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Sequence

import pytest

from cloud_runtime.model import CloudModel
from gateway.cloud_tier import CloudTier
from gateway.routing import Reason
from tests.conftest import Stack, StackFactory
from tests.test_gateway import infer_request
from tests.test_metrics import scrape, value
from tiergate.errors import TierDeadlineError, TierUnavailableError
from tiergate.scoring import Scored
from tiergate.settings import CloudSettings, GatewaySettings

CHUNK_S = 0.05  # what the slowed model takes per chunk


class SlowModel:
    """The real cloud model, taking CHUNK_S longer per call; fails any call holding `poison`."""

    def __init__(self, inner: CloudModel, poison: str = "", delay_s: float = CHUNK_S) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.labels = inner.labels
        self.poison = poison
        self.calls: list[int] = []

    def predict(self, texts: Sequence[str]) -> Scored:
        self.calls.append(len(texts))
        time.sleep(self.delay_s)
        if self.poison and self.poison in texts:
            raise RuntimeError("the model cannot take this row")
        return self.inner.predict(texts)

    def close(self) -> None:
        self.inner.close()


def slow_cloud(stack: Stack, poison: str = "", delay_s: float = CHUNK_S) -> SlowModel:
    assert stack.cloud is not None
    servicer = stack.cloud.servicer
    slow = SlowModel(servicer.model, poison, delay_s)
    servicer.use_model(slow, servicer.model_version)  # type: ignore[arg-type]
    return slow


def texts(n: int) -> list[str]:
    return [f"organic whole milk {i}" for i in range(n)]


async def test_an_abandoned_big_batch_does_not_hold_up_the_next_request(start_stack: StackFactory) -> None:
    def chunks(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        cloud.model_chunk_rows = 32
        cloud.limits.max_batch_rows = gateway.limits.max_batch_rows = 2048

    stack = await start_stack(configure=chunks, max_batch_rows=2048)
    slow = slow_cloud(stack)
    loop = asyncio.get_running_loop()
    # 1,024 rows forced to the cloud: 32 chunks, about 1.6 s of model time; the caller gives it 0.5 s. The
    # collector runs first so that no full collection of the test process's heap lands inside that half second.
    gc.collect()
    started = loop.time()
    reply = await stack.stub.ModelInfer(infer_request(texts(1024), tier="cloud"), timeout=0.5)
    assert loop.time() - started < 0.5
    reasons = reply.parameters["escalation_reasons"].string_param
    assert Reason.DEADLINE.value in reasons, "the rows the cloud could not answer in time say why"
    # The next request reaches a model that dropped the abandoned work: it waits a chunk or so, not a second.
    started = loop.time()
    reply = await stack.stub.ModelInfer(infer_request(["bananas"], tier="cloud"), timeout=5.0)
    waited = loop.time() - started
    assert reply.outputs[2].contents.bytes_contents[0] == b"cloud"
    assert waited < 8 * CHUNK_S, f"the next request waited {waited:.3f}s behind abandoned work"
    assert sum(slow.calls) < 1024 / 2, f"the cloud computed {sum(slow.calls)} of 1,024 abandoned rows"
    assert stack.cloud is not None
    for _ in range(50):  # bounded: the drop is counted as the cancelled handlers unwind
        metrics = await scrape(stack.cloud.metrics_port)
        dropped = sum(
            value(metrics, "tiergate_cloud_rows_dropped_total", model="product-category", reason=reason)
            for reason in ("cancelled", "deadline")
        )
        if dropped:
            break
        await asyncio.sleep(0.05)
    assert dropped > 0


async def test_cancelling_a_hop_call_stops_the_cloud_work(start_stack: StackFactory) -> None:
    def one_call(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        cloud.model_chunk_rows = 8
        gateway.limits.hop_chunk_rows = 1024

    stack = await start_stack(configure=one_call)
    slow = slow_cloud(stack)
    hop = stack.gateway.tiers[-1]
    assert isinstance(hop, CloudTier)
    call = asyncio.ensure_future(hop.predict(texts(200), None))  # 25 chunks, 1.25 s of model time
    await asyncio.sleep(4 * CHUNK_S)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(4 * CHUNK_S)
    computed = len(slow.calls)
    await asyncio.sleep(4 * CHUNK_S)
    assert len(slow.calls) == computed, "the cloud went on computing after its caller had gone"
    assert computed < 25 / 2


async def test_a_large_escalation_goes_as_bounded_chunks_in_order(start_stack: StackFactory) -> None:
    def chunked(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.limits.hop_chunk_rows = 64
        cloud.model_chunk_rows = 1024

    stack = await start_stack(configure=chunked, max_batch_rows=512)
    assert stack.cloud is not None
    hop = stack.gateway.tiers[-1]
    assert isinstance(hop, CloudTier)
    rows = texts(300)
    chunked_answers = await hop.predict(rows, None)
    metrics = await scrape(stack.cloud.metrics_port)
    calls = value(metrics, "tiergate_cloud_request_duration_seconds_count", model="product-category")
    assert calls == 5  # ceil(300 / 64)
    whole = [p for start in range(0, 300, 50) for p in await hop.predict(rows[start : start + 50], None)]
    assert chunked_answers == whole


async def test_one_failing_chunk_fails_the_escalation_and_the_cascade_degrades(start_stack: StackFactory) -> None:
    def chunked(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.limits.hop_chunk_rows = 16

    stack = await start_stack(configure=chunked, max_batch_rows=128)
    rows = texts(100)
    slow_cloud(stack, poison=rows[70])
    hop = stack.gateway.tiers[-1]
    assert isinstance(hop, CloudTier)
    with pytest.raises(TierUnavailableError):
        await hop.predict(rows, None)
    reply = await stack.stub.ModelInfer(infer_request(rows, tier="cloud"), timeout=10.0)
    assert reply.parameters["degraded"].bool_param is True
    tiers = set(reply.outputs[2].contents.bytes_contents)
    assert tiers == {b"edge"}


async def test_chunk_sizes_are_checked() -> None:
    from gateway.cloud_tier import CloudTier
    from tiergate.envelope import Keyring, Sealer

    with pytest.raises(ValueError, match="hop_chunk_rows"):
        CloudTier(
            "127.0.0.1:1",
            Sealer(Keyring.generate()),
            model_name="m",
            timeout_s=1.0,
            max_message_bytes=1 << 20,
            chunk_rows=0,
        )


async def test_work_queued_behind_the_model_is_skipped_once_its_caller_has_gone(start_stack: StackFactory) -> None:
    def small_chunks(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        cloud.model_chunk_rows = 8

    stack = await start_stack(configure=small_chunks)
    slow = slow_cloud(stack, delay_s=0.25)
    hop = stack.gateway.tiers[-1]
    assert isinstance(hop, CloudTier)
    loop = asyncio.get_running_loop()
    busy = asyncio.ensure_future(hop.predict(texts(16), None))  # two chunks of 8 rows, 0.25 s each
    await asyncio.sleep(0.02)
    # Three rows whose caller gives up long before the model thread is free: never computed.
    with pytest.raises(TierDeadlineError):
        await hop.predict(texts(3), loop.time() + 0.08)
    assert len(await busy) == 16
    assert 3 not in slow.calls, "a request whose caller had gone was computed"
