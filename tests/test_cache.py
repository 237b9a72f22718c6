"""The response cache: the normalised key, both bounds, the TTL and invalidation on a new model version."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from gateway.cache import ResponseCache, normalise
from proto.inference import grpc_service_pb2 as pb
from tests.conftest import StackFactory
from tests.test_gateway import infer_request, rows
from tests.test_hot_reload import add_version, versions_with_one
from tests.test_metrics import scrape, value
from tiergate.constants import CACHE_HITS_PARAMETER, CACHE_PARAMETER, MODEL_NAME
from tiergate.settings import CacheSettings, CloudSettings, GatewaySettings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cache(clock: Clock | None = None, **overrides: float) -> ResponseCache[str]:
    options: dict[str, float] = {"max_entries": 100, "max_bytes": 1_000_000, "ttl_s": 60.0} | overrides
    return ResponseCache(
        max_entries=int(options["max_entries"]),
        max_bytes=int(options["max_bytes"]),
        ttl_s=options["ttl_s"],
        size_of=lambda label: len(label.encode()),
        clock=clock or Clock(),
    )


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("Organic  Bananas ", "organic bananas"),
        ("  ORGANIC\tbananas!!", "organic bananas"),
        ("«organic bananas»", "organic bananas"),
        ("ＯＲＧＡＮＩＣ bananas", "organic bananas"),  # full-width letters, NFKC
        ("Straße", "strasse"),  # case folding, not just lower()
        ("2% milk", "2% milk"),  # punctuation inside stays
        ("...", ""),
    ],
)
def test_queries_normalise_as_shoppers_mean_them(typed: str, meant: str) -> None:
    assert normalise(typed) == meant


def test_a_hit_needs_the_same_version_hint_and_normalised_text() -> None:
    c = cache()
    c.store("v1", "auto", ["Organic  Bananas "], ["bananas"])
    assert c.lookup("v1", "auto", ["organic bananas", "ORGANIC BANANAS!", "apples"]) == ["bananas", "bananas", None]
    assert c.lookup("v1", "cloud", ["organic bananas"]) == [None]
    assert (c.hits, c.misses) == (2, 2)
    # A new model version drops everything, also for the old version's keys.
    assert c.lookup("v2", "auto", ["organic bananas"]) == [None]
    assert c.lookup("v1", "auto", ["organic bananas"]) == [None]
    assert c.stats().entries == 0


def test_the_entry_bound_evicts_the_least_recently_used() -> None:
    c = cache(max_entries=2)
    c.store("v1", "auto", ["a", "b"], ["A", "B"])
    assert c.lookup("v1", "auto", ["a"]) == ["A"]  # "a" is now the most recently used
    c.store("v1", "auto", ["c"], ["C"])
    assert c.lookup("v1", "auto", ["a", "b", "c"]) == ["A", None, "C"]
    assert c.stats().entries == 2


def test_the_byte_bound_holds_and_an_answer_larger_than_the_cache_is_not_kept() -> None:
    c = cache(max_bytes=1000)
    labels = [f"label-{n}" * 10 for n in range(20)]  # about 270 bytes each with the overhead
    c.store("v1", "auto", [f"q{n}" for n in range(20)], labels)
    stats = c.stats()
    assert stats.bytes <= 1000 and 1 <= stats.entries <= 3
    assert c.lookup("v1", "auto", ["q19"]) == [labels[19]]
    c.store("v1", "auto", ["huge"], ["x" * 5000])
    assert c.lookup("v1", "auto", ["huge"]) == [None]


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    c = cache(clock, ttl_s=10.0)
    c.store("v1", "auto", ["milk"], ["dairy"])
    clock.now = 9.0
    assert c.lookup("v1", "auto", ["milk"]) == ["dairy"]
    clock.now = 10.5
    assert c.lookup("v1", "auto", ["milk"]) == [None]


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        cache(max_entries=0)


# --- The cache on a real gateway: hits, opt-out, what is never kept, metrics, and a new version starting empty.


def _cached(gateway: GatewaySettings, cloud: CloudSettings) -> None:
    gateway.cache = CacheSettings(enabled=True, max_entries=1000, max_bytes=1 << 20, ttl_s=60.0)


def _answers(reply: pb.ModelInferResponse) -> list[tuple[str, str, str]]:
    return [(label, tier, reason) for label, _, tier, reason in rows(reply)]


async def test_a_query_typed_another_way_is_answered_from_the_cache(
    start_stack: StackFactory, sure_and_unsure: tuple[str, str, float]
) -> None:
    sure, unsure, threshold = sure_and_unsure
    stack = await start_stack(configure=_cached, threshold=threshold)
    first = await stack.stub.ModelInfer(infer_request([sure, unsure]), timeout=10.0)
    assert first.parameters[CACHE_HITS_PARAMETER].int64_param == 0
    assert [tier for _, tier, _ in _answers(first)] == ["edge", "cloud"]
    # The same queries as a shopper might type them, with a new one between: two hits, answers unchanged.
    retyped = [f"  {unsure.upper()}!! ", "a query never seen before", sure.title()]
    second = await stack.stub.ModelInfer(infer_request(retyped), timeout=10.0)
    assert second.parameters[CACHE_HITS_PARAMETER].int64_param == 2
    got = _answers(second)
    assert [got[2], got[0]] == _answers(first), "each cached row keeps its tier and reasons, in request order"
    # Cached rows count under the tier that gave them; the new row under whichever tier the tiny model sends it.
    new_tier = got[1][1]
    assert second.parameters["cloud_rows"].int64_param == 1 + (new_tier == "cloud")
    assert second.parameters["edge_rows"].int64_param == 1 + (new_tier == "edge")
    metrics = await scrape(stack.gateway.metrics_port)
    assert value(metrics, "tiergate_cache_lookups_total", model=MODEL_NAME, result="hit") == 2
    assert value(metrics, "tiergate_cache_lookups_total", model=MODEL_NAME, result="miss") == 3
    assert value(metrics, "tiergate_cache_entries", model=MODEL_NAME) == 3
    # The hint is part of the key: the cloud's answer for `sure` was never asked for, so it is not a hit.
    hinted = await stack.stub.ModelInfer(infer_request([sure], tier="cloud"), timeout=10.0)
    assert hinted.parameters[CACHE_HITS_PARAMETER].int64_param == 0
    assert _answers(hinted)[0][1] == "cloud"


async def test_a_request_can_opt_out_and_a_wrong_opt_out_says_what_to_send(
    start_stack: StackFactory, sure_and_unsure: tuple[str, str, float]
) -> None:
    sure, _, threshold = sure_and_unsure
    stack = await start_stack(configure=_cached, threshold=threshold)
    opted_out = infer_request([sure])
    opted_out.parameters[CACHE_PARAMETER].bool_param = False
    for _ in range(2):  # neither read nor filled
        reply = await stack.stub.ModelInfer(opted_out, timeout=10.0)
        assert reply.parameters[CACHE_HITS_PARAMETER].int64_param == 0
    reply = await stack.stub.ModelInfer(infer_request([sure]), timeout=10.0)
    assert reply.parameters[CACHE_HITS_PARAMETER].int64_param == 0, "an opted-out request filled the cache"
    wrong = infer_request([sure], cache="no")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.stub.ModelInfer(wrong, timeout=10.0)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "parameter 'cache' must be a bool (false opts out); got string_param 'no'"


async def test_degraded_and_private_rows_are_never_cached(
    start_stack: StackFactory, sure_and_unsure: tuple[str, str, float]
) -> None:
    _, unsure, threshold = sure_and_unsure
    stack = await start_stack(configure=_cached, threshold=threshold)
    assert stack.cloud is not None
    await stack.cloud.stop(0)
    for _ in range(2):  # the cloud is down: the edge answers, degraded, and nothing is kept
        reply = await stack.stub.ModelInfer(infer_request([unsure]), timeout=10.0)
        assert reply.parameters["degraded"].bool_param is True
        assert reply.parameters[CACHE_HITS_PARAMETER].int64_param == 0
    private = f"{unsure} call me on 020 7946 0958"
    for _ in range(2):  # personal data is redacted before the hop, and its text is not held in the cache
        reply = await stack.stub.ModelInfer(infer_request([private], tier="edge"), timeout=10.0)
        assert reply.parameters[CACHE_HITS_PARAMETER].int64_param == 0
    metrics = await scrape(stack.gateway.metrics_port)
    assert value(metrics, "tiergate_cache_entries", model=MODEL_NAME) == 0


async def test_a_new_model_version_starts_with_an_empty_cache(
    start_stack: StackFactory, tiny_models: Path, tmp_path: Path, sure_and_unsure: tuple[str, str, float]
) -> None:
    sure, _, _ = sure_and_unsure
    root = versions_with_one(tmp_path, tiny_models)

    def versioned_and_cached(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        _cached(gateway, cloud)
        gateway.models_dir = root
        gateway.reload_poll_s = 0.0
        cloud.models_dir = tiny_models

    stack = await start_stack(configure=versioned_and_cached)
    await stack.stub.ModelInfer(infer_request([sure]), timeout=10.0)
    again = await stack.stub.ModelInfer(infer_request([sure]), timeout=10.0)
    assert (again.model_version, again.parameters[CACHE_HITS_PARAMETER].int64_param) == ("1", 1)
    add_version(root, 2, tiny_models)
    await stack.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL_NAME), timeout=30.0)
    after = await stack.stub.ModelInfer(infer_request([sure]), timeout=10.0)
    assert (after.model_version, after.parameters[CACHE_HITS_PARAMETER].int64_param) == ("2", 0)
