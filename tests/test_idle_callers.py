"""Idle, slow and stalled callers cost the server no thread and hold no compute place.

The server here has one compute slot, no queue and so few handler threads (6) that
before the asyncio transport a handful of idle calls starved every other call,
health checks included. Each test holds many more idle calls than that open and
checks that health, GetModelInfo and a compute call are still answered, with
deadlines far beyond what the server needs (nothing here races the clock).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import layergrad
import numpy as np
import pytest
from conftest import serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc

IDLE_CALLS = 20  # of each kind, against 6 handler threads
TOKEN = "idle-test-token"
NO_RETRIES = [("grpc.enable_retries", 0)]


def cheap() -> pb.ComputeGradientsRequest:
    zeros = np.zeros((3, 224, 224), np.float32)
    return pb.ComputeGradientsRequest(
        inputs=[
            pb.Input(prepared=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=zeros.shape, data=zeros.tobytes()))
        ],
        loss=pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[1])),
        pattern=pb.BACKWARD_PATTERN_GRAD,
        targets=pb.GradientTargets(parameters=["fc8/b"]),
    )


@pytest.fixture(scope="module")
def tight_server(weights_file, tmp_path_factory):
    args = ["--weights", str(weights_file), "--max-queue", "0", "--stall-timeout", "3"]
    env = {"LAYERGRAD_TOKENS": f"{TOKEN} *"}
    with serving(args, tmp_path_factory.mktemp("tight"), env=env) as process:
        yield process


class Silent:
    """Request iterators that send nothing until released."""

    def __init__(self) -> None:
        self._release = threading.Event()

    def requests(self) -> Iterator[bytes]:
        self._release.wait()
        return
        yield b""  # a generator that ends without a message

    def release(self) -> None:
        self._release.set()


def assert_served(address: str) -> None:
    """Health, GetModelInfo and one compute call are answered (deadlines far beyond need)."""
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(address, options=NO_RETRIES) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == 1
        stub = pb_grpc.GradientServiceStub(channel)
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30, metadata=metadata).model_name
        response = stub.ComputeGradients(cheap(), timeout=120, metadata=metadata)
        assert np.frombuffer(response.gradients[0].tensor.data, "<f4")[1] == 1.0


def test_idle_calls_of_every_kind_starve_nothing(tight_server):
    silent = Silent()
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    channels = [grpc.insecure_channel(tight_server.address, options=NO_RETRIES) for _ in range(4)]
    held = []
    try:
        for number in range(IDLE_CALLS):
            channel = channels[number % len(channels)]
            # A unary call whose request message never arrives.
            method = channel.stream_unary("/layergrad.v1.GradientService/ComputeGradients")
            held.append(method.future(silent.requests(), timeout=300, metadata=metadata))
            # A health Watch, as gRPC's client-side health checking opens one per subchannel.
            held.append(
                health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=300)
            )
            # A reflection stream that asks nothing.
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            held.append(reflection.ServerReflectionInfo(iter(silent.requests()), timeout=300))
        assert_served(tight_server.address)
        with grpc.insecure_channel(tight_server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(20):
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == 1
    finally:
        silent.release()
        for call in held:
            call.cancel()
        for channel in channels:
            channel.close()


def test_a_caller_without_a_token_is_refused_before_it_sends_its_request(tight_server):
    silent = Silent()
    try:
        with grpc.insecure_channel(tight_server.address, options=NO_RETRIES) as channel:
            method = channel.stream_unary("/layergrad.v1.GradientService/ComputeGradients")
            calls = [method.future(silent.requests(), timeout=120) for _ in range(IDLE_CALLS)]
            for call in calls:
                with pytest.raises(grpc.RpcError) as caught:
                    call.result()
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        silent.release()
    assert_served(tight_server.address)


def test_a_request_message_that_never_arrives_ends_after_the_stall_timeout(tight_server):
    silent = Silent()
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    try:
        with grpc.insecure_channel(tight_server.address, options=NO_RETRIES) as channel:
            method = channel.stream_unary("/layergrad.v1.GradientService/Predict")
            with pytest.raises(grpc.RpcError) as caught:
                method(silent.requests(), timeout=120, metadata=metadata)
    finally:
        silent.release()
    error = layergrad.from_grpc_error(caught.value)
    assert isinstance(error, layergrad.DeadlineExceeded) and error.reason == "REQUEST_NOT_SENT"
    assert "--stall-timeout" in error.message


def test_a_stream_nobody_reads_is_cancelled_and_gives_back_its_place(tight_server):
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    everything = pb.StreamGradientsRequest.FromString(cheap().SerializeToString())
    everything.targets.Clear()
    everything.targets.all_parameters = True  # 553 MB: far more than flow control lets through
    stalled_before = tight_server.log().count("read nothing")
    with grpc.insecure_channel(tight_server.address, options=NO_RETRIES) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        stream = stub.StreamGradients(everything, timeout=600, metadata=metadata)
        first = next(stream)  # computed and sending; then nothing more is read
        assert first.name
        # The one compute place is held by the stalled stream until the server gives up on it.
        give_up = time.monotonic() + 240
        while tight_server.log().count("read nothing") == stalled_before:
            assert time.monotonic() < give_up, "the server never noticed the stalled reader"
            time.sleep(0.5)
        assert_served(tight_server.address)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        error = layergrad.from_grpc_error(caught.value)
        assert isinstance(error, layergrad.Cancelled) and error.reason == "STALLED_READER"


def test_a_slow_reader_that_keeps_reading_is_not_cancelled(tight_server):
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    request = pb.StreamGradientsRequest.FromString(cheap().SerializeToString())
    request.targets.Clear()
    request.targets.parameters.extend(["fc7/W"])  # 64 MiB: 64 messages
    with grpc.insecure_channel(tight_server.address, options=NO_RETRIES) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        received = 0
        started = time.monotonic()
        for message in stub.StreamGradients(request, timeout=600, metadata=metadata):
            received += len(message.data)
            # Slower than the server sends, so every send waits on flow control, yet far
            # faster than the 3 s bound even when gRPC returns window in large steps.
            time.sleep(0.1)
        took = time.monotonic() - started
    assert received == 4096 * 4096 * 4
    assert took > 3  # the whole stream outlasted the stall bound; only a pause counts
