"""The circuit breaker on a remote tier: a pure state machine, and on real servers through an outage."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from cloud_runtime.server import CloudServer
from gateway.breaker import CircuitBreaker, State
from gateway.cloud_tier import CloudTier
from tests.conftest import StackFactory
from tests.test_gateway import infer_request
from tests.test_metrics import scrape, value
from tiergate.settings import BreakerSettings, CloudSettings, GatewaySettings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(**overrides: object) -> tuple[CircuitBreaker, Clock, list[State]]:
    settings = BreakerSettings(consecutive_failures=3, error_rate=0.5, window=10, min_calls=6, cool_off_s=5.0)
    for name, setting in overrides.items():
        setattr(settings, name, setting)
    clock, moves = Clock(), []
    return CircuitBreaker(settings, clock=clock, on_change=lambda state, why: moves.append(state)), clock, moves


def test_consecutive_failures_open_it_and_a_probe_after_the_cool_off_closes_it() -> None:
    b, clock, moves = breaker()
    for _ in range(2):
        assert b.allow()
        b.record(False)
    assert b.state is State.CLOSED
    b.record(False)
    assert b.state is State.OPEN and not b.allow()
    clock.now += 4.9
    assert not b.allow(), "still cooling off"
    clock.now += 0.2
    assert b.allow() and b.state is State.HALF_OPEN
    assert not b.allow(), "one probe at a time"
    b.record(True)
    assert b.state is State.CLOSED and b.allow()
    assert moves == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_a_failed_probe_opens_it_again_for_a_full_cool_off() -> None:
    b, clock, _ = breaker()
    for _ in range(3):
        b.record(False)
    clock.now += 5.0
    assert b.allow()
    b.record(False)
    assert b.state is State.OPEN
    clock.now += 4.0
    assert not b.allow()


def test_an_error_rate_over_the_window_opens_it() -> None:
    b, _, _ = breaker(consecutive_failures=100)
    for ok in (True, False, True, False, True):
        b.record(ok)
    assert b.state is State.CLOSED, "fewer than min_calls"
    b.record(False)  # 3 of 6 failed
    assert b.state is State.OPEN


def test_health_can_trip_and_reset_it_and_disabled_never_opens() -> None:
    b, _, _ = breaker()
    b.trip("down")
    assert b.state is State.OPEN and not b.allow()
    b.reset("serving")
    assert b.state is State.CLOSED and b.allow()
    off, _, _ = breaker(enabled=False)
    for _ in range(10):
        off.record(False)
    assert off.state is State.CLOSED and off.allow()
    with pytest.raises(ValueError, match="error_rate"):
        breaker(error_rate=0.0)


async def test_an_outage_opens_the_circuit_and_the_cloud_coming_back_closes_it(start_stack: StackFactory) -> None:
    def quick_breaker(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.breaker.consecutive_failures = 3
        gateway.breaker.cool_off_s = 0.5

    stack = await start_stack(threshold=1.0, configure=quick_breaker)  # every row goes to the cloud
    hop = stack.gateway.tiers[-1]
    assert isinstance(hop, CloudTier) and stack.cloud is not None
    port = stack.cloud.servicer.bound[1]
    settings = dataclasses.replace(stack.cloud.settings, port=port)
    await stack.cloud.stop(0)

    async def answer() -> tuple[str, list[str], bool]:
        reply = await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=10.0)
        tier = reply.outputs[2].contents.bytes_contents[0].decode()
        reasons = json.loads(reply.parameters["escalation_reasons"].string_param)
        return tier, reasons, reply.parameters["degraded"].bool_param

    for _ in range(12):
        assert await answer() == ("edge", ["low_confidence+tier_unavailable"], True)
    assert hop.breaker.state in (State.OPEN, State.HALF_OPEN)
    metrics = await scrape(stack.gateway.metrics_port)
    assert value(metrics, "tiergate_breaker_transitions_total", tier="cloud", state="open") >= 1
    # While open, requests do not even try the hop: far fewer hop errors than requests.
    assert value(metrics, "tiergate_hop_errors_total", tier="cloud", code="UNAVAILABLE") < 12

    # The cloud comes back on the same port: health (or the half-open probe) closes the circuit.
    revived = CloudServer(settings, stack.cloud.sealer._keyring)  # type: ignore[attr-defined]
    await revived.start()
    try:
        assert revived.servicer.bound[1] == port
        for _ in range(100):  # bounded: 10 s
            if (await answer())[0] == "cloud":
                break
            await asyncio.sleep(0.1)
        assert hop.breaker.state is State.CLOSED
        assert await answer() == ("cloud", ["low_confidence"], False)
    finally:
        await revived.stop(0)


async def test_a_slow_cloud_never_makes_a_caller_miss_its_deadline(start_stack: StackFactory) -> None:
    from tests.tap import TapProxy

    cloud_stack = await start_stack()
    assert cloud_stack.cloud is not None
    slow = TapProxy(cloud_stack.cloud.servicer.bound[1], delay_s=2.0)
    slow_port = await slow.start()
    try:
        stack = await start_stack(with_cloud=False, cloud_target=f"127.0.0.1:{slow_port}", threshold=1.0)
        loop = asyncio.get_running_loop()
        for _ in range(5):
            started = loop.time()
            reply = await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=0.5)
            assert loop.time() - started < 0.5, "the answer came before the caller's deadline"
            assert reply.outputs[2].contents.bytes_contents == [b"edge"]
            reasons = json.loads(reply.parameters["escalation_reasons"].string_param)
            assert reasons == ["low_confidence+deadline"]
    finally:
        await slow.close()


async def test_the_clouds_reason_for_refusing_reaches_the_gateway_log(
    start_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from tiergate.envelope import Keyring

    stack = await start_stack(cloud_keyring=Keyring.generate("not-the-gateways"), threshold=1.0)
    with caplog.at_level(logging.WARNING, logger="gateway.cascade"):
        reply = await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=10.0)
    assert reply.parameters["degraded"].bool_param
    assert "UNAUTHENTICATED: envelope sealed with unknown key id" in caplog.text
