"""The routing policy and the cascade on plain Python objects (no gRPC)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gateway.cascade import Cascade
from gateway.routing import Hint, Reason, RoutingPolicy, count_tokens
from gateway.tier import Prediction
from tiergate.errors import TierUnavailableError


class TableTier:
    """A tier answering from a dict of text -> (label, confidence), recording what it was asked."""

    def __init__(
        self,
        name: str,
        table: dict[str, tuple[str, float]],
        fail: bool = False,
        latency_s: float | None = None,
        error: Exception | None = None,
    ) -> None:
        self.name = name
        self.table = table
        self.fail = fail
        self.latency_s = latency_s
        self.error = error
        self.calls: list[list[str]] = []

    async def predict(self, texts: Sequence[str], deadline: float | None) -> list[Prediction]:
        self.calls.append(list(texts))
        if self.fail:
            raise TierUnavailableError(f"{self.name} is down")
        if self.error is not None:
            raise self.error
        # The table's value stands for both the probability and the routing signal.
        return [Prediction(self.table[text][0], self.table[text][1], self.table[text][1]) for text in texts]

    def ready(self) -> bool:
        return True

    def start(self) -> None:
        pass

    def expected_latency_s(self) -> float | None:
        return self.latency_s

    async def close(self) -> None:
        pass


POLICY = RoutingPolicy(threshold=0.5, max_edge_tokens=5, max_edge_batch=3)
EDGE = {"milk": ("dairy", 0.9), "odd thing": ("pantry", 0.2), "a b c d e f g": ("snacks", 0.9)}
CLOUD = {"milk": ("dairy", 0.99), "odd thing": ("frozen", 0.8), "a b c d e f g": ("bakery", 0.7)}


def test_count_tokens_counts_words_and_punctuation() -> None:
    assert count_tokens("Organic 2% Milk, 1 gal") == 7
    assert count_tokens("   ") == 0


@pytest.mark.parametrize(
    ("texts", "hint", "expected"),
    [
        (["milk"], Hint.AUTO, [()]),
        (["a b c d e f g"], Hint.AUTO, [(Reason.LONG_INPUT,)]),
        (["milk"] * 4, Hint.AUTO, [(Reason.LARGE_BATCH,)] * 4),
        (["milk"], Hint.CLOUD, [(Reason.CLIENT_HINT,)]),
        (["a b c d e f g"], Hint.EDGE, [()]),
    ],
)
def test_heavy_reasons(texts: list[str], hint: Hint, expected: list[tuple[Reason, ...]]) -> None:
    assert POLICY.heavy_reasons(texts, hint) == expected


def test_client_hint_ignored_when_disallowed() -> None:
    policy = RoutingPolicy(threshold=0.5, max_edge_tokens=5, max_edge_batch=3, allow_client_hint=False)
    assert policy.heavy_reasons(["milk"], Hint.CLOUD) == [()]
    assert policy.escalates(0.1, Hint.EDGE)


def test_escalates_below_threshold_only() -> None:
    assert POLICY.escalates(0.49, Hint.AUTO)
    assert not POLICY.escalates(0.5, Hint.AUTO)
    assert not POLICY.escalates(0.0, Hint.EDGE)


@pytest.mark.parametrize(
    ("threshold", "max_edge_tokens", "max_edge_batch", "message"),
    [
        (1.5, 5, 3, r"threshold must be within \[0, 1\], got 1.5"),
        (0.5, 0, 3, "max_edge_tokens and max_edge_batch must be positive"),
        (0.5, 5, 0, "max_edge_tokens and max_edge_batch must be positive"),
    ],
)
def test_policy_rejects_bad_values(threshold: float, max_edge_tokens: int, max_edge_batch: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RoutingPolicy(threshold=threshold, max_edge_tokens=max_edge_tokens, max_edge_batch=max_edge_batch)


async def test_rows_escalate_independently() -> None:
    edge, cloud = TableTier("edge", EDGE), TableTier("cloud", CLOUD)
    result = await Cascade([edge, cloud], POLICY).infer(["milk", "odd thing", "a b c d e f g"])
    assert [(r.label, r.tier, r.reasons) for r in result.rows] == [
        ("dairy", "edge", ()),
        ("frozen", "cloud", (Reason.LOW_CONFIDENCE,)),
        ("bakery", "cloud", (Reason.LONG_INPUT,)),
    ]
    # The heavy row never touched the edge; only the unsure and heavy rows went to the cloud, in one call.
    assert edge.calls == [["milk", "odd thing"]]
    assert cloud.calls == [["odd thing", "a b c d e f g"]]
    assert not result.degraded


async def test_cloud_down_degrades_to_edge_answers_without_losing_rows() -> None:
    edge, cloud = TableTier("edge", EDGE), TableTier("cloud", CLOUD, fail=True)
    result = await Cascade([edge, cloud], POLICY).infer(["milk", "odd thing", "a b c d e f g"])
    assert result.degraded
    assert [(r.label, r.tier) for r in result.rows] == [("dairy", "edge"), ("pantry", "edge"), ("snacks", "edge")]
    assert result.rows[1].reasons == (Reason.LOW_CONFIDENCE, Reason.TIER_UNAVAILABLE)
    assert result.rows[2].reasons == (Reason.LONG_INPUT, Reason.TIER_UNAVAILABLE)


async def test_first_tier_failure_propagates() -> None:
    with pytest.raises(TierUnavailableError, match="edge is down"):
        await Cascade([TableTier("edge", EDGE, fail=True)], POLICY).infer(["milk"])


async def test_single_tier_chain_keeps_heavy_rows() -> None:
    edge = TableTier("edge", EDGE)
    result = await Cascade([edge], POLICY).infer(["odd thing", "a b c d e f g"])
    assert [r.tier for r in result.rows] == ["edge", "edge"]


async def test_rows_stay_at_the_edge_when_the_deadline_cannot_cover_the_hop() -> None:
    import asyncio

    edge, slow_cloud = TableTier("edge", EDGE), TableTier("cloud", CLOUD, latency_s=1.0)
    cascade = Cascade([edge, slow_cloud], POLICY)
    soon = asyncio.get_running_loop().time() + 0.1
    result = await cascade.infer(["milk", "odd thing", "a b c d e f g"], deadline=soon)
    assert slow_cloud.calls == [], "a call that cannot come back in time is not made"
    assert [(r.tier, r.reasons) for r in result.rows] == [
        ("edge", ()),
        ("edge", (Reason.LOW_CONFIDENCE, Reason.DEADLINE)),
        ("edge", (Reason.LONG_INPUT, Reason.DEADLINE)),
    ]
    assert not result.degraded, "a decision, not a failure"
    later = asyncio.get_running_loop().time() + 5.0
    result = await cascade.infer(["odd thing"], deadline=later)
    assert result.rows[0].tier == "cloud" and slow_cloud.calls == [["odd thing"]]


async def test_a_hop_that_runs_out_of_time_answers_from_the_edge_with_the_reason_deadline() -> None:
    from tiergate.errors import TierDeadlineError

    edge = TableTier("edge", EDGE)
    cloud = TableTier("cloud", CLOUD, error=TierDeadlineError("cloud tier did not answer within 0.5s"))
    result = await Cascade([edge, cloud], POLICY).infer(["odd thing"])
    assert (result.rows[0].tier, result.rows[0].reasons) == ("edge", (Reason.LOW_CONFIDENCE, Reason.DEADLINE))
    assert result.degraded
