"""gRPC plumbing both servers share: status table, error interceptor, health, reflection and lifecycle."""

from __future__ import annotations

import asyncio
import datetime
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, Protocol, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tiergate import errors
from tiergate.audit import AUDIT_DETAILS
from tiergate.logs import REQUEST_ID

logger = logging.getLogger(__name__)

# The one status table. Looked up along the exception's MRO, so subclasses inherit their parent's code.
STATUS_TABLE: dict[type[errors.TiergateError], grpc.StatusCode] = {
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.RequestTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ReplayCacheFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotReadyError: grpc.StatusCode.UNAVAILABLE,
    errors.TierUnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.TierDeadlineError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.SealError: grpc.StatusCode.UNAUTHENTICATED,
    errors.AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
}
INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for an exception."""
    for cls in type(error).__mro__:
        code = STATUS_TABLE.get(cls)
        if code is not None:
            return code, str(error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can refuse it with a status."""


UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer: bytes that do not parse become UNDECODABLE instead of grpcio's UNKNOWN."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return UNDECODABLE

    return deserialize


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions raised by unary handlers into statuses from STATUS_TABLE.

    `on_error(method, code_name)` is told of each one (the servers count them in their metrics).
    """

    def __init__(self, on_error: Callable[[str, str], None] | None = None) -> None:
        self._on_error = on_error

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        # An aio server's unary behaviours are coroutines taking the aio context.
        behavior = cast(Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]], handler.unary_unary)
        method = handler_call_details.method

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                if request is UNDECODABLE:
                    raise errors.InvalidInputError(
                        "the request is not a valid message for this method: it does not parse (truncated, a "
                        "wrong wire type, or invalid UTF-8 in a string field)"
                    )
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                raise
            except Exception as error:
                code, message = status_for(error)
                if self._on_error is not None:
                    self._on_error(method.rpartition("/")[2], code.name)
                if code is grpc.StatusCode.INTERNAL:
                    logger.exception("unexpected error in %s", method)
                else:
                    logger.debug("%s -> %s: %s", method, code.name, message)
                await context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


class ManagedServer:
    """An aio server with health and reflection registered and an explicit drain-then-stop lifecycle."""

    def __init__(
        self,
        register: Callable[[grpc.aio.Server], Iterable[str]],
        *,
        max_message_bytes: int,
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        inner_interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        on_error: Callable[[str, str], None] | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        """`interceptors` run outside the error interceptor, so a tracing interceptor sees the status each
        exception was mapped to; `inner_interceptors` (authentication) run inside it. `credentials`: TLS."""
        self.server = grpc.aio.server(
            interceptors=[*interceptors, ErrorInterceptor(on_error), *inner_interceptors],
            options=server_options(max_message_bytes),
        )
        self._credentials = credentials
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._services = list(register(self.server))
        names = [*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self.port = 0

    @property
    def secure(self) -> bool:
        return self._credentials is not None

    async def start(self, host: str, port: int) -> int:
        """Bind (with TLS when credentials were given), start and mark every service SERVING; returns the port."""
        address = f"{host}:{port}"
        if self._credentials is not None:
            self.port = self.server.add_secure_port(address, self._credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")
        await self.server.start()
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _set_all(self, status: int) -> None:
        await self.health.set("", status)
        for name in self._services:
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Health goes NOT_SERVING so balancers stop sending, then drain in-flight calls and stop."""
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)

    async def wait_for_signal(self) -> None:
        """Return once SIGTERM or SIGINT arrives; the caller then drains and stops."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("signal received: draining")


class AuditSink(Protocol):
    """Where audit records go (the hash-chained `tiergate.audit.AuditLog`)."""

    def write(self, record: Mapping[str, Any]) -> object: ...


class AuditInterceptor(grpc.aio.ServerInterceptor):
    """Writes one audit line per call of the audited methods: who, what, the status code and the latency.

    It runs inside the error interceptor and outside authentication, so refused calls are audited too.
    `request_id(context)` names each call; the id is also put where logs and the handler find it.
    """

    def __init__(
        self,
        sink: AuditSink,
        methods: Collection[str],
        request_id: Callable[[grpc.aio.ServicerContext[Any, Any]], str],
    ) -> None:
        self._sink = sink
        self._methods = frozenset(methods)
        self._request_id = request_id

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or method.rpartition("/")[2] not in self._methods:
            return handler
        behavior = cast(Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]], handler.unary_unary)
        sink, name, request_id = self._sink, method.rpartition("/")[2], self._request_id

        async def audited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            REQUEST_ID.set(request_id(context))
            details: dict[str, Any] = {}
            AUDIT_DETAILS.set(details)
            code = grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                code = status_for(error)[0]
                raise
            finally:
                record = {
                    "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
                    "request_id": REQUEST_ID.get(),
                    "method": name,
                    **details,
                    "status": code.name,
                    "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
                }
                try:
                    sink.write(record)
                except Exception:
                    # An audit line that cannot be written is an operator's problem, not the caller's.
                    logger.exception("audit line for %s could not be written", name)

        return grpc.unary_unary_rpc_method_handler(
            audited, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def _aborted_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code: object = context.code()  # an int in some grpcio versions
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
