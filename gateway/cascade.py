"""The tier chain and the model served on it.

Each row starts at the first tier (or the last, if heavy) and climbs while unsure.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.routing import Hint, Reason, RoutingPolicy
from gateway.tier import Prediction, Tier
from tiergate.errors import TierDeadlineError, TierUnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowAnswer:
    """The answer returned for one row, with the tier that gave it and why it got there."""

    label: str
    confidence: float
    tier: str
    reasons: tuple[Reason, ...] = ()


@dataclass(frozen=True)
class CascadeResult:
    rows: list[RowAnswer]
    # True when a later tier failed and earlier answers were returned in its place.
    degraded: bool = False


@dataclass
class _Row:
    text: str
    start: int
    reasons: list[Reason] = field(default_factory=list)
    answer: Prediction | None = None
    tier: str = ""


class Cascade:
    """Routes a batch through an ordered chain of tiers under one routing policy."""

    def __init__(self, tiers: Sequence[Tier], policy: RoutingPolicy) -> None:
        if not tiers:
            raise ValueError("the tier chain is empty")
        self.tiers = list(tiers)
        self.policy = policy

    def ready(self) -> bool:
        # The first tier must be up; later tiers may be down (answers degrade to earlier tiers).
        return self.tiers[0].ready()

    async def infer(self, texts: Sequence[str], hint: Hint = Hint.AUTO, deadline: float | None = None) -> CascadeResult:
        last = len(self.tiers) - 1
        rows = []
        for text, heavy in zip(texts, self.policy.heavy_reasons(texts, hint), strict=True):
            rows.append(_Row(text=text, start=last if heavy else 0, reasons=list(heavy)))
        degraded = False
        for level, tier in enumerate(self.tiers):
            pending = [
                row
                for row in rows
                if row.start <= level and (row.answer is None or (level > 0 and self._climbs(row, hint)))
            ]
            if level > 0:
                for row in pending:
                    if row.answer is not None and Reason.LOW_CONFIDENCE not in row.reasons:
                        row.reasons.append(Reason.LOW_CONFIDENCE)
            if not pending:
                continue
            try:
                answers = await tier.predict([row.text for row in pending], deadline)
            except (TierUnavailableError, TierDeadlineError) as error:
                if level == 0:
                    raise
                logger.warning(
                    "tier %s failed (%s); answering %d rows from earlier tiers", tier.name, error, len(pending)
                )
                degraded = True
                await self._fall_back(pending, level, deadline)
                break
            for row, answer in zip(pending, answers, strict=True):
                row.answer, row.tier = answer, tier.name
        return CascadeResult(
            rows=[RowAnswer(r.answer.label, r.answer.confidence, r.tier, tuple(r.reasons)) for r in rows if r.answer],
            degraded=degraded,
        )

    def _climbs(self, row: _Row, hint: Hint) -> bool:
        return row.answer is not None and self.policy.escalates(row.answer.confidence, hint)

    async def _fall_back(self, rows: list[_Row], failed_level: int, deadline: float | None) -> None:
        # Rows that already hold an earlier tier's answer keep it; heavy rows that skipped the
        # earlier tiers are answered by the first tier, so no row of the batch is lost.
        for row in rows:
            row.reasons.append(Reason.TIER_UNAVAILABLE)
        missing = [row for row in rows if row.answer is None]
        if missing and failed_level > 0:
            first = self.tiers[0]
            answers = await first.predict([row.text for row in missing], deadline)
            for row, answer in zip(missing, answers, strict=True):
                row.answer, row.tier = answer, first.name


class TieredModel:
    """A named, versioned model served by a cascade of tiers."""

    def __init__(self, name: str, version: str, cascade: Cascade) -> None:
        self.name = name
        self.version = version
        self.cascade = cascade

    def ready(self) -> bool:
        return self.cascade.ready()

    async def infer(self, texts: Sequence[str], hint: Hint = Hint.AUTO, deadline: float | None = None) -> CascadeResult:
        return await self.cascade.infer(texts, hint, deadline)
