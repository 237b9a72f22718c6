"""The dynamic batcher: own rows back in order, batch forming rules, deadlines while queued, failure isolation,
callers that go away, and a shutdown that drains the queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_runtime.model import EdgeModel
from tests.conftest import StackFactory
from tests.test_gateway import infer_request
from tests.test_metrics import scrape, value
from tiergate.batching import BatchStats, DynamicBatcher
from tiergate.errors import NotReadyError, TierDeadlineError
from tiergate.settings import CloudSettings, GatewaySettings


class Model:
    """Doubles each number after `delay_s`; refuses a batch holding a negative number; records each batch."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[int]] = []

    async def run(self, rows: list[int]) -> list[int]:
        self.batches.append(list(rows))
        await asyncio.sleep(self.delay_s)
        if any(row < 0 for row in rows):
            raise ValueError("negative rows are not allowed")
        return [row * 2 for row in rows]


async def test_concurrent_requests_share_a_batch_and_each_gets_its_own_rows_in_order() -> None:
    model = Model()
    stats: list[BatchStats] = []
    batcher = DynamicBatcher(model.run, max_rows=64, max_delay_s=0.05, on_batch=stats.append)
    requests = [list(range(start, start + 3)) for start in range(0, 30, 3)]
    answers = await asyncio.gather(*(batcher.submit(rows) for rows in requests))
    assert answers == [[row * 2 for row in rows] for rows in requests]
    assert len(model.batches) == 1 and model.batches[0] == [row for rows in requests for row in rows]
    assert stats[0].requests == 10 and stats[0].rows == 30
    await batcher.close()


async def test_a_batch_goes_out_when_full_at_a_preferred_size_or_after_the_delay() -> None:
    model = Model()
    batcher = DynamicBatcher(model.run, max_rows=8, max_delay_s=10.0, preferred_sizes=[4])
    loop = asyncio.get_running_loop()
    started = loop.time()
    # Four rows reach the preferred size: out at once, not after the 10 s delay.
    assert await asyncio.gather(*(batcher.submit([n]) for n in range(4))) == [[0], [2], [4], [6]]
    assert loop.time() - started < 5.0
    # Twelve rows: eight fill a batch, the other four make a preferred-size batch.
    await asyncio.gather(*(batcher.submit([n]) for n in range(12)))
    assert [len(batch) for batch in model.batches[1:]] == [8, 4]
    quick = DynamicBatcher(model.run, max_rows=8, max_delay_s=0.02)
    started = loop.time()
    assert await quick.submit([5]) == [10]  # alone: it waits the delay, no more
    assert loop.time() - started < 5.0
    await batcher.close()
    await quick.close()


async def test_a_request_larger_than_a_batch_goes_alone_and_whole() -> None:
    model = Model()
    batcher = DynamicBatcher(model.run, max_rows=4, max_delay_s=0.01)
    big, small = list(range(10)), [100]
    answers = await asyncio.gather(batcher.submit(small), batcher.submit(big))
    assert answers == [[200], [n * 2 for n in big]]
    assert model.batches == [[100], big]
    await batcher.close()


async def test_a_deadline_that_passes_while_queued_fails_that_request_alone() -> None:
    model = Model(delay_s=0.2)
    batcher = DynamicBatcher(model.run, max_rows=1, max_delay_s=0.0)
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(batcher.submit([1]))
    await asyncio.sleep(0.01)  # the first batch is running: the next two queue behind it
    late = asyncio.ensure_future(batcher.submit([2], deadline=loop.time() + 0.05))
    patient = asyncio.ensure_future(batcher.submit([3], deadline=loop.time() + 5.0))
    assert await first == [2]
    with pytest.raises(TierDeadlineError, match="deadline passed while 1 rows waited"):
        await late
    assert await patient == [6]
    assert [2] not in model.batches, "a request past its deadline was computed"
    await batcher.close()


async def test_one_requests_bad_rows_do_not_fail_the_others() -> None:
    model = Model()
    batcher = DynamicBatcher(model.run, max_rows=64, max_delay_s=0.05)
    good, bad, other = batcher.submit([1, 2]), batcher.submit([3, -1]), batcher.submit([4])
    answers = await asyncio.gather(good, bad, other, return_exceptions=True)
    assert answers[0] == [2, 4] and answers[2] == [8]
    assert isinstance(answers[1], ValueError)
    await batcher.close()


async def test_a_caller_that_goes_away_is_skipped() -> None:
    model = Model(delay_s=0.1)
    batcher = DynamicBatcher(model.run, max_rows=1, max_delay_s=0.0)
    running = asyncio.ensure_future(batcher.submit([1]))
    await asyncio.sleep(0.01)
    gone = asyncio.ensure_future(batcher.submit([2]))
    await asyncio.sleep(0.01)
    gone.cancel()
    assert await running == [2]
    assert await batcher.submit([3]) == [6]
    assert [2] not in model.batches
    await batcher.close()


async def test_close_answers_every_queued_request_then_refuses_new_ones() -> None:
    model = Model(delay_s=0.02)
    batcher = DynamicBatcher(model.run, max_rows=2, max_delay_s=1.0)
    queued = [asyncio.ensure_future(batcher.submit([n])) for n in range(5)]
    await asyncio.sleep(0)
    await batcher.close()
    assert batcher.queued_rows == 0, "close returned before the queue was answered"
    assert await asyncio.wait_for(asyncio.gather(*queued), timeout=1.0) == [[0], [2], [4], [6], [8]]
    with pytest.raises(NotReadyError, match="shutting down"):
        await batcher.submit([9])


def test_settings_are_checked() -> None:
    async def run(rows: list[int]) -> list[int]:
        return rows

    with pytest.raises(ValueError, match="max_rows"):
        DynamicBatcher(run, max_rows=0, max_delay_s=0.0)
    with pytest.raises(ValueError, match="preferred"):
        DynamicBatcher(run, max_rows=8, max_delay_s=0.0, preferred_sizes=[16])


async def test_the_gateway_batches_concurrent_requests_at_the_edge_and_each_gets_its_own_answer(
    start_stack: StackFactory, tiny_models: Path, tiny_rows: list[tuple[str, str]]
) -> None:
    def gather_20ms(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.batching.enabled = True  # off by default
        gateway.batching.max_queue_delay_us = 20_000

    stack = await start_stack(with_cloud=False, configure=gather_20ms)
    texts = sorted({text for text, _ in tiny_rows})[:32]
    replies = await asyncio.gather(
        *(stack.stub.ModelInfer(infer_request([text], tier="edge"), timeout=10.0) for text in texts)
    )
    model = EdgeModel.load(tiny_models)
    alone = model.predict(texts)
    expected = [model.labels[int(index)] for index in alone.label_index]
    model.close()
    labels = [reply.outputs[0].contents.bytes_contents[0].decode() for reply in replies]
    assert labels == expected, "a request got another request's answer"
    samples = await scrape(stack.gateway.metrics_port)
    calls = value(samples, "tiergate_edge_batch_rows_count", tier="edge")
    rows = value(samples, "tiergate_edge_batch_rows_sum", tier="edge")
    assert rows == len(texts) and calls < len(texts) / 4, f"{calls:.0f} model calls for {len(texts)} requests"


class Gate:
    """A model whose batches wait on an event; records the most batches that ran at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.running = 0
        self.most = 0
        self.batches: list[list[int]] = []

    async def run(self, rows: list[int]) -> list[int]:
        self.batches.append(list(rows))
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return [row * 2 for row in rows]


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(200):  # bounded polling, up to about 2 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


async def test_up_to_max_inflight_batches_run_at_once_and_the_next_gathers_meanwhile() -> None:
    model = Gate()
    batcher = DynamicBatcher(model.run, max_rows=2, max_delay_s=0.0, max_inflight=3)
    requests = [asyncio.ensure_future(batcher.submit([n])) for n in range(10)]
    await wait_until(lambda: batcher.inflight == 3, "three batches run")
    await asyncio.sleep(0.05)  # the bound holds while they run
    assert model.running == 3 and batcher.inflight == 3
    # With no delay, each of the first three found the queue empty and a slot free: each runs alone at once.
    assert batcher.queued_rows == 10 - 3, "rows past the in-flight bound wait in the queue"
    model.release.set()
    assert await asyncio.gather(*requests) == [[n * 2] for n in range(10)]
    assert model.most == 3
    assert all(len(batch) <= 2 for batch in model.batches)
    await batcher.close()


async def test_a_request_to_an_idle_batcher_runs_at_once_and_those_arriving_meanwhile_gather() -> None:
    model = Gate()
    stats: list[BatchStats] = []
    batcher = DynamicBatcher(model.run, max_rows=8, max_delay_s=0.0, on_batch=stats.append)
    first = asyncio.ensure_future(batcher.submit([1]))
    await wait_until(lambda: model.running == 1, "the first request runs")
    later = [asyncio.ensure_future(batcher.submit([n, n + 1])) for n in (10, 20, 30)]
    await asyncio.sleep(0.02)
    assert batcher.queued_rows == 6 and batcher.inflight == 1, "arrivals wait while the first runs"
    model.release.set()
    assert await first == [2]
    assert await asyncio.gather(*later) == [[20, 22], [40, 42], [60, 62]]
    assert model.batches == [[1], [10, 11, 20, 21, 30, 31]]
    assert [(s.rows, s.requests) for s in stats] == [(1, 1), (6, 3)]
    await batcher.close()


async def test_one_batch_in_flight_by_default() -> None:
    model = Gate()
    batcher = DynamicBatcher(model.run, max_rows=1, max_delay_s=0.0)
    requests = [asyncio.ensure_future(batcher.submit([n])) for n in range(3)]
    await wait_until(lambda: batcher.inflight == 1, "a batch runs")
    await asyncio.sleep(0.05)
    assert model.running == 1 and batcher.queued_rows == 2
    model.release.set()
    assert await asyncio.gather(*requests) == [[0], [2], [4]]
    assert model.most == 1
    await batcher.close()


async def test_batches_in_flight_keep_each_requests_rows_in_order_and_fail_alone() -> None:
    model = Model(delay_s=0.02)
    batcher = DynamicBatcher(model.run, max_rows=6, max_delay_s=0.001, max_inflight=4)
    requests = [[start, start + 1, start + 2] for start in range(0, 60, 3)]
    requests[7] = [21, -1, 23]
    answers = await asyncio.gather(*(batcher.submit(rows) for rows in requests), return_exceptions=True)
    assert isinstance(answers[7], ValueError)
    assert [a for i, a in enumerate(answers) if i != 7] == [[r * 2 for r in rows] for rows in requests if rows[1] >= 0]
    await batcher.close()


async def test_a_deadline_passing_while_every_slot_is_busy_fails_that_request_alone() -> None:
    model = Gate()
    batcher = DynamicBatcher(model.run, max_rows=1, max_delay_s=0.0, max_inflight=2)
    loop = asyncio.get_running_loop()
    busy = [asyncio.ensure_future(batcher.submit([n])) for n in range(2)]
    await wait_until(lambda: batcher.inflight == 2, "both slots are busy")
    late = asyncio.ensure_future(batcher.submit([7], deadline=loop.time() + 0.05))
    await asyncio.sleep(0.1)
    model.release.set()
    with pytest.raises(TierDeadlineError, match="waited for a batch"):
        await late
    assert await asyncio.gather(*busy) == [[0], [2]]
    assert [7] not in model.batches
    await batcher.close()


async def test_a_batch_whose_every_request_went_away_is_cancelled_and_frees_its_slot() -> None:
    model = Gate()
    batcher = DynamicBatcher(model.run, max_rows=4, max_delay_s=0.0, max_inflight=1)
    callers = [asyncio.ensure_future(batcher.submit([n])) for n in range(2)]
    await wait_until(lambda: model.running == 1, "the batch runs")
    callers[0].cancel()
    await asyncio.sleep(0.02)
    assert model.running == 1, "the batch went on while one of its requests still waited"
    callers[1].cancel()
    await wait_until(lambda: model.running == 0 and batcher.inflight == 0, "the abandoned batch is cancelled")
    model.release.set()
    assert await batcher.submit([5]) == [10], "the slot was not freed"
    await batcher.close()


async def test_a_failure_that_is_not_the_rows_fault_is_not_rerun() -> None:
    calls: list[list[int]] = []

    async def down(rows: list[int]) -> list[int]:
        calls.append(rows)
        raise ConnectionError("the tier is down")

    batcher = DynamicBatcher(
        down, max_rows=8, max_delay_s=0.01, rerun_alone=lambda error: not isinstance(error, ConnectionError)
    )
    answers = await asyncio.gather(*(batcher.submit([n]) for n in range(4)), return_exceptions=True)
    assert all(isinstance(answer, ConnectionError) for answer in answers)
    assert len(calls) == 1, "a failure every request shares was rerun request by request"
    await batcher.close()


async def test_close_waits_for_every_batch_in_flight() -> None:
    model = Model(delay_s=0.05)
    batcher = DynamicBatcher(model.run, max_rows=1, max_delay_s=0.0, max_inflight=3)
    requests = [asyncio.ensure_future(batcher.submit([n])) for n in range(6)]
    await asyncio.sleep(0)
    await batcher.close()
    assert batcher.inflight == 0 and batcher.queued_rows == 0
    assert all(request.done() for request in requests)
    assert [request.result() for request in requests] == [[n * 2] for n in range(6)]


def test_max_inflight_is_checked() -> None:
    async def run(rows: list[int]) -> list[int]:
        return rows

    with pytest.raises(ValueError, match="max_inflight"):
        DynamicBatcher(run, max_rows=8, max_delay_s=0.0, max_inflight=0)
