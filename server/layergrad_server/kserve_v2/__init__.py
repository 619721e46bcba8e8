"""The Open Inference Protocol (KServe v2) over gRPC, served beside layergrad.v1 on one port.

``inference.GRPCInferenceService``: ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata and ModelInfer, each registered through ``handlers.Handlers`` like
GradientService's methods (token check, request stall timeout, bounded executor, the
one error map of ``status``); the protocol's other methods are UNIMPLEMENTED. Like
gRPC health, the liveness and readiness probes answer without a bearer token. See
``servicer`` for how ModelInfer runs layergrad.v1's behaviours, ``convert`` and
docs/kserve-v2.md for the mapping.
"""

from __future__ import annotations

import grpc

from layergrad_server._gen.inference import grpc_predict_v2_pb2 as v2
from layergrad_server.handlers import Handlers
from layergrad_server.kserve_v2.servicer import InferenceServicer

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVICE_PREFIX = f"/{SERVICE_NAME}/"

__all__ = ["SERVICE_NAME", "SERVICE_PREFIX", "InferenceServicer", "add_inference_service"]


#: Answered without a bearer token, like gRPC health: what orchestrators' probes call.
PROBES = (
    ("ServerLive", v2.ServerLiveRequest),
    ("ServerReady", v2.ServerReadyRequest),
    ("ModelReady", v2.ModelReadyRequest),
)


def add_inference_service(
    servicer: InferenceServicer, server: grpc.aio.Server, handlers: Handlers, probe_handlers: Handlers
) -> None:
    """Registers GRPCInferenceService's methods with ``server``: the probes through
    ``probe_handlers`` (built without tokens), the others through ``handlers``."""
    methods = {
        name: probe_handlers.unary(name, getattr(servicer, name), request_type)
        for name, request_type in PROBES
    }
    methods |= {
        name: handlers.unary(name, getattr(servicer, name), request_type, servicer.scopes)
        for name, request_type in (
            ("ServerMetadata", v2.ServerMetadataRequest),
            ("ModelMetadata", v2.ModelMetadataRequest),
            ("ModelInfer", v2.ModelInferRequest),
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, methods),))
