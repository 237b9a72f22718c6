"""The tier chain and the model served on it.

Each row starts at the first tier (or the last, if heavy) and climbs while unsure. Every tier after the
first is treated as remote: rows reach it only through the boundary policy (redacted, or kept back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import overload

from opentelemetry import trace

from gateway.cache import ResponseCache
from gateway.cost import CostModel
from gateway.drift import DriftWatch
from gateway.metrics import GatewayMetrics
from gateway.policy import BoundaryPolicy, Decision
from gateway.routing import Hint, Reason, RoutingPolicy
from gateway.tier import Prediction, Tier
from tiergate.audit import audit_detail
from tiergate.errors import TierDeadlineError, TierUnavailableError
from tiergate.inputs import Row
from tiergate.manifest import TEXT_INPUT, InputSpec

logger = logging.getLogger(__name__)

# A failing tier is warned about at most this often (the rest are counted into the next warning).
WARN_EVERY_S = 10.0
# Time kept back from a remote tier's deadline for the first tier to answer the rows that have no answer yet:
# their count times the first tier's recent cost per row (starting from a guess), with a margin.
FIRST_ROW_S_INITIAL = 1e-4
FIRST_ROW_WEIGHT = 0.1
FALLBACK_MARGIN = 2.0


@dataclass(frozen=True)
class RowAnswer:
    """The answer returned for one row, with the tier that gave it and why it got there."""

    label: str
    # The calibrated probability of `label`, and the routing signal the thresholds were applied to.
    probability: float
    signal: float
    tier: str
    reasons: tuple[Reason, ...] = ()
    # Every tier that ran this row, in order (an escalated row ran at each tier it passed).
    ran: tuple[str, ...] = ()


@dataclass(frozen=True)
class CascadeResult:
    rows: list[RowAnswer]
    # True when a later tier failed and earlier answers were returned in its place.
    degraded: bool = False
    # Per row, what the boundary policy lets a remote tier see (a text redacted), or None: the row stays private.
    outbound: Sequence[Row | None] = ()
    # Rows answered from the response cache.
    cache_hits: int = 0

    def rows_by_tier(self) -> dict[str, int]:
        """Rows answered, by the tier that answered them."""
        return dict(Counter(row.tier for row in self.rows))

    def reason_counts(self) -> dict[str, int]:
        """Escalated rows by reason (a row escalated for two reasons counts under each)."""
        return dict(Counter(reason.value for row in self.rows for reason in row.reasons))


@dataclass
class _Row:
    text: Row
    policy: BoundaryPolicy
    start: int
    reasons: list[Reason] = field(default_factory=list)
    answer: Prediction | None = None
    tier: str = ""
    # The level of the tier that gave `answer` (-1: none yet).
    level: int = -1
    ran: list[str] = field(default_factory=list)
    # Set when a tier this row needed failed (or ran out of time) and no later tier has answered it since.
    short: Reason | None = None
    short_of: str = ""
    _decision: Decision | None = None

    @property
    def decision(self) -> Decision:
        """What of this row the boundary policy lets leave, decided the first time it is asked: only rows that
        may climb to a remote tier (and the few the drift watch or the cache look at) are ever examined."""
        if self._decision is None:
            self._decision = self.policy.decide(self.text)
        return self._decision


class _Outbound(Sequence[Row | None]):
    """Per row, the text the boundary policy lets a remote tier see (None: the row stays private), each row
    decided on first use."""

    def __init__(self, rows: list[_Row]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> Row | None: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Row | None]: ...
    def __getitem__(self, index: int | slice) -> Row | Sequence[Row | None] | None:
        if isinstance(index, slice):
            return [row.decision.outbound for row in self._rows[index]]
        return self._rows[index].decision.outbound


@dataclass(frozen=True)
class ChainRules:
    """How rows move along a chain beyond the routing policy's per-row decisions."""

    # One threshold per tier but the last: that tier's answers with a signal under it climb on.
    # Empty: the routing policy's threshold for every tier.
    thresholds: tuple[float, ...] = ()
    # The level heavy rows start at; None: the last tier.
    heavy_level: int | None = None
    # Fail the request, rather than answer from an earlier tier, when rows needed a tier that failed.
    fail_closed: bool = False
    # Grey-band hedging (see RoutingSettings.hedge_band); 0 turns it off.
    hedge_band: float = 0.0
    hedge_wait_s: float = 0.05


class Cascade:
    """Routes a batch through an ordered chain of tiers under one routing policy and one boundary policy.

    The first tier runs on the private side; every later tier is remote, so the boundary policy decides what
    of each row may be handed to it. Without a `data_policy`, personal data of every kind is redacted.

    Each row gets exactly one answer, or the request fails. A row climbs while the answer it holds is unsure
    under the threshold of the tier that gave it. A tier that fails (or that the caller's deadline cannot
    cover) passes its rows on to the next tier, flagged with the reason; rows still short at the end of the
    chain keep the answer they hold, and rows that never had one (heavy rows) are answered by the first tier.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        policy: RoutingPolicy,
        tracer: trace.Tracer | None = None,
        *,
        data_policy: BoundaryPolicy | None = None,
        rules: ChainRules | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("the tier chain is empty")
        self.tiers = list(tiers)
        self.policy = policy
        self.rules = rules or ChainRules()
        last = len(self.tiers) - 1
        self.thresholds = list(self.rules.thresholds) or [policy.threshold] * last
        if len(self.thresholds) != last:
            raise ValueError(f"a chain of {len(self.tiers)} tiers needs {last} thresholds, got {len(self.thresholds)}")
        for threshold in self.thresholds:
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"tier thresholds must be within [0, 1], got {threshold}")
        self.heavy_level = last if self.rules.heavy_level is None else self.rules.heavy_level
        if not 0 <= self.heavy_level <= last:
            raise ValueError(f"the heavy tier's level {self.heavy_level} is outside the chain")
        self.data_policy = data_policy if data_policy is not None else BoundaryPolicy()
        self._tracer = tracer or trace.NoOpTracer()
        self._warned: dict[str, tuple[float, int]] = {}
        # What one row recently cost at the first tier (an exponentially weighted mean), seconds.
        self._first_row_s = FIRST_ROW_S_INITIAL

    def ready(self) -> bool:
        """The first tier is up; later tiers may be down (fail_open: answers come from earlier tiers), unless
        the model is fail_closed, which also needs one later tier up to answer rows that climb."""
        if not self.tiers[0].ready():
            return False
        later = self.tiers[1:]
        return not (self.rules.fail_closed and later) or any(tier.ready() for tier in later)

    async def infer(self, texts: Sequence[Row], hint: Hint = Hint.AUTO, deadline: float | None = None) -> CascadeResult:
        rows = []
        # The one place the boundary policy is applied: nothing reaches a remote tier but `row.decision.outbound`
        # (each row is examined when it first may leave).
        policy = self.data_policy
        for text, heavy in zip(texts, self.policy.heavy_reasons(texts, hint), strict=True):
            row = _Row(text=text, policy=policy, start=self.heavy_level if heavy else 0, reasons=list(heavy))
            if heavy and row.start > 0 and row.decision.private:
                # A heavy row that may not leave is answered by the first tier instead.
                row.start = 0
                row.reasons.append(Reason.PRIVATE_DATA)
            rows.append(row)
        failed: set[str] = set()
        for level, tier in enumerate(self.tiers):
            pending = self._route(rows, level, hint) if level > 0 else [row for row in rows if row.start == 0]
            if not pending:
                continue
            if level > 0 and not self._in_time(tier, deadline):
                # The caller's deadline cannot cover this tier's recent latency: pass the rows on.
                self._fall_short(pending, Reason.DEADLINE, tier.name)
                continue
            if level > 0:
                if not await self._run_remote(level, tier, pending, deadline):
                    failed.add(tier.name)
            else:
                self._take(level, pending, await self._first(pending, deadline))
        short = [row for row in rows if row.short is not None]
        # Degraded: a tier failed and rows it should have answered hold an earlier tier's answer.
        degraded = any(row.short_of in failed for row in short)
        if short and self.rules.fail_closed:
            raise _refusal(short)
        missing = [row for row in rows if row.answer is None]
        if missing:
            # Heavy rows whose tiers all failed or were out of time: the first tier answers them.
            self._take(0, missing, await self._first(missing, deadline))
        answered = [
            RowAnswer(r.answer.label, r.answer.probability, r.answer.signal, r.tier, tuple(r.reasons), tuple(r.ran))
            for r in rows
            if r.answer
        ]
        if len(answered) != len(rows):
            raise RuntimeError(f"{len(rows) - len(answered)} of {len(rows)} rows were left without an answer")
        return CascadeResult(rows=answered, degraded=degraded, outbound=_Outbound(rows))

    async def _run_remote(self, level: int, tier: Tier, pending: list[_Row], deadline: float | None) -> bool:
        """Ask remote tier `level` for `pending`; False when it failed (its rows pass on, flagged).

        Grey-band rows (an answer just under its threshold) go in a call of their own, started first, that
        the request waits for at most the hedge wait once the rest is answered; then they keep the answer they
        hold and the call is cancelled.
        """
        grey = self._grey(pending)
        rest = [row for row in pending if row not in grey] if grey else pending
        if deadline is not None:
            # Rows with no answer yet fall back to the first tier if this one fails: keep that time back too.
            unanswered = sum(row.answer is None for row in pending)
            deadline -= unanswered * self._first_row_s * FALLBACK_MARGIN
        hedge: asyncio.Future[list[Prediction]] | None = None
        loop = asyncio.get_running_loop()
        try:
            if grey:
                # Request parameters never cross: a tier is handed texts only. A future forwarder of parameters
                # must pass them through `self.data_policy.forwardable(...)` for remote tiers (level > 0).
                hedge = asyncio.ensure_future(tier.predict([_outbound(row) for row in grey], deadline))
            if rest:
                self._take(level, rest, await tier.predict([_outbound(row) for row in rest], deadline))
            if hedge is not None:
                # Once the rest is done, the grey call gets the hedge wait, and never the caller's reserve.
                limit = loop.time() + self.rules.hedge_wait_s
                if deadline is not None:
                    limit = min(limit, deadline - self.policy.deadline_reserve_s)
                done, _ = await asyncio.wait({hedge}, timeout=max(0.0, limit - loop.time()))
                if done:
                    self._take(level, grey, hedge.result())
                else:
                    for row in grey:
                        row.reasons.append(Reason.HEDGE_TIMEOUT)
            return True
        except (TierUnavailableError, TierDeadlineError) as error:
            self._warn_failed(tier.name, error, len(pending))
            reason = Reason.DEADLINE if isinstance(error, TierDeadlineError) else Reason.TIER_UNAVAILABLE
            self._fall_short([row for row in pending if row.level < level], reason, tier.name)
            return False
        finally:
            if hedge is not None and not hedge.done():
                # The request completes without it (hedge wait, a failure, or the caller gone): stop the call.
                hedge.cancel()
            elif hedge is not None and not hedge.cancelled():
                hedge.exception()  # retrieved: a failure already handled is not logged again as unretrieved

    async def _first(self, rows: list[_Row], deadline: float | None) -> list[Prediction]:
        """The first tier's answers for `rows`, timed: what a row costs there sizes the time kept for fallbacks."""
        started = time.perf_counter()
        answers = await self.tiers[0].predict([row.text for row in rows], deadline)
        per_row = (time.perf_counter() - started) / len(rows)
        self._first_row_s += FIRST_ROW_WEIGHT * (per_row - self._first_row_s)
        return answers

    def _grey(self, pending: list[_Row]) -> list[_Row]:
        """Rows holding an answer whose signal lies within the hedge band under its tier's threshold."""
        band = self.rules.hedge_band
        if band <= 0.0:
            return []
        return [
            row
            for row in pending
            if row.answer is not None
            and self.thresholds[row.level] - band <= routing_signal(row.answer) < self.thresholds[row.level]
        ]

    def _take(self, level: int, rows: list[_Row], answers: Sequence[Prediction]) -> None:
        tier = self.tiers[level].name
        for row, answer in zip(rows, answers, strict=True):
            row.answer, row.tier, row.level, row.short = answer, tier, level, None
            row.ran.append(tier)

    @staticmethod
    def _fall_short(rows: list[_Row], reason: Reason, tier: str) -> None:
        """`rows` did not get `tier`, which they needed; they keep what they hold and climb on if they can."""
        for row in rows:
            if reason not in row.reasons:
                row.reasons.append(reason)
            row.short, row.short_of = reason, tier

    def _route(self, rows: list[_Row], level: int, hint: Hint) -> list[_Row]:
        """The rows tier `level` must answer: unsure answers climbing to it, rows starting there (heavy), and
        rows passed on by an earlier tier that failed.

        Unsure rows the boundary policy keeps private stay with the answer they have (reason `private_data`).
        """
        with self._tracer.start_as_current_span("tiergate.route") as span:
            # A row already kept private is settled: it climbs no further.
            climbing = [
                row
                for row in rows
                if row.start <= level
                and Reason.PRIVATE_DATA not in row.reasons
                and (row.answer is None or self._climbs(row, hint))
            ]
            for row in climbing:
                if row.answer is not None and Reason.LOW_CONFIDENCE not in row.reasons:
                    row.reasons.append(Reason.LOW_CONFIDENCE)
            pending = [row for row in climbing if not row.decision.private]
            kept = [row for row in climbing if row.decision.private]
            for row in kept:
                row.reasons.append(Reason.PRIVATE_DATA)
            if span.is_recording():
                reasons = Counter(reason.value for row in pending for reason in row.reasons)
                if kept:
                    reasons[Reason.PRIVATE_DATA.value] += len(kept)
                span.set_attributes(
                    {
                        "tiergate.routing.signal": self.policy.signal,
                        "tiergate.routing.threshold": self.thresholds[level - 1],
                        "tiergate.routing.from_tier": self.tiers[level - 1].name,
                        "tiergate.routing.to_tier": self.tiers[level].name,
                        "tiergate.routing.rows": len(rows),
                        "tiergate.routing.escalated_rows": len(pending),
                        "tiergate.routing.private_rows": len(kept),
                        "tiergate.routing.reasons": ",".join(f"{r}={n}" for r, n in sorted(reasons.items())),
                    }
                )
        return pending

    def _warn_failed(self, tier: str, error: Exception, rows: int) -> None:
        """One warning per tier per WARN_EVERY_S, saying how many failures it stands for (no flood in an outage)."""
        now = time.monotonic()
        last, suppressed = self._warned.get(tier, (-WARN_EVERY_S, 0))
        if now - last < WARN_EVERY_S:
            self._warned[tier] = (last, suppressed + 1)
            return
        more = f"; {suppressed} more failures since the last warning" if suppressed else ""
        logger.warning("tier %s failed (%s); %d rows pass on or keep earlier answers%s", tier, error, rows, more)
        self._warned[tier] = (now, 0)

    def _climbs(self, row: _Row, hint: Hint) -> bool:
        """Whether the answer `row` holds is unsure under the threshold of the tier that gave it."""
        if row.answer is None or self.policy.effective_hint(hint) is Hint.EDGE:
            return False
        return routing_signal(row.answer) < self.thresholds[row.level]

    def _in_time(self, tier: Tier, deadline: float | None) -> bool:
        """Whether the time left covers `tier`'s recent latency plus what answering needs (unknown: try it)."""
        expected = tier.expected_latency_s()
        if deadline is None or expected is None:
            return True
        remaining = deadline - asyncio.get_running_loop().time()
        return remaining >= expected + self.policy.deadline_reserve_s


# A row holding one of these did not get the tier it needed: its answer is not final, so it is never cached.
_SHORT_REASONS = frozenset({Reason.TIER_UNAVAILABLE, Reason.DEADLINE, Reason.HEDGE_TIMEOUT, Reason.PRIVATE_DATA})


def row_answer_bytes(answer: RowAnswer) -> int:
    """What one cached answer costs the cache's byte bound, roughly: its strings and the object around them."""
    return len(answer.label) + len(answer.tier) + 16 * len(answer.reasons) + 16 * len(answer.ran) + 120


def routing_signal(answer: Prediction) -> float:
    """The value routing compares with a tier's threshold."""
    return answer.signal


def _refusal(short: list[_Row]) -> TierUnavailableError | TierDeadlineError:
    """The error a fail_closed model answers with when rows needed tiers that failed or were out of time."""
    names = ", ".join(sorted({row.short_of for row in short}))
    if all(row.short is Reason.DEADLINE for row in short):
        return TierDeadlineError(
            f"{len(short)} rows needed tier {names}, which the time left could not cover; "
            "the model is fail_closed, so no earlier answer is returned"
        )
    return TierUnavailableError(
        f"{len(short)} rows needed tier {names}, which is unavailable; "
        "the model is fail_closed, so no earlier answer is returned"
    )


def _outbound(row: _Row) -> Row:
    """The text a remote tier is sent for `row`; `_route` never hands it a private row."""
    if row.decision.outbound is None:
        raise RuntimeError("a private row was routed to a remote tier")
    return row.decision.outbound


class TieredModel:
    """A named, versioned model served by a cascade of tiers; accounts each answer in metrics, cost and trace."""

    def __init__(
        self,
        name: str,
        version: str,
        cascade: Cascade,
        *,
        metrics: GatewayMetrics | None = None,
        cost: CostModel | None = None,
        drift: DriftWatch | None = None,
        owned: Sequence[Tier] = (),
        cache: ResponseCache[RowAnswer] | None = None,
        input_spec: InputSpec = TEXT_INPUT,
    ) -> None:
        """`owned`: the tiers this version alone uses (its edge model), closed when the version retires; the
        rest (remote tiers) are shared with the versions before and after it. `cache`: this version's response
        cache (each version has its own, so a new version starts empty). `input_spec`: what callers send it."""
        self.name = name
        self.input = input_spec
        self.cache = cache
        self._owned = list(owned)
        self._active = 0
        self.version = version
        self.cascade = cascade
        self.drift = drift
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        last = cascade.tiers[-1].name
        self.cost = cost if cost is not None else CostModel({last: 0.0}, reference_tier=last, currency="USD")
        self._order = {tier.name: level for level, tier in enumerate(cascade.tiers)}
        self.metrics.describe_model(
            name,
            version=version,
            signal=cascade.policy.signal,
            threshold=cascade.policy.threshold,
            chain=[tier.name for tier in cascade.tiers],
        )

    def ready(self) -> bool:
        return self.cascade.ready()

    async def _infer_cached(
        self, cache: ResponseCache[RowAnswer], texts: Sequence[Row], hint: Hint, deadline: float | None
    ) -> CascadeResult:
        """Rows found in `cache` are answered from it; the rest run the cascade, and its final answers are kept.

        Final: answered by the tier the row needed. A row that fell short (a failed or out-of-time tier, a
        hedge cut short) is not kept, nor is a row in which the boundary policy found personal data: such text
        is not held in memory beyond its request.
        """
        key = self.cascade.policy.effective_hint(hint).value
        found = cache.lookup(self.version, key, texts)
        misses = [index for index, answer in enumerate(found) if answer is None]
        hits = len(texts) - len(misses)
        if hits:
            self.metrics.cache_lookups.labels(model=self.name, result="hit").inc(hits)
        if misses:
            self.metrics.cache_lookups.labels(model=self.name, result="miss").inc(len(misses))
        if not misses:
            answers = [answer for answer in found if answer is not None]
            return CascadeResult(rows=answers, outbound=(None,) * len(texts), cache_hits=hits)
        computed = await self.cascade.infer([texts[index] for index in misses], hint, deadline)
        final = [
            (texts[index], row)
            for position, (index, row) in enumerate(zip(misses, computed.rows, strict=True))
            if not _SHORT_REASONS.intersection(row.reasons) and computed.outbound[position] == texts[index]
        ]
        if final:
            # A cached answer runs no tier when it is served again: it costs nothing then.
            cache.store(self.version, key, [text for text, _ in final], [replace(row, ran=()) for _, row in final])
        stats = cache.stats()
        self.metrics.cache_entries.labels(model=self.name).set(stats.entries)
        self.metrics.cache_bytes.labels(model=self.name).set(stats.bytes)
        if not hits:
            return computed
        rows = list(found)
        outbound: list[Row | None] = [None] * len(texts)  # cached rows are not offered to the drift watch
        for index, row, text in zip(misses, computed.rows, computed.outbound, strict=True):
            rows[index], outbound[index] = row, text
        merged = [row for row in rows if row is not None]
        return CascadeResult(rows=merged, degraded=computed.degraded, outbound=tuple(outbound), cache_hits=hits)

    @property
    def tier_names(self) -> list[str]:
        """The chain's tiers, in escalation order."""
        return [tier.name for tier in self.cascade.tiers]

    async def retire(self, grace_s: float) -> None:
        """Once the requests running on this version finish (at most `grace_s`), close the tiers it owns."""
        loop = asyncio.get_running_loop()
        until = loop.time() + grace_s
        while self._active and loop.time() < until:
            await asyncio.sleep(0.01)
        for tier in self._owned:
            await tier.close()

    async def infer(
        self, texts: Sequence[Row], hint: Hint = Hint.AUTO, deadline: float | None = None, *, use_cache: bool = True
    ) -> CascadeResult:
        started = time.perf_counter()
        self._active += 1
        try:
            with self.metrics.child(self.metrics.inflight, self.name).track_inprogress():
                if self.cache is not None and use_cache:
                    result = await self._infer_cached(self.cache, texts, hint, deadline)
                else:
                    result = await self.cascade.infer(texts, hint, deadline)
        finally:
            self._active -= 1
        seconds = time.perf_counter() - started
        if self.drift is not None and self.drift.enabled:
            # The drift watch shadows rows to the last (remote) tier: it is offered what may leave, no more (the
            # rows it samples are the only ones it has the boundary policy decide).
            first, threshold = self.cascade.tiers[0].name, self.cascade.policy.threshold
            self.drift.offer(
                result.outbound,
                [
                    (row.label, row.signal, row.tier == first and not row.reasons and row.signal >= threshold)
                    for row in result.rows
                ],
            )
        tiers = result.rows_by_tier()
        reasons = result.reason_counts()
        cost = self.cost.price([row.ran for row in result.rows])
        audit_detail(tiers=tiers, reasons=reasons, degraded=result.degraded)
        top_tier = max(tiers, key=lambda tier: self._order.get(tier, -1)) if tiers else ""
        self.metrics.answered(
            self.name,
            seconds=seconds,
            tiers=tiers,
            reasons=reasons,
            degraded=result.degraded,
            cost=cost,
            currency=self.cost.currency,
            top_tier=top_tier,
        )
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "tiergate.model": self.name,
                    "tiergate.model_version": self.version,
                    "tiergate.rows": len(result.rows),
                    "tiergate.degraded": result.degraded,
                    "tiergate.cache_hits": result.cache_hits,
                    "tiergate.cost.spent": cost.spent,
                    "tiergate.cost.cloud_only": cost.cloud_only,
                    "tiergate.cost.saved": cost.net_saved,
                    "tiergate.cost.currency": self.cost.currency,
                    **{f"tiergate.{tier}_rows": count for tier, count in tiers.items()},
                    **{f"tiergate.escalations.{reason}": count for reason, count in reasons.items()},
                }
            )
        return result
