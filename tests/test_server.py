"""The server process: model info, health, reflection, CLI, graceful shutdown, numpy shim."""

from __future__ import annotations

import platform
import subprocess
import sys
import threading
import time

import grpc
import layergrad
import numpy as np
import pytest
from conftest import encode, make_rgb
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from layergrad_server.launch import ServerProcess
from layergrad_server.reflection import v1_descriptor

LAYERS = [
    "conv1_1", "conv1_2", "pool1", "conv2_1", "conv2_2", "pool2", "conv3_1", "conv3_2", "conv3_3",
    "pool3", "conv4_1", "conv4_2", "conv4_3", "pool4", "conv5_1", "conv5_2", "conv5_3", "pool5",
    "fc6", "fc7", "fc8", "prob",
]  # fmt: skip


def test_model_info_describes_layers_parameters_input_and_weights(client, weights_file):
    info = client.model_info()
    assert info.model_name == "VGG16"
    assert [layer.name for layer in info.layers] == LAYERS
    shapes = {layer.name: layer.output_shape for layer in info.layers}
    assert (
        shapes["conv1_1"] == (64, 224, 224) and shapes["pool5"] == (512, 7, 7) and shapes["prob"] == (1000,)
    )
    assert len(info.parameters) == 32
    assert info.parameters[0].name == "conv1_1/W" and info.parameters[0].shape == (64, 3, 3, 3)
    assert {p.name: p.shape for p in info.parameters}["fc6/W"] == (4096, 25088)
    assert sum(p.size for p in info.parameters) == 138_357_544
    assert info.input_spec.shape == (3, 224, 224)
    assert info.input_spec.channel_order == "BGR" and info.input_spec.layout == "CHW"
    assert info.input_spec.mean == pytest.approx((103.939, 116.779, 123.68))
    assert str(weights_file) in info.weights.source
    assert len(info.weights.file_sha256) == 64 and len(info.weights.parameters_sha256) == 64
    assert info.versions["chainer"] == "7.8.1"
    assert info.device == "@numpy"


def test_repeated_model_info_is_the_same_and_each_caller_owns_its_versions(client, server):
    first = client.model_info()
    first.versions["edited"] = "by the caller"
    second = client.model_info()
    assert "edited" not in second.versions and second.versions is not first.versions
    with layergrad.Client(server.address) as fresh:
        assert fresh.model_info() == second  # parsed anew by another Client: the same answer


def test_the_server_keeps_freed_memory_for_reuse_on_glibc(server):
    on_glibc = platform.libc_ver()[0] == "glibc"
    assert ("malloc keeps freed blocks up to 32 MiB" in server.log()) == on_glibc
    assert layergrad.keep_freed_memory() is on_glibc  # the SDK's own, in this process


def test_health_is_serving_for_the_server_and_the_service(server):
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert server.health("layergrad.v1.GradientService") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_gradient_service(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name for s in next(responses).list_services_response.service]
    assert "layergrad.v1.GradientService" in names and "grpc.health.v1.Health" in names


def test_reflection_v1_lists_and_describes_the_services(server):
    """Reflection ``grpc.reflection.v1``, with ``v1`` messages (tools try it before v1alpha)."""
    pool = descriptor_pool.Default()
    v1_descriptor(pool)
    request_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
    )
    response_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    with grpc.insecure_channel(server.address) as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        asked = [
            request_class(list_services=""),
            request_class(file_containing_symbol="layergrad.v1.GradientService"),
            request_class(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            request_class(file_containing_symbol="layergrad.v1.NoSuchService"),
        ]
        listed, gradient, itself, missing = list(info(iter(asked), timeout=30))
    names = [s.name for s in listed.list_services_response.service]
    assert {"layergrad.v1.GradientService", "grpc.health.v1.Health"} <= set(names)
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= set(names)
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in gradient.file_descriptor_response.file_descriptor_proto
    ]
    assert any(
        f.package == "layergrad.v1" and [s.name for s in f.service] == ["GradientService"] for f in files
    )
    described = descriptor_pb2.FileDescriptorProto.FromString(
        itself.file_descriptor_response.file_descriptor_proto[0]
    )
    assert (
        described.package == "grpc.reflection.v1"
        and described.service[0].method[0].name == "ServerReflectionInfo"
    )
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_cli_grad_writes_npz_and_prints_a_summary(server, tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(encode(make_rgb(12), "PNG"))
    out = tmp_path / "grads.npz"
    command = [
        sys.executable, "-m", "layergrad.cli", "--target", server.address, "grad", str(image),
        "--out", str(out), "--loss", "class-score:fc8:3", "--pattern", "backward_retain_grad",
        "--input", "--layers", "conv5_3",
        "--params", "fc8/b",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with np.load(out) as saved:
        assert saved["input"].shape == (1, 3, 224, 224)
        assert saved["layer/conv5_3"].shape == (1, 512, 14, 14)
        assert saved["param/fc8/b"].shape == (1000,)
    assert "conv5_3" in done.stdout and "fc8/b" in done.stdout

    bad = subprocess.run(
        [*command[:7], "--out", str(out), "--layers", "nope"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr


def test_sigterm_lets_the_call_in_flight_finish_then_exits_zero(tmp_path):
    process = ServerProcess(["--weights", "random:1", "--grace", "60"], tmp_path / "server.log")
    try:
        process.wait_serving()
        outcome: dict[str, object] = {}

        def slow_call() -> None:
            with layergrad.Client(process.address, timeout=120) as sdk:
                try:
                    outcome["result"] = sdk.parameter_gradients(
                        [encode(make_rgb(3), "PNG")], layergrad.SumOfSquares("prob"), parameters="all"
                    )
                except layergrad.LayergradError as error:
                    outcome["error"] = error

        thread = threading.Thread(target=slow_call)
        thread.start()
        time.sleep(1.0)
        process.process.send_signal(15)
        thread.join(120)
        assert "error" not in outcome, outcome.get("error")
        assert len(outcome["result"]) == 32
        assert process.process.wait(60) == 0
        assert "shutting down" in process.log() and "stopped" in process.log()
    finally:
        process.terminate()


def test_loading_server_reports_not_serving_and_unavailable(tmp_path):
    process = ServerProcess(["--weights", "random:2"], tmp_path / "server.log")
    try:
        status = process.health()
        with layergrad.Client(process.address, timeout=30) as sdk:
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                with pytest.raises(layergrad.Unavailable) as caught:
                    sdk.model_info()
                assert caught.value.reason == "MODEL_LOADING"
            process.wait_serving()
            assert sdk.model_info().weights.source == "random:2"
            assert not sdk.model_info().weights.pretrained
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "RANDOM weights" in process.log()
    finally:
        assert process.terminate() == 0


def test_numpy_shim_lets_chainer_import_without_sctypes_or_numpy_distutils():
    code = (
        "import sys, numpy\n"
        "sys.modules['numpy.distutils'] = None\n"  # as on Python 3.12+: import fails
        "if hasattr(numpy, 'sctypes'): del numpy.sctypes\n"
        "import layergrad_server\n"
        "import chainer, chainer.functions as F\n"
        "assert set(numpy.sctypes) == {'int', 'uint', 'float', 'complex', 'others'}\n"
        "assert numpy.float16 in numpy.sctypes['float']\n"
        "x = chainer.Variable(numpy.arange(6, dtype=numpy.float32).reshape(2, 3))\n"
        "y = F.sum(F.as_strided(x, (2, 3), (3, 1)) ** 2)\n"
        "y.backward()\n"
        "assert (x.grad == 2 * x.array).all()\n"
        "print('ok', chainer.__version__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok 7.8.1"


def test_unusable_device_fails_at_start_with_a_clear_message(tmp_path):
    process = ServerProcess(["--weights", "random:0", "--device", "@cupy:0"], tmp_path / "server.log")
    assert process.process.wait(120) == 2
    assert "cannot use device @cupy:0" in process.log()
    assert "Traceback" not in process.log()
    process.terminate()


def test_a_port_already_in_use_is_a_clear_error_not_a_traceback():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "layergrad_server", "--address", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    assert f"cannot start: could not listen on 127.0.0.1:{port}" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr + done.stdout
