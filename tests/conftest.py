"""Shared fixtures: tiny real models, keyrings, and real gateway/cloud servers on 127.0.0.1 port 0."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cloud_runtime.server import CloudServer
from edge_runtime.model import EdgeModel
from gateway.server import GatewayServer
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tiergate.constants import MODEL_NAME
from tiergate.envelope import Keyring
from tiergate.settings import DEFAULT_KEYRING, CloudSettings, DriftSettings, GatewaySettings, TracingSettings
from tiergate.telemetry import Tracing, resolve

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """The shared catalogues: TIERGATE_DATA_ROOT, else ../shared/data beside the repository."""
    return Path(os.environ.get("TIERGATE_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete model directory (manifest, INT8 edge, FP32 cloud) trained in seconds on generated data."""
    import gc

    from training.tiny import build_tiny_models

    built = build_tiny_models(tmp_path_factory.mktemp("models") / "tiny", seed=0)
    # As `tiergate serve` does once its models are loaded: the heap the build left (torch and its imports) is
    # frozen, so full collections stop walking it; over it one pauses the loop for a quarter of a second, which
    # the deadline tests would pay for at random.
    gc.collect()
    gc.freeze()
    return built


@pytest.fixture(scope="session")
def tiny_rows(tiny_models: Path) -> list[tuple[str, str]]:
    from training.tiny import tiny_examples

    return tiny_examples(seed=0)


@pytest.fixture(scope="session")
def sure_and_unsure(tiny_models: Path, tiny_rows: list[tuple[str, str]]) -> tuple[str, str, float]:
    """The edge's most and least confident held-out rows, and a threshold between them."""
    model = EdgeModel.load(tiny_models)
    texts = sorted({text for text, _ in tiny_rows if len(text.split()) <= 8})
    confidence = model.predict(texts).signal
    model.close()
    order = np.argsort(confidence)
    low, high = float(confidence[order[0]]), float(confidence[order[-1]])
    assert high > low, "the tiny edge model should not be equally sure of every row"
    return texts[order[-1]], texts[order[0]], (low + high) / 2


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

    async def stop(self) -> None:
        await self.channel.close()
        await self.gateway.stop(0)
        if self.cloud is not None:
            await self.cloud.stop(0)


class BearerToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sends `authorization: Bearer <token>` on every unary call, as tritonclient's `headers=` does."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details = client_call_details._replace(metadata=tuple(client_call_details.metadata or ()) + self._metadata)
        return await continuation(details, request)


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key directory as `tiergate keys init` writes it: keyring, dev CA, certificates, an empty token file."""
    from tiergate.keys import init_key_dir

    return init_key_dir(tmp_path_factory.mktemp("keys") / "tiergate")


def _untraced() -> Tracing:
    # Independent of any OTEL_* variables in the environment the tests run in.
    return Tracing(resolve(TracingSettings(enabled=False), "tiergate-test", env={}))


class StackFactory:
    """Starts stacks on the given models with per-test options; `stop_all` stops them, newest first."""

    def __init__(self, models: Path, keyring_path: Path) -> None:
        self.models = models
        self.keyring_path = keyring_path
        self._running: list[Stack] = []

    async def __call__(
        self,
        *,
        cloud_target: str | None = None,
        with_cloud: bool = True,
        model_name: str = MODEL_NAME,
        threshold: float | None = None,
        max_edge_tokens: int = 24,
        max_edge_batch: int = 16,
        max_batch_rows: int = 64,
        gateway_tracing: Tracing | None = None,
        cloud_tracing: Tracing | None = None,
        cloud_keyring: Keyring | None = None,
        cloud_timeout_s: float = 5.0,
        drift: DriftSettings | None = None,
        keys: Path | None = None,
        token: str | None = None,
        audit_dir: Path | None = None,
        configure: Callable[[GatewaySettings, CloudSettings], None] | None = None,
    ) -> Stack:
        """A cloud server (unless `with_cloud` is False) and a gateway on it, or on `cloud_target` if given.

        Both serve metrics on a free port; tracing is off unless a `Tracing` is handed in, and so is the
        drift watch unless `drift` settings are (its shadow calls would move the counters tests check).
        Without `keys` the hop and the public port are plaintext (explicitly insecure) and no token is
        needed; with a key directory from `tiergate keys init` the hop is mutual TLS, the gateway asks
        for client tokens, and the stub sends `token`. `audit_dir` turns on both audit logs there.
        """
        keyring = None if keys is not None else Keyring.load(self.keyring_path)
        cloud_settings = CloudSettings(
            port=0, models_dir=self.models, keyring_path=self.keyring_path, model_name=model_name
        )
        cloud_settings.metrics.port = 0
        cloud_settings.keys_dir = keys
        cloud_settings.insecure = keys is None
        settings = GatewaySettings(
            port=0,
            models_dir=self.models,
            keyring_path=self.keyring_path,
            model_name=model_name,
            cloud_timeout_s=cloud_timeout_s,
        )
        settings.keys_dir = keys
        settings.hop_insecure = keys is None
        if keys is not None:
            cloud_settings.keyring_path = settings.keyring_path = DEFAULT_KEYRING  # the key directory's
            settings.hop_tls.server_name = "localhost"
        if audit_dir is not None:
            settings.audit.path = audit_dir / "gateway-audit.log"
            cloud_settings.audit.path = audit_dir / "cloud-audit.log"
        if configure is not None:
            configure(settings, cloud_settings)
        cloud = None
        if with_cloud:
            cloud = CloudServer(cloud_settings, cloud_keyring or keyring, tracing=cloud_tracing or _untraced())
            cloud_port = await cloud.start()
            cloud_target = cloud_target or f"127.0.0.1:{cloud_port}"
        settings.metrics.port = 0
        settings.drift = drift or DriftSettings(sample_rate=0.0)
        settings.cloud_target = cloud_target or "127.0.0.1:1"
        settings.routing.threshold = threshold
        settings.routing.max_edge_tokens = max_edge_tokens
        settings.routing.max_edge_batch = max_edge_batch
        settings.limits.max_batch_rows = max_batch_rows
        try:
            gateway = GatewayServer(settings, keyring, tracing=gateway_tracing or _untraced())
            port = await gateway.start()
        except BaseException:
            if cloud is not None:
                await cloud.stop(0)
            raise
        target = f"127.0.0.1:{port}"
        channel = grpc.aio.insecure_channel(target, interceptors=[BearerToken(token)] if token else None)
        stack = Stack(gateway, cloud, channel, pb_grpc.GRPCInferenceServiceStub(channel), target)
        self._running.append(stack)
        return stack

    async def stop_all(self) -> None:
        # Newest first: a gateway stops before the cloud another stack serves it from.
        while self._running:
            await self._running.pop().stop()


@pytest.fixture
async def start_stack(tiny_models: Path, keyring_path: Path) -> AsyncIterator[StackFactory]:
    """`await start_stack(threshold=..., with_cloud=False, ...)` starts a stack; all are stopped at teardown."""
    factory = StackFactory(tiny_models, keyring_path)
    yield factory
    await factory.stop_all()


@pytest.fixture
async def stack(start_stack: StackFactory) -> Stack:
    """A stack with the default options."""
    return await start_stack()
