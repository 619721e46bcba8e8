"""gRPC server reflection, both ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection serves only ``v1alpha``, while current tools (grpcurl, Postman, gRPC UI)
try ``v1`` first. The two protocols differ only in their package name: the same messages,
field numbers and method. So ``v1`` is served by the same servicer, its messages read and
written with the ``v1alpha`` classes (the bytes are the same), and its descriptor (the
``v1alpha`` file with the package renamed) is added to the descriptor pool, so that ``v1``
can describe itself too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE_NAME = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _renamed(type_name: str) -> str:
    old = f".{reflection_pb2.DESCRIPTOR.package}."
    return f".{V1_PACKAGE}." + type_name.removeprefix(old) if type_name.startswith(old) else type_name


def _rename_message(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        if field.type_name:
            field.type_name = _renamed(field.type_name)
    for nested in message.nested_type:
        _rename_message(nested)


def v1_descriptor(pool: descriptor_pool.DescriptorPool | None = None) -> FileDescriptor:
    """The ``grpc.reflection.v1`` file descriptor, added to ``pool`` (the default) once."""
    pool = descriptor_pool.Default() if pool is None else pool
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = V1_PACKAGE
    proto.ClearField("options")
    for message in proto.message_type:
        _rename_message(message)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    pool.AddSerializedFile(proto.SerializeToString())
    return pool.FindFileByName(V1_FILE)


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection ``v1`` and ``v1alpha`` on ``server``, listing ``service_names`` and both
    reflection services."""
    v1_descriptor()
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    servicer = reflection_aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1}),)
    )
