"""Dynamic batching: rows from concurrent requests gathered into one model call, as Triton's dynamic batcher does.

Transport-free and model-free: a `DynamicBatcher` is handed the coroutine that runs one batch (the edge model on
its worker thread, or one sealed call to a remote tier). Each request gets exactly its own rows back, in order.

- A batch goes out when it reaches `max_rows`, when it reaches one of the preferred sizes, or when the oldest
  request in it has waited `max_delay_s`; while `max_inflight` batches run, the next one gathers. With no delay,
  a request arriving to an empty queue and a free slot runs at once in its own task (a batch of itself).
- A request whose deadline passes while queued is failed alone, with `TierDeadlineError`.
- A failing batch of several requests is run again one request at a time, so a request whose rows fail the
  model fails alone and the others are answered (unless `rerun_alone` says the failure is not the rows').
- A batch whose every request has gone away (cancelled, or given up on its own deadline) is cancelled.
- `close()` refuses new requests, answers every queued one, waits for the batches running, then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tiergate.errors import NotReadyError, TierDeadlineError

T = TypeVar("T")
R = TypeVar("R")
logger = logging.getLogger(__name__)


@dataclass
class _Entry(Generic[T, R]):
    items: list[T]
    deadline: float | None
    queued_at: float
    # The submitter's context: a batch runs in its first request's, so its logs and spans carry that request.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    future: asyncio.Future[list[R]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(frozen=True)
class BatchStats:
    """What one dispatched batch held: for metrics and tests."""

    rows: int
    requests: int
    # Seconds the oldest request waited in the queue before the batch went out.
    waited_s: float


def _always(error: Exception) -> bool:
    return True


class DynamicBatcher(Generic[T, R]):
    """Gathers `submit` calls into batches for `run`, up to `max_inflight` batches at a time."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_rows: int,
        max_delay_s: float,
        preferred_sizes: Sequence[int] = (),
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "batcher",
        max_inflight: int = 1,
        rerun_alone: Callable[[Exception], bool] = _always,
    ) -> None:
        """`rerun_alone(error)`: whether a batch of several requests that failed with `error` is run again one
        request at a time (a remote tier that is down fails every request alike: rerunning only adds load)."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must not be negative, got {max_delay_s}")
        if any(size < 1 or size > max_rows for size in preferred_sizes):
            raise ValueError(f"preferred batch sizes must be within [1, {max_rows}], got {list(preferred_sizes)}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self._run = run
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.preferred_sizes = frozenset(preferred_sizes)
        self.max_inflight = max_inflight
        self._on_batch = on_batch
        self._rerun_alone = rerun_alone
        self._name = name
        self._queue: deque[_Entry[T, R]] = deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(max_inflight)
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        # Requests running at once in their own task (see `submit`): each holds a slot, as a batch does.
        self._alone = 0

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch (not counting the batches running now)."""
        return self._queued_rows

    @property
    def inflight(self) -> int:
        """Batches running now."""
        return len(self._running) + self._alone

    async def submit(self, items: Sequence[T], deadline: float | None = None) -> list[R]:
        """The results for `items`, in order, once the batch holding them has run.

        `deadline` is an absolute `loop.time()`; passing it while queued fails this request alone.
        """
        if self._closing:
            raise NotReadyError(f"{self._name} is shutting down; retry on another instance")
        loop = asyncio.get_running_loop()
        if not items:
            return []
        if self.max_delay_s == 0 and not self._queue and not self._slots.locked():
            # Nothing queued, a slot free and no delay to gather in: the batch would be this request alone, so
            # it runs here and now, without the hand-off to the worker (requests arriving meanwhile queue).
            return await self._run_alone(list(items))
        entry: _Entry[T, R] = _Entry(list(items), deadline, loop.time())
        self._queue.append(entry)
        self._queued_rows += len(entry.items)
        self._arrived.set()
        if self._worker is None:
            self._worker = asyncio.ensure_future(self._work())
        try:
            # Shielded: a caller that goes away leaves its entry to be skipped, not a half-cancelled batch.
            return await asyncio.shield(entry.future)
        except asyncio.CancelledError:
            entry.future.cancel()
            raise

    async def _run_alone(self, items: list[T]) -> list[R]:
        await self._slots.acquire()  # free: returns at once
        self._alone += 1
        try:
            if self._on_batch is not None:
                self._on_batch(BatchStats(rows=len(items), requests=1, waited_s=0.0))
            results = await self._run(items)
        finally:
            self._alone -= 1
            self._slots.release()
        if len(results) != len(items):
            raise RuntimeError(f"{self._name} returned {len(results)} results for {len(items)} rows")
        return results

    async def close(self) -> None:
        """Refuse new requests, answer the queued ones and wait for the running batches, then stop."""
        self._closing = True
        self._arrived.set()
        if self._worker is not None:
            await self._worker
            self._worker = None
        # Requests running alone finish too: every slot comes back.
        for _ in range(self.max_inflight):
            await self._slots.acquire()
        for _ in range(self.max_inflight):
            self._slots.release()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    break
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # A free slot first: while every slot is busy, arriving rows gather into the next batch.
            await self._slots.acquire()
            # Gather: until full, at a preferred size, or the oldest has waited its delay (closing: at once).
            oldest = self._queue[0].queued_at
            while (
                not self._closing
                and self._queued_rows < self.max_rows
                and self._queued_rows not in self.preferred_sizes
                and (wait := oldest + self.max_delay_s - loop.time()) > 0
            ):
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), timeout=wait)
            batch = self._take(loop.time())
            if not batch:
                self._slots.release()
                continue
            task = loop.create_task(self._dispatch(batch, loop.time() - oldest), context=batch[0].context.copy())
            self._running.add(task)
            task.add_done_callback(self._finished)
        while self._running:
            await asyncio.wait(set(self._running))

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: a batch failed unexpectedly", self._name, exc_info=task.exception())

    def _take(self, now: float) -> list[_Entry[T, R]]:
        """Whole requests from the front of the queue, up to `max_rows` (a larger request goes alone)."""
        batch: list[_Entry[T, R]] = []
        rows = 0
        while self._queue:
            entry = self._queue[0]
            if batch and rows + len(entry.items) > self.max_rows:
                break
            self._queue.popleft()
            self._queued_rows -= len(entry.items)
            if entry.future.done():  # its caller is gone
                continue
            if entry.deadline is not None and now >= entry.deadline:
                entry.future.set_exception(
                    TierDeadlineError(f"the deadline passed while {len(entry.items)} rows waited for a batch")
                )
                continue
            batch.append(entry)
            rows += len(entry.items)
        return batch

    async def _dispatch(self, batch: list[_Entry[T, R]], waited_s: float) -> None:
        rows = [item for entry in batch for item in entry.items]
        if self._on_batch is not None:
            self._on_batch(BatchStats(rows=len(rows), requests=len(batch), waited_s=waited_s))
        try:
            try:
                results = await self._run_for(batch, rows)
            except Exception as error:  # handed to the requests, never lost
                if len(batch) == 1 or not self._rerun_alone(error):
                    for entry in batch:
                        _settle(entry, error=error)
                    return
                # Which request's rows failed it? Run each alone: only that one fails.
                logger.debug(
                    "%s: a batch of %d requests failed (%s); running them one by one", self._name, len(batch), error
                )
                for entry in batch:
                    if entry.future.done():
                        continue
                    try:
                        alone = await self._run_for([entry], entry.items)
                    except Exception as failure:  # handed to its request
                        _settle(entry, error=failure)
                    else:
                        if alone is not None:
                            _settle(entry, results=alone)
                return
            if results is None:  # every request had gone: nothing to hand out
                return
            offset = 0
            for entry in batch:
                _settle(entry, results=results[offset : offset + len(entry.items)])
                offset += len(entry.items)
        finally:
            # Every request is answered: one still waiting here (the batch itself was cancelled) is cancelled too.
            for entry in batch:
                entry.future.cancel()

    async def _run_for(self, entries: list[_Entry[T, R]], rows: list[T]) -> list[R] | None:
        """`run(rows)` for `entries`, cancelled (None) once every one of them has gone away."""
        run = asyncio.ensure_future(self._run(rows))

        def gone(_: object) -> None:
            if not run.done() and all(entry.future.done() for entry in entries):
                run.cancel()

        for entry in entries:
            entry.future.add_done_callback(gone)
        try:
            results = await run
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this batch itself is being cancelled
            if all(entry.future.done() for entry in entries):
                return None
            raise RuntimeError(f"{self._name}: a batch was cancelled while requests waited for it") from None
        finally:
            for entry in entries:
                entry.future.remove_done_callback(gone)
        if len(results) != len(rows):
            raise RuntimeError(f"{self._name} returned {len(results)} results for {len(rows)} rows")
        return results


def _settle(entry: _Entry[T, R], *, results: list[R] | None = None, error: BaseException | None = None) -> None:
    if entry.future.done():  # cancelled by a caller that went away
        return
    if error is not None:
        entry.future.set_exception(error)
    else:
        assert results is not None
        entry.future.set_result(results)
