"""gRPC plumbing both servers share: status table, error and audit interceptors, per-message streams, lifecycle."""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, NoReturn, Protocol, TypeVar, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tiergate import errors
from tiergate.audit import AUDIT_DETAILS
from tiergate.logs import NO_REQUEST_ID, REQUEST_ID

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
UNDECODABLE_MESSAGE = (
    "the request is not a valid message for this method: it does not parse (truncated, a wrong wire type, or "
    "invalid UTF-8 in a string field)"
)


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


# A stream answered message by message: each request gets exactly one response, in order, and a request that
# fails gets a response saying so while the stream carries on (OIP's ModelStreamInfer). Interceptors wrap the
# whole stream, so to act per message they register a hook on the stream's context (each RPC runs in a task
# of its own, and async generators share their caller's context): `answer_each` calls every hook as a message
# arrives, and the finisher the hook returns with that message's status code once it is answered.
MessageFinisher = Callable[[grpc.StatusCode], None]
MessageHook = Callable[[], MessageFinisher]
_MESSAGE_HOOKS: contextvars.ContextVar[tuple[MessageHook, ...]] = contextvars.ContextVar(
    "tiergate_message_hooks", default=()
)
# Set while a stream is answered message by message: an undecodable message is then answered, not fatal.
_ANSWERS_EACH: contextvars.ContextVar[bool] = contextvars.ContextVar("tiergate_answers_each", default=False)
# The longest per-message request id: the cloud keeps this many characters of an id.
_MAX_MESSAGE_ID = 128

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


def add_message_hook(hook: MessageHook) -> None:
    """Have `hook` called for each message of the current stream, if the handler answers message by message."""
    _MESSAGE_HOOKS.set((*_MESSAGE_HOOKS.get(), hook))


def message_id(stream_id: str, number: int) -> str:
    """The request id of message `number` (from 1) of stream `stream_id`: `<stream id>.<number>`."""
    suffix = f".{number}"
    return stream_id[: _MAX_MESSAGE_ID - len(suffix)] + suffix


async def answer_each(
    requests: AsyncIterable[Any],
    answer: Callable[[_Request], Awaitable[_Response]],
    refusal: Callable[[grpc.StatusCode, str], _Response],
) -> AsyncIterator[_Response]:
    """Answer each request of a stream in turn with `answer`; one that fails (or did not parse) is answered
    with `refusal(code, message)`, its status from STATUS_TABLE, and the stream goes on.

    Each message gets its own request id, `<stream id>.<n>` (the stream's is the current REQUEST_ID).
    Sequential on purpose: responses keep the order of requests without any reordering buffer, and one
    stream holds at most one admission slot; a client wanting parallelism opens more streams.
    """
    _ANSWERS_EACH.set(True)
    stream_id = REQUEST_ID.get()
    if stream_id == NO_REQUEST_ID:
        stream_id = uuid.uuid4().hex
    number = 0
    async for request in requests:
        number += 1
        REQUEST_ID.set(message_id(stream_id, number))
        finishers = [hook() for hook in _MESSAGE_HOOKS.get()]
        code = grpc.StatusCode.OK
        try:
            if request is UNDECODABLE:
                raise errors.InvalidInputError(UNDECODABLE_MESSAGE)
            response = await answer(cast(_Request, request))
        except (grpc.aio.AbortError, asyncio.CancelledError):
            # An abort or a cancellation ends the whole stream; the stream's wrappers record it.
            raise
        except Exception as error:
            code, message = status_for(error)
            if code is grpc.StatusCode.INTERNAL:
                logger.exception("unexpected error answering message %d of a stream", number)
            else:
                logger.debug("streamed message %d -> %s: %s", number, code.name, message)
            response = refusal(code, message)
        for finish in reversed(finishers):
            finish(code)
        yield response
    REQUEST_ID.set(stream_id)


async def _checked(requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
    """The requests of a stream; an undecodable one ends a stream not answered message by message, with a
    clear INVALID_ARGUMENT rather than whatever the handler makes of the placeholder."""
    async for request in requests:
        if request is UNDECODABLE and not _ANSWERS_EACH.get():
            raise errors.InvalidInputError(UNDECODABLE_MESSAGE)
        yield request


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions raised by unary and bidirectional handlers into statuses from STATUS_TABLE.

    `on_error(method, code_name)` is told of each one (the servers count them in their metrics), and of each
    message of a stream answered with an error by `answer_each`. Other handler shapes pass through untouched.
    """

    def __init__(self, on_error: Callable[[str, str], None] | None = None) -> None:
        self._on_error = on_error

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        deserializer = _tolerant(handler.request_deserializer)
        # One wrapper per handler shape; an aio server's behaviours take the aio context.
        if handler.unary_unary is not None:
            unary = cast(Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]], handler.unary_unary)

            async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    if request is UNDECODABLE:
                        raise errors.InvalidInputError(UNDECODABLE_MESSAGE)
                    return await unary(request, context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as error:
                    await self._abort(method, error, context)

            return grpc.unary_unary_rpc_method_handler(guarded, deserializer, handler.response_serializer)
        if handler.stream_stream is not None:
            stream = cast(
                Callable[[AsyncIterator[Any], grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]],
                handler.stream_stream,
            )
            count = self._count_messages(method)

            async def guarded_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                add_message_hook(count)
                try:
                    async for response in stream(_checked(requests), context):
                        yield response
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as error:
                    await self._abort(method, error, context)

            return grpc.stream_stream_rpc_method_handler(guarded_stream, deserializer, handler.response_serializer)
        return handler

    def _count_messages(self, method: str) -> MessageHook:
        """A message hook telling `on_error` of each message answered with an error."""
        on_error, name = self._on_error, method.rpartition("/")[2]

        def finisher(code: grpc.StatusCode) -> None:
            if code is not grpc.StatusCode.OK and on_error is not None:
                on_error(name, code.name)

        return lambda: finisher

    async def _abort(self, method: str, error: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        code, message = status_for(error)
        if self._on_error is not None:
            self._on_error(method.rpartition("/")[2], code.name)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("unexpected error in %s", method, exc_info=error)
        else:
            logger.debug("%s -> %s: %s", method, code.name, message)
        await context.abort(code, message)


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
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        """`interceptors` run outside the error interceptor, so a tracing interceptor sees the status each
        exception was mapped to; `inner_interceptors` (authentication) run inside it. `credentials`: TLS.
        `options`: further channel arguments of the server (connection ageing, say)."""
        self.server = grpc.aio.server(
            interceptors=[*interceptors, ErrorInterceptor(on_error), *inner_interceptors],
            options=[*server_options(max_message_bytes), *options],
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

    A bidirectional stream answered message by message (`answer_each`) gets one line per message instead,
    each with its own request id (`<stream id>.<n>`) and status, plus one line for the stream itself when it
    ends other than OK (refused, cancelled, failed), with `messages`: how many it answered. Any other stream
    gets one line for the stream. It runs inside the error interceptor and outside authentication, so
    refused calls are audited too. `request_id(context)` names each call; the id is also put where logs and
    the handler find it.
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
        name = handler_call_details.method.rpartition("/")[2]
        if handler is None or name not in self._methods:
            return handler
        write, request_id = self._write, self._request_id
        deserializer, serializer = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            unary = cast(Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]], handler.unary_unary)

            async def audited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started = time.perf_counter()
                REQUEST_ID.set(request_id(context))
                details: dict[str, Any] = {}
                AUDIT_DETAILS.set(details)
                code = grpc.StatusCode.OK
                try:
                    return await unary(request, context)
                except BaseException as error:
                    code = _failed_code(error, context)
                    raise
                finally:
                    write(name, REQUEST_ID.get(), details, code, started)

            return grpc.unary_unary_rpc_method_handler(audited, deserializer, serializer)
        if handler.stream_stream is not None:
            stream = cast(
                Callable[[AsyncIterator[Any], grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]],
                handler.stream_stream,
            )

            async def audited_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                started = time.perf_counter()
                stream_id = request_id(context)
                REQUEST_ID.set(stream_id)
                details: dict[str, Any] = {}
                AUDIT_DETAILS.set(details)
                answered = 0

                def message() -> MessageFinisher:
                    message_started = time.perf_counter()
                    message_details: dict[str, Any] = {}
                    AUDIT_DETAILS.set(message_details)

                    def finish(code: grpc.StatusCode) -> None:
                        nonlocal answered
                        answered += 1
                        write(name, REQUEST_ID.get(), message_details, code, message_started)

                    return finish

                add_message_hook(message)
                code = grpc.StatusCode.OK
                try:
                    async for response in stream(requests, context):
                        yield response
                except BaseException as error:
                    code = _failed_code(error, context)
                    raise
                finally:
                    # Messages answered one by one have their lines; the stream has one of its own when it
                    # says more than they do (it failed, or no message was answered on its own).
                    if code is not grpc.StatusCode.OK or answered == 0:
                        write(name, stream_id, {**details, "messages": answered}, code, started)

            return grpc.stream_stream_rpc_method_handler(audited_stream, deserializer, serializer)
        return handler

    def _write(
        self, method: str, request_id: str, details: Mapping[str, Any], code: grpc.StatusCode, started: float
    ) -> None:
        record = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "method": method,
            **details,
            "status": code.name,
            "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
        }
        try:
            self._sink.write(record)
        except Exception:
            # An audit line that cannot be written is an operator's problem, not the caller's.
            logger.exception("audit line for %s could not be written", method)


def _failed_code(error: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The status a call ends with when its handler raised `error`."""
    if isinstance(error, grpc.aio.AbortError):
        return _aborted_code(context)
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    if isinstance(error, Exception):
        return status_for(error)[0]
    return grpc.StatusCode.UNKNOWN


def _aborted_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code: object = context.code()  # an int in some grpcio versions
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
