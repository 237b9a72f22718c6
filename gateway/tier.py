"""The tier contract: what every tier of the chain answers, whether it runs in-process or across the network."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tiergate.inputs import Row


@dataclass(frozen=True)
class Prediction:
    """One row's answer from one tier: its label, the calibrated probability of that label (what the caller sees
    as confidence), and the routing signal a threshold applies to (which signal it is, the manifest says)."""

    label: str
    probability: float
    signal: float


class Tier(Protocol):
    """Something that classifies rows (texts, or tensor rows): the in-process edge model or a remote server."""

    name: str

    async def predict(self, texts: Sequence[Row], deadline: float | None) -> list[Prediction]:
        """Classify `texts` (the rows); `deadline` is an absolute `loop.time()` or None for no limit."""
        ...

    def ready(self) -> bool:
        """Whether the tier can answer now (a remote tier: whether its server reports SERVING)."""
        ...

    def expected_latency_s(self) -> float | None:
        """What a call has recently taken (a high percentile), or None when the tier has no such record."""
        ...

    def start(self) -> None:
        """Begin background work (a remote tier watches its server's health); call in the running loop."""
        ...

    async def close(self) -> None: ...
