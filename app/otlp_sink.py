"""A small OTLP/gRPC trace sink that keeps what is exported to it: the tests' collector and `make bench`'s."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

_T = TypeVar("_T")


def _value(any_value: common_pb2.AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    return None if kind is None else getattr(any_value, kind)


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened: its service, ids, name, kind, status, attributes and resource."""

    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    status_code: int
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        # Appended on the sink's loop, read from whichever thread asks.
        self._lock = threading.Lock()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                received.extend(
                    ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=span.kind,
                        status_code=span.status.code,
                        attributes={kv.key: _value(kv.value) for kv in span.attributes},
                        resource=resource,
                    )
                    for span in scope_spans.spans
                )
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An aio gRPC server on 127.0.0.1:0 that keeps every span exported to it; runs on the caller's loop."""

    def __init__(self) -> None:
        self._collector = _Collector()
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self._collector, self._server)
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        return self._collector.spans

    async def start(self) -> None:
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop(0)

    async def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 10.0
    ) -> list[ReceivedSpan]:
        """Poll (bounded) until `predicate(spans)` holds; returns the spans then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate(self.spans):
            if loop.time() > deadline:
                raise AssertionError(f"spans did not arrive within {timeout_s}s; have {[s.name for s in self.spans]}")
            await asyncio.sleep(0.02)
        return self.spans


class OtlpSink:
    """An `OtlpReceiver` on its own event loop in a background thread, for synchronous callers.

    A context manager: the receiver listens from `__enter__` until `__exit__`, whatever event loops
    the caller runs (and closes) in between; the spans stay readable after it stops.
    """

    def __init__(self, timeout_s: float = 10.0) -> None:
        self._timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="otlp-sink", daemon=True)
        self._receiver: OtlpReceiver | None = None

    @property
    def endpoint(self) -> str:
        return self._running().endpoint

    @property
    def spans(self) -> list[ReceivedSpan]:
        return self._running().spans

    def _running(self) -> OtlpReceiver:
        if self._receiver is None:
            raise RuntimeError("the OTLP sink is not started; use it as a context manager")
        return self._receiver

    async def _start(self) -> OtlpReceiver:
        # Built on the sink's loop: an aio server belongs to the loop it is created on.
        receiver = OtlpReceiver()
        await receiver.start()
        return receiver

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(self._timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"the OTLP sink did not answer within {self._timeout_s}s") from None

    def __enter__(self) -> OtlpSink:
        self._thread.start()
        try:
            self._receiver = self._call(self._start())
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._receiver is not None:
                self._call(self._receiver.stop())
        finally:
            self._close()

    def _close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self._timeout_s)
        if not self._thread.is_alive():
            self._loop.close()
