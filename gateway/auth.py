"""Who is calling: bearer tokens (or mTLS subjects) checked on every RPC, and the model permission of each client.

The interceptor authenticates before any handler runs and puts the client in a context variable;
the servicer asks `authorize(model)` where a model is named. A missing, unknown or malformed
credential is UNAUTHENTICATED and a model outside the client's list PERMISSION_DENIED; no message
says whether a token exists.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, cast

import grpc

from tiergate.errors import AuthenticationError, PermissionDeniedError
from tiergate.rpc import status_for
from tiergate.settings import AuthSettings

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_PREFIX = "grpc.reflection."
_BEARER = "bearer"
# The longest authorization value read at all; tokens are 43 characters.
_MAX_AUTHORIZATION = 512

NO_TOKEN = (
    "this endpoint needs a client token: send metadata 'authorization: Bearer <token>' "
    "(an operator issues one with `tiergate tokens add NAME --models MODEL`)"
)
BAD_TOKEN = "the client token was not accepted; ask the operator for a valid one (`tiergate tokens add`)"
MALFORMED = "malformed authorization metadata: send exactly 'authorization: Bearer <token>'"


class Client(Protocol):
    """A known caller and the models it may call."""

    @property
    def name(self) -> str: ...

    def may_call(self, model: str) -> bool: ...


class Directory(Protocol):
    """Where clients are looked up: by token, and by the name their mTLS certificate carries."""

    def authenticate(self, token: str) -> Client | None: ...

    def get(self, name: str) -> Client | None: ...


CLIENT: contextvars.ContextVar[Client | None] = contextvars.ContextVar("tiergate_client", default=None)


def current_client_name() -> str:
    """The authenticated caller's name, or "-" where authentication is off."""
    client = CLIENT.get()
    return "-" if client is None else client.name


def may_use(model: str) -> bool:
    """Whether the current client may call `model` (no client: auth is off, so yes)."""
    client = CLIENT.get()
    return client is None or client.may_call(model)


def authorize(model: str) -> None:
    """Raise PermissionDeniedError unless the current client may call `model` (no client: auth is off)."""
    client = CLIENT.get()
    if client is not None and not client.may_call(model):
        raise PermissionDeniedError(
            f"client {client.name!r} may not call model {model!r}; ask the operator to add it to the client's models"
        )


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` entry; None when there is none; malformed raises."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        return None
    if len(values) != 1 or not isinstance(values[0], str) or len(values[0]) > _MAX_AUTHORIZATION:
        raise AuthenticationError(MALFORMED)
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != _BEARER or not token or any(c.isspace() for c in token):
        raise AuthenticationError(MALFORMED)
    return token


def certificate_name(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The common name of the client's verified TLS certificate, if the connection has one."""
    names = list(context.auth_context().get("x509_common_name") or [])
    return names[0].decode("utf-8", "replace") if names else None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every RPC (health and reflection exempt unless settings say otherwise)."""

    def __init__(self, settings: AuthSettings, directory: Callable[[], Directory]) -> None:
        """`directory` returns the current client directory (it may be reloaded between calls)."""
        self._settings = settings
        self._directory = directory

    def _exempt(self, method: str) -> bool:
        service = method.lstrip("/").split("/", 1)[0]
        if service == HEALTH_SERVICE:
            return self._settings.exempt_health
        if service.startswith(REFLECTION_PREFIX):
            return self._settings.exempt_reflection
        return False

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Client:
        """The calling client, from its token or (if allowed) its certificate; raises AuthenticationError."""
        directory = self._directory()
        token = bearer_token(context.invocation_metadata())
        if token is not None:
            client = directory.authenticate(token)
            if client is None:
                raise AuthenticationError(BAD_TOKEN)
            return client
        if self._settings.allow_cert_subjects:
            name = certificate_name(context)
            client = directory.get(name) if name else None
            if client is not None:
                return client
        raise AuthenticationError(NO_TOKEN)

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> contextvars.Token[Client | None]:
        try:
            client = self.identify(context)
        except AuthenticationError as error:
            code, message = status_for(error)
            await context.abort(code, message)
        return CLIENT.set(client)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or self._exempt(handler_call_details.method):
            return handler
        return self._wrap(handler)

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        # One wrapper per handler shape: health's Watch streams, reflection is bidirectional.
        check = self._check
        deserializer, serializer = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            unary = cast(Callable[..., Any], handler.unary_unary)

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                token = await check(context)
                try:
                    return await unary(request, context)
                finally:
                    CLIENT.reset(token)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
        if handler.unary_stream is not None:
            unary_stream_behaviour = cast(Callable[..., Any], handler.unary_stream)

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                token = await check(context)
                try:
                    async for reply in unary_stream_behaviour(request, context):
                        yield reply
                finally:
                    CLIENT.reset(token)

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)
        if handler.stream_unary is not None:
            stream_unary_behaviour = cast(Callable[..., Any], handler.stream_unary)

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                token = await check(context)
                try:
                    return await stream_unary_behaviour(requests, context)
                finally:
                    CLIENT.reset(token)

            return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
        assert handler.stream_stream is not None
        stream_stream_behaviour = cast(Callable[..., Any], handler.stream_stream)

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            token = await check(context)
            try:
                async for reply in stream_stream_behaviour(requests, context):
                    yield reply
            finally:
                CLIENT.reset(token)

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)
