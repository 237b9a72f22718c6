"""One status table: every error class maps to its gRPC code, and anything unexpected to a generic INTERNAL."""

from __future__ import annotations

import grpc
import pytest

from tiergate import errors
from tiergate.rpc import INTERNAL_MESSAGE, status_for


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidInputError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFoundError("bad"), grpc.StatusCode.NOT_FOUND),
        (errors.RequestTooLargeError("bad"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.OverloadedError("bad"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.NotReadyError("bad"), grpc.StatusCode.UNAVAILABLE),
        (errors.TierUnavailableError("bad"), grpc.StatusCode.UNAVAILABLE),
        (errors.TierDeadlineError("bad"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.SealError("bad"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.ReplayCacheFullError("bad"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.AuthenticationError("bad"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDeniedError("bad"), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_error_classes_map_to_codes(error: errors.TiergateError, code: grpc.StatusCode) -> None:
    assert status_for(error) == (code, "bad")


def test_unexpected_errors_hide_internals() -> None:
    assert status_for(KeyError("/secret/path")) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert status_for(errors.TiergateError("base")) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


def test_every_error_class_has_a_row() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.TiergateError)]
    missing = [
        c.__name__
        for c in classes
        if c is not errors.TiergateError and status_for(c("x"))[0] is grpc.StatusCode.INTERNAL
    ]
    assert not missing
