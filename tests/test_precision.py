"""Reduced-precision output: the conversions against references written element by element, and
bfloat16 and scaled float16 through a real server (every output path) and the real SDK."""

from __future__ import annotations

import struct

import grpc
import layergrad
import numpy as np
import pytest
from conftest import make_rgb, serving
from google.rpc import error_details_pb2, status_pb2
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad._tensors import to_tensor
from layergrad_server import precision


def _reference_bfloat16(value: float) -> int:
    """Round-to-nearest-even of one float32 to its upper 16 bits, NaN kept NaN."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    if value != value:
        return (bits >> 16) | 0x0040
    upper, lower = bits >> 16, bits & 0xFFFF
    if lower > 0x8000 or (lower == 0x8000 and upper & 1):
        upper += 1
    return upper


def test_bfloat16_rounds_to_nearest_even_like_the_element_reference():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(2000).astype(np.float32) * np.float32(1e-3),
            np.array(
                [0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-40, 1.00390625, 1.01171875],
                dtype=np.float32,
            ),
            np.array([0x7F810001, 0x7FFFFFFF, 0x3F808000, 0x3F818000], dtype=np.uint32).view(np.float32),
        ]
    )
    got = precision.bfloat16_bits(values)
    expected = np.array([_reference_bfloat16(float(v)) for v in values], dtype=np.uint16)
    np.testing.assert_array_equal(got, expected)
    back = precision.bfloat16_to_float32(got)
    assert np.isnan(back[np.isnan(values)]).all()
    assert back[values == np.inf].tolist() == [np.inf]


def test_bfloat16_of_an_empty_tensor_is_empty():
    assert precision.bfloat16_bits(np.zeros((0, 3), np.float32)).shape == (0, 3)


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1.0, 1e6, 1e30])
def test_scaled_float16_never_overflows_and_undoes_its_power_of_two_scale(scale):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(5000) * scale).astype(np.float32)
    exponent = precision.float16_scale_exponent(values)
    half = precision.to_float16(values, exponent)
    assert np.isfinite(half).all()
    expected = (values.astype(np.float64) * 2.0**exponent).astype(np.float16)  # reference rounding
    np.testing.assert_array_equal(half, expected)
    back = precision.from_float16(half, exponent)
    np.testing.assert_array_equal(back, expected.astype(np.float64) * 2.0**-exponent)
    wide = values.astype(np.float64)
    assert np.linalg.norm(back - wide) / np.linalg.norm(wide) < 1e-3


def test_float16_in_its_normal_range_is_not_scaled():
    assert precision.float16_scale_exponent(np.array([1.0, -3.5, 60000.0], np.float32)) == 0
    assert precision.float16_scale_exponent(np.zeros(4, np.float32)) == 0
    assert precision.float16_scale_exponent(np.zeros(0, np.float32)) == 0


def test_float16_scale_ignores_nan_and_inf_which_pass_through():
    values = np.array([np.nan, np.inf, -np.inf, 1e6, 1.0], np.float32)
    exponent = precision.float16_scale_exponent(values)
    assert exponent == 15 - 20  # 2**19 <= 1e6 < 2**20
    back = precision.from_float16(precision.to_float16(values, exponent), exponent)
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf
    assert back[3] == float(np.float16(1e6 / 32)) * 32 and back[4] == 1.0


def test_encoded_counts_are_the_values_that_became_infinite_or_zero():
    values = np.array([0.0, -0.0, 1.0, 7e4, -1e5, 1e-9, -2e-8, 3e-8, np.inf, np.nan, 65519.0], np.float32)
    plain = precision.encode(values, precision.FLOAT16)
    assert plain.exponent == 0
    # 7e4 and -1e5 overflow (65519 rounds down to 65504); 1e-9 and -2e-8 round to zero, 3e-8 to 2**-24.
    assert (plain.overflow, plain.underflow) == (2, 2)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(plain.data, values.astype(np.float16))
    scaled = precision.encode(values, precision.FLOAT16, scaling=True)
    # Scaled by 2**-2 (2**16 <= 1e5 < 2**17), 3e-8 now rounds to zero too.
    assert scaled.exponent == 15 - 17 and (scaled.overflow, scaled.underflow) == (0, 3)
    # 2**13 <= 1e4 < 2**14: scaled by 2; 1e-7 becomes a subnormal, 1e-9 (2**-43 of 1e4) still zero.
    kept = precision.encode(np.array([1e4, 1e-7], np.float32), precision.FLOAT16, scaling=True)
    assert (kept.exponent, kept.overflow, kept.underflow) == (1, 0, 0)
    wide = precision.encode(np.array([1e4, 1e-9], np.float32), precision.FLOAT16, scaling=True)
    assert (wide.exponent, wide.overflow, wide.underflow) == (1, 0, 1)
    bf = precision.encode(np.array([3.4e38, -3.39e38, 1e-45, 1e-38, np.inf], np.float32), precision.BFLOAT16)
    assert (bf.exponent, bf.overflow, bf.underflow) == (0, 1, 1)
    np.testing.assert_array_equal(precision.decode(bf.data), precision.bfloat16_to_float32(bf.data))


@pytest.mark.parametrize("scaling", [False, True])
def test_counts_equal_the_values_lost_in_the_converted_data(scaling):
    """The threshold counts of ``encode`` against the converted elements, on values spread over
    float32's whole range (both thresholds' neighbours, subnormals, infinities, NaN)."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        exponents = rng.integers(-150, 128, size=500) if trial % 2 else rng.integers(-40, 20, size=500)
        values = (rng.uniform(1, 2, 500) * np.exp2(exponents.astype(np.float64))).astype(np.float32)
        values *= rng.choice(np.array([-1, 1], np.float32), 500)
        edges = [
            65504,
            65519.996,
            65520,
            2.0**-25,
            2.0**-25 * 1.0000001,
            2.0**-134,
            2.0**-133,
            0,
            np.inf,
            np.nan,
        ]
        values[: len(edges)] = edges
        values[len(edges) : len(edges) + 4] = np.array(
            [0x7F7F7FFF, 0x7F7F8000, 0x80008000, 1], np.uint32
        ).view(np.float32)
        finite_nonzero = np.isfinite(values) & (values != 0)
        for dtype in (precision.FLOAT16, precision.BFLOAT16):
            encoded = precision.encode(values, dtype, scaling=scaling)
            back = precision.decode(encoded.data, encoded.exponent)
            assert encoded.overflow == np.count_nonzero(np.isinf(back) & finite_nonzero)
            assert encoded.underflow == np.count_nonzero((back == 0) & finite_nonzero)
            assert np.isnan(back[np.isnan(values)]).all()


# ---- through the service ----------------------------------------------------------


def expected_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 values as the SDK returns them from bfloat16: each rounded by the element reference."""
    bits = np.array([_reference_bfloat16(float(v)) for v in values.reshape(-1)], np.uint32)
    return (bits << 16).view(np.float32).reshape(values.shape)


def documented_exponent(values: np.ndarray) -> int:
    """The contract's rule: 0 when every non-zero magnitude is in [2**-14, 65504], else the e that
    puts the largest magnitude in [2**14, 2**15)."""
    magnitude = np.abs(values.astype(np.float64))
    nonzero = magnitude[magnitude > 0]
    if nonzero.size == 0 or (nonzero.min() >= 2.0**-14 and nonzero.max() <= 65504):
        return 0
    e = 0
    while magnitude.max() * 2.0**e >= 2**15:
        e -= 1
    while magnitude.max() * 2.0**e < 2**14:
        e += 1
    return e


def expected_float16(values: np.ndarray) -> tuple[np.ndarray, int]:
    e = documented_exponent(values)
    return (values.astype(np.float64) * 2.0**e).astype(np.float16).astype(np.float64) * 2.0**-e, e


@pytest.fixture(scope="module")
def process(weights_file, tmp_path_factory):
    flags = ["--weights", str(weights_file), "--workers", "1", "--shared-memory"]
    with serving(flags, tmp_path_factory.mktemp("precision-logs")) as server:
        yield server


@pytest.fixture(scope="module")
def sdk(process):
    with layergrad.Client(process.address, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def stub(process):
    with grpc.insecure_channel(process.address) as channel:
        yield pb_grpc.GradientServiceStub(channel)


# The cases: the input gradient of SumOfSquares("prob"), whose values are tiny, and the
# conv1_1/W gradient of SumOfSquares("conv1_2"), whose values float16 holds only as infinity.
CASES = {
    "input": (layergrad.SumOfSquares("prob"), dict(pattern="backward", input=True)),
    "conv1_1/W": (layergrad.SumOfSquares("conv1_2"), dict(pattern="backward", parameters=["conv1_1/W"])),
}


def pick(result: layergrad.GradientResult, name: str) -> np.ndarray:
    return result.input if name == "input" else result.parameters[name]


@pytest.fixture(scope="module")
def float32_results(sdk):
    image = make_rgb(11)
    return image, {name: pick(sdk.gradients(image, loss, **kw), name) for name, (loss, kw) in CASES.items()}


def test_the_cases_lose_values_in_plain_float16(float32_results):
    _, full = float32_results
    tiny, huge = full["input"], full["conv1_1/W"]
    assert np.count_nonzero((tiny.astype(np.float16) == 0) & (tiny != 0)) > 0
    with np.errstate(over="ignore"):
        assert np.count_nonzero(np.isinf(huge.astype(np.float16))) > huge.size // 2


@pytest.mark.parametrize("path", ["stream", "unary", "shared_memory"])
@pytest.mark.parametrize("name", list(CASES))
def test_reduced_output_converts_as_documented_on_every_path(sdk, float32_results, name, path):
    image, fulls = float32_results
    full = fulls[name]
    loss, kwargs = CASES[name]
    call = {
        "stream": sdk.gradients,
        "unary": sdk.compute_gradients_unary,
        "shared_memory": lambda *a, **k: sdk.gradients(*a, shared_memory=True, **k),
    }[path]
    bf = pick(call(image, loss, dtype="bfloat16", **kwargs), name)
    assert bf.dtype == np.float32
    np.testing.assert_array_equal(bf, expected_bfloat16(full))
    half = pick(call(image, loss, dtype="float16", **kwargs), name)
    expected, exponent = expected_float16(full)
    assert half.dtype == np.float32 and exponent != 0
    np.testing.assert_array_equal(half, expected)
    assert np.count_nonzero((half == 0) & (full != 0)) == 0 and np.isfinite(half).all()
    assert np.linalg.norm(half - full) / np.linalg.norm(full) < 1e-3


def gradients_request(kind, name: str, dtype: int, **extra):
    loss = CASES[name][0]
    targets = pb.GradientTargets(input=True) if name == "input" else pb.GradientTargets(parameters=[name])
    return kind(
        inputs=[pb.Input(rgb_image=to_tensor(make_rgb(11)))],
        loss=loss._to_proto(),
        pattern=pb.BACKWARD_PATTERN_BACKWARD,
        targets=targets,
        output_dtype=dtype,
        **extra,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_the_scale_travels_with_each_tensor_and_each_chunk(stub, float32_results, name):
    full = float32_results[1][name]
    _, exponent = expected_float16(full)
    unary = stub.ComputeGradients(
        gradients_request(pb.ComputeGradientsRequest, name, pb.DATA_TYPE_FLOAT16, float16_scaling=True)
    )
    (tensor,) = unary.gradients
    assert tensor.tensor.dtype == pb.DATA_TYPE_FLOAT16 and tensor.tensor.scale_exponent == exponent
    chunks = list(
        stub.StreamGradients(
            gradients_request(pb.StreamGradientsRequest, name, pb.DATA_TYPE_FLOAT16, float16_scaling=True)
        )
    )
    assert {c.scale_exponent for c in chunks} == {exponent}
    assert b"".join(c.data for c in chunks) == tensor.tensor.data
    bf = stub.ComputeGradients(gradients_request(pb.ComputeGradientsRequest, name, pb.DATA_TYPE_BFLOAT16))
    assert (
        bf.gradients[0].tensor.dtype == pb.DATA_TYPE_BFLOAT16 and bf.gradients[0].tensor.scale_exponent == 0
    )
    assert bf.gradients[0].tensor.data == precision.bfloat16_bits(full).tobytes()


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = next(
        status_pb2.Status.FromString(value)
        for key, value in error.trailing_metadata()
        if key == "grpc-status-details-bin"
    )
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


@pytest.mark.parametrize("name", list(CASES))
def test_a_client_that_does_not_ask_for_scaling_is_refused_with_counts(stub, sdk, float32_results, name):
    """A client written before scale_exponent never gets scaled numbers: values that float16 cannot
    hold are refused, counted, on every path, before any message."""
    full = float32_results[1][name]
    with np.errstate(over="ignore"):
        half = full.astype(np.float16)
    overflow = np.count_nonzero(np.isinf(half))
    underflow = np.count_nonzero((half == 0) & (full != 0))
    assert overflow + underflow > 0
    calls = [
        lambda: stub.ComputeGradients(
            gradients_request(pb.ComputeGradientsRequest, name, pb.DATA_TYPE_FLOAT16)
        ),
        lambda: list(
            stub.StreamGradients(gradients_request(pb.StreamGradientsRequest, name, pb.DATA_TYPE_FLOAT16))
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
        info = error_info(caught.value)
        assert info.reason == "FLOAT16_OUT_OF_RANGE"
        assert dict(info.metadata) == {
            "request_id": dict(caught.value.trailing_metadata())["x-request-id"],
            "tensor": name,
            "overflow": str(overflow),
            "underflow": str(underflow),
            "tensors": "1",
        }
        assert "float16_scaling" in caught.value.details()
    assert sdk.gradients(make_rgb(11), *CASES[name][:1], **CASES[name][1]) is not None  # still serving


def test_a_tensor_in_float16_range_is_plain_float16_for_any_client(stub, sdk):
    """fc8/b of a class score is one-hot: unscaled, byte for byte today's float16, flag or not."""
    request = pb.ComputeGradientsRequest(
        inputs=[pb.Input(rgb_image=to_tensor(make_rgb(12)))],
        loss=layergrad.ClassScore("fc8", [3])._to_proto(),
        pattern=pb.BACKWARD_PATTERN_GRAD,
        targets=pb.GradientTargets(parameters=["fc8/b"]),
        output_dtype=pb.DATA_TYPE_FLOAT16,
    )
    old = stub.ComputeGradients(request).gradients[0].tensor
    request.float16_scaling = True
    new = stub.ComputeGradients(request).gradients[0].tensor
    assert old == new and old.scale_exponent == 0
    expected = np.zeros(1000, np.float16)
    expected[3] = 1
    assert old.data == expected.tobytes()


def upstream(values: np.ndarray) -> tuple[layergrad.UpstreamGradient, dict]:
    gradient = np.ones((1, 1000), np.float32)
    gradient[0, : values.size] = values
    return layergrad.UpstreamGradient("fc8", gradient), gradient


def test_counts_of_values_out_of_range_are_exact_and_scaling_cannot_save_a_too_wide_tensor(sdk):
    """An upstream gradient is returned as fc8's gradient: its values are chosen here."""
    kwargs = dict(pattern="backward_retain_grad", layers=["fc8"])
    loss, gradient = upstream(np.array([1e5, -2e5, 7e4, 1e-9, -1e-9, 2e-9, 1e-8], np.float32))
    with pytest.raises(layergrad.errors.OutOfRange) as caught:
        sdk.gradients(make_rgb(13), loss, dtype="float16", **kwargs)
    # Scaled by 2**-3 (2**17 <= 2e5 < 2**18) the four values of 1e-8 and below still become zero.
    assert caught.value.reason == "FLOAT16_OUT_OF_RANGE"
    assert dict(caught.value.error_info.metadata) == {
        "request_id": caught.value.request_id,
        "tensor": "fc8",
        "overflow": "0",
        "underflow": "4",
        "tensors": "1",
    }
    assert "BFLOAT16" in caught.value.message
    bf = sdk.gradients(make_rgb(13), loss, dtype="bfloat16", **kwargs).layers["fc8"]
    np.testing.assert_array_equal(bf, expected_bfloat16(gradient))
    loss, gradient = upstream(np.array([1e5, -2e5, 7e4, 1e-6], np.float32))
    half = sdk.gradients(make_rgb(13), loss, dtype="float16", **kwargs).layers["fc8"]
    np.testing.assert_array_equal(half, expected_float16(gradient)[0])
    assert abs(half[0, 1] + 2e5) <= 2e5 * 2**-11 and half[0, 3] != 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_predict_converts_the_same_way(sdk, dtype):
    images = [make_rgb(14)]
    full = sdk.predict(images, ["prob", "conv1_2"])
    reduced = sdk.predict(images, ["prob", "conv1_2"], dtype=dtype)
    for name, values in full.items():
        expected = expected_bfloat16(values) if dtype == "bfloat16" else expected_float16(values)[0]
        assert reduced[name].dtype == np.float32
        np.testing.assert_array_equal(reduced[name], expected)
