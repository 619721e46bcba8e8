"""Faults: overload, cancellation, deadlines, shutdown, oversized and hostile input.

Each case asserts the exact status and that the server answers a normal request
right after. Most run against a server with one compute slot and a queue of one
(``small_server``), where a place that was not given back would show at once.
"""

from __future__ import annotations

import re
import struct
import threading
import time
import zlib
from concurrent import futures

import grpc
import layergrad
import numpy as np
import pytest
from conftest import encode, make_rgb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad_server.launch import ServerProcess

NO_RETRIES = [("grpc.enable_retries", 0), ("grpc.max_send_message_length", 1 << 30)]
ZEROS = np.zeros((3, 224, 224), np.float32)


def prepared(array: np.ndarray = ZEROS) -> pb.Input:
    return pb.Input(prepared=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=array.shape, data=array.tobytes()))


def cheap(batch: int = 1, pattern: int = pb.BACKWARD_PATTERN_GRAD) -> pb.ComputeGradientsRequest:
    """ClassScore on fc8 and the gradient of fc8/b: one forward pass and a tiny backward."""
    return pb.ComputeGradientsRequest(
        inputs=[prepared()] * batch,
        loss=pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[1] * batch)),
        pattern=pattern,
        targets=pb.GradientTargets(parameters=["fc8/b"]),
    )


def slow(batch: int = 2) -> pb.ComputeGradientsRequest:
    """The input gradient: a full backward pass through every layer."""
    return pb.ComputeGradientsRequest(
        inputs=[prepared()] * batch,
        loss=pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[1] * batch)),
        pattern=pb.BACKWARD_PATTERN_GRAD,
        targets=pb.GradientTargets(input=True),
    )


def as_stream(request: pb.ComputeGradientsRequest) -> pb.StreamGradientsRequest:
    return pb.StreamGradientsRequest.FromString(request.SerializeToString())


def assert_answers_normally(stub: pb_grpc.GradientServiceStub) -> None:
    response = stub.ComputeGradients(cheap(), timeout=60)
    assert [g.name for g in response.gradients] == ["fc8/b"]
    assert np.frombuffer(response.gradients[0].tensor.data, "<f4")[1] == 1.0


def wait_for_log(server: ServerProcess, pattern: str, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, server.log())) < count:
        assert time.monotonic() < deadline, f"no {count} x {pattern!r} in the log:\n{server.log()[-3000:]}"
        time.sleep(0.02)


def error_of(future: grpc.Future) -> layergrad.LayergradError | None:
    try:
        future.result()
    except grpc.RpcError as error:
        return layergrad.from_grpc_error(error)
    return None


@pytest.fixture(scope="module")
def small_server(weights_file, tmp_path_factory):
    process = ServerProcess(
        ["--weights", str(weights_file), "--max-queue", "1", "--grace", "5"],
        tmp_path_factory.mktemp("small") / "server.log",
    )
    try:
        process.wait_serving()
        yield process
    finally:
        assert process.terminate() == 0


@pytest.fixture(scope="module")
def small_stub(small_server):
    with grpc.insecure_channel(small_server.address, options=NO_RETRIES) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        assert_answers_normally(stub)  # and gives the server a compute-time estimate
        yield stub


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address, options=NO_RETRIES) as channel:
        yield pb_grpc.GradientServiceStub(channel)


# ---- overload -------------------------------------------------------------------------------------


def test_calls_beyond_slot_and_queue_are_resource_exhausted_at_once_while_health_stays_fast(
    small_server, small_stub
):
    running = small_stub.ComputeGradients.future(slow(), timeout=120)
    time.sleep(0.3)
    queued = small_stub.ComputeGradients.future(cheap(), timeout=120)
    time.sleep(0.3)
    refusals = []
    for call in (small_stub.ComputeGradients, small_stub.Predict, small_stub.StreamGradients):
        request = cheap() if call is not small_stub.Predict else pb.PredictRequest(inputs=[prepared()])
        if call is small_stub.StreamGradients:
            request = as_stream(request)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            response = call(request, timeout=60)
            list(response) if call is small_stub.StreamGradients else response
        refusals.append((time.monotonic() - started, layergrad.from_grpc_error(caught.value)))
    with grpc.insecure_channel(small_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        info = pb_grpc.GradientServiceStub(channel)
        started = time.monotonic()
        for _ in range(5):
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1
            assert info.GetModelInfo(pb.GetModelInfoRequest(), timeout=2).model_name == "VGG16"
        cheap_calls_seconds = time.monotonic() - started
    assert not running.done(), "the slow call should still be computing"
    assert error_of(running) is None and error_of(queued) is None
    for seconds, error in refusals:
        assert isinstance(error, layergrad.ResourceExhausted), error
        assert error.reason == "OVERLOADED" and "1 computing + 1 queued" in error.message
        assert error.retry_after is not None and error.retry_after > 0
        assert seconds < 0.5
    assert cheap_calls_seconds < 1.0
    assert_answers_normally(small_stub)


def test_sdk_retries_overload_refusals_after_the_hinted_delay(small_server, small_stub):
    results: list[object] = []

    def call() -> None:
        with layergrad.Client(small_server.address, timeout=120) as client:
            try:
                grads = client.gradients([ZEROS], layergrad.ClassScore("fc8", [2]), parameters=["fc8/b"])
                results.append(grads.parameters["fc8/b"][2])
            except layergrad.LayergradError as error:
                results.append(error)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(120)
    assert results == [1.0, 1.0, 1.0]


# ---- cancellation and deadlines -------------------------------------------------------------------


def test_cancel_mid_compute_stops_the_work_and_frees_the_slot(small_server, small_stub):
    stopped = len(re.findall("caller went away", small_server.log()))
    call = small_stub.ComputeGradients.future(slow(), timeout=120)
    time.sleep(1.0)
    assert not call.done()
    call.cancel()
    wait_for_log(small_server, "caller went away", stopped + 1)
    assert call.cancelled()
    # Both places are free again: two calls at once are admitted.
    first = small_stub.ComputeGradients.future(cheap(), timeout=60)
    second = small_stub.ComputeGradients.future(cheap(), timeout=60)
    assert error_of(first) is None and error_of(second) is None


def test_cancel_after_the_first_streamed_chunk_stops_the_stream(small_server, small_stub):
    request = pb.StreamGradientsRequest(
        inputs=[prepared()],
        loss=pb.Loss(sum_of_squares=pb.SumOfSquares(layer="conv2_2")),
        pattern=pb.BACKWARD_PATTERN_GRAD,
        targets=pb.GradientTargets(all_layers=True),
    )
    stream = small_stub.StreamGradients(request, timeout=120)
    first = next(stream)
    assert first.name == "conv1_1" and first.offset == 0
    stream.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        list(stream)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 10
    while True:  # the stream's place is given back within moments
        first = small_stub.ComputeGradients.future(cheap(), timeout=60)
        second = small_stub.ComputeGradients.future(cheap(), timeout=60)
        errors = [error_of(first), error_of(second)]
        if errors == [None, None]:
            break
        assert all(e is None or e.reason == "OVERLOADED" for e in errors), errors
        assert time.monotonic() < deadline, "the cancelled stream kept its place"
        time.sleep(0.2)


def test_deadline_too_short_for_the_estimate_is_refused_before_compute(small_server, small_stub):
    # One input gradient gives the server the cost of this kind of call; 32 inputs need about
    # 32 times the compute, and a deadline of 8 times the single call's whole time (which
    # scales with the machine's speed) leaves the server seconds to refuse it up front.
    started = time.monotonic()
    small_stub.ComputeGradients(slow(batch=1), timeout=120)
    single = time.monotonic() - started
    with pytest.raises(grpc.RpcError) as caught:
        small_stub.ComputeGradients(slow(batch=32), timeout=8 * single)
    error = layergrad.from_grpc_error(caught.value)
    assert isinstance(error, layergrad.DeadlineExceeded)
    assert error.reason == "DEADLINE_TOO_SHORT"
    assert (
        re.search(r"estimated to need \d+\.\d\ds", error.message) and "nothing was computed" in error.message
    )
    assert_answers_normally(small_stub)


def test_calls_reaching_deeper_are_estimated_apart_from_cheap_calls_of_the_same_pattern():
    from layergrad_server.servicer import cost_kind

    assert cost_kind(cheap()) == cost_kind(cheap(batch=4))  # the estimate scales with the batch
    assert cost_kind(cheap()) != cost_kind(slow())  # fc8/b only against a full backward
    assert cost_kind(cheap()) != cost_kind(cheap(pattern=pb.BACKWARD_PATTERN_BACKWARD))
    everything = cheap()
    everything.targets.all_parameters = True
    assert cost_kind(everything) != cost_kind(cheap())
    assert cost_kind(pb.PredictRequest(layers=["prob"])) != cost_kind(pb.PredictRequest(layers=["fc7"]))
    assert len(cost_kind(pb.PredictRequest(layers=["x" * 100_000]))) < 40


def test_deadline_expiring_mid_compute_stops_the_work(small_server, small_stub):
    # A kind of call the server has no estimate for yet is admitted, then stopped at its deadline.
    stopped = len(re.findall("deadline passed", small_server.log()))
    with pytest.raises(grpc.RpcError) as caught:
        small_stub.ComputeGradients(cheap(pattern=pb.BACKWARD_PATTERN_BACKWARD_RETAIN_GRAD), timeout=0.7)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for_log(small_server, "deadline passed", stopped + 1)
    assert_answers_normally(small_stub)


# ---- limits and hostile bytes --------------------------------------------------------------------


def request_of_size(size: int) -> pb.PredictRequest:
    """A Predict request whose serialized form is exactly ``size`` bytes."""
    payload = size
    while True:
        message = pb.PredictRequest(inputs=[pb.Input(encoded_image=b"\0" * payload)])
        excess = message.ByteSize() - size
        if excess == 0:
            return message
        payload -= excess


def test_request_one_byte_over_the_limit_is_resource_exhausted(server, stub, client):
    limit = 64 << 20
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request_of_size(limit + 1), timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"larger than max ({limit + 1} vs. {limit})" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:  # at the limit, it reaches the server's checks
        stub.Predict(request_of_size(limit), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_answers_normally(stub)


@pytest.mark.parametrize("method", ["ComputeGradients", "StreamGradients", "Predict", "GetModelInfo"])
def test_garbage_bytes_to_each_method_are_invalid_argument(server, stub, method):
    with grpc.insecure_channel(server.address) as channel:
        if method == "StreamGradients":
            raw = channel.unary_stream(f"/layergrad.v1.GradientService/{method}")
            call = lambda data: list(raw(data, timeout=30))  # noqa: E731
        else:
            raw = channel.unary_unary(f"/layergrad.v1.GradientService/{method}")
            call = lambda data: raw(data, timeout=30)  # noqa: E731
        for garbage in (b"\xff\xff\xff\xff garbage", b"\x0a\xff\xff\xff\xff\x0f", b"\x08"):
            with pytest.raises(grpc.RpcError) as caught:
                call(garbage)
            error = layergrad.from_grpc_error(caught.value)
            assert isinstance(error, layergrad.InvalidArgument), (garbage, error)
            assert error.reason == "MALFORMED_REQUEST"
    assert_answers_normally(stub)


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit grayscale PNG of side x side black pixels: a few kB that decode to gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte, then packed pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def memory_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status:
        return {
            key: int(value.split()[0])
            for key, value in (line.split(":", 1) for line in status)
            if key in ("VmRSS", "VmHWM")
        }


def test_decompression_bomb_is_refused_from_its_header_without_growing_memory(small_server, small_stub):
    bomb = png_bomb()
    assert len(bomb) < 100_000
    pid = small_server.process.pid
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak (VmHWM) to the current RSS
    before = memory_kib(pid)
    for call, request in (
        (small_stub.Predict, pb.PredictRequest(inputs=[pb.Input(encoded_image=bomb)])),
        (small_stub.ComputeGradients, pb.ComputeGradientsRequest(inputs=[pb.Input(encoded_image=bomb)])),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=60)
        error = layergrad.from_grpc_error(caught.value)
        assert isinstance(error, layergrad.InvalidArgument)
        assert error.reason == "IMAGE_TOO_LARGE" and "20000x20000" in error.message
    after = memory_kib(pid)
    assert after["VmHWM"] - before["VmRSS"] < 50 * 1024, (before, after)
    assert_answers_normally(small_stub)


# ---- concurrency ------------------------------------------------------------------------------------


def test_four_concurrent_clients_with_cancellations_each_get_their_serial_gradients(server, client):
    images = [encode(make_rgb(40 + i, 96, 128), "PNG") for i in range(4)]
    loss = layergrad.SumOfSquares("fc8")

    def fc7_gradient(sdk: layergrad.Client, image: bytes) -> np.ndarray:
        return sdk.layer_gradients([image], loss, ["fc7"])["fc7"]

    reference = [fc7_gradient(client, image) for image in images]
    assert not np.array_equal(reference[0], reference[1])

    def worker(index: int) -> list[np.ndarray]:
        got = []
        with (
            layergrad.Client(server.address, timeout=300) as sdk,
            grpc.insecure_channel(server.address) as channel,
        ):
            stub = pb_grpc.GradientServiceStub(channel)
            for round_ in range(2):
                if (index + round_) % 2:  # a call abandoned part-way
                    doomed = stub.ComputeGradients.future(slow(batch=1), timeout=120)
                    time.sleep(0.2 + 0.3 * index)
                    doomed.cancel()
                got.append(fc7_gradient(sdk, images[index]))
        return got

    with futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    for index, got in enumerate(results):
        for array in got:
            np.testing.assert_array_equal(array, reference[index])


# ---- shutdown -------------------------------------------------------------------------------------


def test_sigterm_finishes_the_call_in_flight_refuses_queued_calls_that_cannot_fit_and_exits_zero(
    weights_file, tmp_path
):
    process = ServerProcess(
        ["--weights", str(weights_file), "--max-queue", "4", "--grace", "6"], tmp_path / "server.log"
    )
    try:
        process.wait_serving()
        with grpc.insecure_channel(process.address, options=NO_RETRIES) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            started = time.monotonic()
            stub.ComputeGradients(slow(batch=1), timeout=120)
            one = time.monotonic() - started  # the estimate the server now holds, too
            in_flight = stub.ComputeGradients.future(slow(batch=1), timeout=120)
            time.sleep(0.3)
            queued = []
            for _ in range(4):
                queued.append(stub.ComputeGradients.future(slow(batch=1), timeout=120))
                time.sleep(0.05)
            process.process.send_signal(15)
            wait_for_log(process, "shutting down", 1)
            assert process.health() == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as caught:
                stub.ComputeGradients(cheap(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_of(in_flight) is None
            outcomes = [error_of(call) for call in queued]
        assert process.process.wait(30) == 0
        stopped_after = time.monotonic() - started - one
    finally:
        process.terminate()
    # 6 s of grace hold the call in flight and maybe a queued one, never all four (each takes `one`).
    # Queued calls the estimate says cannot finish are refused at once (SHUTTING_DOWN); one that
    # started but outran the grace is cancelled by the server's stop: UNAVAILABLE as well.
    finished = sum(e is None for e in outcomes)
    assert outcomes[:finished] == [None] * finished, outcomes
    assert all(isinstance(e, layergrad.Unavailable) for e in outcomes[finished:]), outcomes
    if one > 1.5:
        assert outcomes[-1] is not None and outcomes[-1].reason == "SHUTTING_DOWN", outcomes
    assert stopped_after < 6 + 5
    assert "stopped" in process.log() and "Traceback" not in process.log()
