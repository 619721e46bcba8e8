"""``--workers N``: several server processes on one port, each with its own model; a busy
worker hands compute calls to the least-loaded one, whichever worker a connection landed on."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import tempfile
import threading
import time
from concurrent import futures

import grpc
import layergrad
import numpy as np
import pytest
from conftest import make_rgb, metric_delta, metrics_url, scrape, serving
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad_server import config as config_module
from layergrad_server import workers as workers_module
from layergrad_server._gen.inference import grpc_predict_v2_pb2 as v2
from layergrad_server._gen.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from layergrad_server.forwarding import WORKER_METADATA_KEY
from layergrad_server.launch import ServerProcess

SERVICE = "/layergrad.v1.GradientService/"
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # a connection of its own per channel
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 1 << 30),
]


def children_of(pid: int) -> list[int]:
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_for_log(server: ServerProcess, pattern: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, server.log())) < count:
        assert time.monotonic() < deadline, f"no {count} x {pattern!r} in the log:\n{server.log()[-4000:]}"
        time.sleep(0.05)


def prepared(array: np.ndarray) -> pb.Input:
    return pb.Input(prepared=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=array.shape, data=array.tobytes()))


def input_gradient_request(seed: int, batch: int = 1) -> pb.ComputeGradientsRequest:
    """The input gradient of a class score: a full forward and backward pass per input (a batch
    of ``SLOW`` inputs keeps a worker busy for seconds)."""
    image = np.random.default_rng(seed).standard_normal((3, 224, 224)).astype(np.float32)
    return pb.ComputeGradientsRequest(
        inputs=[prepared(image)] * batch,
        loss=pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[seed * 7 % 1000] * batch)),
        pattern=pb.BACKWARD_PATTERN_GRAD,
        targets=pb.GradientTargets(input=True),
    )


def wait_computing(server: ServerProcess, count: int, timeout: float = 300.0) -> None:
    """Waits until ``count`` calls hold a compute slot across the workers (their metrics), so
    that the next call finds them busy: an event from the server, not a guess of how long."""
    wait_gauge(server, "layergrad_calls_computing", count, timeout)


def wait_gauge(server: ServerProcess, name: str, count: int, timeout: float = 300.0) -> None:
    """Waits until the workers' gauge ``name`` (summed over them) reaches ``count``."""
    url = metrics_url(server)
    deadline = time.monotonic() + timeout
    while scrape(url).get((name, frozenset()), 0.0) < count:
        assert time.monotonic() < deadline, f"{name} below {count} after {timeout:.0f}s"
        time.sleep(0.05)


SLOW = 4


def as_stream(request: pb.ComputeGradientsRequest) -> pb.StreamGradientsRequest:
    return pb.StreamGradientsRequest.FromString(request.SerializeToString())


def computed_by(call: grpc.Call) -> int:
    """The worker that answered a call (-1: not a worker of ``--workers N``)."""
    return int(dict(call.initial_metadata()).get(WORKER_METADATA_KEY, -1))


class Raw:
    """One connection (a channel of its own) and the raw bytes of what comes back."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.info = self.channel.unary_unary(
            SERVICE + "GetModelInfo", request_serializer=pb.GetModelInfoRequest.SerializeToString
        )
        self.unary = self.channel.unary_unary(
            SERVICE + "ComputeGradients", request_serializer=pb.ComputeGradientsRequest.SerializeToString
        )
        self.streaming = self.channel.unary_stream(
            SERVICE + "StreamGradients", request_serializer=pb.StreamGradientsRequest.SerializeToString
        )

    def worker(self) -> int:
        """The worker this connection landed on (GetModelInfo is answered where it arrives)."""
        _, call = self.info.with_call(pb.GetModelInfoRequest(), timeout=30)
        return computed_by(call)

    def compute(self, request: pb.ComputeGradientsRequest, timeout: float = 300) -> tuple[bytes, int]:
        """(ComputeGradients' response bytes, the worker that computed them)."""
        response, call = self.unary.with_call(request, timeout=timeout)
        return response, computed_by(call)

    def stream(self, request: pb.StreamGradientsRequest, timeout: float = 300) -> tuple[list[bytes], int]:
        """(StreamGradients' response messages, the worker that computed them)."""
        call = self.streaming(request, timeout=timeout)
        messages = list(call)
        return messages, computed_by(call)

    def close(self) -> None:
        self.channel.close()


def connections_to(address: str, worker: int, count: int, attempts: int = 200) -> list[Raw]:
    """``count`` connections that the kernel happened to give to ``worker``."""
    found: list[Raw] = []
    for _ in range(attempts):
        raw = Raw(address)
        if raw.worker() == worker:
            found.append(raw)
            if len(found) == count:
                return found
        else:
            raw.close()
    raise AssertionError(f"fewer than {count} of {attempts} connections landed on worker {worker}")


def worker_pid(server: ServerProcess, index: int) -> int:
    return int(re.findall(rf"worker {index} started \(pid (\d+)\)", server.log())[-1])


@pytest.fixture(scope="module")
def worker_server(weights_file, tmp_path_factory):
    log = tmp_path_factory.mktemp("workers") / "server.log"
    flags = ["--workers", "2", "--blas-threads", "1", "--max-queue", "1", "--grace", "60"]
    flags += ["--metrics-address", "127.0.0.1:0"]
    process = ServerProcess(["--weights", str(weights_file), *flags], log)
    try:
        process.wait_serving()
        wait_for_log(process, "workers serving", 1, timeout=300)
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def plain_server(weights_file, tmp_path_factory):
    """A single-process server with the workers' BLAS thread count: the results a group of
    workers must reproduce byte for byte (OpenBLAS rounds some products differently with
    another thread count, see ``workers``)."""
    with serving(
        ["--weights", str(weights_file), "--blas-threads", "1"], tmp_path_factory.mktemp("plain")
    ) as process:
        yield process


@pytest.fixture(scope="module")
def plain_client(plain_server):
    with layergrad.Client(plain_server.address, timeout=300) as sdk:
        yield sdk


class Reference:
    """Raw results of the plain single-process server (``plain_server``), computed once."""

    def __init__(self, address: str) -> None:
        self._raw = Raw(address)
        self._unary: dict[tuple[int, int], bytes] = {}
        self._stream: dict[int, list[bytes]] = {}

    def unary(self, seed: int, batch: int = 1) -> bytes:
        if (seed, batch) not in self._unary:
            self._unary[seed, batch] = self._raw.compute(input_gradient_request(seed, batch))[0]
        return self._unary[seed, batch]

    def stream(self, seed: int) -> list[bytes]:
        if seed not in self._stream:
            self._stream[seed] = self._raw.stream(as_stream(input_gradient_request(seed)))[0]
        return self._stream[seed]

    def close(self) -> None:
        self._raw.close()


@pytest.fixture(scope="module")
def expected(plain_server):
    reference = Reference(plain_server.address)
    yield reference
    reference.close()


# ---- units -------------------------------------------------------------------------------------


def test_default_worker_count_is_one_on_two_cpus_and_grows_with_the_machine():
    assert config_module.default_workers(1) == 1
    assert config_module.default_workers(2) == 1
    assert config_module.default_workers(8) == 4
    assert config_module.default_workers(64) == 4
    config = config_module.from_args(config_module.build_parser().parse_args(["--workers", "3"]))
    assert config.workers == 3 and config.blas_threads == 0  # CPUs / workers, set by the parent
    assert config.worker_dispatch == "least-loaded"
    args = ["--workers", "2", "--blas-threads", "1", "--worker-dispatch", "connection"]
    config = config_module.from_args(config_module.build_parser().parse_args(args))
    assert config.blas_threads == 1 and config.worker_dispatch == "connection"


def test_workers_refuse_a_unix_socket_address_with_a_clear_message():
    args = config_module.build_parser().parse_args(["--workers", "2", "--address", "unix:/tmp/x.sock"])
    with pytest.raises(SystemExit, match=r"TCP port.*unix:/tmp/x\.sock is a unix socket"):
        config_module.from_args(args)
    args = config_module.build_parser().parse_args(["--workers", "1", "--address", "unix:/tmp/x.sock"])
    assert config_module.from_args(args).workers == 1


def test_a_forwarding_worker_has_a_handler_thread_for_each_call_its_siblings_admit():
    alone = config_module.ServerConfig(compute_slots=1, max_queue=8)
    worker = config_module.ServerConfig(compute_slots=1, max_queue=8, worker_dir="/x", worker_count=3)
    kernel = config_module.ServerConfig(worker_dir="/x", worker_count=3, worker_dispatch="connection")
    assert worker.forwarding and not alone.forwarding and not kernel.forwarding
    assert worker.handler_threads == alone.handler_threads + 2 * 9 == kernel.handler_threads + 18


def test_the_load_table_is_shared_by_every_mapping_and_reset_clears_a_dead_workers_entries(tmp_path):
    path = tmp_path / "load"
    parent = workers_module.LoadTable(path, 3, create=True)
    worker = workers_module.LoadTable(path, 3)
    try:
        with worker.choosing():
            worker.add_routed(1, 1, 1)
            worker.add_routed(1, 2, 2)
        worker.set_serving(1, True)
        assert parent.loads() == [0, 1, 2] and parent.serving(1)
        parent.reset(1)
        assert worker.loads() == [0, 0, 0] and not worker.serving(1)
        with pytest.raises(ValueError):
            workers_module.LoadTable(path, 2)
    finally:
        worker.close()
        parent.close()


def test_the_private_directory_is_0700_and_short_enough_for_unix_sockets(tmp_path, monkeypatch):
    long = tmp_path / ("x" * 100)
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    directory = workers_module.private_directory(4)
    try:
        assert len(workers_module.socket_path(directory, 3)) <= 107
        assert os.stat(directory).st_mode & 0o777 == 0o700
    finally:
        os.rmdir(directory)


# ---- a real group of two workers -----------------------------------------------------------------


def test_parent_waits_for_every_worker_before_announcing_the_port(worker_server):
    log = worker_server.log()
    assert "listening on" in log and "(2 workers serving, 1 BLAS thread(s) each)" in log
    assert "each call to the least-loaded worker" in log
    assert "worker 0 serving" in log and "worker 1 serving" in log
    assert len(children_of(worker_server.process.pid)) == 2


def test_concurrent_clients_get_exactly_their_own_gradients_from_the_workers(worker_server, plain_client):
    """Four clients (four channels, spread over the workers) against the single-process server."""
    images = [make_rgb(10 + i) for i in range(4)]
    losses = [layergrad.ClassScore("fc8", [i * 7]) for i in range(4)]
    expected = [plain_client.input_gradient(image, loss) for image, loss in zip(images, losses, strict=True)]
    expected_param = plain_client.parameter_gradients(images[0], losses[0], ["fc8/b"])["fc8/b"]
    got: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        try:
            with layergrad.Client(worker_server.address, timeout=300) as sdk:
                barrier.wait()
                got[i] = [sdk.input_gradient(images[i], losses[i]) for _ in range(2)]
                if i == 0:
                    got[i].append(sdk.parameter_gradients(images[0], losses[0], ["fc8/b"])["fc8/b"])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(4):
        for array in got[i][:2]:
            np.testing.assert_array_equal(array, expected[i])
    np.testing.assert_array_equal(got[0][2], expected_param)


def test_every_tensor_of_a_full_backward_is_the_plain_servers_on_each_worker_and_when_handed_on(
    worker_server, plain_server
):
    """backward(retain_grad=True) with every parameter, every layer and the input (613 MB,
    streamed), computed by worker 0, by worker 1, and by worker 1 for a call that arrived at
    a busy worker 0: every message byte for byte the single-process server's."""
    image = np.random.default_rng(21).standard_normal((3, 224, 224)).astype(np.float32)
    request = pb.StreamGradientsRequest(
        inputs=[prepared(image)],
        loss=pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[3])),
        pattern=pb.BACKWARD_PATTERN_BACKWARD_RETAIN_GRAD,
        targets=pb.GradientTargets(all_parameters=True, all_layers=True, input=True),
    )
    reference = Raw(plain_server.address)
    try:
        wanted, _ = reference.stream(request)
    finally:
        reference.close()
    names = {pb.StreamGradientsResponse.FromString(message).name for message in wanted}
    assert len(names) == 32 + 21 + 1 and "conv4_2/W" in names  # parameters, conv1_1..fc8 (pools too), input
    on_0, busy = connections_to(worker_server.address, 0, 2)
    (on_1,) = connections_to(worker_server.address, 1, 1)
    try:
        for connection, worker in ((on_0, 0), (on_1, 1)):
            messages, computed = connection.stream(request)
            assert computed == worker
            assert messages == wanted, f"worker {worker} differs from the single-process server"
        slow = busy.unary.future(input_gradient_request(5, SLOW), timeout=300)
        wait_computing(worker_server, 1)  # worker 0 computes; the next call arriving there goes to worker 1
        messages, computed = on_0.stream(request)
        assert computed == 1
        assert messages == wanted, "the handed-on call differs from the single-process server"
        assert computed_by(slow) == 0 and slow.exception() is None
    finally:
        for connection in (on_0, busy, on_1):
            connection.close()


def test_connections_that_all_landed_on_one_worker_still_get_both_workers_computing(worker_server, expected):
    """Four connections the kernel gave to worker 0, four calls at once (two unary, two streamed),
    twice: both workers compute in every round, and every result is byte for byte the single
    server's."""
    wanted = [expected.stream(seed) if seed % 2 else expected.unary(seed) for seed in range(4)]
    connections = connections_to(worker_server.address, 0, 4)
    try:

        def call(seed: int, barrier: threading.Barrier) -> tuple[object, int]:
            barrier.wait()
            if seed % 2:
                return connections[seed].stream(as_stream(input_gradient_request(seed)))
            return connections[seed].compute(input_gradient_request(seed))

        for _ in range(2):
            barrier = threading.Barrier(4)
            with futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(call, range(4), [barrier] * 4))
            assert [result for result, _ in results] == wanted
            workers = [worker for _, worker in results]
            assert sorted(workers) == [0, 0, 1, 1], workers
    finally:
        for connection in connections:
            connection.close()


def test_one_scrape_adds_up_the_calls_of_both_workers_and_counts_handed_on_calls_once(worker_server):
    """GetModelInfo over fresh connections until both workers answered some, a refused call, and
    two compute calls at once on one connection (the second handed on): the supervisor's /metrics
    counts each exactly once."""
    url = metrics_url(worker_server)
    before = scrape(url)
    answered = []
    for _ in range(200):
        raw = Raw(worker_server.address)
        try:
            answered.append(raw.worker())
        finally:
            raw.close()
        if len(answered) >= 4 and {0, 1} <= set(answered):
            break
    assert {0, 1} <= set(answered)
    with grpc.insecure_channel(worker_server.address, options=CHANNEL_OPTIONS) as channel:
        info = channel.unary_unary(
            SERVICE + "GetModelInfo", request_serializer=pb.GetModelInfoRequest.SerializeToString
        )
        with pytest.raises(grpc.RpcError) as refused:
            info(pb.GetModelInfoRequest(), metadata=(("x-request-id", "has space"),), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    one = Raw(worker_server.address)
    try:
        with futures.ThreadPoolExecutor(2) as pool:
            computed = list(pool.map(lambda seed: one.compute(input_gradient_request(seed))[1], (5, 6)))
    finally:
        one.close()
    after = scrape(url)
    v1 = {"protocol": "layergrad_v1", "model": "vgg16", "pattern": ""}
    total = "layergrad_requests_total"
    assert metric_delta(before, after, total, **v1, method="GetModelInfo", code="OK") == len(answered)
    invalid = {"protocol": "layergrad_v1", "model": "", "pattern": "", "code": "INVALID_ARGUMENT"}
    assert metric_delta(before, after, total, **invalid, method="GetModelInfo") == 1
    grad = {"protocol": "layergrad_v1", "model": "vgg16", "pattern": "grad", "code": "OK"}
    assert metric_delta(before, after, total, **grad, method="ComputeGradients") == 2, computed
    compute = {"protocol": "layergrad_v1", "model": "vgg16", "phase": "compute", "method": "ComputeGradients"}
    assert metric_delta(before, after, "layergrad_request_phase_seconds_count", **compute) == 2
    assert after[("layergrad_calls_in_flight", frozenset({("protocol", "layergrad_v1")}))] == 0
    memory = {dict(labels)["process"] for name, labels in after if name == "layergrad_resident_memory_bytes"}
    assert memory == {"supervisor", "worker-0", "worker-1"}


def test_a_handed_on_call_keeps_its_deadline_and_the_siblings_refusal_reaches_the_caller(worker_server):
    first, second = connections_to(worker_server.address, 0, 2)
    try:
        busy = first.unary.future(input_gradient_request(0, SLOW), timeout=300)
        wait_computing(worker_server, 1)  # worker 0 computes; the next call goes to worker 1
        with pytest.raises(grpc.RpcError) as caught:
            second.compute(input_gradient_request(1), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert computed_by(caught.value) == 1
        error = layergrad.from_grpc_error(caught.value)
        assert error.reason in ("DEADLINE_TOO_SHORT", "DEADLINE_EXCEEDED")
        busy.result()
    finally:
        first.close()
        second.close()


def test_cancelling_a_handed_on_call_stops_it_on_the_sibling(worker_server):
    stopped = len(re.findall(r"\[worker 1\].*caller went away", worker_server.log()))
    first, second = connections_to(worker_server.address, 0, 2)
    try:
        busy = first.unary.future(input_gradient_request(0, SLOW), timeout=300)
        wait_computing(worker_server, 1)
        handed_on = second.unary.future(input_gradient_request(1, SLOW), timeout=300)
        wait_computing(worker_server, 2)
        assert not handed_on.done()
        handed_on.cancel()
        wait_for_log(worker_server, r"\[worker 1\].*caller went away", stopped + 1)
        busy.result()
    finally:
        first.close()
        second.close()


def test_the_group_refuses_a_call_only_when_every_worker_is_full(worker_server):
    """One slot and a queue of one per worker: four calls at once are admitted, a fifth is not."""
    connections = connections_to(worker_server.address, 0, 5)
    try:
        admitted = []
        for seed in range(4):
            admitted.append(connections[seed].unary.future(input_gradient_request(seed, SLOW), timeout=300))
            time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as caught:
            connections[4].compute(input_gradient_request(4))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert layergrad.from_grpc_error(caught.value).reason == "OVERLOADED"
        assert [f.exception() for f in admitted] == [None] * 4
        assert sorted(computed_by(f) for f in admitted) == [0, 0, 1, 1]
    finally:
        for connection in connections:
            connection.close()


def test_a_worker_killed_mid_call_is_restarted_and_the_call_is_computed_by_the_other(worker_server, expected):
    wanted = [expected.unary(0, SLOW), expected.unary(1, SLOW), expected.unary(2), expected.unary(3)]
    restarted = worker_server.log().count("worker 1 serving")
    first, second = connections_to(worker_server.address, 0, 2)
    try:
        kept = first.unary.future(input_gradient_request(0, SLOW), timeout=300)
        wait_computing(worker_server, 1)
        handed_on = second.unary.future(input_gradient_request(1, SLOW), timeout=300)
        wait_computing(worker_server, 2)  # worker 1 computes the handed-on call
        os.kill(worker_pid(worker_server, 1), signal.SIGKILL)
        assert kept.result() == wanted[0]
        assert handed_on.result() == wanted[1]
        assert computed_by(handed_on) == 0
        log = worker_server.log()
        assert "worker 1 exited with -9; restarting it" in log
        assert "worker 1 could not be reached; computing the call on worker 0" in log
        wait_for_log(worker_server, "worker 1 serving", restarted + 1, timeout=300)
        # The restarted worker takes calls again.
        barrier = threading.Barrier(2)

        def call(connection: Raw, seed: int) -> tuple[bytes, int]:
            barrier.wait()
            return connection.compute(input_gradient_request(seed))

        with futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(call, (first, second), (2, 3)))
        assert [r for r, _ in results] == wanted[2:]
        assert sorted(w for _, w in results) == [0, 1]
    finally:
        first.close()
        second.close()


def test_a_kserve_v2_infer_is_dispatched_like_its_layergrad_v1_call(worker_server, expected):
    """ModelInfer runs layergrad.v1's ComputeGradients as dispatched: computed where it arrived,
    or handed on to the idle sibling when that worker is busy, the same bytes either way."""
    wanted = pb.ComputeGradientsResponse.FromString(expected.unary(1)).gradients[0].tensor.data
    image = np.frombuffer(input_gradient_request(1).inputs[0].prepared.data, np.float32)
    request = v2.ModelInferRequest(
        inputs=[v2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 3, 224, 224])],
        outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="grad/input")],
        raw_input_contents=[image.tobytes()],
    )
    request.parameters["target_class"].int64_param = 7  # input_gradient_request(1)'s class
    first, second = connections_to(worker_server.address, 0, 2)
    try:
        infer = v2_grpc.GRPCInferenceServiceStub(second.channel).ModelInfer
        response, call = infer.with_call(request, timeout=300)
        assert computed_by(call) == 0 and response.raw_output_contents[0] == wanted
        busy = first.unary.future(input_gradient_request(0, SLOW), timeout=300)
        wait_computing(worker_server, 1)  # worker 0 computes; the next call arriving there goes to worker 1
        response, call = infer.with_call(request, timeout=300)
        assert computed_by(call) == 1 and response.raw_output_contents[0] == wanted
        assert computed_by(busy) == 0 and busy.exception() is None
    finally:
        first.close()
        second.close()


def test_sigterm_lets_calls_in_flight_finish_then_every_worker_and_the_parent_exit_zero(worker_server):
    """Runs last in this module: it stops the module's server. One call computes on the worker its
    connection landed on, one was handed to the other worker: both finish."""
    workers = children_of(worker_server.process.pid)
    first, second = connections_to(worker_server.address, 0, 2)
    outcome: dict[str, object] = {}

    def big() -> None:
        with layergrad.Client(worker_server.address, timeout=300, retry=False) as sdk:
            try:
                outcome["big"] = sdk.parameter_gradients(make_rgb(1), layergrad.SumOfSquares("fc8"), "all")
            except layergrad.LayergradError as error:
                outcome["big_error"] = error

    try:
        kept = first.unary.future(input_gradient_request(0, SLOW), timeout=300)
        wait_computing(worker_server, 1)
        handed_on = second.unary.future(input_gradient_request(1, SLOW), timeout=300)
        wait_computing(worker_server, 2)  # both compute
        thread = threading.Thread(target=big)
        thread.start()
        wait_gauge(worker_server, "layergrad_queue_depth", 1)  # the big call waits for a slot
        worker_server.process.send_signal(signal.SIGTERM)
        thread.join(300)
        assert kept.exception() is None and handed_on.exception() is None
        assert computed_by(handed_on) == 1
    finally:
        first.close()
        second.close()
    assert worker_server.process.wait(120) == 0
    assert "big_error" not in outcome, outcome.get("big_error")
    assert len(outcome["big"]) == 32
    log = worker_server.log()
    assert "received SIGTERM; stopping the workers" in log and "all workers stopped" in log
    assert re.search(r"worker 0 dispatch: \d+ compute call\(s\) arrived on the port", log)
    assert not [pid for pid in workers if pathlib.Path(f"/proc/{pid}").exists()]
