"""The edge tier on the real tiny INT8 model: small calls on the event loop, larger ones (and any while the worker
is busy) on the worker thread, the same answers either way."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from edge_runtime.model import EdgeModel
from gateway.edge_tier import EdgeTier
from gateway.tier import Prediction


class _Recording(EdgeTier):
    """The real tier, noting the thread each model call ran on."""

    def __init__(self, model: EdgeModel, inline_rows: int) -> None:
        super().__init__(model, inline_rows=inline_rows)
        self.threads: list[str] = []
        self.release = threading.Event()
        self.release.set()

    def _predict_sync(self, texts: Sequence[str]) -> list[Prediction]:
        self.threads.append(threading.current_thread().name)
        self.release.wait(5.0)
        return super()._predict_sync(texts)


async def _until_on_the_model(tier: _Recording) -> None:
    """Wait (at most 5 s) until a call has reached the model."""
    for _ in range(5000):
        if tier.threads:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("no call reached the model")


@pytest.fixture
def texts(tiny_rows: list[tuple[str, str]]) -> list[str]:
    return [text for text, _ in tiny_rows[:40]]


async def test_small_calls_run_on_the_loop_and_large_ones_on_the_worker(tiny_models: Path, texts: list[str]) -> None:
    tier = _Recording(EdgeModel.load(tiny_models), inline_rows=8)
    try:
        loop_thread = threading.current_thread().name
        small = await tier.predict(texts[:8], None)
        large = await tier.predict(texts[:9], None)
        assert tier.threads[0] == loop_thread
        assert tier.threads[1] != loop_thread and tier.threads[1].startswith("edge")
        # Same model, same answers, wherever it ran.
        assert large[:8] == small
    finally:
        await tier.close()


async def test_while_the_worker_is_busy_small_calls_queue_behind_it(tiny_models: Path, texts: list[str]) -> None:
    tier = _Recording(EdgeModel.load(tiny_models), inline_rows=8)
    try:
        tier.release.clear()
        large = asyncio.ensure_future(tier.predict(texts[:20], None))
        await _until_on_the_model(tier)
        small = asyncio.ensure_future(tier.predict(texts[:2], None))
        await asyncio.sleep(0.05)
        assert not small.done(), "the model never runs on two threads at once"
        tier.release.set()
        await asyncio.gather(large, small)
        assert len(tier.threads) == 2 and all(name.startswith("edge") for name in tier.threads)
        # Once the worker is idle again, small calls are back on the loop.
        await tier.predict(texts[:2], None)
        assert tier.threads[-1] == threading.current_thread().name
    finally:
        await tier.close()


async def test_a_caller_that_goes_away_leaves_the_worker_call_counted_until_it_ends(
    tiny_models: Path, texts: list[str]
) -> None:
    tier = _Recording(EdgeModel.load(tiny_models), inline_rows=0)
    try:
        tier.release.clear()
        call = asyncio.ensure_future(tier.predict(texts[:3], None))
        await _until_on_the_model(tier)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert tier._on_worker == 1, "the model is still running on the worker"
        tier.release.set()
        for _ in range(200):
            if tier._on_worker == 0:
                break
            await asyncio.sleep(0.005)
        assert tier._on_worker == 0
    finally:
        await tier.close()


def test_a_negative_inline_bound_is_refused(tiny_models: Path) -> None:
    model = EdgeModel.load(tiny_models)
    with pytest.raises(ValueError, match="edge_inline_rows"):
        EdgeTier(model, inline_rows=-1)
    model.close()
