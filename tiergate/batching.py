"""Dynamic batching: rows from concurrent requests gathered into one model call, as Triton's dynamic batcher does.

Transport-free and model-free: a `DynamicBatcher` is handed the coroutine that runs one batch (the edge model on
its worker thread, or one sealed call to a remote tier). Each request gets exactly its own rows back, in order.

- A batch goes out when it reaches `max_rows`, when it reaches one of the preferred sizes, or when the oldest
  request in it has waited `max_delay_s`; while a batch runs, the next one gathers.
- A request whose deadline passes while queued is failed alone, with `TierDeadlineError`.
- A failing batch of several requests is run again one request at a time, so a request whose rows fail the
  model fails alone and the others are answered.
- `close()` refuses new requests, answers every queued one, then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    future: asyncio.Future[list[R]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(frozen=True)
class BatchStats:
    """What one dispatched batch held: for metrics and tests."""

    rows: int
    requests: int
    # Seconds the oldest request waited in the queue before the batch went out.
    waited_s: float


class DynamicBatcher(Generic[T, R]):
    """Gathers `submit` calls into batches for `run`, one batch at a time."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_rows: int,
        max_delay_s: float,
        preferred_sizes: Sequence[int] = (),
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must not be negative, got {max_delay_s}")
        if any(size < 1 or size > max_rows for size in preferred_sizes):
            raise ValueError(f"preferred batch sizes must be within [1, {max_rows}], got {list(preferred_sizes)}")
        self._run = run
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.preferred_sizes = frozenset(preferred_sizes)
        self._on_batch = on_batch
        self._name = name
        self._queue: deque[_Entry[T, R]] = deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch (not counting the batch running now)."""
        return self._queued_rows

    async def submit(self, items: Sequence[T], deadline: float | None = None) -> list[R]:
        """The results for `items`, in order, once the batch holding them has run.

        `deadline` is an absolute `loop.time()`; passing it while queued fails this request alone.
        """
        if self._closing:
            raise NotReadyError(f"{self._name} is shutting down; retry on another instance")
        loop = asyncio.get_running_loop()
        if not items:
            return []
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

    async def close(self) -> None:
        """Refuse new requests, answer the queued ones, then stop."""
        self._closing = True
        self._arrived.set()
        if self._worker is not None:
            await self._worker
            self._worker = None

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
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
            if batch:
                await self._dispatch(batch, loop.time() - oldest)

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
            results = await self._run(rows)
            if len(results) != len(rows):
                raise RuntimeError(f"{self._name} returned {len(results)} results for {len(rows)} rows")
        except Exception as error:  # handed to the requests, never lost
            if len(batch) == 1:
                _settle(batch[0], error=error)
                return
            # Which request's rows failed it? Run each alone: only that one fails.
            logger.debug(
                "%s: a batch of %d requests failed (%s); running them one by one", self._name, len(batch), error
            )
            for entry in batch:
                if entry.future.done():
                    continue
                try:
                    _settle(entry, results=await self._run(entry.items))
                except Exception as alone:  # handed to its request
                    _settle(entry, error=alone)
            return
        offset = 0
        for entry in batch:
            _settle(entry, results=results[offset : offset + len(entry.items)])
            offset += len(entry.items)


def _settle(entry: _Entry[T, R], *, results: list[R] | None = None, error: BaseException | None = None) -> None:
    if entry.future.done():  # cancelled by a caller that went away
        return
    if error is not None:
        entry.future.set_exception(error)
    else:
        assert results is not None
        entry.future.set_result(results)
