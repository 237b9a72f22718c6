"""Admission control: a bound on requests and rows in flight; past it, callers are refused at once.

Refusing early (RESOURCE_EXHAUSTED, which clients back off on) keeps the latency of admitted
requests intact instead of letting a queue grow without bound. Plain Python; both servers use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tiergate.errors import OverloadedError


class Admission:
    """Counts requests and rows in flight against their limits (single-threaded: the event loop's)."""

    def __init__(self, max_requests: int, max_rows: int) -> None:
        if max_requests < 1 or max_rows < 1:
            raise ValueError("admission limits must be positive")
        self.max_requests = max_requests
        self.max_rows = max_rows
        self.requests = 0
        self.rows = 0

    @contextmanager
    def admit(self, rows: int) -> Iterator[None]:
        """Hold a place for a request of `rows` rows; OverloadedError when there is none."""
        if self.requests >= self.max_requests or self.rows + rows > self.max_rows:
            raise OverloadedError(
                f"the server is at capacity ({self.requests} requests, {self.rows} rows in flight); retry with backoff"
            )
        self.requests += 1
        self.rows += rows
        try:
            yield
        finally:
            self.requests -= 1
            self.rows -= rows
