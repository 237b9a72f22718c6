"""The cloud tier's gRPC servicer: open the sealed request, refuse stale or replayed ones, run the full model, seal
the answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable

import grpc
from opentelemetry import trace

from cloud_runtime.metrics import CloudMetrics
from cloud_runtime.model import CloudModel
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tiergate.admission import Admission
from tiergate.audit import audit_detail
from tiergate.constants import REQUEST_ID_METADATA
from tiergate.envelope import Sealer
from tiergate.errors import InvalidInputError, ModelNotFoundError, RequestTooLargeError, SealError
from tiergate.logs import REQUEST_ID
from tiergate.replay import ReplayGuard
from tiergate.settings import LimitSettings, ReplaySettings
from tiergate.telemetry import annotate_server_span, timed_span

# Longest request id kept for logs and spans.
MAX_REQUEST_ID_CHARS = 128


class CloudInferenceServicer(cloud_pb2_grpc.CloudInferenceServicer):
    """Thin adapter over `CloudModel`; inference runs off the event loop."""

    def __init__(
        self,
        model: CloudModel,
        sealer: Sealer,
        *,
        model_name: str,
        model_version: str,
        limits: LimitSettings,
        tracer: trace.Tracer | None = None,
        metrics: CloudMetrics | None = None,
        replay: ReplaySettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`replay` sizes the freshness window and seen-set (defaults: `ReplaySettings()`); `clock` is the wall
        clock that window is measured on."""
        self._model = model
        self._sealer = sealer
        self._model_name = model_name
        self._tracer = tracer or trace.NoOpTracer()
        self._metrics = metrics or CloudMetrics()
        # (host, port) the server is bound to, for the server span's attributes.
        self.bound: tuple[str, int] = ("", 0)
        self._model_version = model_version
        self._limits = limits
        self.admission = Admission(limits.max_inflight_requests, limits.max_inflight_rows)
        self._guard = ReplayGuard(replay, clock=clock)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-model")

    def _check(self, request: cloud_pb2.CloudInferRequest) -> list[str]:
        if request.model_name != self._model_name:
            raise ModelNotFoundError(
                f"model {request.model_name!r} is not served here; this tier serves {self._model_name!r}"
            )
        texts = list(request.texts)
        if not texts:
            raise InvalidInputError("the request holds no rows")
        if len(texts) > self._limits.max_batch_rows:
            raise RequestTooLargeError(f"{len(texts)} rows exceed the limit of {self._limits.max_batch_rows}")
        return texts

    def _predict(self, texts: list[str]) -> cloud_pb2.CloudInferResponse:
        scored = self._model.predict(texts)
        labels = self._model.labels
        return cloud_pb2.CloudInferResponse(
            model_version=self._model_version,
            predictions=[
                cloud_pb2.CloudPrediction(label=labels[int(i)], signal=float(s), probability=float(p))
                for i, p, s in zip(scored.label_index, scored.probability, scored.signal, strict=True)
            ],
        )

    async def Infer(
        self, request: cloud_pb2.Envelope, context: grpc.aio.ServicerContext[cloud_pb2.Envelope, cloud_pb2.Envelope]
    ) -> cloud_pb2.Envelope:
        started = time.perf_counter()
        metadata = dict(context.invocation_metadata() or ())
        # The clear metadata names the request until the envelope is open; then the sealed id replaces it.
        request_id = str(metadata.get(REQUEST_ID_METADATA, "-"))[:MAX_REQUEST_ID_CHARS]
        REQUEST_ID.set(request_id)
        server_span = annotate_server_span(context, *self.bound)
        server_span.set_attribute("tiergate.request_id", request_id)
        audit_detail(key_id=request.key_id[:64])
        try:
            with timed_span(self._tracer, "tiergate.open", {"tiergate.envelope.bytes": request.ByteSize()}):
                # Authenticate first, then freshness and replay: a forged envelope fails here and is never
                # remembered, so forgeries cannot fill the replay cache or evict genuine entries.
                plain = self._sealer.open(request, cloud_pb2.CloudInferRequest, direction="request")
                # Every opened envelope is remembered, answered or not. A gateway retry resends the identical
                # envelope; the channel retries UNAVAILABLE only, which normally comes before this servicer runs.
                # If an attempt did get here (its answer then lost on the way back, say), the retry is refused
                # as replayed: UNAUTHENTICATED, not retried, the gateway answers those rows from the edge. The
                # model never runs one sealed request twice; a lost answer costs one degraded response.
                self._guard.check(request)
        except SealError as error:
            self._metrics.envelope_rejections.labels(cause=error.cause).inc()
            raise
        if plain.gateway_request_id:
            request_id = plain.gateway_request_id[:MAX_REQUEST_ID_CHARS]
            REQUEST_ID.set(request_id)
            server_span.set_attribute("tiergate.request_id", request_id)
        texts = self._check(plain)
        audit_detail(rows=len(texts))
        loop = asyncio.get_running_loop()
        self._metrics.batch_rows.labels(model=self._model_name).observe(len(texts))
        with (
            self.admission.admit(len(texts)),
            self._tracer.start_as_current_span(
                "tiergate.cloud.infer", attributes={"tiergate.tier": "cloud", "tiergate.rows": len(texts)}
            ),
        ):
            response = await loop.run_in_executor(self._executor, self._predict, texts)
        with timed_span(self._tracer, "tiergate.seal") as span:
            sealed = self._sealer.seal(response, request_id=request.request_id, direction="response")
            span.set_attribute("tiergate.envelope.bytes", sealed.ByteSize())
        self._metrics.rows.labels(model=self._model_name).inc(len(texts))
        self._metrics.request_seconds.labels(model=self._model_name).observe(time.perf_counter() - started)
        return sealed

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._model.close()
