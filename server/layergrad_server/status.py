"""Maps domain errors to gRPC statuses, in one place; the scopes a call needs.

A ``LayergradError`` becomes its status with google.rpc details: ``ErrorInfo``
(stable ``reason``, domain ``layergrad.dev``, the error's ``metadata``),
``BadRequest`` naming the request field at fault, and ``RetryInfo`` when
retrying later may work (also sent as the ``grpc-retry-pushback-ms`` trailer,
which gRPC clients' retry policies honour; other RESOURCE_EXHAUSTED statuses
carry a pushback of -1: do not retry). Any other exception is logged with its
traceback and becomes ``INTERNAL "Internal server error"``: no exception text
ever reaches a client (see ``handlers``, which applies this mapping).
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb

from layergrad_server import auth
from layergrad_server.errors import LayergradError

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "layergrad.dev"
SERVICE_PREFIX = f"/{pb.DESCRIPTOR.services_by_name['GradientService'].full_name}/"
PUSHBACK_KEY = "grpc-retry-pushback-ms"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class _RichStatus(_Status, grpc.Status):
    """A status with arbitrary trailing metadata."""


# Longest status message sent: the message travels twice (details and google.rpc.Status),
# and gRPC clients refuse trailers above 8 KiB by default.
MAX_MESSAGE_CHARS = 1024


def status_for(error: LayergradError) -> grpc.Status:
    """The gRPC status, with rich details, of a domain error."""
    if len(error.message) > MAX_MESSAGE_CHARS:
        error.message = error.message[: MAX_MESSAGE_CHARS - 20] + " ... (message cut)"
    details: list[Any] = []
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    details.append(info)
    if error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if error.retry_after is not None:
        seconds = max(error.retry_after, 0.0)
        delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=getattr(code_pb2, error.status), message=error.message, details=packed)
    plain = rpc_status.to_status(status)
    trailers = tuple(plain.trailing_metadata)
    if error.retry_after is not None:
        trailers += ((PUSHBACK_KEY, str(math.ceil(error.retry_after * 1000))),)
    elif error.status == "RESOURCE_EXHAUSTED":
        trailers += ((PUSHBACK_KEY, "-1"),)
    return _RichStatus(plain.code, plain.details, trailers)


def internal_status(method: str, request_id: str | None = None) -> grpc.Status:
    """INTERNAL "Internal server error", after logging the exception being handled; with a
    ``request_id``, an ErrorInfo (reason INTERNAL) naming it, to quote when reporting it."""
    logger.exception("unexpected error in %s (request id %s)", method, request_id or "-")
    details = []
    if request_id:
        holder = any_pb2.Any()
        holder.Pack(
            error_details_pb2.ErrorInfo(
                reason="INTERNAL", domain=ERROR_DOMAIN, metadata={"request_id": request_id}
            )
        )
        details.append(holder)
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INTERNAL, message="Internal server error", details=details)
    )


def with_trailers(
    status: grpc.Status, trailers: tuple[tuple[str, str | bytes], ...], *, replace: bool = False
) -> grpc.Status:
    """``status`` with ``trailers`` added to (or, with ``replace``, instead of) its trailing metadata."""
    kept = () if replace else tuple(status.trailing_metadata or ())
    return _RichStatus(status.code, status.details, kept + tuple(trailers))


def reason_of(status: grpc.Status) -> str:
    """The ErrorInfo reason in a status's ``grpc-status-details-bin`` trailer, or ""."""
    for key, value in status.trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                rich = status_pb2.Status.FromString(value)
            except Exception:
                return ""
            for detail in rich.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason
    return ""


def required_scopes(method: str, request: Any) -> set[str]:
    """The token scopes a GradientService call needs (see ``auth``)."""
    if method == "Predict":
        return {auth.PREDICT}
    if method == "Explain":  # every attribution map is computed from input or layer gradients
        return {auth.INPUT_GRADIENTS}
    if method in ("ComputeGradients", "StreamGradients", "ExportGradients"):
        targets = request.targets
        return auth.gradient_scopes(
            input=targets.input,
            layers=bool(targets.layers) or targets.all_layers or bool(targets.links),
            parameters=bool(targets.parameters) or targets.all_parameters,
            activations=bool(request.activation_layers),
        )
    return set()
