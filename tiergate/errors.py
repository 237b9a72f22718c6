"""The one exception hierarchy of Tiergate; `tiergate.rpc` maps it to gRPC status codes."""

from __future__ import annotations


class TiergateError(Exception):
    """Base of every error Tiergate raises on purpose.

    The message is shown to the caller, so it must say what to change and must
    never carry payloads, keys or internal paths.
    """


class InvalidInputError(TiergateError):
    """The request is malformed: wrong inputs, datatype, shape or encoding."""


class ModelNotFoundError(TiergateError):
    """The request names a model or version this server does not serve."""


class RequestTooLargeError(TiergateError):
    """The request exceeds a configured size limit."""


class OverloadedError(TiergateError):
    """The server is saturated; the caller should back off and retry."""


class ReplayCacheFullError(OverloadedError):
    """The replay guard's seen-set is full of envelopes still inside the window; it refuses new ones rather
    than forget those early (which would let them be replayed)."""


class NotReadyError(TiergateError):
    """A model or server is not ready yet, or is draining."""


class AuthenticationError(TiergateError):
    """The caller did not prove who it is: no token, an unknown one, or malformed credentials."""


class PermissionDeniedError(TiergateError):
    """The caller is known but may not use what it asked for (a model outside its token's list)."""


class TierUnavailableError(TiergateError):
    """A downstream tier could not be reached or failed."""


class TierDeadlineError(TiergateError):
    """A downstream tier did not answer within the time left."""


class SealError(TiergateError):
    """An envelope was refused: unknown key, tampering, bad format, stale or replayed.

    `cause` is a short, bounded name for metrics and audit (`malformed`, `unknown_key_id`,
    `tampered`, `wrong_request_id`, `stale`, `replayed`); the message is the caller-facing sentence.
    """

    def __init__(self, message: str, cause: str = "malformed") -> None:
        super().__init__(message)
        self.cause = cause
