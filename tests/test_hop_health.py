"""Remote tiers report readiness honestly: the gateway watches the cloud's grpc.health.v1 status."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.cloud_tier import CloudTier
from tests.conftest import StackFactory
from tests.test_metrics import scrape, value


async def until(predicate: object, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.05)):  # bounded
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition did not hold in time")


async def test_the_hop_is_ready_while_the_cloud_serves_and_not_after(start_stack: StackFactory) -> None:
    stack = await start_stack()
    hop = stack.gateway.tiers[-1]
    assert isinstance(hop, CloudTier)
    await until(hop.ready)
    assert value(await scrape(stack.gateway.metrics_port), "tiergate_tier_ready", tier="cloud") == 1
    assert stack.cloud is not None
    await stack.cloud.stop(0)  # health goes NOT_SERVING, then the server is gone
    await until(lambda: not hop.ready())
    assert value(await scrape(stack.gateway.metrics_port), "tiergate_tier_ready", tier="cloud") == 0
    # The gateway itself stays ready: the edge answers (degraded) while the cloud is away.
    assert stack.gateway.repository.current(stack.gateway.settings.model_name).ready()


async def test_a_wrong_cloud_address_is_reported_at_start(
    start_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.cloud_tier"):
        stack = await start_stack(with_cloud=False, cloud_target="127.0.0.1:1")
        hop = stack.gateway.tiers[-1]
        await until(lambda: "health watch failed with UNAVAILABLE" in caplog.text)
    assert not hop.ready()
    assert "reaches the cloud at 127.0.0.1:1" in caplog.text
