"""ExportGradients: the same-host shared memory fast path (``Client.gradients(shared_memory=True)``).

Results must equal the stream's exactly, and no segment may outlive its use: the
SDK unlinks what it reads, the server unlinks what nobody claimed within
``--shm-claim-seconds`` and everything left when it stops, and a refused call
creates none.
"""

from __future__ import annotations

import layergrad_server  # noqa: F401  (applies the numpy 2 shim Chainer needs)

# isort: split
import os
import pathlib
import time

import grpc
import layergrad
import numpy as np
import pytest
from conftest import make_rgb
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad_server import engine, shm
from layergrad_server.launch import ServerProcess

CLAIM_SECONDS = 2.0
SHM_DIR = pathlib.Path("/dev/shm")

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm (Linux)")


def segments() -> set[str]:
    return {path.name for path in SHM_DIR.iterdir() if path.name.startswith(shm.PREFIX)}


def wait_until_gone(names: set[str], timeout: float) -> set[str]:
    deadline = time.monotonic() + timeout
    while (left := names & segments()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def shm_server(weights_file: pathlib.Path, log_path: pathlib.Path) -> ServerProcess:
    return ServerProcess(
        [
            "--weights",
            str(weights_file),
            "--workers",
            "1",
            "--shared-memory",
            "--shm-claim-seconds",
            str(CLAIM_SECONDS),
        ],
        log_path,
    )


@pytest.fixture(scope="module")
def shm_process(weights_file, tmp_path_factory):
    process = shm_server(weights_file, tmp_path_factory.mktemp("shm-logs") / "server.log")
    try:
        process.wait_serving()
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def shm_client(shm_process):
    with layergrad.Client(shm_process.address, timeout=300) as sdk:
        yield sdk


def raw_request(**targets) -> pb.ExportGradientsRequest:
    return pb.ExportGradientsRequest(
        inputs=[pb.Input(rgb_image=layergrad._tensors.to_tensor(make_rgb(5)))],
        loss=layergrad.SumOfSquares("fc8")._to_proto(),
        pattern=pb.BACKWARD_PATTERN_GRAD,
        targets=pb.GradientTargets(**targets),
    )


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


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_shared_memory_equals_the_stream(shm_client, dtype, capfd):
    before = segments()
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
    via_shm = shm_client.gradients(images, loss, shared_memory=True, **kwargs)
    streamed = shm_client.gradients(images, loss, **kwargs)
    assert_same(via_shm, streamed)
    assert via_shm.input.dtype == np.dtype(dtype) and via_shm.input.flags.writeable
    assert segments() == before
    assert "resource_tracker" not in capfd.readouterr().err


def test_every_parameter_gradient_through_shared_memory_equals_the_stream(shm_client, shm_process):
    before = segments()
    loss = layergrad.SumOfSquares("fc8")
    kwargs = dict(pattern="backward", parameters="all")
    via_shm = shm_client.gradients(make_rgb(4), loss, shared_memory=True, **kwargs)
    streamed = shm_client.gradients(make_rgb(4), loss, **kwargs)
    assert len(via_shm.parameters) == 32
    assert_same(via_shm, streamed)
    assert segments() == before


def test_an_unclaimed_segment_is_unlinked_after_the_claim_time(shm_process):
    with grpc.insecure_channel(shm_process.address) as channel:
        response = pb_grpc.GradientServiceStub(channel).ExportGradients(
            raw_request(parameters=["fc8/b"], input=True), timeout=120
        )
    name = response.segment_name
    assert name.startswith(shm.PREFIX) and name in segments()
    assert [t.name for t in response.tensors] == ["input", "fc8/b"]
    assert all(t.offset % shm.ALIGNMENT == 0 for t in response.tensors)
    assert response.segment_bytes >= response.tensors[1].offset + 1000 * 4
    assert (SHM_DIR / name).stat().st_mode & 0o777 == 0o600
    assert not wait_until_gone({name}, CLAIM_SECONDS + 5)


def test_a_refused_call_creates_no_segment(shm_client, shm_process):
    before = segments()
    with pytest.raises(layergrad.InvalidArgument):
        shm_client.gradients(
            make_rgb(1), layergrad.SumOfSquares("fc8"), parameters=["nope/W"], shared_memory=True
        )
    with pytest.raises(layergrad.InvalidArgument):
        shm_client.gradients(
            make_rgb(1), layergrad.SumOfSquares("conv3_1"), layers=["fc7"], shared_memory=True
        )
    assert segments() == before


def test_segments_are_unlinked_when_the_server_stops(weights_file, tmp_path):
    process = shm_server(weights_file, tmp_path / "server.log")
    try:
        process.wait_serving()
        with grpc.insecure_channel(process.address) as channel:
            name = (
                pb_grpc.GradientServiceStub(channel)
                .ExportGradients(raw_request(parameters=["fc8/b"]), timeout=120)
                .segment_name
            )
        assert name in segments()
    finally:
        assert process.terminate() == 0
    assert name not in segments()
    log = process.log()
    assert "resource_tracker" not in log and "leaked" not in log


def test_shared_memory_is_failed_precondition_when_the_server_has_it_off(client):
    with pytest.raises(layergrad.FailedPrecondition) as caught:
        client.gradients(make_rgb(1), layergrad.SumOfSquares("fc8"), parameters=["fc8/b"], shared_memory=True)
    assert "--shared-memory" in caught.value.message
    assert caught.value.reason == "SHARED_MEMORY_DISABLED"


def test_shared_memory_is_refused_for_a_remote_target():
    with layergrad.Client("192.0.2.1:50051") as remote, pytest.raises(ValueError, match="this host"):
        remote.gradients(make_rgb(1), layergrad.SumOfSquares("fc8"), parameters=["fc8/b"], shared_memory=True)


def test_a_segment_the_server_already_reaped_is_data_loss(shm_process, shm_client, monkeypatch):
    """A segment unlinked before the SDK attaches (claim time over) is DataLoss, and nothing stays."""
    from layergrad import _shm

    real = _shm._copy_out

    def late(response):
        shm.unlink(response.segment_name)
        return real(response)

    monkeypatch.setattr(_shm, "_copy_out", late)
    before = segments()
    with pytest.raises(layergrad.DataLoss, match="claim time"):
        shm_client.gradients(
            make_rgb(1), layergrad.SumOfSquares("fc8"), parameters=["fc8/b"], shared_memory=True
        )
    assert segments() == before


def test_layout_aligns_every_tensor():
    kind = engine.Kind.PARAMETER_GRADIENT
    tensors = [
        engine.ResultTensor("a", kind, np.zeros(3, np.float32)),
        engine.ResultTensor("b", kind, np.zeros((0, 2), np.float32)),
        engine.ResultTensor("c", kind, np.zeros(5, np.float32), np.dtype(np.float16)),
    ]
    offsets, size = shm.layout(tensors)
    assert offsets == [0, 64, 64] and size == 74
    assert shm.layout([]) == ([], 1)
    assert os.sep not in shm.PREFIX


def test_export_needs_the_same_scopes_as_the_stream():
    from layergrad_server.interceptors import required_scopes

    request = raw_request(parameters=["fc8/b"], input=True)
    stream = pb.StreamGradientsRequest.FromString(request.SerializeToString())
    assert required_scopes("ExportGradients", request) == required_scopes("StreamGradients", stream)
    assert required_scopes("ExportGradients", request) == {"input-gradients", "param-gradients"}
