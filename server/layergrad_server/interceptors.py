"""Maps exceptions raised by RPC handlers to gRPC statuses, in one place; checks tokens.

A ``LayergradError`` becomes its status with google.rpc details: ``ErrorInfo``
(stable ``reason``, domain ``layergrad.dev``, the error's ``metadata``),
``BadRequest`` naming the request field at fault, and ``RetryInfo`` when
retrying later may work (also sent as the ``grpc-retry-pushback-ms`` trailer,
which gRPC clients' retry policies honour; other RESOURCE_EXHAUSTED statuses
carry a pushback of -1: do not retry). Any
other exception is logged with its traceback and becomes ``INTERNAL "Internal
server error"``: no exception text ever reaches a client.

Request bytes that do not parse as the method's request message become
INVALID_ARGUMENT (gRPC itself would answer INTERNAL): the handlers' deserializer
returns a marker instead of raising, and the wrapped handler refuses it.

``AuthInterceptor`` (when tokens are configured) requires a valid bearer token
on every GradientService call and the scopes the request implies; health and
reflection stay open.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb

from layergrad_server import auth
from layergrad_server.errors import InvalidArgument, LayergradError

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "layergrad.dev"
SERVICE_PREFIX = f"/{pb.DESCRIPTOR.services_by_name['GradientService'].full_name}/"
PUSHBACK_KEY = "grpc-retry-pushback-ms"


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class _RichStatus(_Status, grpc.Status):
    """A status with arbitrary trailing metadata."""


def status_for(error: LayergradError) -> grpc.Status:
    """The gRPC status, with rich details, of a domain error."""
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


def _internal(method: str) -> grpc.Status:
    logger.exception("unexpected error in %s", method)
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message="Internal server error"))


def _abort(context: grpc.ServicerContext, status: grpc.Status) -> None:
    context.abort_with_status(status)


class _Undecodable:
    """Stands for request bytes that did not parse as the method's request message."""


_UNDECODABLE = _Undecodable()


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _UNDECODABLE

    return deserialize


def _check_decoded(request: Any) -> None:
    if request is _UNDECODABLE:
        raise InvalidArgument(
            "the request bytes are not a valid serialized request message of this method",
            reason="MALFORMED_REQUEST",
        )


Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _rewrap(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Behavior, bool], Behavior],
    deserializer: Callable[[bytes], Any] | None,
) -> grpc.RpcMethodHandler:
    """The handler with its unary-unary or unary-stream behaviour wrapped."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, True),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Wraps unary-unary and unary-stream handlers with the error mapping.

    Its handlers parse requests leniently (see ``_UNDECODABLE``); ``AuthInterceptor``,
    when present, comes before it and maps its own refusals.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if handler is None:
            return handler
        method = details.method

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            return _wrap_stream(behavior, method) if streaming else _wrap_unary(behavior, method)

        return _rewrap(handler, wrap, _lenient(handler.request_deserializer))


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires a bearer token with the needed scopes on every GradientService call.

    Comes before ``ErrorInterceptor`` (whose lenient deserializer it reuses), so a
    caller without a valid token learns nothing else, not even whether its
    request parses; it maps its own refusals with ``status_for``.
    """

    def __init__(self, tokens: auth.TokenStore) -> None:
        self._tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        header = dict(details.invocation_metadata or ()).get("authorization")
        method = details.method.removeprefix(SERVICE_PREFIX)
        tokens = self._tokens

        def check(request: Any, context: grpc.ServicerContext) -> None:
            """Authenticates first, then refuses undecodable requests, then checks scopes."""
            try:
                principal = tokens.authenticate(header if isinstance(header, str) else None)
                _check_decoded(request)
                principal.require(required_scopes(method, request))
            except LayergradError as error:
                logger.info("%s refused: %s %s", details.method, error.status, error.message)
                _abort(context, status_for(error))
            except Exception:
                _abort(context, _internal(details.method))

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            if streaming:

                def guarded_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    check(request, context)
                    yield from behavior(request, context)

                return guarded_stream

            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                check(request, context)
                return behavior(request, context)

            return guarded

        return _rewrap(handler, wrap, handler.request_deserializer)


def required_scopes(method: str, request: Any) -> set[str]:
    """The token scopes a GradientService call needs (see ``auth``)."""
    if method == "Predict":
        return {auth.PREDICT}
    if method in ("ComputeGradients", "StreamGradients", "ExportGradients"):
        targets = request.targets
        return auth.gradient_scopes(
            input=targets.input,
            layers=bool(targets.layers) or targets.all_layers,
            parameters=bool(targets.parameters) or targets.all_parameters,
            activations=bool(request.activation_layers),
        )
    return set()


def _wrap_unary(behavior: Behavior, method: str) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _check_decoded(request)
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
            _check_decoded(request)
            yield from behavior(request, context)
        except LayergradError as error:
            logger.info("%s refused: %s %s", method, error.status, error.message)
            _abort(context, status_for(error))
        except Exception:
            if context.code() is not None:
                raise
            _abort(context, _internal(method))

    return wrapped
