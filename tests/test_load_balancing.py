"""Load balancing across cloud replicas with what gRPC provides: one gateway, three cloud servers behind one
target (an `ipv4:` list, as a headless Service's DNS name resolves to every ready pod), round robin over the
replicas whose health says SERVING, and connections aged out by the servers. Real servers on port 0."""

from __future__ import annotations

import asyncio
import json

import pytest

from cloud_runtime.server import CloudServer, connection_age_options
from tests.conftest import Stack, StackFactory, _untraced
from tests.test_gateway import infer_request
from tiergate.constants import MODEL_NAME, REASONS_PARAMETER
from tiergate.envelope import Keyring
from tiergate.settings import CloudSettings, GatewaySettings

REPLICAS = 3
CALLS = 300


def _cloud_settings(factory: StackFactory, port: int, age_s: float) -> CloudSettings:
    settings = CloudSettings(port=port, models_dir=factory.models, keyring_path=factory.keyring_path, insecure=True)
    settings.metrics.enabled = False
    settings.max_connection_age_s = age_s
    settings.max_connection_age_grace_s = min(age_s, 0.2)
    return settings


async def _start_cloud(factory: StackFactory, port: int = 0, age_s: float = 0.0) -> CloudServer:
    cloud = CloudServer(_cloud_settings(factory, port, age_s), Keyring.load(factory.keyring_path), tracing=_untraced())
    await cloud.start()
    return cloud


def _served(cloud: CloudServer) -> int:
    value = cloud.metrics.registry.get_sample_value("tiergate_cloud_rows_total", {"model": MODEL_NAME})
    return int(value or 0)


async def _send(stack: Stack, count: int, text: str) -> list[str]:
    """`count` one-row requests the hint sends to the cloud, one after another; the reason each row got."""
    reasons = []
    for _ in range(count):
        reply = await stack.stub.ModelInfer(infer_request([text], tier="cloud"), timeout=10.0)
        reasons.extend(json.loads(reply.parameters[REASONS_PARAMETER].string_param))
    return reasons


def _assert_even(counts: list[int], total: int) -> None:
    even = total / len(counts)
    assert all(abs(count - even) <= 0.2 * even for count in counts), f"calls {counts} are not within 20% of even"


async def _stack_on(factory: StackFactory, clouds: list[CloudServer]) -> Stack:
    target = "ipv4:" + ",".join(f"127.0.0.1:{cloud.managed.port}" for cloud in clouds)

    def no_hop_batching(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.hop_batching.enabled = False  # one sealed call per request, so calls and rows count alike

    return await factory(with_cloud=False, cloud_target=target, configure=no_hop_batching)


async def test_calls_spread_over_every_replica_and_again_after_one_restarts(
    start_stack: StackFactory, tiny_rows: list[tuple[str, str]]
) -> None:
    clouds = [await _start_cloud(start_stack) for _ in range(REPLICAS)]
    try:
        stack = await _stack_on(start_stack, clouds)
        text = tiny_rows[0][0]
        before = [_served(cloud) for cloud in clouds]
        assert set(await _send(stack, CALLS, text)) == {"client_hint"}
        _assert_even([_served(cloud) - b for cloud, b in zip(clouds, before, strict=True)], CALLS)

        # One replica restarts on its port: while it is gone the others answer every call, nothing degraded.
        port = clouds[1].managed.port
        await clouds[1].stop(0)
        assert set(await _send(stack, 60, text)) == {"client_hint"}, "a replica going away costs no request"
        clouds[1] = await _start_cloud(start_stack, port)
        # The channel reconnects to it by itself (its reconnect backoff is at most 2 s); bounded wait.
        for _ in range(100):
            if _served(clouds[1]) > 0:
                break
            await _send(stack, 3, text)
            await asyncio.sleep(0.05)
        assert _served(clouds[1]) > 0, "the restarted replica never got a call again"
        before = [_served(cloud) for cloud in clouds]
        assert set(await _send(stack, CALLS, text)) == {"client_hint"}
        _assert_even([_served(cloud) - b for cloud, b in zip(clouds, before, strict=True)], CALLS)
        assert stack.gateway.tiers[-1].ready()
    finally:
        await start_stack.stop_all()
        for cloud in clouds:
            await cloud.stop(0)


async def test_aged_out_connections_cost_no_request_and_leave_the_tier_ready(
    start_stack: StackFactory, tiny_rows: list[tuple[str, str]]
) -> None:
    # Connections (the health watch's stream among them) are closed every 0.5 s: gateways reconnect, and the
    # tier is never called down nor a row degraded for it.
    clouds = [await _start_cloud(start_stack, age_s=0.5) for _ in range(REPLICAS)]
    try:
        stack = await _stack_on(start_stack, clouds)
        text = tiny_rows[0][0]
        reasons: list[str] = []
        loop = asyncio.get_running_loop()
        ends = loop.time() + 2.5
        while loop.time() < ends:
            reasons += await _send(stack, 10, text)
            await asyncio.sleep(0.02)
        assert set(reasons) == {"client_hint"}, "no row may fall back to the edge because a connection aged out"
        assert all(_served(cloud) > 0 for cloud in clouds)
        assert stack.gateway.tiers[-1].ready()
    finally:
        await start_stack.stop_all()
        for cloud in clouds:
            await cloud.stop(0)


def test_connection_age_options() -> None:
    assert connection_age_options(0, 30) == []
    assert connection_age_options(300, 30) == [
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 30_000),
    ]
    with pytest.raises(ValueError, match="0 or more"):
        connection_age_options(-1, 0)
