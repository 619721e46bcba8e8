"""Domain errors of the server.

Every error a caller can cause is a ``LayergradError`` subclass carrying the
gRPC status it maps to (by name, so this module needs no grpc), a stable
machine-readable ``reason`` and, where one request field is at fault, that
field's path (``loss.class_score.classes``), when retrying later may work, a
retry delay, and optional string ``metadata`` for the ErrorInfo detail
(machine-readable values a client may act on, such as a needed size).
``status.py`` turns them into gRPC statuses with google.rpc details;
anything else becomes INTERNAL.
"""

from __future__ import annotations

from collections.abc import Mapping

# Longest part of a caller's string that an error message repeats.
SHOWN_CHARS = 64


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """``value`` quoted for an error message; a long one cut, with its length, so that a status
    never grows with what the caller sent."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class LayergradError(Exception):
    """Base class; ``status`` is the gRPC status code name."""

    status = "INTERNAL"
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        reason: str | None = None,
        retry_after: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.reason = reason or self.default_reason
        self.retry_after = retry_after
        self.metadata = dict(metadata or {})


class InvalidArgument(LayergradError):
    """The request is malformed or names something that does not exist."""

    status = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"


class NotFound(LayergradError):
    """Something the request names outside the model (a shared memory segment) does not exist."""

    status = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class ResultTooLarge(LayergradError):
    """The result exceeds the unary response cap; the stream must be used."""

    status = "RESOURCE_EXHAUSTED"
    default_reason = "RESULT_TOO_LARGE"


class FailedPrecondition(LayergradError):
    """The server is not set up for this call (a feature that is turned off)."""

    status = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class OutOfRange(LayergradError):
    """A computed value lies outside what the requested output type can hold."""

    status = "OUT_OF_RANGE"
    default_reason = "OUT_OF_RANGE"


class Overloaded(LayergradError):
    """Every compute slot and queue place is taken; ``retry_after`` says when to retry."""

    status = "RESOURCE_EXHAUSTED"
    default_reason = "OVERLOADED"


class DeadlineExceeded(LayergradError):
    """The call's deadline passed, or cannot be met, before its result was ready."""

    status = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(LayergradError):
    """The caller went away; the call's work was stopped."""

    status = "CANCELLED"
    default_reason = "CANCELLED"


class Unauthenticated(LayergradError):
    """The call carries no valid bearer token."""

    status = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(LayergradError):
    """The caller's token lacks a scope the call needs."""

    status = "PERMISSION_DENIED"
    default_reason = "MISSING_SCOPE"


class Unavailable(LayergradError):
    """The server cannot take the call now (starting up or shutting down)."""

    status = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"


def names_hint(kind: str, valid: list[str] | tuple[str, ...]) -> str:
    """A sentence listing the valid names of ``kind``."""
    return f"valid {kind}: {', '.join(valid)}"
