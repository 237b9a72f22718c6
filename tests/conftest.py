"""Shared fixtures: tiny real models, keyrings, and real gateway/cloud servers on 127.0.0.1 port 0."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cloud_runtime.server import CloudServer  # noqa: E402
from gateway.server import GatewayServer  # noqa: E402
from proto.inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from tiergate.envelope import Keyring  # noqa: E402
from tiergate.settings import CloudSettings, GatewaySettings  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """The shared catalogues: TIERGATE_DATA_ROOT, else ../shared/data beside the repository."""
    return Path(os.environ.get("TIERGATE_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete model directory (manifest, INT8 edge, FP32 cloud) trained in seconds on generated data."""
    from training.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_rows(tiny_models: Path) -> list[tuple[str, str]]:
    from training.tiny import tiny_examples

    return tiny_examples(seed=0)


@pytest.fixture(scope="session")
def keyring_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keyring.json"
    Keyring.generate("test-key").save(path)
    return path


@dataclass
class Stack:
    """A running cloud server and gateway wired together, plus a client stub on the gateway."""

    gateway: GatewayServer
    cloud: CloudServer | None
    channel: grpc.aio.Channel
    stub: pb_grpc.GRPCInferenceServiceStub
    target: str


async def start_stack(
    models: Path,
    keyring_path: Path,
    *,
    cloud_target: str | None = None,
    with_cloud: bool = True,
    threshold: float | None = None,
    max_edge_tokens: int = 24,
    max_edge_batch: int = 16,
    max_batch_rows: int = 64,
) -> Stack:
    keyring = Keyring.load(keyring_path)
    cloud = None
    if with_cloud:
        cloud = CloudServer(CloudSettings(port=0, models_dir=models, keyring_path=keyring_path), keyring)
        cloud_port = await cloud.start()
        cloud_target = cloud_target or f"127.0.0.1:{cloud_port}"
    settings = GatewaySettings(port=0, models_dir=models, keyring_path=keyring_path, cloud_timeout_s=5.0)
    settings.cloud_target = cloud_target or "127.0.0.1:1"
    settings.routing.threshold = threshold
    settings.routing.max_edge_tokens = max_edge_tokens
    settings.routing.max_edge_batch = max_edge_batch
    settings.limits.max_batch_rows = max_batch_rows
    gateway = GatewayServer(settings, keyring)
    port = await gateway.start()
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target)
    return Stack(gateway, cloud, channel, pb_grpc.GRPCInferenceServiceStub(channel), target)


async def stop_stack(stack: Stack) -> None:
    await stack.channel.close()
    await stack.gateway.stop(0)
    if stack.cloud is not None:
        await stack.cloud.stop(0)


@pytest.fixture
async def stack(tiny_models: Path, keyring_path: Path) -> AsyncIterator[Stack]:
    running = await start_stack(tiny_models, keyring_path)
    yield running
    await stop_stack(running)
