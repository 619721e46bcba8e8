"""Exceptions raised by the layergrad client.

Every failed call raises a subclass of :class:`LayergradError`, chosen by the
gRPC status code the server (or the gRPC runtime) returned::

    LayergradError                  base: .code, .message, .details, .reason, .field_violations,
                                          .request_id, .timings
    ├── Cancelled                   CANCELLED
    ├── Unknown                     UNKNOWN
    ├── InvalidArgument             INVALID_ARGUMENT    bad input, loss, layer or parameter name
    ├── DeadlineExceeded            DEADLINE_EXCEEDED   the call ran past, or could not meet, its timeout
    ├── NotFound                    NOT_FOUND
    ├── AlreadyExists               ALREADY_EXISTS
    ├── PermissionDenied            PERMISSION_DENIED   the token lacks a scope the call needs
    ├── ResourceExhausted           RESOURCE_EXHAUSTED  server overloaded (.retry_after), a unary
    │                                                   result over the cap, a request too large
    ├── FailedPrecondition          FAILED_PRECONDITION
    ├── Aborted                     ABORTED
    ├── OutOfRange                  OUT_OF_RANGE
    ├── Unimplemented               UNIMPLEMENTED
    ├── Internal                    INTERNAL
    ├── Unavailable                 UNAVAILABLE         server unreachable or shutting down
    ├── DataLoss                    DATA_LOSS           also raised locally for a malformed stream
    ├── Unauthenticated             UNAUTHENTICATED     missing or invalid bearer token
    └── ClientClosedError           the Client was used after close(); no RPC was made (.code is None)

The server attaches rich details (``google.rpc.BadRequest`` field violations,
``google.rpc.ErrorInfo`` with domain ``"layergrad.dev"`` and a reason string,
``google.rpc.RetryInfo`` when the server is overloaded)
in the ``grpc-status-details-bin`` trailer; :func:`from_grpc_error` decodes them
into :attr:`LayergradError.details`.

Local mistakes made before any RPC (an unsupported image type, a malformed
loss) raise the built-in :class:`TypeError` or :class:`ValueError` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from layergrad._calls import call_info

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "ClientClosedError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LayergradError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "exception_class_for_code",
    "from_grpc_error",
]

_STATUS_DETAILS_KEY = "grpc-status-details-bin"

# google.rpc detail messages decoded from the status trailer; others stay as Any.
_DETAIL_TYPES: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        error_details_pb2.BadRequest,
        error_details_pb2.ErrorInfo,
        error_details_pb2.RetryInfo,
        error_details_pb2.DebugInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.ResourceInfo,
        error_details_pb2.RequestInfo,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
    )
}


class LayergradError(Exception):
    """Base of every error the layergrad client raises.

    Attributes:
        code: the gRPC status code, or None for errors that involved no RPC.
        message: the server's error message (the gRPC status details string).
        details: the decoded ``google.rpc`` detail messages, for example
            ``error_details_pb2.BadRequest`` and ``error_details_pb2.ErrorInfo``;
            a detail of an unknown type is kept as a ``google.protobuf.Any``.
        request_id: the call's request id (the server's ``x-request-id``: the caller's own, or
            the one the server made), to find the call in the server's access log; None if
            the call never reached a layergrad server.
        timings: seconds the call spent in each phase on the server (``queue``, ``compute``,
            ``send``; the ``server-timing`` trailer), empty if the server sent none.
    """

    grpc_status_code: ClassVar[grpc.StatusCode | None] = None

    def __init__(
        self,
        message: str,
        *,
        details: Sequence[Message] = (),
        code: grpc.StatusCode | None = None,
        response: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: list[Message] = list(details)
        self.code: grpc.StatusCode | None = code if code is not None else self.grpc_status_code
        self.response = response
        self.request_id: str | None = None
        self.timings: dict[str, float] = {}

    def __str__(self) -> str:
        if self.code is None:
            return self.message
        return f"{self.code.name}: {self.message}"

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        """The first ``google.rpc.ErrorInfo`` detail, or None."""
        for detail in self.details:
            if isinstance(detail, error_details_pb2.ErrorInfo):
                return detail
        return None

    @property
    def reason(self) -> str | None:
        """``ErrorInfo.reason`` (a machine-readable cause such as ``"UNKNOWN_LAYER"``), or None."""
        info = self.error_info
        return info.reason if info is not None and info.reason else None

    @property
    def domain(self) -> str | None:
        """``ErrorInfo.domain`` (``"layergrad.dev"`` for the layergrad server), or None."""
        info = self.error_info
        return info.domain if info is not None and info.domain else None

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asks to wait before retrying (``google.rpc.RetryInfo``), or None."""
        for detail in self.details:
            if isinstance(detail, error_details_pb2.RetryInfo):
                return detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9
        return None

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """Every ``BadRequest`` field violation as a ``(field, description)`` pair."""
        return [
            (violation.field, violation.description)
            for detail in self.details
            if isinstance(detail, error_details_pb2.BadRequest)
            for violation in detail.field_violations
        ]


class Cancelled(LayergradError):
    """The call was cancelled, usually by the caller."""

    grpc_status_code = grpc.StatusCode.CANCELLED


class Unknown(LayergradError):
    """An error the server or runtime could not classify."""

    grpc_status_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(LayergradError):
    """The request was malformed: a bad input, loss, layer or parameter name."""

    grpc_status_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(LayergradError):
    """The call did not finish before its deadline."""

    grpc_status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(LayergradError):
    """A requested entity does not exist."""

    grpc_status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LayergradError):
    """The entity the call tried to create already exists."""

    grpc_status_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(LayergradError):
    """The caller may not run this call."""

    grpc_status_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(LayergradError):
    """A limit was hit: the server is overloaded (see ``retry_after``), the request is too large,
    or a result is over the unary response cap."""

    grpc_status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(LayergradError):
    """The server is not in a state that allows the call."""

    grpc_status_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(LayergradError):
    """The call was aborted, typically by a concurrency conflict."""

    grpc_status_code = grpc.StatusCode.ABORTED


class OutOfRange(LayergradError):
    """A value was past the valid range."""

    grpc_status_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(LayergradError):
    """The server does not implement the call."""

    grpc_status_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(LayergradError):
    """The server failed while running the call."""

    grpc_status_code = grpc.StatusCode.INTERNAL


class Unavailable(LayergradError):
    """The server could not be reached or is shutting down; retrying may help."""

    grpc_status_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(LayergradError):
    """Data was lost or corrupted, including a malformed gradient stream."""

    grpc_status_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(LayergradError):
    """The call lacked valid credentials."""

    grpc_status_code = grpc.StatusCode.UNAUTHENTICATED


class ClientClosedError(LayergradError, RuntimeError):
    """The :class:`~layergrad.Client` was used after ``close()``; no RPC was made."""


_CODE_TO_CLASS: dict[grpc.StatusCode, type[LayergradError]] = {
    cls.grpc_status_code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
    if cls.grpc_status_code is not None
}


def exception_class_for_code(code: grpc.StatusCode) -> type[LayergradError]:
    """The exception class for a gRPC status code (LayergradError for OK or an unknown code)."""
    return _CODE_TO_CLASS.get(code, LayergradError)


def from_grpc_error(rpc_error: grpc.RpcError) -> LayergradError:
    """Builds the typed exception for a failed gRPC call, with its rich details decoded.

    ``rpc_error`` is what a stub call or a response stream raised; it normally is
    also a ``grpc.Call`` with ``code()``, ``details()`` and ``trailing_metadata()``.
    """
    if not (hasattr(rpc_error, "code") and hasattr(rpc_error, "details")):
        return Unknown(str(rpc_error) or type(rpc_error).__name__, response=rpc_error)
    code = rpc_error.code()
    message = rpc_error.details() or ""
    details = _decode_details(_rich_status(rpc_error))
    error = exception_class_for_code(code)(message, details=details, code=code, response=rpc_error)
    error.request_id, error.timings = call_info(rpc_error)
    info = error.error_info
    if error.request_id is None and info is not None and info.metadata.get("request_id"):
        error.request_id = info.metadata["request_id"]
    return error


def _rich_status(call: Any) -> status_pb2.Status | None:
    """The google.rpc.Status carried in the call's trailer, or None."""
    try:
        return rpc_status.from_call(call)
    except ValueError:
        # The trailer disagrees with the call's code or message; keep its details anyway.
        return _status_from_trailer(call)
    except (DecodeError, AttributeError, TypeError):
        return None


def _status_from_trailer(call: Any) -> status_pb2.Status | None:
    for key, value in call.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY:
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def _decode_details(status: status_pb2.Status | None) -> list[Message]:
    if status is None:
        return []
    return [_unpack(detail) for detail in status.details]


def _unpack(detail: any_pb2.Any) -> Message:
    cls = _DETAIL_TYPES.get(detail.TypeName())
    if cls is None:
        return detail
    message = cls()
    return message if detail.Unpack(message) else detail
