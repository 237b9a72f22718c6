"""Circuit breaker for a remote tier: stop calling a tier that keeps failing, and probe it back to health.

Closed, it counts outcomes: it opens on `consecutive_failures` failures in a row, or when the share of
failures among the last `window` calls (once `min_calls` were made) reaches `error_rate`. Open, it
refuses every call at once, so rows are answered by the earlier tier instead of waiting on a dead hop.
After `cool_off_s` it goes half-open and lets one probe through: a success closes it, a failure opens
it again. The hop's own health watch can open it early (`trip`) and close it on SERVING (`reset`).
Plain Python on a clock; no gRPC.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum

from tiergate.settings import BreakerSettings


class State(IntEnum):
    """Breaker states; the values are what the `tiergate_breaker_state` gauge shows."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """One remote tier's breaker; `allow()` before a call, `record(ok)` after it."""

    def __init__(
        self,
        settings: BreakerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State, str], None] | None = None,
    ) -> None:
        if settings.consecutive_failures < 1 or settings.window < 1 or settings.min_calls < 1:
            raise ValueError("breaker consecutive_failures, window and min_calls must be positive")
        if not 0.0 < settings.error_rate <= 1.0:
            raise ValueError(f"breaker error_rate must be within (0, 1], got {settings.error_rate}")
        self.settings = settings
        self._clock = clock
        self._on_change = on_change
        self.state = State.CLOSED
        self._outcomes: deque[bool] = deque(maxlen=settings.window)
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """Whether a call may go to the tier now (in half-open state: only the one probe)."""
        if not self.settings.enabled or self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if self._clock() - self._opened_at < self.settings.cool_off_s:
                return False
            self._move(State.HALF_OPEN, f"cool-off of {self.settings.cool_off_s:g}s over: one probe")
        if self._probing:
            return False
        self._probing = True
        return True

    def record(self, ok: bool) -> None:
        """The outcome of a call that `allow()` let through."""
        if self.state is State.HALF_OPEN:
            self._probing = False
            if ok:
                self.reset("the probe succeeded")
            else:
                self._open("the probe failed")
            return
        self._outcomes.append(ok)
        self._consecutive = 0 if ok else self._consecutive + 1
        if self.state is not State.CLOSED or not self.settings.enabled:
            return
        if self._consecutive >= self.settings.consecutive_failures:
            self._open(f"{self._consecutive} failures in a row")
            return
        if len(self._outcomes) >= self.settings.min_calls:
            rate = self._outcomes.count(False) / len(self._outcomes)
            if rate >= self.settings.error_rate:
                self._open(f"{rate:.0%} of the last {len(self._outcomes)} calls failed")

    def trip(self, why: str) -> None:
        """Open now (the tier's health says it is down)."""
        if self.settings.enabled and self.state is not State.OPEN:
            self._open(why)

    def reset(self, why: str) -> None:
        """Close and forget past failures (a probe succeeded, or the tier's health says SERVING)."""
        self._outcomes.clear()
        self._consecutive = 0
        self._probing = False
        if self.state is not State.CLOSED:
            self._move(State.CLOSED, why)

    def _open(self, why: str) -> None:
        self._opened_at = self._clock()
        self._probing = False
        self._move(State.OPEN, why)

    def _move(self, state: State, why: str) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(state, why)
