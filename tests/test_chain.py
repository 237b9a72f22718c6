"""Chains of any length: every row gets exactly one answer or the request fails; per-tier thresholds, the heavy
tier, fail_open / fail_closed and grey-band hedging. Scripted tiers for the rules, real servers for a 3-tier chain.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_runtime.server import CloudServer
from gateway.cascade import Cascade, ChainRules
from gateway.routing import Hint, Reason, RoutingPolicy
from gateway.tier import Prediction
from tests.conftest import StackFactory
from tests.test_gateway import infer_request
from tiergate.constants import DEGRADED_PARAMETER, REASONS_PARAMETER
from tiergate.errors import TierDeadlineError, TierUnavailableError
from tiergate.settings import CloudSettings, GatewaySettings, TierSettings

LONG = " ".join(["word"] * 40)  # heavy: over max_edge_tokens


class ScriptedTier:
    """A tier whose answers are scripted per text: signal per text, or failure, or a delay."""

    def __init__(
        self,
        name: str,
        signals: dict[str, float] | None = None,
        *,
        fails: bool = False,
        delay_s: float = 0.0,
        latency_s: float | None = None,
    ) -> None:
        self.name = name
        self.signals = signals or {}
        self.fails = fails
        self.delay_s = delay_s
        self.latency_s = latency_s
        self.calls: list[list[str]] = []
        self.cancelled = 0

    async def predict(self, texts: Sequence[str], deadline: float | None) -> list[Prediction]:
        self.calls.append(list(texts))
        if self.fails:
            raise TierUnavailableError(f"{self.name} is down")
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [
            Prediction(f"{self.name}:{text}", probability=0.5, signal=self.signals.get(text, 0.99)) for text in texts
        ]

    def ready(self) -> bool:
        return True

    def expected_latency_s(self) -> float | None:
        return self.latency_s

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


def policy(threshold: float = 0.5, **overrides: float) -> RoutingPolicy:
    return RoutingPolicy(threshold=threshold, max_edge_tokens=24, max_edge_batch=64, **overrides)  # type: ignore[arg-type]


async def test_a_failing_middle_tier_passes_light_and_heavy_rows_on_and_every_row_is_answered() -> None:
    edge = ScriptedTier("edge", {"unsure": 0.1})
    mid = ScriptedTier("mid", fails=True)
    cloud = ScriptedTier("cloud")
    result = await Cascade([edge, mid, cloud], policy()).infer(["sure", "unsure", LONG])
    answers = [(row.tier, row.reasons) for row in result.rows]
    assert answers == [
        ("edge", ()),
        ("cloud", (Reason.LOW_CONFIDENCE, Reason.TIER_UNAVAILABLE)),
        ("cloud", (Reason.LONG_INPUT,)),
    ]
    assert mid.calls == [["unsure"]] and cloud.calls == [["unsure", LONG]]
    # The last tier answered every row the middle one dropped: nothing is degraded.
    assert result.degraded is False and result.rows[1].ran == ("edge", "cloud")


async def test_heavy_rows_past_a_failed_last_tier_are_answered_by_the_first() -> None:
    edge = ScriptedTier("edge", {"unsure": 0.1})
    mid = ScriptedTier("mid", {"unsure": 0.2})
    cloud = ScriptedTier("cloud", fails=True)
    result = await Cascade([edge, mid, cloud], policy()).infer(["sure", "unsure", LONG, LONG + " more"])
    assert [row.tier for row in result.rows] == ["edge", "mid", "edge", "edge"]
    assert result.rows[1].reasons == (Reason.LOW_CONFIDENCE, Reason.TIER_UNAVAILABLE)
    assert result.rows[2].reasons == (Reason.LONG_INPUT, Reason.TIER_UNAVAILABLE)
    assert result.degraded is True
    assert edge.calls == [["sure", "unsure"], [LONG, LONG + " more"]]


async def test_each_tier_has_its_own_threshold() -> None:
    edge = ScriptedTier("edge", {"a": 0.55, "b": 0.9})
    mid = ScriptedTier("mid", {"a": 0.35})
    cloud = ScriptedTier("cloud")
    # The edge's answers climb under 0.6, the middle tier's under 0.3: "a" stops at the middle tier.
    cascade = Cascade([edge, mid, cloud], policy(), rules=ChainRules(thresholds=(0.6, 0.3)))
    result = await cascade.infer(["a", "b"])
    assert [row.tier for row in result.rows] == ["mid", "edge"]
    assert cloud.calls == []
    result = await Cascade([edge, mid, cloud], policy(), rules=ChainRules(thresholds=(0.6, 0.4))).infer(["a"])
    assert result.rows[0].tier == "cloud" and result.rows[0].ran == ("edge", "mid", "cloud")
    with pytest.raises(ValueError, match="needs 2 thresholds"):
        Cascade([edge, mid, cloud], policy(), rules=ChainRules(thresholds=(0.6,)))


async def test_heavy_rows_start_at_the_heavy_tier_and_fail_over_past_it() -> None:
    edge, region_a, region_b = ScriptedTier("edge"), ScriptedTier("region-a", fails=True), ScriptedTier("region-b")
    rules = ChainRules(heavy_level=1)
    result = await Cascade([edge, region_a, region_b], policy(), rules=rules).infer([LONG], Hint.AUTO)
    assert result.rows[0].tier == "region-b"
    assert result.rows[0].reasons == (Reason.LONG_INPUT, Reason.TIER_UNAVAILABLE)
    assert region_a.calls == [[LONG]] and region_b.calls == [[LONG]]
    assert result.degraded is False


async def test_fail_closed_refuses_rows_that_needed_a_failed_tier_but_not_rows_a_later_tier_answered() -> None:
    edge = ScriptedTier("edge", {"unsure": 0.1})
    cascade = Cascade([edge, ScriptedTier("cloud", fails=True)], policy(), rules=ChainRules(fail_closed=True))
    with pytest.raises(TierUnavailableError, match=r"needed tier cloud.*fail_closed"):
        await cascade.infer(["sure", "unsure"])
    # Rows the first tier settles need no later tier: the request succeeds.
    assert (await cascade.infer(["sure"])).rows[0].tier == "edge"
    failover = Cascade(
        [edge, ScriptedTier("region-a", fails=True), ScriptedTier("region-b")],
        policy(),
        rules=ChainRules(fail_closed=True),
    )
    assert (await failover.infer(["unsure"])).rows[0].tier == "region-b"
    slow = Cascade([edge, ScriptedTier("cloud", latency_s=5.0)], policy(), rules=ChainRules(fail_closed=True))
    deadline = asyncio.get_running_loop().time() + 0.5
    with pytest.raises(TierDeadlineError, match="time left"):
        await slow.infer(["unsure"], deadline=deadline)


async def test_grey_band_rows_go_in_their_own_call_and_a_slow_one_is_cut_at_the_hedge_wait() -> None:
    edge = ScriptedTier("edge", {"grey": 0.45, "low": 0.1})
    cloud = ScriptedTier("cloud", delay_s=0.5)
    rules = ChainRules(hedge_band=0.1, hedge_wait_s=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await Cascade([edge, cloud], policy(), rules=rules).infer(["grey", "sure"])
    took = loop.time() - started
    assert result.rows[0].tier == "edge" and result.rows[0].reasons == (Reason.LOW_CONFIDENCE, Reason.HEDGE_TIMEOUT)
    assert took < 0.45, "the request waited for the slow call past the hedge wait"
    await asyncio.sleep(0)
    assert cloud.cancelled == 1, "the cut call was not cancelled"
    # Rows far under the threshold wait for their answer; the grey row's call runs beside theirs.
    cloud.cancelled = 0
    result = await Cascade([edge, cloud], policy(), rules=rules).infer(["grey", "low"])
    assert sorted(cloud.calls[-2:]) == [["grey"], ["low"]]
    assert [row.tier for row in result.rows] == ["cloud", "cloud"]
    assert result.rows[0].reasons == (Reason.LOW_CONFIDENCE,)


async def test_a_caller_gone_cancels_the_hedged_call() -> None:
    edge = ScriptedTier("edge", {"grey": 0.45, "low": 0.1})
    cloud = ScriptedTier("cloud", delay_s=5.0)
    cascade = Cascade([edge, cloud], policy(), rules=ChainRules(hedge_band=0.1, hedge_wait_s=5.0))
    task = asyncio.ensure_future(cascade.infer(["grey", "low"]))
    for _ in range(100):  # bounded: until both calls are in flight
        if len(cloud.calls) == 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert cloud.cancelled == 2


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    length=st.integers(min_value=1, max_value=4),
    fail_closed=st.booleans(),
)
def test_every_row_gets_exactly_one_answer_or_the_request_fails(
    data: st.DataObject, length: int, fail_closed: bool
) -> None:
    texts = data.draw(st.lists(st.sampled_from(["a", "b", "c", LONG, "d"]), min_size=1, max_size=8))
    failing = [False] + [data.draw(st.booleans(), label=f"fails{level}") for level in range(1, length)]
    tiers = [
        ScriptedTier(
            f"t{level}",
            {text: data.draw(st.floats(0.0, 1.0), label=f"s{level}{text[:1]}") for text in set(texts)},
            fails=failing[level],
        )
        for level in range(length)
    ]
    heavy_level = data.draw(st.integers(0, length - 1))
    hint = data.draw(st.sampled_from(list(Hint)))
    cascade = Cascade(tiers, policy(), rules=ChainRules(heavy_level=heavy_level, fail_closed=fail_closed))
    try:
        result = asyncio.run(cascade.infer(texts, hint))
    except TierUnavailableError:
        assert fail_closed and any(failing)
        return
    assert len(result.rows) == len(texts)
    for text, row in zip(texts, result.rows, strict=True):
        level = int(row.tier[1:])
        assert not failing[level], "a failed tier cannot have answered"
        assert row.label == f"{row.tier}:{text}"
        assert row.ran[-1] == row.tier
        # A row sent to a failed tier says so; a row answered below a tier it needed is degraded.
        if any(failing[t] and any(text in call for call in tier.calls) for t, tier in enumerate(tiers)):
            assert Reason.TIER_UNAVAILABLE in row.reasons
        else:
            assert Reason.TIER_UNAVAILABLE not in row.reasons
    if not any(failing):
        assert not result.degraded


def _three_tiers(mid_target: str, *, mid_threshold: float = 1.0) -> object:
    def configure(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.chain = ["edge", "mid", "cloud"]
        gateway.tiers["mid"] = TierSettings(target=mid_target, threshold=mid_threshold, timeout_s=2.0)

    return configure


def _answers(reply: object) -> list[tuple[str, str]]:
    outputs = {o.name: o for o in reply.outputs}  # type: ignore[attr-defined]
    tiers = [tier.decode() for tier in outputs["tier"].contents.bytes_contents]
    return list(zip(tiers, json.loads(reply.parameters[REASONS_PARAMETER].string_param), strict=True))  # type: ignore[attr-defined]


async def test_three_tiers_on_real_servers_middle_failing(start_stack: StackFactory) -> None:
    # Every light row climbs (edge threshold 1.0); the middle tier's address refuses connections.
    stack = await start_stack(threshold=1.0, configure=_three_tiers("127.0.0.1:1"))  # type: ignore[arg-type]
    reply = await stack.stub.ModelInfer(infer_request(["whole milk", "qqq zzz xxy", LONG]), timeout=10.0)
    assert _answers(reply) == [
        ("cloud", "low_confidence+tier_unavailable"),
        ("cloud", "low_confidence+tier_unavailable"),
        ("cloud", "long_input"),
    ]
    assert reply.parameters["mid_rows"].int64_param == 0 and reply.parameters["cloud_rows"].int64_param == 3
    assert reply.parameters[DEGRADED_PARAMETER].bool_param is False


async def test_three_tiers_on_real_servers_middle_answering_then_last_failing(
    start_stack: StackFactory, tiny_models: object, keyring_path: object
) -> None:
    from tiergate.envelope import Keyring

    mid_settings = CloudSettings(port=0, models_dir=tiny_models, keyring_path=keyring_path, insecure=True)  # type: ignore[arg-type]
    mid_settings.metrics.enabled = False
    mid = CloudServer(mid_settings, Keyring.load(keyring_path))  # type: ignore[arg-type]
    mid_port = await mid.start()
    try:
        # The middle tier settles every row it gets (threshold 0): nothing reaches the last tier but heavy rows.
        stack = await start_stack(threshold=1.0, configure=_three_tiers(f"127.0.0.1:{mid_port}", mid_threshold=0.0))  # type: ignore[arg-type]
        reply = await stack.stub.ModelInfer(infer_request(["whole milk", LONG]), timeout=10.0)
        assert _answers(reply) == [("mid", "low_confidence"), ("cloud", "long_input")]
        assert stack.cloud is not None
        await stack.cloud.stop(0)
        reply = await stack.stub.ModelInfer(infer_request(["whole milk", LONG]), timeout=10.0)
        assert _answers(reply) == [("mid", "low_confidence"), ("edge", "long_input+tier_unavailable")]
        assert reply.parameters[DEGRADED_PARAMETER].bool_param is True
    finally:
        await mid.stop(0)


async def test_fail_closed_model_answers_unavailable_when_rows_needed_the_cloud(start_stack: StackFactory) -> None:
    def closed(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.routing.failure_policy = "fail_closed"

    stack = await start_stack(with_cloud=False, cloud_target="127.0.0.1:1", threshold=1.0, configure=closed)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=10.0)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "fail_closed" in (caught.value.details() or "")
    # A row the edge settles needs no cloud: it is answered.
    reply = await stack.stub.ModelInfer(infer_request(["whole milk"], tier="edge"), timeout=10.0)
    assert _answers(reply) == [("edge", "")]


def test_chain_settings_are_checked_at_start() -> None:
    from gateway.server import chain_rules, tier_settings
    from tiergate.settings import load_settings

    settings = GatewaySettings(chain=["edge", "mid", "cloud"])
    with pytest.raises(ValueError, match=r"unknown tier 'mid'.*gateway\.tiers\.mid"):
        tier_settings(settings, "mid")
    settings.tiers["mid"] = TierSettings()
    with pytest.raises(ValueError, match="has no target"):
        tier_settings(settings, "mid")
    loaded = load_settings(
        None,
        env={
            "TIERGATE_GATEWAY__CHAIN": "edge,mid,cloud",
            "TIERGATE_GATEWAY__TIERS__MID__TARGET": "10.0.0.5:8101",
            "TIERGATE_GATEWAY__TIERS__MID__THRESHOLD": "0.3",
            "TIERGATE_GATEWAY__ROUTING__HEAVY_TIER": "mid",
        },
    ).gateway
    assert tier_settings(loaded, "mid") == TierSettings(target="10.0.0.5:8101", threshold=0.3)
    assert tier_settings(loaded, "cloud").target == loaded.cloud_target

    class Calibrated:
        class routing:  # stands in for a manifest's routing section
            threshold = 0.7

    rules = chain_rules(loaded, Calibrated)  # type: ignore[arg-type]
    assert rules.thresholds == (0.7, 0.3) and rules.heavy_level == 1 and not rules.fail_closed
    loaded.routing.failure_policy = "fail_sideways"
    with pytest.raises(ValueError, match="failure_policy"):
        chain_rules(loaded, Calibrated)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        load_settings(None, env={"TIERGATE_GATEWAY__TIERS__X__KIND": "gpu"})


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def test_each_tier_reports_its_readiness_and_a_fail_closed_model_is_not_ready_without_its_cloud(
    start_stack: StackFactory,
) -> None:
    from grpc_health.v1 import health_pb2

    from proto.inference import grpc_service_pb2 as pb
    from tiergate.constants import MODEL_NAME

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def closed(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.routing.failure_policy = "fail_closed"

    live = await start_stack(configure=closed)
    dead = await start_stack(with_cloud=False, cloud_target="127.0.0.1:1", configure=closed)
    for _ in range(100):  # bounded: 10 s for both health watches to settle
        states = [
            await _health(live.channel, "tiergate.tier.cloud"),
            await _health(dead.channel, "tiergate.tier.cloud"),
        ]
        if states == [serving, not_serving]:
            break
        await asyncio.sleep(0.1)
    assert states == [serving, not_serving]
    assert await _health(dead.channel, "tiergate.tier.edge") == serving
    ready = pb.ModelReadyRequest(name=MODEL_NAME)
    assert (await live.stub.ModelReady(ready)).ready is True
    assert (await dead.stub.ModelReady(ready)).ready is False


@pytest.mark.parametrize("target", ["not a host::", "cloud.internal", "10.0.0.5:99999", ":8101", "host name:1"])
def test_a_malformed_tier_address_stops_the_start(target: str, tiny_models: object, keyring_path: object) -> None:
    from gateway.server import GatewayServer
    from tiergate.envelope import Keyring

    settings = GatewaySettings(models_dir=tiny_models, cloud_target=target, hop_insecure=True)  # type: ignore[arg-type]
    settings.metrics.enabled = False
    with pytest.raises(ValueError, match="not an address: expected host:port"):
        GatewayServer(settings, Keyring.load(keyring_path))  # type: ignore[arg-type]
    for fine in ("127.0.0.1:8101", "cloud.internal:443", "[::1]:8101", "dns:///cloud.internal:443"):
        from gateway.server import check_target

        assert check_target(fine, "x") == fine
