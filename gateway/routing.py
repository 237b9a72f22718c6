"""The routing decision: which rows skip the edge (heavy requests) and which edge answers escalate.

Pure Python on plain values; no gRPC, so it is unit-tested with plain objects.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from tiergate.inputs import Row

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class Reason(StrEnum):
    """Why a row was answered by a later tier than the first, or why it was not."""

    LOW_CONFIDENCE = "low_confidence"
    LONG_INPUT = "long_input"
    LARGE_BATCH = "large_batch"
    CLIENT_HINT = "client_hint"
    # The later tier failed, so an earlier tier's answer was returned instead.
    TIER_UNAVAILABLE = "tier_unavailable"
    # The row holds personal data the boundary policy keeps private, so the first tier's answer was returned.
    PRIVATE_DATA = "private_data"
    # The caller's deadline could not cover the later tier (its recent latency, or it ran out of time).
    DEADLINE = "deadline"
    # A grey-band row's later tier did not answer within the hedge wait, so the earlier answer was kept.
    HEDGE_TIMEOUT = "hedge_timeout"


class Hint(StrEnum):
    """The caller's wish, sent as the request parameter `tier`."""

    AUTO = "auto"
    EDGE = "edge"
    CLOUD = "cloud"


def count_tokens(text: str) -> int:
    """Words and punctuation marks: a cheap, model-independent length measure."""
    return len(_TOKEN.findall(text))


@dataclass(frozen=True)
class RoutingPolicy:
    """Escalate when confidence < threshold; send heavy rows straight to the last tier."""

    threshold: float
    max_edge_tokens: int
    max_edge_batch: int
    allow_client_hint: bool = True
    # The confidence signal the threshold applies to (from the manifest); reported, not computed here.
    signal: str = "max_prob"
    # Time kept back from a caller's deadline to return an earlier tier's answer when a later one cannot make it.
    deadline_reserve_s: float = 0.02

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        if self.max_edge_tokens < 1 or self.max_edge_batch < 1:
            raise ValueError("max_edge_tokens and max_edge_batch must be positive")

    def effective_hint(self, hint: Hint) -> Hint:
        return hint if self.allow_client_hint else Hint.AUTO

    def heavy_reasons(self, texts: Sequence[Row], hint: Hint) -> list[tuple[Reason, ...]]:
        """Per row, the reasons to skip the first tier (empty tuple: start at the first tier)."""
        hint = self.effective_hint(hint)
        if hint is Hint.EDGE:
            return [() for _ in texts]
        batch_reasons: tuple[Reason, ...] = ()
        if hint is Hint.CLOUD:
            batch_reasons += (Reason.CLIENT_HINT,)
        if len(texts) > self.max_edge_batch:
            batch_reasons += (Reason.LARGE_BATCH,)
        return [
            batch_reasons
            + ((Reason.LONG_INPUT,) if isinstance(text, str) and count_tokens(text) > self.max_edge_tokens else ())
            for text in texts
        ]

    def escalates(self, confidence: float, hint: Hint) -> bool:
        """Whether an answer of this confidence goes on to the next tier."""
        if self.effective_hint(hint) is Hint.EDGE:
            return False
        return confidence < self.threshold
