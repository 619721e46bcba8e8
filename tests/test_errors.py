"""Every bad input gets INVALID_ARGUMENT (or the status named) with an actionable message and
google.rpc details, and the server answers a normal request right after."""

from __future__ import annotations

import io

import grpc
import layergrad
import numpy as np
import pytest
from conftest import encode, make_rgb
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from PIL import Image

PNG = encode(make_rgb(1, 64, 64), "PNG")
JPEG = encode(make_rgb(1, 64, 64), "JPEG")
# A PNG whose image data is damaged (one byte of IDAT flipped, CRC left wrong).
BAD_PNG = PNG[:60] + bytes([PNG[60] ^ 0xFF]) + PNG[61:]


def one_bit_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


# 4.9 kB, within the pixel limit, but 1.5 GB to resize to 224x224.
THIN_PNG = one_bit_png(40_000_000, 1)


def tensor(array: np.ndarray, dtype: int) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())


def prepared(array: np.ndarray | None = None) -> pb.Input:
    array = np.zeros((3, 224, 224), np.float32) if array is None else array
    return pb.Input(prepared=tensor(array, pb.DATA_TYPE_FLOAT32))


def request(**overrides) -> pb.ComputeGradientsRequest:
    fields = {
        "inputs": [pb.Input(encoded_image=PNG)],
        "loss": pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[1])),
        "pattern": pb.BACKWARD_PATTERN_GRAD,
        "targets": pb.GradientTargets(input=True),
    }
    fields.update(overrides)
    return pb.ComputeGradientsRequest(**fields)


def gif() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_rgb(2, 32, 32)).save(buffer, format="GIF")
    return buffer.getvalue()


BAD_REQUESTS = {
    "unknown_layer_lists_valid_names": (
        request(pattern=pb.BACKWARD_PATTERN_GRAD, targets=pb.GradientTargets(layers=["conv9_9"])),
        "targets.layers",
        ["conv9_9", "conv5_3", "pool5"],
    ),
    "unknown_parameter_lists_valid_names": (
        request(targets=pb.GradientTargets(parameters=["fc9/W"])),
        "targets.parameters",
        ["fc9/W", "fc8/W", "conv1_1/b"],
    ),
    "unknown_loss_layer": (
        request(loss=pb.Loss(sum_of_squares=pb.SumOfSquares(layer="softmax"))),
        "loss.sum_of_squares.layer",
        ["softmax", "prob"],
    ),
    "undecodable_image": (
        request(inputs=[pb.Input(encoded_image=b"\x89PNG not really")]),
        "inputs[0].encoded_image",
        ["JPEG"],
    ),
    "truncated_png": (
        request(inputs=[pb.Input(encoded_image=PNG[: len(PNG) // 2])]),
        "inputs[0].encoded_image",
        ["corrupt"],
    ),
    "truncated_jpeg": (
        request(inputs=[pb.Input(encoded_image=JPEG[: len(JPEG) // 2])]),
        "inputs[0].encoded_image",
        ["corrupt or truncated JPEG"],
    ),
    "png_with_damaged_data": (
        request(inputs=[pb.Input(encoded_image=BAD_PNG)]),
        "inputs[0].encoded_image",
        ["PNG"],
    ),
    "random_bytes_as_an_image": (
        request(inputs=[pb.Input(encoded_image=np.random.default_rng(5).bytes(4096))]),
        "inputs[0].encoded_image",
        ["JPEG, PNG"],
    ),
    "dimensions_whose_product_overflows": (
        request(inputs=[pb.Input(rgb_image=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[2**40, 2**40, 3]))]),
        "inputs[0].rgb_image.shape",
        ["describe more than"],
    ),
    "empty_prepared_input_with_a_huge_dimension": (
        request(inputs=[pb.Input(prepared=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[0, 2**63 - 1]))]),
        "inputs[0].prepared.shape",
        ["describe more than"],
    ),
    "empty_rgb_image_with_a_huge_dimension": (
        request(inputs=[pb.Input(rgb_image=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[0, 2**62, 3]))]),
        "inputs[0].rgb_image.shape",
        ["describe more than"],
    ),
    "empty_squared_error_target_with_a_huge_dimension": (
        request(
            loss=pb.Loss(
                squared_error=pb.SquaredError(
                    layer="fc8", target=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2**63 - 1, 0])
                )
            )
        ),
        "loss.squared_error.target.shape",
        ["describe more than"],
    ),
    "empty_upstream_gradient_with_a_huge_dimension": (
        request(
            loss=pb.Loss(
                upstream_gradient=pb.UpstreamGradient(
                    layer="fc8", gradient=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[0, 2**40, 2**40])
                )
            )
        ),
        "loss.upstream_gradient.gradient.shape",
        ["describe more than"],
    ),
    "a_very_long_unknown_layer_name": (
        request(targets=pb.GradientTargets(layers=["conv" + "x" * 20_000])),
        "targets.layers",
        ["(20004 characters)", "conv5_3"],
    ),
    "a_very_long_unknown_parameter_name": (
        request(targets=pb.GradientTargets(parameters=["w" * 50_000])),
        "targets.parameters",
        ["(50000 characters)", "fc8/W"],
    ),
    "a_small_png_too_costly_to_resize": (
        request(inputs=[pb.Input(encoded_image=THIN_PNG)]),
        "inputs[0].encoded_image",
        ["40000000x1", "MiB", "aspect ratio"],
    ),
    "an_rgb_image_too_costly_to_resize": (
        request(
            inputs=[
                pb.Input(
                    rgb_image=pb.Tensor(
                        dtype=pb.DATA_TYPE_UINT8, shape=[1, 20_000_000, 3], data=bytes(60_000_000)
                    )
                )
            ]
        ),
        "inputs[0].rgb_image",
        ["1 pixels", "MiB"],
    ),
    "rgb_image_byte_length_lies": (
        request(
            inputs=[
                pb.Input(rgb_image=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[8, 8, 3], data=b"\0" * 191))
            ]
        ),
        "inputs[0].rgb_image.data",
        ["191 bytes", "192"],
    ),
    "unknown_activation_layer": (
        request(activation_layers=["fc9"]),
        "activation_layers",
        ["fc9", "fc8"],
    ),
    "nan_in_squared_error_target": (
        request(
            loss=pb.Loss(
                squared_error=pb.SquaredError(
                    layer="prob", target=tensor(np.full((1, 1000), np.nan, np.float32), pb.DATA_TYPE_FLOAT32)
                )
            )
        ),
        "loss.squared_error.target",
        ["finite"],
    ),
    "gif_is_not_an_accepted_format": (
        request(inputs=[pb.Input(encoded_image=gif())]),
        "inputs[0].encoded_image",
        ["PNG"],
    ),
    "empty_input": (request(inputs=[pb.Input()]), "inputs[0]", ["encoded_image"]),
    "wrong_dtype": (
        request(inputs=[pb.Input(prepared=tensor(np.zeros((3, 224, 224)), pb.DATA_TYPE_FLOAT64))]),
        "inputs[0].prepared.dtype",
        ["DATA_TYPE_FLOAT32"],
    ),
    "wrong_shape": (
        request(inputs=[prepared(np.zeros((3, 100, 100), np.float32))]),
        "inputs[0].prepared.shape",
        ["224"],
    ),
    "byte_length_lies": (
        request(
            inputs=[
                pb.Input(
                    prepared=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[3, 224, 224], data=b"\0" * 100)
                )
            ]
        ),
        "inputs[0].prepared.data",
        ["100 bytes", "602112"],
    ),
    "negative_dimension": (
        request(inputs=[pb.Input(rgb_image=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[-4, 2, 3], data=b""))]),
        "inputs[0].rgb_image.shape",
        ["invalid"],
    ),
    "rgb_image_with_four_channels": (
        request(inputs=[pb.Input(rgb_image=tensor(np.zeros((8, 8, 4), np.uint8), pb.DATA_TYPE_UINT8))]),
        "inputs[0].rgb_image.shape",
        ["[height, width, 3]"],
    ),
    "nan_in_prepared_input": (
        request(inputs=[prepared(np.full((3, 224, 224), np.nan, np.float32))]),
        "inputs[0].prepared",
        ["finite"],
    ),
    "empty_batch": (request(inputs=[]), "inputs", ["empty"]),
    "batch_over_the_limit": (request(inputs=[prepared()] * 33), "inputs", ["33", "32"]),
    "missing_loss": (request(loss=None), "loss", ["sum_of_squares"]),
    "missing_pattern": (
        request(pattern=pb.BACKWARD_PATTERN_UNSPECIFIED),
        "pattern",
        ["BACKWARD_RETAIN_GRAD"],
    ),
    "no_targets": (request(targets=pb.GradientTargets()), "targets", ["targets.input"]),
    "label_out_of_range": (
        request(loss=pb.Loss(softmax_cross_entropy=pb.SoftmaxCrossEntropy(labels=[1000]))),
        "loss.softmax_cross_entropy.labels",
        ["1000", "[0, 1000)"],
    ),
    "negative_class": (
        request(loss=pb.Loss(class_score=pb.ClassScore(layer="prob", classes=[-1]))),
        "loss.class_score.classes",
        ["-1"],
    ),
    "one_label_per_input": (
        request(loss=pb.Loss(softmax_cross_entropy=pb.SoftmaxCrossEntropy(labels=[1, 2]))),
        "loss.softmax_cross_entropy.labels",
        ["one class per input"],
    ),
    "class_score_on_a_conv_layer": (
        request(loss=pb.Loss(class_score=pb.ClassScore(layer="conv5_3", classes=[1]))),
        "loss.class_score.layer",
        ["fc8"],
    ),
    "target_shape_mismatch": (
        request(
            loss=pb.Loss(
                squared_error=pb.SquaredError(
                    layer="fc7", target=tensor(np.zeros((1, 1000), np.float32), pb.DATA_TYPE_FLOAT32)
                )
            )
        ),
        "loss.squared_error.target",
        ["[1, 1000]", "[1, 4096]"],
    ),
    "target_and_classes_together": (
        request(
            loss=pb.Loss(
                squared_error=pb.SquaredError(
                    layer="prob",
                    target=tensor(np.zeros((1, 1000), np.float32), pb.DATA_TYPE_FLOAT32),
                    target_classes=[1],
                )
            )
        ),
        "loss.squared_error.target",
        ["exactly one"],
    ),
    "upstream_gradient_with_infinity": (
        request(
            loss=pb.Loss(
                upstream_gradient=pb.UpstreamGradient(
                    layer="fc8", gradient=tensor(np.full((1, 1000), np.inf, np.float32), pb.DATA_TYPE_FLOAT32)
                )
            )
        ),
        "loss.upstream_gradient.gradient",
        ["finite"],
    ),
    "layer_gradients_with_backward_pattern": (
        request(pattern=pb.BACKWARD_PATTERN_BACKWARD, targets=pb.GradientTargets(layers=["conv5_3"])),
        "targets.layers",
        ["BACKWARD_RETAIN_GRAD", "GRAD"],
    ),
    "layer_after_the_loss_layer": (
        request(
            loss=pb.Loss(sum_of_squares=pb.SumOfSquares(layer="conv4_3")),
            targets=pb.GradientTargets(layers=["fc7"]),
        ),
        "targets.layers",
        ["after the loss layer"],
    ),
    "unsupported_output_dtype": (request(output_dtype=pb.DATA_TYPE_INT32), "output_dtype", ["FLOAT16"]),
}


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GradientServiceStub(channel)


def assert_still_serving(client: layergrad.Client) -> None:
    grad = client.gradients([PNG], layergrad.ClassScore("fc8", [1]), pattern="grad", parameters=["fc8/b"])
    assert grad.parameters["fc8/b"].shape == (1000,)
    assert np.abs(grad.parameters["fc8/b"]).sum() > 0


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_naming_the_field_and_server_keeps_serving(stub, client, case):
    bad, field, fragments = BAD_REQUESTS[case]
    for call in (
        stub.ComputeGradients,
        lambda r, timeout: list(
            stub.StreamGradients(pb.StreamGradientsRequest.FromString(r.SerializeToString()), timeout=timeout)
        ),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(bad, timeout=60)
        error = layergrad.from_grpc_error(caught.value)
        assert isinstance(error, layergrad.InvalidArgument), (case, error)
        for fragment in fragments:
            assert fragment in error.message, (case, error.message)
        assert [f for f, _ in error.field_violations] == [field]
        assert error.reason and error.reason not in ("INTERNAL", "INVALID_ARGUMENT")
        assert "Traceback" not in error.message
        assert len(error.message) <= 1024
    assert_still_serving(client)


def test_unary_result_over_the_cap_is_resource_exhausted_naming_the_stream(client):
    with pytest.raises(layergrad.ResourceExhausted) as caught:
        client.compute_gradients_unary(
            [PNG], layergrad.ClassScore("fc8", [1]), pattern="backward", parameters="all"
        )
    assert "StreamGradients" in caught.value.message
    assert caught.value.reason == "USE_STREAM_GRADIENTS"
    assert_still_serving(client)


def test_unary_and_stream_return_the_same_tensors(client):
    kwargs = {
        "pattern": "backward_retain_grad",
        "layers": ["conv5_3"],
        "parameters": ["fc8/b"],
        "input": True,
    }
    unary = client.compute_gradients_unary(
        [PNG], layergrad.SumOfSquares("fc7"), activations=["fc7"], **kwargs
    )
    stream = client.gradients([PNG], layergrad.SumOfSquares("fc7"), activations=["fc7"], **kwargs)
    np.testing.assert_array_equal(unary.input, stream.input)
    np.testing.assert_array_equal(unary.layers["conv5_3"], stream.layers["conv5_3"])
    np.testing.assert_array_equal(unary.parameters["fc8/b"], stream.parameters["fc8/b"])
    np.testing.assert_array_equal(unary.activations["fc7"], stream.activations["fc7"])
    assert unary.loss == stream.loss


def test_predict_unknown_layer_is_invalid_argument(stub, client):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(pb.PredictRequest(inputs=[pb.Input(encoded_image=PNG)], layers=["fc9"]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fc8" in caught.value.details()
    assert_still_serving(client)


def test_garbage_bytes_to_a_method_are_invalid_argument(server, client):
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary("/layergrad.v1.GradientService/ComputeGradients")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff\xff\xff\xff garbage", timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_still_serving(client)


def test_predict_result_over_the_cap_is_refused_before_compute_naming_the_stream(stub, client):
    zeros = np.zeros((3, 224, 224), np.float32)
    big = pb.PredictRequest(inputs=[prepared(zeros)] * 3, layers=["conv1_1", "conv1_2"])  # 77 MB
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(big, timeout=60)
    error = layergrad.from_grpc_error(caught.value)
    assert isinstance(error, layergrad.ResourceExhausted)
    assert error.reason == "USE_STREAM_GRADIENTS"
    assert "activation_layers" in error.message and "nothing was computed" in error.message
    assert str(3 * 2 * 64 * 224 * 224 * 4) in error.message
    assert_still_serving(client)
