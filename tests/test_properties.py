"""Random well-formed but wrong requests against a live server: a status a caller can act on,
never UNKNOWN or INTERNAL, never a crash."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc

NAMES = ["conv1_1", "conv5_3", "pool5", "fc7", "fc8", "prob", "fc8/W", "fc8/b", "conv1_1/b", "", "nope", "é"]
# OUT_OF_RANGE: FLOAT16 output (unscaled: these requests do not set float16_scaling) or BFLOAT16 output
# refused, with counts, because a value would become infinite or zero.
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}

dims = st.one_of(
    st.sampled_from([[1, 1000], [1, 4096], [2, 1000], [1, 512, 14, 14]]),
    st.lists(st.sampled_from([-1, 0, 1, 2, 3, 224, 1000, 4096, 2**40]), max_size=5),
)
enum_values = st.integers(min_value=-2, max_value=8)
# Mostly valid values, so that requests get past the first checks and reach the later ones.
patterns = st.sampled_from([1, 2, 3]) | enum_values
output_dtypes = st.sampled_from([0, 1, 2, 7]) | enum_values


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    shape = draw(dims)
    dtype = draw(st.just(pb.DATA_TYPE_FLOAT32) | enum_values)
    size = 1
    for d in shape:
        size *= max(d, 0)
    itemsize = {1: 4, 2: 2, 3: 8, 4: 1, 5: 4, 6: 8}.get(dtype, 4)
    honest = size * itemsize <= 1 << 20 and draw(st.booleans())
    if honest:
        values = draw(st.sampled_from([0.0, 1.5, -3.0, float("nan"), float("inf")]))
        data = (
            np.full(size, values).astype({1: "<f4", 2: "<f2", 3: "<f8", 4: "u1"}.get(dtype, "<f4")).tobytes()
        )
        data = data[: size * itemsize]
    else:
        data = draw(st.binary(max_size=64))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def prepared_input() -> pb.Input:
    zeros = np.zeros((3, 224, 224), np.float32)
    return pb.Input(prepared=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[3, 224, 224], data=zeros.tobytes()))


inputs = st.one_of(
    st.just(prepared_input()),
    tensors().map(lambda t: pb.Input(prepared=t)),
    tensors().map(lambda t: pb.Input(rgb_image=t)),
    st.binary(max_size=64).map(lambda b: pb.Input(encoded_image=b)),
    st.just(pb.Input()),
)
# Seven batches in ten are valid, so that most requests reach the checks of loss and targets.
batches = st.integers(0, 9).flatmap(
    lambda i: (
        st.lists(st.just(prepared_input()), min_size=1, max_size=2) if i < 7 else st.lists(inputs, max_size=2)
    )
)
classes = st.lists(st.integers(0, 999), min_size=1, max_size=1) | st.lists(
    st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.integers(0, 999), max_size=3
)
losses = st.one_of(
    st.just(pb.Loss()),
    st.sampled_from(NAMES).map(lambda n: pb.Loss(sum_of_squares=pb.SumOfSquares(layer=n))),
    st.builds(
        lambda n, c: pb.Loss(class_score=pb.ClassScore(layer=n, classes=c)), st.sampled_from(NAMES), classes
    ),
    classes.map(lambda c: pb.Loss(softmax_cross_entropy=pb.SoftmaxCrossEntropy(labels=c))),
    st.builds(
        lambda n, t, c: pb.Loss(squared_error=pb.SquaredError(layer=n, target=t, target_classes=c)),
        st.sampled_from(NAMES),
        st.none() | tensors(),
        classes,
    ),
    st.builds(
        lambda n, t: pb.Loss(upstream_gradient=pb.UpstreamGradient(layer=n, gradient=t)),
        st.sampled_from(NAMES),
        st.none() | tensors(),
    ),
)
targets = st.builds(
    pb.GradientTargets,
    parameters=st.lists(st.sampled_from(NAMES), max_size=2),
    all_parameters=st.booleans(),
    layers=st.lists(st.sampled_from(NAMES), max_size=2),
    all_layers=st.booleans(),
    input=st.booleans(),
)
gradient_requests = st.builds(
    pb.ComputeGradientsRequest,
    inputs=batches,
    loss=losses,
    pattern=patterns,
    targets=targets,
    activation_layers=st.lists(st.sampled_from(NAMES), max_size=2),
    output_dtype=output_dtypes,
)
predict_requests = st.builds(
    pb.PredictRequest,
    inputs=batches,
    layers=st.lists(st.sampled_from(NAMES), max_size=2),
    output_dtype=output_dtypes,
)


@pytest.fixture(scope="module")
def stub(server):
    options = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 1 << 30)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        yield pb_grpc.GradientServiceStub(channel)


def status_of(call, request) -> grpc.StatusCode:
    try:
        call(request, timeout=120)
    except grpc.RpcError as error:
        assert error.code() in ACCEPTABLE, (error.code(), error.details(), request)
        assert "Traceback" not in (error.details() or "")
        return error.code()
    return grpc.StatusCode.OK


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=st.one_of(gradient_requests, predict_requests))
def test_random_wrong_requests_get_an_actionable_status_never_internal(server, stub, request):
    if isinstance(request, pb.PredictRequest):
        status_of(stub.Predict, request)
    else:
        status_of(stub.ComputeGradients, request)
    assert server.process.poll() is None


def test_server_still_serves_after_the_random_requests(server, client):
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert client.predict([np.zeros((3, 224, 224), np.float32)])["prob"].shape == (1, 1000)
