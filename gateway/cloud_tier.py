"""The cloud tier as seen from the gateway: seals a batch, calls the cloud server in the time left, opens the answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from gateway.breaker import CircuitBreaker, State
from gateway.metrics import GatewayMetrics
from gateway.tier import Prediction
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tiergate.constants import REQUEST_ID_METADATA
from tiergate.envelope import Sealer
from tiergate.errors import SealError, TierDeadlineError, TierUnavailableError
from tiergate.logs import REQUEST_ID
from tiergate.replay import FreshnessCheck
from tiergate.settings import BreakerSettings, ReplaySettings
from tiergate.tasks import cancel_and_wait
from tiergate.telemetry import timed_span

logger = logging.getLogger(__name__)

# Retries are the channel's job, declared here rather than hand-rolled. Only UNAVAILABLE is
# retried: the call then normally never reached the servicer. A retry resends the identical
# sealed envelope (same nonce, request id and issue time); should an attempt have reached the
# servicer after all, the cloud's replay guard refuses the retry as replayed (UNAUTHENTICATED,
# not retried) and the rows get the edge's answer, so no sealed request is processed twice.
# The backoffs stay far inside the replay window (replay.skew_s), so a retry is never stale.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "tiergate.cloud.v1.CloudInference"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.02s",
                    "maxBackoff": "0.2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        # The retry budget: once failures outnumber successes, retries stop until calls succeed again
        # (each failure costs a token, each success gives back a tenth; retries need more than half).
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
)
# Reconnect quickly after an outage; the breaker's probe, not gRPC's default backoff (up to 120 s),
# decides when traffic returns.
_RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Not grpc.min_reconnect_backoff_ms: gRPC also takes it as the connect timeout, and a short one
    # would never let a distant (high-latency) cloud finish its handshake.
]
# The service name the cloud's health reports on (one per registered service).
CLOUD_SERVICE = cloud_pb2.DESCRIPTOR.services_by_name["CloudInference"].full_name
# Between two attempts to watch the hop's health (doubling up to the max).
HEALTH_RETRY_MIN_S = 0.2
HEALTH_RETRY_MAX_S = 5.0
# The hop latency window, and how many calls it needs before it says anything.
LATENCY_WINDOW = 256
LATENCY_MIN_SAMPLES = 20
# Below this much time left, escalating cannot succeed; answer from the edge instead.
MIN_CALL_BUDGET_S = 0.005
# Sealed calls of one chunked escalation in flight at once.
CHUNKS_IN_FLIGHT = 2


class CloudTier:
    """Remote full-model tier reached over gRPC with application-layer sealed payloads."""

    def __init__(
        self,
        target: str,
        sealer: Sealer,
        *,
        model_name: str,
        timeout_s: float,
        max_message_bytes: int,
        name: str = "cloud",
        tracer: trace.Tracer | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        metrics: GatewayMetrics | None = None,
        replay: ReplaySettings | None = None,
        clock: Callable[[], float] = time.time,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, str]] = (),
        breaker: BreakerSettings | None = None,
        deadline_reserve_s: float = 0.02,
        chunk_rows: int = 64,
    ) -> None:
        """`replay.skew_s` is the freshness window for responses (default `ReplaySettings()`), measured on
        `clock`."""
        self.name = name
        self._sealer = sealer
        self._model_name = model_name
        self._timeout_s = timeout_s
        self._tracer = tracer or trace.NoOpTracer()
        self._metrics = metrics or GatewayMetrics()
        # Responses need no seen-set: each carries the hop id of the one call it answers, a fresh uuid.
        self._freshness = FreshnessCheck((replay or ReplaySettings()).skew_s, clock=clock)
        options: list[tuple[str, Any]] = [
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *_RECONNECT_OPTIONS,
            *channel_options,
        ]
        # `credentials`: mutual TLS under the sealed envelopes (a balancer that ends TLS sees ciphertext only).
        self.secure = credentials is not None
        self._target, self._options, self._interceptors = target, options, list(interceptors)
        self._channel = self._open_channel(credentials)
        self._stub = cloud_pb2_grpc.CloudInferenceStub(self._channel)
        self._retiring: set[asyncio.Task[None]] = set()
        self._serving: bool | None = None  # unknown until the health service first answers (or fails)
        self._reserve_s = deadline_reserve_s
        if chunk_rows < 1:
            raise ValueError(f"hop_chunk_rows must be at least 1, got {chunk_rows}")
        self._chunk_rows = chunk_rows
        # Recent successful call latencies: what deadline-aware escalation measures a caller's time left against.
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.breaker = CircuitBreaker(breaker or BreakerSettings(), on_change=self._breaker_moved)
        self._metrics.breaker_state.labels(tier=self.name).set(self.breaker.state)
        self._watch: asyncio.Task[None] | None = None
        logger.info("tier %s reaches the cloud at %s over %s", name, target, "mTLS" if self.secure else "plaintext")

    def _open_channel(self, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        interceptors = self._interceptors or None
        if credentials is None:
            return grpc.aio.insecure_channel(self._target, options=self._options, interceptors=interceptors)
        return grpc.aio.secure_channel(self._target, credentials, options=self._options, interceptors=interceptors)

    def use_credentials(self, credentials: grpc.ChannelCredentials, grace_s: float = 30.0) -> None:
        """New calls go over a channel with `credentials` (renewed certificates); calls in flight on the old
        one finish within `grace_s` before it closes. Call from the event loop."""
        old, self._channel = self._channel, self._open_channel(credentials)
        self._stub = cloud_pb2_grpc.CloudInferenceStub(self._channel)
        task = asyncio.get_running_loop().create_task(old.close(grace=grace_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self._timeout_s
        # Keep back the time the gateway needs to answer from the edge if this call does not come back.
        remaining = deadline - asyncio.get_running_loop().time() - self._reserve_s
        if remaining < MIN_CALL_BUDGET_S:
            raise TierDeadlineError("no time left in the caller's deadline to reach the cloud tier")
        return min(self._timeout_s, remaining)

    def expected_latency_s(self) -> float | None:
        """The recent p95 of successful calls (None until LATENCY_MIN_SAMPLES were made)."""
        if len(self._latencies) < LATENCY_MIN_SAMPLES:
            return None
        ordered = sorted(self._latencies)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]

    def _breaker_moved(self, state: State, why: str) -> None:
        log = logger.info if state is State.CLOSED else logger.warning
        log("tier %s circuit %s: %s", self.name, state.name.lower().replace("_", "-"), why)
        self._metrics.breaker_state.labels(tier=self.name).set(state)
        self._metrics.breaker_transitions.labels(tier=self.name, state=state.name.lower()).inc()

    async def predict(self, texts: Sequence[str], deadline: float | None) -> list[Prediction]:
        timeout = self._timeout(deadline)
        if not self.breaker.allow():
            # Open: answer from the earlier tier at once rather than wait on a hop that keeps failing.
            raise TierUnavailableError(f"the {self.name} tier's circuit is open; earlier tiers answer")
        started = time.monotonic()
        try:
            if len(texts) <= self._chunk_rows:
                predictions = await self._call(texts, timeout)
            else:
                predictions = await self._call_in_chunks(texts, deadline)
        except TierDeadlineError:
            # Slow against its own timeout is the tier's fault; against a caller's tighter deadline it is not.
            self.breaker.record(timeout < self._timeout_s)
            raise
        except TierUnavailableError:
            self.breaker.record(False)
            raise
        except BaseException:
            self.breaker.record(True)  # cancelled by the caller: says nothing about the tier
            raise
        self.breaker.record(True)
        self._latencies.append(time.monotonic() - started)
        return predictions

    async def _call_in_chunks(self, texts: Sequence[str], deadline: float | None) -> list[Prediction]:
        """A large escalation as sealed calls of at most `chunk_rows` rows, CHUNKS_IN_FLIGHT at a time, answers
        in order. The first failure fails it all and cancels the calls still running or waiting."""
        gate = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

        async def one(chunk: Sequence[str]) -> list[Prediction]:
            async with gate:
                return await self._call(chunk, self._timeout(deadline))

        size = self._chunk_rows
        calls = [asyncio.ensure_future(one(texts[start : start + size])) for start in range(0, len(texts), size)]
        try:
            answers = await asyncio.gather(*calls)
        finally:
            for call in calls:
                if not call.done():
                    call.cancel()
                elif not call.cancelled():
                    call.exception()  # retrieved: one failure is reported once, by gather
        return [prediction for chunk in answers for prediction in chunk]

    async def _call(self, texts: Sequence[str], timeout: float) -> list[Prediction]:
        hop_id = uuid.uuid4().hex
        # The gateway's request id rides sealed too, so one id joins both tiers' logs; the clear metadata stays
        # for tracing and for the cloud's records of envelopes it cannot open.
        gateway_request_id = REQUEST_ID.get()
        plain = cloud_pb2.CloudInferRequest(
            model_name=self._model_name, texts=list(texts), gateway_request_id=gateway_request_id
        )
        with timed_span(self._tracer, "tiergate.seal", {"tiergate.tier": self.name}) as span:
            envelope = self._sealer.seal(plain, request_id=hop_id, direction="request")
            span.set_attributes(
                {"tiergate.envelope.bytes": envelope.ByteSize(), "tiergate.envelope.key_id": envelope.key_id}
            )
        try:
            reply = await self._stub.Infer(
                envelope, timeout=timeout, metadata=((REQUEST_ID_METADATA, gateway_request_id),)
            )
        except grpc.aio.AioRpcError as error:
            self._metrics.hop_errors.labels(tier=self.name, code=error.code().name).inc()
            if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TierDeadlineError(f"cloud tier did not answer within {timeout:.3f}s") from None
            # The cloud's own words (e.g. "envelope sealed with unknown key id ...") hold no secret; keep them.
            details = (error.details() or "")[:200]
            raise TierUnavailableError(f"cloud tier failed with {error.code().name}: {details}") from None
        try:
            with timed_span(self._tracer, "tiergate.open", {"tiergate.tier": self.name}) as span:
                span.set_attribute("tiergate.envelope.bytes", reply.ByteSize())
                if reply.request_id != hop_id:
                    raise SealError("cloud response carries another request id", cause="wrong_request_id")
                response = self._sealer.open(reply, cloud_pb2.CloudInferResponse, direction="response")
                # Only once it authenticated is issued_at the cloud's own.
                self._freshness.check(reply)
        except SealError as error:
            self._metrics.envelope_rejections.labels(tier=self.name, cause=error.cause).inc()
            raise TierUnavailableError(f"cloud response rejected: {error}") from None
        if len(response.predictions) != len(texts):
            raise TierUnavailableError("cloud response has the wrong number of rows")
        return [Prediction(p.label, probability=p.probability, signal=p.signal) for p in response.predictions]

    def ready(self) -> bool:
        """What the cloud's own health service last said (False until it has said SERVING)."""
        return self._serving is True

    def start(self) -> None:
        """Watch the hop's `grpc.health.v1` status in the background, reconnecting with a bounded backoff."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_health(), name=f"{self.name} health")

    def _set_serving(self, serving: bool, why: str) -> None:
        if serving != self._serving:
            log = logger.info if serving else logger.warning
            log("tier %s at %s: %s (%s)", self.name, self._target, "SERVING" if serving else "not serving", why)
            # The hop's own health drives the breaker too: down opens it at once, SERVING closes it.
            if serving:
                self.breaker.reset("its health service says SERVING")
            elif self._serving is not None:
                self.breaker.trip("its health service says it is down")
        self._serving = serving
        self._metrics.tier_ready.labels(tier=self.name).set(1 if serving else 0)

    async def _watch_health(self) -> None:
        backoff = HEALTH_RETRY_MIN_S
        request = health_pb2.HealthCheckRequest(service=CLOUD_SERVICE)
        while True:
            try:
                async for reply in health_pb2_grpc.HealthStub(self._channel).Watch(request):
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                    self._set_serving(serving, "its health service says so")
                    backoff = HEALTH_RETRY_MIN_S
                self._set_serving(False, "its health stream ended")
            except grpc.aio.AioRpcError as error:
                self._set_serving(False, f"health watch failed with {error.code().name}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, HEALTH_RETRY_MAX_S)

    async def close(self) -> None:
        watch, self._watch = self._watch, None
        await cancel_and_wait(watch)
        await self._channel.close()
        for task in list(self._retiring):
            await task
