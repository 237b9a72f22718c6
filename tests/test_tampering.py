"""Hostile envelopes against a real cloud server (127.0.0.1, port 0): bit flips, truncations, swapped key ids,
replays and stale timestamps are all refused as UNAUTHENTICATED with their cause, and none reaches the model."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cloud_runtime.model import CloudModel
from cloud_runtime.server import SERVICE_NAME, CloudServer
from cloud_runtime.servicer import CloudInferenceServicer, CloudServed
from gateway.cloud_tier import CloudTier
from gateway.metrics import GatewayMetrics
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tiergate.constants import MODEL_NAME, REQUEST_ID_METADATA
from tiergate.envelope import Keyring, Sealer
from tiergate.errors import TierUnavailableError
from tiergate.logs import REQUEST_ID
from tiergate.manifest import CLOUD_ROLES, load_manifest
from tiergate.rpc import ManagedServer
from tiergate.settings import CloudSettings, LimitSettings, ReplaySettings, TracingSettings
from tiergate.telemetry import Tracing, resolve

Req = TypeVar("Req")
Resp = TypeVar("Resp")

ENVELOPES = 1000
PRIMED = 20
SPARE_KEY = "spare-key"
KINDS = ("bit_flip", "truncation", "swapped_key_id", "replay", "stale")
# What the caller is told, per refusal cause (the metric label); bit flips in the version field are malformed.
MESSAGE_OF_CAUSE = {
    "tampered": "tampered",
    "malformed": "tampered",
    "unknown_key_id": "unknown key id",
    "replayed": "replayed",
    "stale": "stale",
}


def _untraced() -> Tracing:
    return Tracing(resolve(TracingSettings(enabled=False), "tiergate-test", env={}))


@dataclass
class Cloud:
    server: CloudServer
    keyring: Keyring
    channel: grpc.aio.Channel
    stub: cloud_pb2_grpc.CloudInferenceStub

    def sample(self, name: str, **labels: str) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels) or 0.0

    def rows(self) -> float:
        return self.sample("tiergate_cloud_rows_total", model=MODEL_NAME)

    def model_calls(self) -> float:
        return self.sample("tiergate_cloud_batch_rows_count", model=MODEL_NAME)


async def _start_cloud(tiny_models: Path, keyring: Keyring, tracing: Tracing | None = None) -> Cloud:
    settings = CloudSettings(port=0, models_dir=tiny_models, insecure=True)  # the envelopes are what is tested
    settings.metrics.enabled = False  # read straight from the registry
    server = CloudServer(settings, keyring, tracing=tracing or _untraced())
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Cloud(server, keyring, channel, cloud_pb2_grpc.CloudInferenceStub(channel))


@pytest.fixture
async def cloud(tiny_models: Path, keyring_path: Path) -> AsyncIterator[Cloud]:
    """A cloud server holding the shared key (active) and a spare one."""
    shared = Keyring.load(keyring_path)
    keyring = Keyring(keys={**shared.keys, **Keyring.generate(SPARE_KEY).keys}, active_key_id=shared.active_key_id)
    running = await _start_cloud(tiny_models, keyring)
    yield running
    await running.channel.close()
    await running.server.stop(0)


def _request(text: str = "organic whole milk", gateway_request_id: str = "") -> cloud_pb2.CloudInferRequest:
    return cloud_pb2.CloudInferRequest(model_name=MODEL_NAME, texts=[text], gateway_request_id=gateway_request_id)


def _flip_bit(envelope: cloud_pb2.Envelope, rng: random.Random) -> None:
    field = rng.choice(["ciphertext", "ciphertext", "nonce", "request_id", "issued_at_unix_ms", "version"])
    if field in ("ciphertext", "nonce"):
        data = bytearray(getattr(envelope, field))
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        setattr(envelope, field, bytes(data))
    elif field == "request_id":
        text = bytearray(envelope.request_id.encode("ascii"))
        text[rng.randrange(len(text))] ^= 1 << rng.randrange(7)  # stays ASCII, so still a valid string
        envelope.request_id = text.decode("ascii")
    elif field == "issued_at_unix_ms":
        envelope.issued_at_unix_ms ^= 1 << rng.randrange(40)
    else:
        envelope.version ^= 1 << rng.randrange(8)


def _hostile(
    kind: str, rng: random.Random, sealer: Sealer, stale_sealers: list[Sealer], accepted: list[cloud_pb2.Envelope]
) -> tuple[cloud_pb2.Envelope, set[str]]:
    """One hostile envelope of `kind` and the refusal causes it may meet."""
    fresh = sealer.seal(_request(), request_id=f"hop-{rng.getrandbits(64):016x}", direction="request")
    if kind == "bit_flip":
        _flip_bit(fresh, rng)
        return fresh, {"tampered", "malformed"}
    if kind == "truncation":
        if rng.random() < 0.8:
            fresh.ciphertext = fresh.ciphertext[: rng.randrange(len(fresh.ciphertext))]
            return fresh, {"tampered"}
        fresh.nonce = fresh.nonce[: rng.randrange(len(fresh.nonce))]
        return fresh, {"malformed"}
    if kind == "swapped_key_id":
        # A key the cloud holds no longer matches the associated data; any other key is unknown.
        if rng.random() < 0.5:
            fresh.key_id = SPARE_KEY
            return fresh, {"tampered"}
        fresh.key_id = f"k-{rng.getrandbits(32):08x}"
        return fresh, {"unknown_key_id"}
    if kind == "replay":
        original = rng.choice(accepted)
        if rng.random() < 0.5:
            return original, {"replayed"}  # byte for byte: its nonce was seen
        # Sealed anew (fresh nonce, valid tag) but reusing a request id the cloud has answered.
        return sealer.seal(_request(), request_id=original.request_id, direction="request"), {"replayed"}
    return rng.choice(stale_sealers).seal(_request(), request_id=fresh.request_id, direction="request"), {"stale"}


async def test_hostile_envelopes_are_refused_and_never_reach_the_model(cloud: Cloud) -> None:
    sealer = Sealer(cloud.keyring)
    # Validly sealed, with clocks two minutes behind and ahead of the cloud's.
    stale_sealers = [
        Sealer(cloud.keyring, clock=lambda: time.time() - 120),
        Sealer(cloud.keyring, clock=lambda: time.time() + 120),
    ]
    accepted = []
    for i in range(PRIMED):
        envelope = sealer.seal(_request(), request_id=f"primed-{i}", direction="request")
        await cloud.stub.Infer(envelope, timeout=5.0)
        accepted.append(envelope)
    rows_before, calls_before = cloud.rows(), cloud.model_calls()
    assert rows_before == PRIMED

    rng = random.Random(20261124)
    kinds: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    for _ in range(ENVELOPES):
        kind = rng.choice(KINDS)
        envelope, expected = _hostile(kind, rng, sealer, stale_sealers, accepted)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cloud.stub.Infer(envelope, timeout=5.0)
        code, details = caught.value.code(), caught.value.details() or ""
        assert code is grpc.StatusCode.UNAUTHENTICATED, (kind, code, details)
        matched = [cause for cause in expected if MESSAGE_OF_CAUSE[cause] in details]
        assert matched, (kind, details)
        kinds[kind] += 1
        causes[matched[0]] += 1

    assert set(kinds) == set(KINDS) and min(kinds.values()) > 150, kinds
    # Nothing reached the model: no rows answered and no model call made after the primed ones.
    assert (cloud.rows(), cloud.model_calls()) == (rows_before, calls_before)
    counted = {
        cause: cloud.sample("tiergate_cloud_envelope_rejections_total", cause=cause) for cause in MESSAGE_OF_CAUSE
    }
    assert sum(counted.values()) == ENVELOPES
    assert counted["stale"] == kinds["stale"] and counted["replayed"] == kinds["replay"]
    assert counted["unknown_key_id"] == causes["unknown_key_id"] > 0
    assert counted["tampered"] + counted["malformed"] == causes["tampered"] + causes["malformed"]
    assert cloud.sample("tiergate_cloud_rpc_errors_total", method="Infer", code="UNAUTHENTICATED") == ENVELOPES

    # The legitimate caller is unaffected.
    envelope = sealer.seal(_request(), request_id="after-the-storm", direction="request")
    reply = await cloud.stub.Infer(envelope, timeout=5.0)
    answer = sealer.open(reply, cloud_pb2.CloudInferResponse, direction="response")
    assert reply.request_id == "after-the-storm" and len(answer.predictions) == 1
    assert cloud.rows() == rows_before + 1


async def test_gateway_refuses_a_stale_response(cloud: Cloud) -> None:
    # The gateway's clock runs two minutes ahead: the cloud's answer, sealed on the cloud's clock, is stale to it.
    metrics = GatewayMetrics()
    tier = CloudTier(
        f"127.0.0.1:{cloud.server.servicer.bound[1]}",
        Sealer(cloud.keyring),
        model_name=MODEL_NAME,
        timeout_s=5.0,
        max_message_bytes=LimitSettings().max_message_bytes,
        metrics=metrics,
        clock=lambda: time.time() + 120,
    )
    try:
        with pytest.raises(TierUnavailableError, match="cloud response rejected: envelope is stale"):
            await tier.predict(["organic whole milk"], deadline=None)
    finally:
        await tier.close()
    labels = {"tier": "cloud", "cause": "stale"}
    assert metrics.registry.get_sample_value("tiergate_envelope_rejections_total", labels) == 1


async def test_sealed_gateway_request_id_names_the_cloud_span(tiny_models: Path, keyring_path: Path) -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(resolve(TracingSettings(), "tiergate-cloud", env={}), processor=SimpleSpanProcessor(exporter))
    keyring = Keyring.load(keyring_path)
    cloud = await _start_cloud(tiny_models, keyring, tracing)
    try:
        envelope = Sealer(keyring).seal(
            _request(gateway_request_id="req-sealed"), request_id="hop-1", direction="request"
        )
        # The clear metadata says otherwise; once the envelope is open, the sealed id wins.
        await cloud.stub.Infer(envelope, timeout=5.0, metadata=((REQUEST_ID_METADATA, "req-in-the-clear"),))
    finally:
        await cloud.channel.close()
        await cloud.server.stop(0)
    (server_span,) = [s for s in exporter.get_finished_spans() if s.name.endswith("CloudInference/Infer")]
    assert server_span.attributes is not None and server_span.attributes["tiergate.request_id"] == "req-sealed"


async def test_gateway_seals_its_request_id(cloud: Cloud) -> None:
    seen: list[str] = []
    sealer = Sealer(cloud.keyring)

    class Recording(grpc.aio.UnaryUnaryClientInterceptor):
        """Opens each request envelope on its way out, as the cloud will."""

        async def intercept_unary_unary(
            self,
            continuation: Callable[[grpc.aio.ClientCallDetails, Req], Awaitable[grpc.aio.UnaryUnaryCall[Req, Resp]]],
            client_call_details: grpc.aio.ClientCallDetails,
            request: Req,
        ) -> Resp | grpc.aio.UnaryUnaryCall[Req, Resp]:
            assert isinstance(request, cloud_pb2.Envelope)
            seen.append(sealer.open(request, cloud_pb2.CloudInferRequest, direction="request").gateway_request_id)
            return await continuation(client_call_details, request)

    tier = CloudTier(
        f"127.0.0.1:{cloud.server.servicer.bound[1]}",
        sealer,
        model_name=MODEL_NAME,
        timeout_s=5.0,
        max_message_bytes=LimitSettings().max_message_bytes,
        interceptors=[Recording()],
    )
    token = REQUEST_ID.set("req-joined")
    try:
        await tier.predict(["organic whole milk"], deadline=None)
    finally:
        REQUEST_ID.reset(token)
        await tier.close()
    assert seen == ["req-joined"]


async def test_full_replay_cache_answers_resource_exhausted(tiny_models: Path, keyring_path: Path) -> None:
    # The servicer as CloudServer assembles it, with a replay cache of two envelopes.
    keyring = Keyring.load(keyring_path)
    manifest = load_manifest(tiny_models, roles=CLOUD_ROLES)
    servicer = CloudInferenceServicer(
        {MODEL_NAME: CloudServed(CloudModel.load(tiny_models, manifest, intra_op_threads=1), manifest.version)},
        Sealer(keyring),
        limits=LimitSettings(),
        replay=ReplaySettings(skew_s=30.0, max_entries=2),
    )

    def register(server: grpc.aio.Server) -> list[str]:
        cloud_pb2_grpc.add_CloudInferenceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    managed = ManagedServer(register, max_message_bytes=LimitSettings().max_message_bytes)
    port = await managed.start("127.0.0.1", 0)
    sealer = Sealer(keyring)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = cloud_pb2_grpc.CloudInferenceStub(channel)
            first = sealer.seal(_request(), request_id="hop-1", direction="request")
            await stub.Infer(first, timeout=5.0)
            await stub.Infer(sealer.seal(_request(), request_id="hop-2", direction="request"), timeout=5.0)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Infer(sealer.seal(_request(), request_id="hop-3", direction="request"), timeout=5.0)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert caught.value.details() == "too many requests in the replay window; retry later"
            # Full, yet nothing was forgotten: the first envelope is still a replay.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Infer(first, timeout=5.0)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "replayed" in (caught.value.details() or "")
    finally:
        await managed.stop(0)
        servicer.close()
