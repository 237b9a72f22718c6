"""Hot reload of model versions on a real gateway: a new version swaps in under traffic with no failure, requests
finish on the version they started with, broken versions are refused while the old one serves, and the OIP
repository calls (also through unmodified tritonclient) index, unload and load."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from gateway.cascade import TieredModel
from gateway.edge_tier import EdgeTier
from gateway.tier import Prediction, Tier
from proto.inference import grpc_service_pb2 as pb
from tests.conftest import REPO_ROOT, Stack, StackFactory
from tests.test_gateway import infer_request
from tiergate.constants import MODEL_NAME
from tiergate.manifest import EDGE_VARIANT_ROLES, MANIFEST_NAME
from tiergate.settings import CloudSettings, GatewaySettings


def add_version(root: Path, number: int, built: Path) -> Path:
    """A copy of the built model `built` as version `number` of `root`, placed atomically (copy, then rename)."""
    staging = root / f".staging-{number}"
    shutil.copytree(built, staging)
    target = root / str(number)
    staging.rename(target)
    return target


def corrupt_edge_file(version: Path) -> None:
    manifest = json.loads((version / MANIFEST_NAME).read_text())
    edge_file = version / manifest["edge"]["onnx"]["path"]
    data = bytearray(edge_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    edge_file.write_bytes(bytes(data))


def versions_with_one(tmp_path: Path, built: Path) -> Path:
    """A versions directory holding `built` as version 1."""
    root = tmp_path / "versions"
    root.mkdir()
    add_version(root, 1, built)
    return root


async def start_versions(start_stack: StackFactory, root: Path, tiny_models: Path, poll_s: float) -> Stack:
    def versioned(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.models_dir = root
        gateway.reload_poll_s = poll_s
        cloud.models_dir = tiny_models

    return await start_stack(configure=versioned)


async def index(stack: Stack) -> list[tuple[str, str, str]]:
    reply = await stack.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5.0)
    return [(m.version, m.state, m.reason) for m in reply.models]


async def test_a_new_version_swaps_in_under_traffic_without_a_failure(
    start_stack: StackFactory, tiny_models: Path, tmp_path: Path
) -> None:
    root = versions_with_one(tmp_path, tiny_models)
    stack = await start_versions(start_stack, root, tiny_models, poll_s=0.1)
    seen: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        for _ in range(2000):  # bounded
            if stop.is_set():
                return
            try:
                reply = await stack.stub.ModelInfer(infer_request(["whole milk", "qqq zzz"]), timeout=5.0)
                seen.append(reply.model_version)
            except grpc.aio.AioRpcError as error:
                failures.append(error.code().name)
            await asyncio.sleep(0.005)

    runners = [asyncio.ensure_future(traffic()) for _ in range(4)]
    await asyncio.sleep(0.3)
    add_version(root, 2, tiny_models)
    for _ in range(100):  # bounded: 10 s for the watch to load and swap
        if seen and seen[-1] == "2":
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*runners)
    assert failures == []
    assert "1" in seen and seen[-1] == "2"
    first_two = seen.index("2")
    assert set(seen[first_two:]) <= {"1", "2"} and seen[-10:] == ["2"] * 10
    meta = await stack.stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME), timeout=5.0)
    assert list(meta.versions) == ["1", "2"]
    assert (await stack.stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME, version="2"))).ready
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME, version="1"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert "version '1' is not loaded; version '2' serves" in (caught.value.details() or "")
    assert await index(stack) == [
        ("1", "UNAVAILABLE", "not loaded: a newer version serves"),
        ("2", "READY", ""),
    ]


async def test_broken_versions_are_refused_and_the_old_one_keeps_serving(
    start_stack: StackFactory, tiny_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = versions_with_one(tmp_path, tiny_models)
    stack = await start_versions(start_stack, root, tiny_models, poll_s=0.0)
    corrupt_edge_file(add_version(root, 2, tiny_models))
    not_json = add_version(root, 3, tiny_models)
    (not_json / MANIFEST_NAME).write_text("{ not json")
    load = pb.RepositoryModelLoadRequest(model_name=MODEL_NAME)
    with caplog.at_level(logging.ERROR, logger="gateway.repository"), pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.RepositoryModelLoad(load, timeout=10.0)
    # Nothing newer loads: the call says why, and version 1 serves on.
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "version 1 keeps serving" in (caught.value.details() or "")
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2 and any("sha256" in line for line in refusals)
    reply = await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=5.0)
    assert reply.model_version == "1"
    states = {version: (state, reason) for version, state, reason in await index(stack)}
    assert states["1"] == ("READY", "")
    assert states["2"][0] == "UNAVAILABLE" and "sha256" in states["2"][1]
    assert states["3"][0] == "UNAVAILABLE" and "not valid JSON" in states["3"][1]
    # Refused once, logged once: asking again keeps version 1 and repeats nothing.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="gateway.repository"):
        await stack.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL_NAME), timeout=10.0)
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


def test_a_gateway_starts_on_the_newest_version_that_verifies(
    tiny_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tiergate.manifest import newest_verified

    root = versions_with_one(tmp_path, tiny_models)
    add_version(root, 7, tiny_models)
    corrupt_edge_file(add_version(root, 12, tiny_models))
    with caplog.at_level(logging.ERROR):
        chosen = newest_verified(root, [EDGE_VARIANT_ROLES["int8"]])
    assert (chosen.path, chosen.version) == (root / "7", "7") and list(chosen.refused) == ["12"]
    single = newest_verified(tiny_models, [EDGE_VARIANT_ROLES["int8"]])
    assert (single.path, single.version, single.refused) == (tiny_models, "", {})


class Gate:
    """A first tier that waits for `opened` before answering: holds a request inside a version."""

    def __init__(self, inner: Tier) -> None:
        self.name = inner.name
        self.inner = inner
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def predict(self, texts: Sequence[str], deadline: float | None) -> list[Prediction]:
        self.entered.set()
        await self.opened.wait()
        return await self.inner.predict(texts, deadline)

    def ready(self) -> bool:
        return self.inner.ready()

    def expected_latency_s(self) -> float | None:
        return None

    def start(self) -> None:
        pass

    async def close(self) -> None:
        await self.inner.close()


async def test_requests_in_flight_finish_on_the_version_they_started_with(
    start_stack: StackFactory, tiny_models: Path, tmp_path: Path
) -> None:
    root = versions_with_one(tmp_path, tiny_models)
    stack = await start_versions(start_stack, root, tiny_models, poll_s=0.0)
    old = stack.gateway.repository.current(MODEL_NAME)
    assert isinstance(old, TieredModel)
    edge = old.cascade.tiers[0]
    assert isinstance(edge, EdgeTier)
    gate = Gate(edge)
    old.cascade.tiers[0] = gate
    held = asyncio.ensure_future(stack.stub.ModelInfer(infer_request(["whole milk"], tier="edge"), timeout=10.0))
    await asyncio.wait_for(gate.entered.wait(), timeout=5.0)
    add_version(root, 2, tiny_models)
    await stack.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL_NAME), timeout=10.0)
    fresh = await stack.stub.ModelInfer(infer_request(["whole milk"], tier="edge"), timeout=10.0)
    assert fresh.model_version == "2"
    assert not held.done(), "the held request finished before it was let go"
    gate.opened.set()
    assert (await held).model_version == "1"
    for _ in range(100):  # bounded: the old version's edge model closes once its last request is done
        if edge.closed:
            break
        await asyncio.sleep(0.05)
    assert edge.closed


async def tritonclient(target: str, *steps: str) -> list[object]:
    """Run the repository steps through unmodified tritonclient in a process of its own (its protocol
    descriptors and ours cannot share one process); the gateway keeps serving on this loop meanwhile."""
    script = REPO_ROOT / "tests" / "scripts" / "triton_repository.py"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), target, *steps, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()
    result: list[object] = json.loads(out)
    return result


async def test_unload_and_load_through_unmodified_tritonclient(
    start_stack: StackFactory, tiny_models: Path, tmp_path: Path
) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    root = versions_with_one(tmp_path, tiny_models)
    stack = await start_versions(start_stack, root, tiny_models, poll_s=0.0)
    seen = await tritonclient(stack.target, "index", "unload", "ready")
    assert seen == [[{"name": MODEL_NAME, "version": "1", "state": "READY"}], "unloaded", False]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=5.0)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "unloaded; load it with RepositoryModelLoad" in (caught.value.details() or "")
    add_version(root, 2, tiny_models)
    seen = await tritonclient(stack.target, "load", "ready", "versions", "load-unknown")
    assert seen[:3] == ["loaded", True, ["1", "2"]]
    assert "not served here" in str(seen[3])
    reply = await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=5.0)
    assert reply.model_version == "2"
