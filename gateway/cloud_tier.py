"""The cloud tier as seen from the gateway: seals a batch, calls the cloud server in the time left, opens the answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from gateway.breaker import CircuitBreaker, State
from gateway.metrics import GatewayMetrics
from gateway.tier import Prediction
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tiergate.batching import DynamicBatcher
from tiergate.constants import REQUEST_ID_METADATA
from tiergate.envelope import Sealer
from tiergate.errors import SealError, TierDeadlineError, TierUnavailableError
from tiergate.hop_rows import pack_rows
from tiergate.inputs import Row
from tiergate.logs import REQUEST_ID
from tiergate.replay import FreshnessCheck
from tiergate.settings import BreakerSettings, HopBatchingSettings, ReplaySettings
from tiergate.tasks import cancel_and_wait
from tiergate.telemetry import timed_span

logger = logging.getLogger(__name__)

# The service name the cloud's health reports on (one per registered service).
CLOUD_SERVICE = cloud_pb2.DESCRIPTOR.services_by_name["CloudInference"].full_name

# Retries are the channel's job, declared here rather than hand-rolled. Only UNAVAILABLE is
# retried: the call then normally never reached the servicer. A retry resends the identical
# sealed envelope (same nonce, request id and issue time); should an attempt have reached the
# servicer after all, the cloud's replay guard refuses the retry as replayed (UNAUTHENTICATED,
# not retried) and the rows get the edge's answer, so no sealed request is processed twice.
# The backoffs stay far inside the replay window (replay.skew_s), so a retry is never stale.
#
# Balancing is the channel's job too: a target that resolves to several replicas (a headless Service behind
# `dns:///`, or an `ipv4:` list) gets a connection to each, and calls go round robin over those whose own
# grpc.health.v1 status is SERVING (client-side health checking), so a draining replica stops getting calls
# before it closes. A target that resolves to one address (a ClusterIP Service, a balancer) behaves as before.
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": CLOUD_SERVICE},
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
# One long-lived channel: pings find a dead connection (a balancer or NAT that dropped it silently) before a
# request does, and keep idle connections open through middleboxes that drop them after a few minutes.
KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # At most two pings until data is sent again: a server that still has gRPC's default ping policy (pings
    # further apart than 5 minutes, two strikes) never answers GOAWAY too_many_pings, whatever its settings.
    ("grpc.http2.max_pings_without_data", 2),
]
# Between two attempts to watch the hop's health (doubling up to the max).
HEALTH_RETRY_MIN_S = 0.2
HEALTH_RETRY_MAX_S = 5.0
# A watch that ends on a serving tier is tried again after this pause (the channel has by then stopped routing
# to a replica that went away) before the tier is called down.
HEALTH_RECHECK_S = 0.1
# The hop latency window, and how many calls it needs before it says anything.
LATENCY_WINDOW = 256
LATENCY_MIN_SAMPLES = 20
# Below this much time left, escalating cannot succeed; answer from the edge instead.
MIN_CALL_BUDGET_S = 0.005
# Sealed calls of one chunked escalation in flight at once.
CHUNKS_IN_FLIGHT = 2
# Most gateway request ids named on the seal span of a shared call.
MAX_NAMED_REQUESTS = 32
# Status codes that may come from the rows themselves (the model failed on one, or refused it): a shared call
# failing so is rerun request by request. Any other failure (down, overloaded, too slow) is every request's.
_ROW_FAULT_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT})


class _RowsRefused(TierUnavailableError):
    """The cloud failed on the rows of a call (a status its rows may have caused)."""


@dataclass(frozen=True, eq=False)
class _Caller:
    """One `predict` call's share of a shared hop call: until when it waits, and who it is."""

    # loop.time() at which it stops waiting: its deadline less the reserve, or the tier timeout from its start.
    expires: float
    # Whether the caller's deadline, not the tier timeout, set `expires` (running out then is not the tier's fault).
    caller_bound: bool
    request_id: str
    queued_at: float


@dataclass(frozen=True, slots=True)
class _Row:
    text: Row
    caller: _Caller


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
        batching: HopBatchingSettings | None = None,
    ) -> None:
        """`replay.skew_s` is the freshness window for responses (default `ReplaySettings()`), measured on
        `clock`. `batching` (None or disabled: one sealed call per request, or per chunk of a large one) gathers
        the rows of concurrent requests into shared sealed calls."""
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
            *KEEPALIVE_OPTIONS,
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
        # Rows of concurrent requests share a sealed call, never larger than a chunk; larger requests go chunked.
        self._batcher: DynamicBatcher[_Row, Prediction] | None = None
        if batching is not None and batching.enabled:
            self._batcher = DynamicBatcher(
                self._run_shared,
                max_rows=min(batching.max_batch_rows, chunk_rows),
                max_delay_s=batching.max_queue_delay_us / 1e6,
                max_inflight=batching.max_inflight_calls,
                rerun_alone=lambda error: isinstance(error, _RowsRefused),
                name=f"the {name} tier's hop batcher",
            )
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

    async def predict(self, texts: Sequence[Row], deadline: float | None) -> list[Prediction]:
        timeout = self._timeout(deadline)
        if not self.breaker.allow():
            # Open: answer from the earlier tier at once rather than wait on a hop that keeps failing.
            raise TierUnavailableError(f"the {self.name} tier's circuit is open; earlier tiers answer")
        # The half-open probe goes alone: its one outcome is what the breaker waits for.
        if self._batcher is not None and len(texts) <= self._batcher.max_rows and self.breaker.state is State.CLOSED:
            return await self._shared(texts, timeout)
        started = asyncio.get_running_loop().time()
        chunked = len(texts) > self._chunk_rows
        work = self._call_in_chunks(texts, deadline) if chunked else self._call(texts, timeout)
        return await self._recorded(work, caller_bound=timeout < self._timeout_s, started=started)

    async def _recorded(
        self, work: Awaitable[list[Prediction]], *, caller_bound: bool, started: float
    ) -> list[Prediction]:
        """`work`, one hop call (or one chunked escalation) as the breaker and the latency window count it."""
        try:
            predictions = await work
        except TierDeadlineError:
            # Slow against its own timeout is the tier's fault; against a caller's tighter deadline it is not.
            self.breaker.record(caller_bound)
            raise
        except TierUnavailableError:
            self.breaker.record(False)
            raise
        except BaseException:
            self.breaker.record(True)  # cancelled by the caller: says nothing about the tier
            raise
        self.breaker.record(True)
        self._latencies.append(asyncio.get_running_loop().time() - started)
        return predictions

    async def _shared(self, texts: Sequence[Row], timeout: float) -> list[Prediction]:
        """`texts` in a sealed call shared with concurrent requests; this caller waits `timeout` and no longer,
        while the call goes on for the others."""
        assert self._batcher is not None
        now = asyncio.get_running_loop().time()
        caller = _Caller(now + timeout, timeout < self._timeout_s, REQUEST_ID.get(), now)
        try:
            return await asyncio.wait_for(
                self._batcher.submit([_Row(text, caller) for text in texts], caller.expires), timeout
            )
        except TimeoutError:
            raise TierDeadlineError(f"cloud tier did not answer within {timeout:.3f}s") from None

    async def _run_shared(self, rows: list[_Row]) -> list[Prediction]:
        """One sealed call for the rows the batcher gathered: its timeout is the latest its callers wait."""
        callers = list(dict.fromkeys(row.caller for row in rows))
        latest = max(callers, key=lambda caller: caller.expires)
        timeout = latest.expires - asyncio.get_running_loop().time()
        if timeout < MIN_CALL_BUDGET_S:
            raise TierDeadlineError("no time left in the callers' deadlines to reach the cloud tier")
        work = self._call([row.text for row in rows], timeout, [caller.request_id for caller in callers])
        # The latency a caller sees: from the first one queued to the answer.
        started = min(caller.queued_at for caller in callers)
        return await self._recorded(work, caller_bound=latest.caller_bound, started=started)

    async def _call_in_chunks(self, texts: Sequence[Row], deadline: float | None) -> list[Prediction]:
        """A large escalation as sealed calls of at most `chunk_rows` rows, CHUNKS_IN_FLIGHT at a time, answers
        in order. The first failure fails it all and cancels the calls still running or waiting."""
        gate = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

        async def one(chunk: Sequence[Row]) -> list[Prediction]:
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

    async def _call(
        self, texts: Sequence[Row], timeout: float, request_ids: Sequence[str] | None = None
    ) -> list[Prediction]:
        """One sealed call; `request_ids`: the gateway requests whose rows it carries (default: the current)."""
        hop_id = uuid.uuid4().hex
        ids = list(request_ids) if request_ids else [REQUEST_ID.get()]
        # The gateway's request id rides sealed too, so one id joins both tiers' logs; the clear metadata stays
        # for tracing and for the cloud's records of envelopes it cannot open. A shared call carries the first
        # request's id; the others are named on its seal span and in the log.
        gateway_request_id = ids[0]
        if len(ids) > 1:
            logger.debug("hop call %s carries %d rows of %d requests: %s", hop_id, len(texts), len(ids), ids)
        self._metrics.hop_call_rows.labels(tier=self.name).observe(len(texts))
        self._metrics.hop_call_requests.labels(tier=self.name).observe(len(ids))
        plain = cloud_pb2.CloudInferRequest(model_name=self._model_name, gateway_request_id=gateway_request_id)
        pack_rows(plain, texts)
        with timed_span(self._tracer, "tiergate.seal", {"tiergate.tier": self.name}) as span:
            envelope = self._sealer.seal(plain, request_id=hop_id, direction="request")
            span.set_attributes(
                {
                    "tiergate.envelope.bytes": envelope.ByteSize(),
                    "tiergate.envelope.key_id": envelope.key_id,
                    "tiergate.hop.rows": len(texts),
                    "tiergate.hop.requests": len(ids),
                    "tiergate.hop.request_ids": ids[:MAX_NAMED_REQUESTS],
                }
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
            failed = _RowsRefused if error.code() in _ROW_FAULT_CODES else TierUnavailableError
            raise failed(f"cloud tier failed with {error.code().name}: {details}") from None
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
        # The watch runs on one replica of the tier. That replica going away (drained, restarted, its connection
        # aged out) says nothing of the others: a serving tier is only called down once a fresh watch, which
        # the channel sends to a replica that is SERVING, cannot find one either.
        recheck = False
        while True:
            down = ""
            call = health_pb2_grpc.HealthStub(self._channel).Watch(request)
            try:
                async for reply in call:
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        self._set_serving(True, "its health service says so")
                        backoff, recheck = HEALTH_RETRY_MIN_S, False
                        continue
                    down = "its health service says it is not serving"
                    break
                else:
                    down = "its health stream ended"
            except grpc.aio.AioRpcError as error:
                down = f"health watch failed with {error.code().name}"
            finally:
                call.cancel()
            if self._serving and not recheck:
                recheck = True
                await asyncio.sleep(HEALTH_RECHECK_S)
                continue
            self._set_serving(False, down)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, HEALTH_RETRY_MAX_S)

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()  # the requests queued are answered first
        watch, self._watch = self._watch, None
        await cancel_and_wait(watch)
        await self._channel.close()
        for task in list(self._retiring):
            await task
