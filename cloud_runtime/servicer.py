"""The cloud tier's gRPC servicer: open the sealed request, refuse stale or replayed ones, run the full model the
request names (or relay it to the upstream server), seal the answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from cloud_runtime.metrics import CloudMetrics
from cloud_runtime.model import CloudModel
from cloud_runtime.upstream import UpstreamModel
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tiergate.admission import Admission
from tiergate.audit import audit_detail
from tiergate.constants import REQUEST_ID_METADATA
from tiergate.envelope import Sealer
from tiergate.errors import InvalidInputError, ModelNotFoundError, RequestTooLargeError, SealError
from tiergate.hop_rows import unpack_rows
from tiergate.inputs import Row
from tiergate.logs import REQUEST_ID
from tiergate.manifest import TEXT_INPUT, InputSpec
from tiergate.replay import ReplayGuard
from tiergate.scoring import Scored
from tiergate.settings import LimitSettings, ReplaySettings
from tiergate.telemetry import annotate_server_span, timed_span

# Longest request id kept for logs and spans.
MAX_REQUEST_ID_CHARS = 128


@dataclass
class CloudServed:
    """One model the cloud tier answers: its ONNX model (or the upstream that answers for it), its version and
    the input it takes."""

    model: CloudModel | UpstreamModel
    version: str
    input: InputSpec = TEXT_INPUT


class CloudInferenceServicer(cloud_pb2_grpc.CloudInferenceServicer):
    """Thin adapter over the served models; ONNX inference runs off the event loop, upstream calls on it."""

    def __init__(
        self,
        models: Mapping[str, CloudServed],
        sealer: Sealer,
        *,
        limits: LimitSettings,
        tracer: trace.Tracer | None = None,
        metrics: CloudMetrics | None = None,
        replay: ReplaySettings | None = None,
        clock: Callable[[], float] = time.time,
        chunk_rows: int = 32,
    ) -> None:
        """`models`: by name, what this tier serves. `replay` sizes the freshness window and seen-set (defaults:
        `ReplaySettings()`); `clock` is the wall clock that window is measured on."""
        if not models:
            raise ValueError("the cloud tier serves no model")
        self._models = dict(models)
        self._sealer = sealer
        self._tracer = tracer or trace.NoOpTracer()
        self._metrics = metrics or CloudMetrics()
        # (host, port) the server is bound to, for the server span's attributes.
        self.bound: tuple[str, int] = ("", 0)
        self._limits = limits
        self.admission = Admission(limits.max_inflight_requests, limits.max_inflight_rows)
        self._metrics.inflight_requests.set_function(lambda: self.admission.requests)
        self._metrics.inflight_rows.set_function(lambda: self.admission.rows)
        self._guard = ReplayGuard(replay, clock=clock)
        if chunk_rows < 1:
            raise ValueError(f"model_chunk_rows must be at least 1, got {chunk_rows}")
        self._chunk_rows = chunk_rows
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-model")

    def _check(self, request: cloud_pb2.CloudInferRequest) -> tuple[CloudServed, list[Row]]:
        served = self._models.get(request.model_name)
        if served is None:
            raise ModelNotFoundError(
                f"model {request.model_name!r} is not served here; this tier serves {', '.join(sorted(self._models))}"
            )
        texts = unpack_rows(request, served.input)
        if not texts:
            raise InvalidInputError("the request holds no rows")
        if len(texts) > self._limits.max_batch_rows:
            raise RequestTooLargeError(f"{len(texts)} rows exceed the limit of {self._limits.max_batch_rows}")
        return served, texts

    @staticmethod
    def _predictions(scored: Scored, labels: list[str]) -> list[cloud_pb2.CloudPrediction]:
        return [
            cloud_pb2.CloudPrediction(label=labels[int(i)], signal=float(s), probability=float(p))
            for i, p, s in zip(scored.label_index, scored.probability, scored.signal, strict=True)
        ]

    @classmethod
    def _predict(cls, model: CloudModel, texts: list[Row]) -> list[cloud_pb2.CloudPrediction]:
        return cls._predictions(model.predict(texts), model.labels)

    async def _run_model(
        self,
        name: str,
        served: CloudServed,
        texts: list[Row],
        context: grpc.aio.ServicerContext[cloud_pb2.Envelope, cloud_pb2.Envelope],
    ) -> cloud_pb2.CloudInferResponse:
        """The model over `texts`, a chunk at a time off the event loop, stopping as soon as the caller is gone.

        Chunks of concurrent requests take turns on the one model thread. A caller that cancels (or whose
        deadline passes) cancels this coroutine: the chunk running finishes, the rest is never computed. Every
        chunk runs on the model version the request started with.
        """
        loop = asyncio.get_running_loop()
        model, version = served.model, served.version
        predictions: list[cloud_pb2.CloudPrediction] = []
        try:
            for start in range(0, len(texts), self._chunk_rows):
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise asyncio.CancelledError  # the caller has given up: its answer would be thrown away
                chunk = texts[start : start + self._chunk_rows]
                self._metrics.batch_rows.labels(model=name).observe(len(chunk))
                if isinstance(model, UpstreamModel):
                    scored = await model.predict(chunk, timeout=remaining)
                    predictions.extend(self._predictions(scored, model.labels))
                else:
                    predictions.extend(await loop.run_in_executor(self._executor, self._predict, model, chunk))
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            reason = "deadline" if remaining is not None and remaining <= 0 else "cancelled"
            self._metrics.rows_dropped.labels(model=name, reason=reason).inc(len(texts) - len(predictions))
            raise
        return cloud_pb2.CloudInferResponse(model_version=version, predictions=predictions)

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
        served, texts = self._check(plain)
        name = plain.model_name
        audit_detail(model=name, rows=len(texts))
        with (
            self.admission.admit(len(texts)),
            self._tracer.start_as_current_span(
                "tiergate.cloud.infer", attributes={"tiergate.tier": "cloud", "tiergate.rows": len(texts)}
            ),
        ):
            response = await self._run_model(name, served, texts, context)
        with timed_span(self._tracer, "tiergate.seal") as span:
            sealed = self._sealer.seal(response, request_id=request.request_id, direction="response")
            span.set_attribute("tiergate.envelope.bytes", sealed.ByteSize())
        self._metrics.rows.labels(model=name).inc(len(texts))
        self._metrics.request_seconds.labels(model=name).observe(time.perf_counter() - started)
        return sealed

    @property
    def models(self) -> dict[str, CloudServed]:
        return dict(self._models)

    def _only(self, name: str | None) -> str:
        return name if name is not None else next(iter(self._models))

    @property
    def model(self) -> CloudModel | UpstreamModel:
        """The first model's (the only one's, on a single-model tier)."""
        return self._models[self._only(None)].model

    @property
    def model_version(self) -> str:
        return self._models[self._only(None)].version

    def use_model(self, model: CloudModel | UpstreamModel, version: str, name: str | None = None) -> CloudServed:
        """Answer new requests for model `name` (default: the first) with `model` at `version`; returns what
        served before, for its owner to close once the chunks already running on it are done. One assignment:
        a request sees the old entry or the new."""
        key = self._only(name)
        old = self._models[key]
        self._models[key] = CloudServed(model, version, old.input)
        return old

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for served in self._models.values():
            if not isinstance(served.model, UpstreamModel):
                served.model.close()
