"""ExportGradients: results written into the caller's shared memory (``gradients(shared_memory=True)``).

Results must equal the stream's exactly; a Client reuses one region across
calls and grows it when a result does not fit; every region error is refused
with its status before any compute and the server keeps serving; and no segment
outlives its owner: ``close()``, an exception, garbage collection, a normal
interpreter exit and even a killed client (the server unlinks what nobody holds
a lock on) all leave ``/dev/shm`` as it was.
"""

from __future__ import annotations

import layergrad_server  # noqa: F401  (applies the numpy 2 shim Chainer needs)

# isort: split
import _posixshmem
import fcntl
import gc
import mmap
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import grpc
import layergrad
import numpy as np
import pytest
from conftest import make_rgb, serving
from google.rpc import error_details_pb2
from layergrad import _shm
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad_server import engine, shm
from layergrad_server.launch import ServerProcess
from layergrad_server.servicer import _is_local_peer

SHM_DIR = pathlib.Path("/dev/shm")
ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm (Linux)")


def segments() -> set[str]:
    return {path.name for path in SHM_DIR.iterdir() if path.name.startswith(shm.PREFIX)}


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def server_maps(process: ServerProcess) -> str:
    return pathlib.Path(f"/proc/{process.process.pid}/maps").read_text()


@pytest.fixture(scope="module")
def shm_process(weights_file, tmp_path_factory):
    flags = ["--weights", str(weights_file), "--workers", "1", "--shared-memory"]
    with serving(flags, tmp_path_factory.mktemp("shm-logs")) as process:
        yield process


@pytest.fixture(scope="module")
def shm_client(shm_process):
    with layergrad.Client(shm_process.address, timeout=300) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def stub(shm_process):
    with grpc.insecure_channel(shm_process.address) as channel:
        yield pb_grpc.GradientServiceStub(channel)


def raw_request(region: pb.SharedMemoryRegion | None = None, **targets) -> pb.ExportGradientsRequest:
    request = pb.ExportGradientsRequest(
        inputs=[pb.Input(rgb_image=layergrad._tensors.to_tensor(make_rgb(5)))],
        loss=layergrad.SumOfSquares("fc8")._to_proto(),
        pattern=pb.BACKWARD_PATTERN_GRAD,
        targets=pb.GradientTargets(**(targets or {"parameters": ["fc8/b"]})),
    )
    if region is not None:
        request.region.CopyFrom(region)
    return request


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    return layergrad.errors.from_grpc_error(error).error_info


def field_of(error: grpc.RpcError) -> list[str]:
    return [field for field, _ in layergrad.errors.from_grpc_error(error).field_violations]


def assert_same(a: layergrad.GradientResult, b: layergrad.GradientResult) -> None:
    assert a.loss == b.loss
    for one, other in ((a.layers, b.layers), (a.parameters, b.parameters), (a.activations, b.activations)):
        assert list(one) == list(other)
        for name in one:
            assert one[name].dtype == other[name].dtype and one[name].shape == other[name].shape
            np.testing.assert_array_equal(one[name], other[name])
    if a.input is None:
        assert b.input is None
    else:
        assert a.input.dtype == b.input.dtype
        np.testing.assert_array_equal(a.input, b.input)


def unlocked_segment(size: int) -> str:
    """A segment of this user that nobody holds a lock on (not how the SDK makes them)."""
    name = f"{shm.PREFIX}test-unlocked-{os.getpid()}-{time.monotonic_ns()}"
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return name


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_shared_memory_equals_the_stream(shm_client, dtype, capfd):
    images = [make_rgb(1), make_rgb(2)]
    kwargs = dict(
        pattern="backward_retain_grad",
        input=True,
        layers=["conv1_2", "conv5_3", "fc7"],
        parameters=["conv1_1/W", "fc6/b", "fc8/W"],
        activations=["fc8"],
        dtype=dtype,
    )
    loss = layergrad.ClassScore("fc8", [3, 7])
    copied = shm_client.gradients(images, loss, shared_memory=True, **kwargs)
    streamed = shm_client.gradients(images, loss, **kwargs)
    assert_same(copied, streamed)
    assert copied.input.dtype == np.float32 and copied.input.flags.writeable
    viewed = shm_client.gradients(images, loss, shared_memory=True, copy=False, **kwargs)
    assert_same(viewed, streamed)
    # float16 is decoded into new float32 arrays; float32 is viewed in place, read-only.
    views = dtype == "float32"
    assert (
        viewed.input.flags.writeable is not views and viewed.parameters["fc8/W"].flags.writeable is not views
    )
    assert len(shm_client.shared_memory_regions) == 1
    assert "resource_tracker" not in capfd.readouterr().err


def test_every_parameter_gradient_through_shared_memory_equals_the_stream(shm_client):
    loss = layergrad.SumOfSquares("fc8")
    kwargs = dict(pattern="backward", parameters="all")
    via_shm = shm_client.gradients(make_rgb(4), loss, shared_memory=True, copy=False, **kwargs)
    streamed = shm_client.gradients(make_rgb(4), loss, **kwargs)
    assert len(via_shm.parameters) == 32
    assert_same(via_shm, streamed)
    (name,) = shm_client.shared_memory_regions
    assert (SHM_DIR / name).stat().st_size >= 553_430_176


def test_a_client_reuses_its_region_and_grows_it_once(shm_process):
    before = segments()
    loss = layergrad.SumOfSquares("fc8")
    with layergrad.Client(shm_process.address, timeout=300) as sdk:
        assert sdk.shared_memory_regions == []
        sdk.gradients(make_rgb(1), loss, parameters=["fc8/b"], shared_memory=True)
        (small,) = sdk.shared_memory_regions
        sdk.gradients(make_rgb(2), loss, parameters=["fc7/b", "fc8/b"], shared_memory=True)
        assert sdk.shared_memory_regions == [small]
        assert segments() - before == {small}
        big = sdk.gradients(make_rgb(3), loss, parameters=["fc8/W"], shared_memory=True)
        assert big.parameters["fc8/W"].shape == (1000, 4096)
        (grown,) = sdk.shared_memory_regions
        assert grown != small and segments() - before == {grown}
        assert (SHM_DIR / grown).stat().st_size >= 1000 * 4096 * 4
        sdk.gradients(make_rgb(4), loss, parameters=["fc8/b"], shared_memory=True)
        assert sdk.shared_memory_regions == [grown]
        assert wait_for(lambda: small not in server_maps(shm_process), 5)
    assert segments() == before


def test_a_region_unlinked_behind_the_clients_back_is_replaced(shm_process):
    loss = layergrad.SumOfSquares("fc8")
    with layergrad.Client(shm_process.address, timeout=300) as sdk:
        sdk.gradients(make_rgb(1), loss, parameters=["fc8/b"], shared_memory=True)
        (first,) = sdk.shared_memory_regions
        shm.unlink(first)
        result = sdk.gradients(make_rgb(1), loss, parameters=["fc8/b"], shared_memory=True)
        assert result.parameters["fc8/b"].shape == (1000,)
        (second,) = sdk.shared_memory_regions
        assert second != first and second in segments()
    assert second not in segments()


def test_a_zero_copy_result_stays_correct_until_the_next_call(shm_client):
    loss = layergrad.SumOfSquares("fc8")
    kwargs = dict(parameters=["fc7/W", "fc8/b"], input=True, shared_memory=True, copy=False)
    first = shm_client.gradients(make_rgb(7), loss, **kwargs)
    kept = {name: array.copy() for name, array in first.parameters.items()}
    kept_input = first.input.copy()
    with pytest.raises(ValueError, match="read-only"):
        first.parameters["fc8/b"][0] = 1.0
    shm_client.gradients(make_rgb(8), loss, parameters=["fc8/b"])  # a stream call leaves it alone
    shm_client.model_info()
    for name, array in first.parameters.items():
        np.testing.assert_array_equal(array, kept[name])
    np.testing.assert_array_equal(first.input, kept_input)
    second = shm_client.gradients(make_rgb(9), loss, **kwargs)
    assert not np.array_equal(second.parameters["fc8/b"], kept["fc8/b"])
    np.testing.assert_array_equal(first.parameters["fc8/b"], second.parameters["fc8/b"])  # overwritten


def test_concurrent_calls_of_one_client_get_a_region_each(shm_process):
    loss = layergrad.SumOfSquares("fc8")
    with layergrad.Client(shm_process.address, timeout=300) as sdk:
        results: dict[int, layergrad.GradientResult] = {}

        def call(seed: int) -> None:
            results[seed] = sdk.gradients(make_rgb(seed), loss, parameters=["fc8/b"], shared_memory=True)

        threads = [threading.Thread(target=call, args=(seed,)) for seed in (11, 12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert 1 <= len(sdk.shared_memory_regions) <= 2
        for seed in (11, 12):
            streamed = sdk.gradients(make_rgb(seed), loss, parameters=["fc8/b"])
            np.testing.assert_array_equal(results[seed].parameters["fc8/b"], streamed.parameters["fc8/b"])


def test_the_response_points_into_the_region_and_reports_server_timing(stub):
    region = _shm.Region(1 << 20)
    try:
        response, call = stub.ExportGradients.with_call(
            raw_request(region.to_proto(), parameters=["fc8/b"], input=True), timeout=120
        )
        assert [t.name for t in response.tensors] == ["input", "fc8/b"]
        assert all(t.offset % shm.ALIGNMENT == 0 for t in response.tensors)
        assert response.tensors[1].offset == 3 * 224 * 224 * 4
        timing = dict(call.trailing_metadata())["server-timing"]
        assert [part.split(";")[0] for part in timing.split(", ")] == [
            "queue",
            "compute",
            "send",
            "pre",
            "write",
        ]
        assert region.read(response, copy=True)[1].array.shape == (1000,)
    finally:
        region.destroy()


def test_a_segment_recreated_under_the_same_name_is_mapped_again(stub, shm_process):
    name = f"{shm.PREFIX}test-recreated-{os.getpid()}"
    for size in (1 << 20, 2 << 20):
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        region = pb.SharedMemoryRegion(name=name, offset=128, size=size - 128)
        response = stub.ExportGradients(raw_request(region, parameters=["fc8/b"]), timeout=120)
        (ref,) = response.tensors
        assert ref.offset == 128
        written = np.frombuffer(memory, np.float32, count=1000, offset=ref.offset).copy()
        assert np.any(written != 0)
        _posixshmem.shm_unlink("/" + name)
        memory.close()
    assert wait_for(lambda: name not in server_maps(shm_process), 5)


def test_region_errors_have_their_status_and_the_server_keeps_serving(stub, shm_client):
    region = _shm.Region(1 << 20)
    other = region.to_proto()
    try:
        error = rpc_error(lambda: stub.ExportGradients(raw_request(), timeout=60))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).reason == "REGION_REQUIRED" and field_of(error) == ["region"]

        for bad in ("other-name", "layergrad-", "layergrad-a/b", "../layergrad-x", "layergrad-" + "a" * 246):
            error = rpc_error(
                lambda bad=bad: stub.ExportGradients(
                    raw_request(pb.SharedMemoryRegion(name=bad, size=4096)), timeout=60
                )
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert error_info(error).reason == "REGION_NAME_INVALID" and field_of(error) == ["region.name"]

        error = rpc_error(
            lambda: stub.ExportGradients(
                raw_request(pb.SharedMemoryRegion(name=f"{shm.PREFIX}missing-{os.getpid()}", size=4096)),
                timeout=60,
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(error).reason == "REGION_NOT_FOUND" and field_of(error) == ["region.name"]

        misaligned = pb.SharedMemoryRegion(name=other.name, offset=32, size=4096)
        error = rpc_error(lambda: stub.ExportGradients(raw_request(misaligned), timeout=60))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_of(error) == ["region.offset"]

        past_end = pb.SharedMemoryRegion(name=other.name, offset=4096, size=region.size)
        error = rpc_error(lambda: stub.ExportGradients(raw_request(past_end), timeout=60))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).reason == "REGION_OUTSIDE_SEGMENT" and field_of(error) == ["region.size"]

        small = pb.SharedMemoryRegion(name=other.name, offset=0, size=3000)
        error = rpc_error(
            lambda: stub.ExportGradients(raw_request(small, parameters=["fc8/b"], input=True), timeout=60)
        )
        needed = 3 * 224 * 224 * 4 + 1000 * 4
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).reason == "REGION_TOO_SMALL" and field_of(error) == ["region.size"]
        assert error_info(error).metadata["needed_bytes"] == str(needed)
        assert str(needed) in error.details()

        unlocked = unlocked_segment(1 << 20)
        try:
            loose = pb.SharedMemoryRegion(name=unlocked, size=1 << 20)
            error = rpc_error(lambda: stub.ExportGradients(raw_request(loose), timeout=60))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_info(error).reason == "REGION_NOT_LOCKED"
        finally:
            shm.unlink(unlocked)
    finally:
        region.destroy()
    result = shm_client.gradients(
        make_rgb(1), layergrad.SumOfSquares("fc8"), parameters=["fc8/b"], shared_memory=True
    )
    assert result.parameters["fc8/b"].shape == (1000,)


@pytest.mark.parametrize("kind", ["directory", "fifo", "socket"])
def test_a_region_name_that_is_not_a_regular_segment_is_invalid_argument(stub, kind):
    name = f"{shm.PREFIX}{kind}-{os.getpid()}"
    path = pathlib.Path("/dev/shm") / name
    holder = None
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    else:
        holder = socket.socket(socket.AF_UNIX)
        holder.bind(str(path))
    try:
        error = rpc_error(
            lambda: stub.ExportGradients(raw_request(pb.SharedMemoryRegion(name=name, size=4096)), timeout=60)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error_info(error).reason == "REGION_NOT_A_SEGMENT" and field_of(error) == ["region.name"]
        assert "not a shared memory segment" in error.details()
    finally:
        if holder is not None:
            holder.close()
        path.rmdir() if kind == "directory" else path.unlink()
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60).model_name == "VGG16"


def test_the_server_never_opens_names_outside_its_prefix(stub):
    """Names that would leave /dev/shm or name other segments are refused before any open."""
    before = segments()
    for bad in ("layergrad-../../etc/passwd", "/layergrad-x", "layergrad-x\0y", "LAYERGRAD-x"):
        error = rpc_error(
            lambda bad=bad: stub.ExportGradients(
                raw_request(pb.SharedMemoryRegion(name=bad, size=4096)), timeout=60
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert segments() == before


def test_shared_memory_is_failed_precondition_when_the_server_has_it_off(client):
    before = segments()
    with pytest.raises(layergrad.FailedPrecondition) as caught:
        client.gradients(make_rgb(1), layergrad.SumOfSquares("fc8"), parameters=["fc8/b"], shared_memory=True)
    assert "--shared-memory" in caught.value.message
    assert caught.value.reason == "SHARED_MEMORY_DISABLED"
    client.free_shared_memory()
    assert client.shared_memory_regions == [] and segments() == before


def test_shared_memory_is_refused_for_a_remote_target():
    with layergrad.Client("192.0.2.1:50051") as remote, pytest.raises(ValueError, match="this host"):
        remote.gradients(make_rgb(1), layergrad.SumOfSquares("fc8"), parameters=["fc8/b"], shared_memory=True)


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.3.2.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("unix:/tmp/layergrad.sock", True),
        ("ipv4:10.0.0.2:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("", False),
    ],
)
def test_only_local_peers_may_export(peer, local):
    assert _is_local_peer(peer) is local


def test_regions_are_unlinked_on_close_and_after_an_exception(shm_process, monkeypatch):
    before = segments()
    loss = layergrad.SumOfSquares("fc8")
    sdk = layergrad.Client(shm_process.address, timeout=300)
    with pytest.raises(layergrad.InvalidArgument):
        sdk.gradients(make_rgb(1), loss, parameters=["nope/W"], shared_memory=True)
    assert len(segments() - before) == 1  # the region, kept for the next call

    def broken(self, response, *, copy):
        raise RuntimeError("failed while reading")

    monkeypatch.setattr(_shm.Region, "read", broken)
    with pytest.raises(RuntimeError, match="failed while reading"):
        sdk.gradients(make_rgb(1), loss, parameters=["fc8/b"], shared_memory=True)
    assert len(segments() - before) == 1
    sdk.close()
    assert segments() == before
    monkeypatch.undo()

    with pytest.raises(KeyError), layergrad.Client(shm_process.address, timeout=300) as sdk:
        sdk.gradients(make_rgb(1), loss, parameters=["fc8/b"], shared_memory=True)
        assert len(segments() - before) == 1
        raise KeyError("the caller's own error")
    assert segments() == before


def test_a_garbage_collected_client_unlinks_its_region(shm_process):
    before = segments()
    sdk = layergrad.Client(shm_process.address, timeout=300)
    sdk.gradients(make_rgb(1), layergrad.SumOfSquares("fc8"), parameters=["fc8/b"], shared_memory=True)
    (name,) = sdk.shared_memory_regions
    del sdk
    gc.collect()
    assert name not in segments() and segments() == before


def test_the_server_unmaps_a_region_its_client_unlinked(shm_process):
    with layergrad.Client(shm_process.address, timeout=300) as sdk:
        sdk.gradients(make_rgb(1), layergrad.SumOfSquares("fc8"), parameters=["fc8/b"], shared_memory=True)
        (name,) = sdk.shared_memory_regions
        assert name in server_maps(shm_process)
    assert wait_for(lambda: name not in server_maps(shm_process), 5)


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import layergrad
    import numpy as np

    client = layergrad.Client(sys.argv[1], timeout=300)
    client.gradients(np.zeros((3, 224, 224), np.float32), layergrad.SumOfSquares("fc8"),
                     parameters=["fc8/b"], shared_memory=True)
    print(*client.shared_memory_regions, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def run_child(address: str, how: str) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, address, how], capture_output=True, text=True, timeout=300, env=env
    )
    return done, done.stdout.strip()


def test_a_client_process_that_exits_without_close_leaves_no_segment(shm_process):
    before = segments()
    done, name = run_child(shm_process.address, "exit")
    assert done.returncode == 0, done.stderr
    assert name.startswith(shm.PREFIX)
    assert name not in segments() and segments() == before
    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr


def test_the_server_unlinks_the_region_of_a_killed_client(shm_process):
    """A killed client cannot unlink its region; its lock dies with it, and the server unlinks it."""
    before = segments()
    done, name = run_child(shm_process.address, "kill")
    assert done.returncode == -signal.SIGKILL
    assert name.startswith(shm.PREFIX)
    assert wait_for(lambda: name not in segments(), 5)
    assert wait_for(lambda: name not in server_maps(shm_process), 5)
    assert segments() == before
    assert "creator gone" in shm_process.log()


def test_the_server_creates_and_keeps_no_segment(weights_file, tmp_path):
    before = segments()
    process = ServerProcess(
        ["--weights", str(weights_file), "--workers", "1", "--shared-memory"], tmp_path / "server.log"
    )
    try:
        process.wait_serving()
        with layergrad.Client(process.address, timeout=300) as sdk:
            sdk.gradients(
                make_rgb(1), layergrad.SumOfSquares("fc8"), parameters=["fc8/b"], shared_memory=True
            )
            (name,) = sdk.shared_memory_regions
            assert segments() - before == {name}
    finally:
        assert process.terminate() == 0
    assert segments() == before
    log = process.log()
    assert "resource_tracker" not in log and "leaked" not in log


def test_layout_aligns_every_tensor():
    kind = engine.Kind.PARAMETER_GRADIENT
    specs = [
        engine.ResultSpec("a", kind, (3,), np.dtype(np.float32)),
        engine.ResultSpec("b", kind, (0, 2), np.dtype(np.float32)),
        engine.ResultSpec("c", kind, (5,), np.dtype(np.float16)),
    ]
    assert shm.layout(specs) == ([0, 64, 64], 74)
    assert shm.layout(specs, base=128) == ([128, 192, 192], 74)
    assert shm.layout([]) == ([], 0)


def test_every_parameter_gradient_takes_the_documented_bytes(shm_client):
    info = shm_client.model_info()
    kind = engine.Kind.PARAMETER_GRADIENT
    specs = [engine.ResultSpec(p.name, kind, p.shape, np.dtype(p.dtype)) for p in info.parameters]
    assert shm.layout(specs)[1] == 553_430_176


def test_export_needs_the_same_scopes_as_the_stream():
    from layergrad_server.status import required_scopes

    request = raw_request(parameters=["fc8/b"], input=True)
    stream = pb.StreamGradientsRequest.FromString(request.SerializeToString())
    assert required_scopes("ExportGradients", request) == required_scopes("StreamGradients", stream)
    assert required_scopes("ExportGradients", request) == {"input-gradients", "param-gradients"}
