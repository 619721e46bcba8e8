"""Maps exceptions raised by RPC handlers to gRPC statuses, in one place.

A ``LayergradError`` becomes its status with google.rpc details: ``ErrorInfo``
(stable ``reason``, domain ``layergrad.dev``) and, when a request field is at
fault, ``BadRequest`` naming it. Any other exception is logged with its
traceback and becomes ``INTERNAL "Internal server error"``: no exception text
ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from layergrad_server.errors import LayergradError

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "layergrad.dev"


def status_for(error: LayergradError) -> grpc.Status:
    """The gRPC status, with rich details, of a domain error."""
    details = []
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)
    details.append(info)
    if error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=getattr(code_pb2, error.status), message=error.message, details=packed)
    return rpc_status.to_status(status)


def _internal(method: str) -> grpc.Status:
    logger.exception("unexpected error in %s", method)
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message="Internal server error"))


def _abort(context: grpc.ServicerContext, status: grpc.Status) -> None:
    context.abort_with_status(status)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Wraps unary-unary and unary-stream handlers with the error mapping."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if handler is None:
            return handler
        method = details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _wrap_unary(behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except LayergradError as error:
            logger.info("%s refused: %s %s", method, error.status, error.message)
            _abort(context, status_for(error))
        except Exception:
            if context.code() is not None:  # the handler aborted on purpose
                raise
            _abort(context, _internal(method))

    return wrapped


def _wrap_stream(behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except LayergradError as error:
            logger.info("%s refused: %s %s", method, error.status, error.message)
            _abort(context, status_for(error))
        except Exception:
            if context.code() is not None:
                raise
            _abort(context, _internal(method))

    return wrapped
