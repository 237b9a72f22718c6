"""Admission control: past the in-flight bounds, requests are refused at once and the admitted ones finish."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import StackFactory
from tests.tap import TapProxy
from tests.test_gateway import infer_request
from tiergate.admission import Admission
from tiergate.errors import OverloadedError
from tiergate.settings import CloudSettings, GatewaySettings


def test_places_are_held_and_given_back() -> None:
    admission = Admission(max_requests=2, max_rows=10)
    with admission.admit(4), admission.admit(5):
        assert (admission.requests, admission.rows) == (2, 9)
        with pytest.raises(OverloadedError, match="at capacity"), admission.admit(1):
            pass
    assert (admission.requests, admission.rows) == (0, 0)
    with admission.admit(8), pytest.raises(OverloadedError), admission.admit(3):
        pass  # rows, not only requests, are bounded
    with pytest.raises(ValueError, match="positive"):
        Admission(0, 1)


async def test_excess_requests_get_resource_exhausted_at_once(start_stack: StackFactory) -> None:
    cloud_stack = await start_stack()
    assert cloud_stack.cloud is not None
    slow = TapProxy(cloud_stack.cloud.servicer.bound[1], delay_s=0.5)
    port = await slow.start()

    def two_at_a_time(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.limits.max_inflight_requests = 2

    try:
        stack = await start_stack(
            with_cloud=False, cloud_target=f"127.0.0.1:{port}", threshold=1.0, configure=two_at_a_time
        )
        loop = asyncio.get_running_loop()

        async def one() -> tuple[str, float]:
            started = loop.time()
            try:
                await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=10.0)
            except grpc.aio.AioRpcError as error:
                assert "at capacity" in (error.details() or "")
                return error.code().name, loop.time() - started
            return "OK", loop.time() - started

        outcomes = await asyncio.gather(*(one() for _ in range(6)))
        codes = sorted(code for code, _ in outcomes)
        assert codes == ["OK", "OK"] + ["RESOURCE_EXHAUSTED"] * 4
        assert all(took < 0.3 for code, took in outcomes if code != "OK"), "refused at once, not queued"
        assert stack.gateway.servicer.admission.requests == 0
    finally:
        await slow.close()
