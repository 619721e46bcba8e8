"""Unit tests of the layergrad client SDK and CLI that need no server.

RPCs are answered by an in-process fake stub, so these tests prove the
client's own conversions: numpy <-> wire tensors, stream reassembly, input
and loss conversion, request building, error mapping and the CLI.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import layergrad
import numpy as np
import pytest
from google.protobuf import any_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from layergrad import cli, errors
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._inputs import to_inputs
from layergrad._tensors import _ChunkAssembler, from_tensor, to_tensor
from layergrad.client import Client, GradientResult, Pattern
from layergrad.losses import ClassScore, SoftmaxCrossEntropy, SquaredError, SumOfSquares, UpstreamGradient

CLIENT_DIR = pathlib.Path(layergrad.__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers


class FakeRpcError(grpc.RpcError):
    """What a failed stub call raises: an RpcError with the grpc.Call accessors."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: Iterable[tuple[str, Any]] = ()) -> None:
        super().__init__(message)
        self._code = code
        self._message = message
        self._trailing = tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


def rich_error(
    code: grpc.StatusCode, message: str, *details: Any, status_message: str | None = None
) -> FakeRpcError:
    """A FakeRpcError carrying a google.rpc.Status with ``details`` in grpc-status-details-bin."""
    status = status_pb2.Status(
        code=code.value[0], message=message if status_message is None else status_message
    )
    for detail in details:
        status.details.add().Pack(detail)
    return FakeRpcError(code, message, [("grpc-status-details-bin", status.SerializeToString())])


def bad_layer_error() -> FakeRpcError:
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field="targets.layers[0]", description="unknown layer 'conv9'; valid: conv1_1, ..., prob"
            )
        ]
    )
    info = error_details_pb2.ErrorInfo(
        reason="UNKNOWN_LAYER", domain="layergrad.dev", metadata={"layer": "conv9", "request_id": "req-9"}
    )
    return rich_error(grpc.StatusCode.INVALID_ARGUMENT, "unknown layer 'conv9'", bad_request, info)


def chunks(
    name: str, kind: int, array: np.ndarray, chunk_bytes: int, loss: float | None = None
) -> list[pb.StreamGradientsResponse]:
    """The StreamGradients messages a server would send for one tensor."""
    tensor = to_tensor(array)
    data = tensor.data
    offsets = range(0, len(data), chunk_bytes) if data else [0]
    messages = [
        pb.StreamGradientsResponse(
            name=name,
            kind=kind,
            dtype=tensor.dtype,
            shape=tensor.shape,
            offset=offset,
            data=data[offset : offset + chunk_bytes],
        )
        for offset in offsets
    ]
    if loss is not None:
        messages[0].loss = loss
    return messages


def assemble(messages: Iterable[pb.StreamGradientsResponse]) -> _ChunkAssembler:
    assembler = _ChunkAssembler()
    for message in messages:
        assembler.add(message)
    assembler.finish()
    return assembler


class FakeStream:
    """A server stream: yields messages, raises any exception found among them."""

    def __init__(self, items: Iterable[Any]) -> None:
        self._items = list(items)
        self.cancelled = False

    def __iter__(self) -> Iterator[pb.StreamGradientsResponse]:
        for item in self._items:
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeCall:
    """The finished call of a unary RPC: echoes the request id, reports server timings."""

    def __init__(self, metadata: Any) -> None:
        self.metadata = dict(metadata or ())

    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        request_id = self.metadata.get("x-request-id", "made-by-server")
        timing = "queue;dur=1.5, compute;dur=250.0, send;dur=2"
        return (("x-request-id", request_id), ("server-timing", timing))


class FakeUnary:
    """A unary method of the fake stub, callable plainly or ``with_call``."""

    def __init__(self, stub: FakeStub, name: str) -> None:
        self._stub, self._name = stub, name

    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
        return self._stub._answer(self._name, request, timeout)

    def with_call(
        self, request: Any, timeout: float | None = None, metadata: Any = None
    ) -> tuple[Any, FakeCall]:
        return self(request, timeout), FakeCall(metadata)


class FakeStub:
    """Answers the four RPCs with canned replies and records each request."""

    def __init__(
        self, *, stream: Iterable[Any] = (), unary: Any = None, error: Exception | None = None
    ) -> None:
        self.stream_items = list(stream)
        self.unary = unary
        self.info: Any = None  # GetModelInfo's answer, when it differs from ``unary``
        self.error = error
        self.requests: list[tuple[str, Any, float | None]] = []
        self.streams: list[FakeStream] = []
        self.Predict = FakeUnary(self, "Predict")
        self.ComputeGradients = FakeUnary(self, "ComputeGradients")

    def _answer(self, method: str, request: Any, timeout: float | None) -> Any:
        self.requests.append((method, request, timeout))
        if self.error is not None:
            raise self.error
        return self.unary

    def GetModelInfo(self, request: Any, timeout: float | None = None) -> bytes:  # noqa: N802
        """The response as bytes, as the SDK's GetModelInfo method receives it."""
        answer = self._answer("GetModelInfo", request, timeout)
        return (answer if self.info is None else self.info).SerializeToString()

    def StreamGradients(self, request: Any, timeout: float | None = None) -> FakeStream:  # noqa: N802
        self._answer("StreamGradients", request, timeout)
        stream = FakeStream(self.stream_items)
        self.streams.append(stream)
        return stream


def fake_client(stub: FakeStub, timeout: float | None = 60.0) -> Client:
    client = Client("127.0.0.1:1", timeout=timeout)
    client._stub = stub
    return client


def prepared(n: int = 1) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 224, 224)).astype(np.float32)


def model_info_response() -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(
        model_name="VGG16",
        input_spec=pb.InputSpec(
            shape=[3, 224, 224],
            dtype=pb.DATA_TYPE_FLOAT32,
            layout="CHW",
            channel_order="BGR",
            mean=[103.939, 116.779, 123.68],
            image_formats=["JPEG", "PNG"],
        ),
        layers=[
            pb.LayerInfo(name="conv1_1", output_shape=[64, 224, 224]),
            pb.LayerInfo(name="prob", output_shape=[1000]),
        ],
        parameters=[
            pb.ParameterInfo(name="fc8/W", shape=[1000, 4096], dtype=pb.DATA_TYPE_FLOAT32),
            pb.ParameterInfo(name="fc8/b", shape=[1000], dtype=pb.DATA_TYPE_FLOAT32),
        ],
        weights=pb.WeightsInfo(source="random:0", pretrained=False, parameters_sha256="ab" * 32),
        versions={"layergrad": "0.1.0", "chainer": "7.8.1"},
        device="@numpy",
        max_unary_response_bytes=64 << 20,
        stream_chunk_bytes=1 << 20,
        max_batch_size=8,
    )


# ---------------------------------------------------------------- tensors

ALL_DTYPES = [
    (np.float32, pb.DATA_TYPE_FLOAT32),
    (np.float16, pb.DATA_TYPE_FLOAT16),
    (np.float64, pb.DATA_TYPE_FLOAT64),
    (np.uint8, pb.DATA_TYPE_UINT8),
    (np.int32, pb.DATA_TYPE_INT32),
    (np.int64, pb.DATA_TYPE_INT64),
]


@pytest.mark.parametrize(("dtype", "wire"), ALL_DTYPES)
def test_tensor_round_trip_keeps_values_shape_and_dtype(dtype: type, wire: int) -> None:
    array = (np.arange(24) % 200).astype(dtype).reshape(2, 3, 4)
    tensor = to_tensor(array)
    assert tensor.dtype == wire
    assert list(tensor.shape) == [2, 3, 4]
    assert len(tensor.data) == array.nbytes
    back = from_tensor(tensor)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_big_endian_array_is_sent_little_endian() -> None:
    array = np.array([1.0, -2.5], dtype=">f4")
    tensor = to_tensor(array)
    assert tensor.data == np.array([1.0, -2.5], dtype="<f4").tobytes()
    np.testing.assert_array_equal(from_tensor(tensor), array)


def test_non_contiguous_array_is_sent_in_row_major_order() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    tensor = to_tensor(array)
    assert list(tensor.shape) == [4, 3]
    np.testing.assert_array_equal(from_tensor(tensor), array)


def test_scalar_tensor_has_empty_shape() -> None:
    tensor = to_tensor(np.float32(3.5))
    assert list(tensor.shape) == []
    assert from_tensor(tensor).shape == ()
    assert float(from_tensor(tensor)) == 3.5


def test_decoded_tensor_is_writable_by_default() -> None:
    array = from_tensor(to_tensor(np.ones(3, np.float32)))
    array[0] = 5.0
    assert array[0] == 5.0


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, np.int16, np.uint32])
def test_unsupported_dtype_is_rejected(dtype: type) -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        to_tensor(np.zeros(2, dtype=dtype))


def test_tensor_whose_bytes_disagree_with_its_shape_is_data_loss() -> None:
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12)
    with pytest.raises(errors.DataLoss, match="needs 16 bytes, got 12"):
        from_tensor(tensor)


def test_tensor_of_unknown_wire_dtype_is_data_loss() -> None:
    with pytest.raises(errors.DataLoss, match="DATA_TYPE_UNSPECIFIED"):
        from_tensor(pb.Tensor(shape=[1], data=b"\0" * 4))


# ---------------------------------------------------------------- chunk assembler

INPUT = pb.TENSOR_KIND_INPUT_GRADIENT
LAYER = pb.TENSOR_KIND_LAYER_GRADIENT
PARAM = pb.TENSOR_KIND_PARAMETER_GRADIENT
ACTIVATION = pb.TENSOR_KIND_ACTIVATION


def test_in_order_chunks_reassemble_each_tensor_into_one_array() -> None:
    grad = np.random.default_rng(1).standard_normal((2, 3, 5, 7)).astype(np.float32)
    weight = np.random.default_rng(2).standard_normal((10, 9)).astype(np.float32)
    messages = chunks("input", INPUT, grad, chunk_bytes=100, loss=1.25) + chunks("fc8/W", PARAM, weight, 64)
    assembler = assemble(messages)
    names = [(t.name, t.kind) for t in assembler.tensors]
    assert names == [("input", INPUT), ("fc8/W", PARAM)]
    np.testing.assert_array_equal(assembler.tensors[0].array, grad)
    np.testing.assert_array_equal(assembler.tensors[1].array, weight)
    assert assembler.loss == 1.25


def test_reassembled_array_is_an_ordinary_writable_array() -> None:
    array = np.arange(50, dtype=np.float16)
    result = assemble(chunks("prob", ACTIVATION, array, 16)).tensors[0].array
    assert result.dtype == np.float32 and result.flags.writeable and result.flags.c_contiguous
    np.testing.assert_array_equal(result, array)
    assert result.base is None or isinstance(result.base, np.ndarray)


def reduced_chunks(name: str, dtype: int, wire: np.ndarray, scale: int, size: int) -> list:
    """Stream messages of a FLOAT16 or BFLOAT16 (``uint16`` bits) tensor with a scale exponent."""
    messages = chunks(name, PARAM, wire.view(np.float16), size)  # the same bytes
    for message in messages:
        message.dtype, message.scale_exponent = dtype, scale
    return messages


def test_scaled_float16_and_bfloat16_are_reassembled_as_float32_values() -> None:
    half = np.array([1.5, -3.0, 2.0**-24, 0.0, 65504.0], np.float16)
    bits = np.array([0x3F80, 0xC040, 0x0001, 0x7F80, 0x7FC0], np.uint16)  # 1, -3, tiny, inf, nan
    messages = [
        *reduced_chunks("a", pb.DATA_TYPE_FLOAT16, half, -40, 3),
        *reduced_chunks("b", pb.DATA_TYPE_BFLOAT16, bits, 0, 3),
    ]
    out = np.full(5, 7.0, np.float32)
    assembler = _ChunkAssembler(out={(PARAM, "b"): out})
    for message in messages:
        assembler.add(message)
    a, b = assembler.finish()
    assert a.array.dtype == np.float32 and b.array is out
    np.testing.assert_array_equal(a.array, half.astype(np.float64) * 2.0**40)
    np.testing.assert_array_equal(out, [1.0, -3.0, 2.0**-133, np.inf, np.nan])


def test_a_scale_that_changes_within_a_tensor_or_a_scaled_float32_is_data_loss() -> None:
    messages = reduced_chunks("a", pb.DATA_TYPE_FLOAT16, np.ones(4, np.float16), 3, 2)
    messages[2].scale_exponent = 4
    with pytest.raises(errors.DataLoss, match="scale"):
        assemble(messages)
    scaled = chunks("a", PARAM, np.ones(2, np.float32), 8)
    scaled[0].scale_exponent = 1
    with pytest.raises(errors.DataLoss, match="scale_exponent"):
        assemble(scaled)


def test_bfloat16_is_requested_with_scaling_allowed_and_decoded_from_a_unary_tensor() -> None:
    tensor = pb.Tensor(
        dtype=pb.DATA_TYPE_BFLOAT16, shape=[2], data=np.array([0x4000, 0xBF80], "<u2").tobytes()
    )
    np.testing.assert_array_equal(layergrad._tensors.result_from_tensor(tensor), [2.0, -1.0])
    stub = FakeStub(stream=chunks("input", INPUT, np.zeros((1, 2), np.float32), 8))
    fake_client(stub).gradients(prepared(1), SumOfSquares(), input=True, dtype="bfloat16")
    request = stub.requests[0][1]
    assert request.output_dtype == pb.DATA_TYPE_BFLOAT16 and request.float16_scaling


def test_chunk_not_a_multiple_of_the_element_size_is_reassembled() -> None:
    array = np.arange(11, dtype=np.float64)
    np.testing.assert_array_equal(assemble(chunks("x", LAYER, array, 5)).tensors[0].array, array)


def test_zero_byte_tensor_arrives_as_one_empty_chunk() -> None:
    assembler = assemble(chunks("empty", LAYER, np.zeros((0, 4), np.float32), 8))
    assert assembler.tensors[0].array.shape == (0, 4)


def test_missing_loss_stays_none() -> None:
    assert assemble(chunks("input", INPUT, np.ones(4, np.float32), 8)).loss is None


def test_loss_zero_on_the_first_message_is_kept() -> None:
    assert assemble(chunks("input", INPUT, np.ones(4, np.float32), 8, loss=0.0)).loss == 0.0


def test_gap_between_chunks_is_data_loss() -> None:
    messages = chunks("input", INPUT, np.arange(8, dtype=np.float32), 8)
    del messages[1]
    with pytest.raises(errors.DataLoss, match="gap"):
        assemble(messages)


def test_overlapping_chunk_is_data_loss() -> None:
    messages = chunks("input", INPUT, np.arange(8, dtype=np.float32), 8)
    messages[1].offset = 4
    with pytest.raises(errors.DataLoss, match="overlap"):
        assemble(messages)


def test_chunks_out_of_order_are_data_loss() -> None:
    messages = chunks("input", INPUT, np.arange(8, dtype=np.float32), 8)
    messages[1], messages[2] = messages[2], messages[1]
    with pytest.raises(errors.DataLoss, match="gap"):
        assemble(messages)


def test_tensor_cut_short_before_the_next_tensor_is_data_loss() -> None:
    first = chunks("input", INPUT, np.arange(8, dtype=np.float32), 8)[:-1]
    second = chunks("fc8/b", PARAM, np.arange(3, dtype=np.float32), 8)
    with pytest.raises(errors.DataLoss, match="'input' is incomplete: got 24 of 32 bytes"):
        assemble(first + second)


def test_stream_ending_inside_a_tensor_is_data_loss() -> None:
    messages = chunks("input", INPUT, np.arange(8, dtype=np.float32), 8)[:-1]
    with pytest.raises(errors.DataLoss, match="incomplete"):
        assemble(messages)


def test_chunk_running_past_the_tensor_end_is_data_loss() -> None:
    messages = chunks("input", INPUT, np.arange(4, dtype=np.float32), 16)
    messages[0].data += b"\0\0\0\0"
    with pytest.raises(errors.DataLoss, match="overruns"):
        assemble(messages)


def test_chunk_after_a_complete_tensor_is_data_loss() -> None:
    messages = chunks("input", INPUT, np.arange(4, dtype=np.float32), 16)
    extra = pb.StreamGradientsResponse()
    extra.CopyFrom(messages[0])
    extra.offset, extra.data = 16, b""
    with pytest.raises(errors.DataLoss, match="after the tensor was complete"):
        assemble([*messages, extra])


def test_tensor_sent_twice_is_data_loss() -> None:
    once = chunks("fc8/b", PARAM, np.arange(3, dtype=np.float32), 8)
    other = chunks("input", INPUT, np.arange(3, dtype=np.float32), 8)
    with pytest.raises(errors.DataLoss, match="sent twice"):
        assemble(once + other + once)


def test_shape_change_between_chunks_is_data_loss() -> None:
    messages = chunks("input", INPUT, np.arange(8, dtype=np.float32), 8)
    messages[1].shape[:] = [4, 2]
    with pytest.raises(errors.DataLoss, match="changed shape, dtype"):
        assemble(messages)


def test_stream_without_tensors_is_data_loss() -> None:
    with pytest.raises(errors.DataLoss, match="without any tensor"):
        assemble([])


def test_chunk_with_unknown_dtype_is_data_loss() -> None:
    message = pb.StreamGradientsResponse(name="input", kind=INPUT, dtype=99, shape=[1], data=b"\0")
    with pytest.raises(errors.DataLoss, match="unsupported tensor dtype"):
        assemble([message])


# ---------------------------------------------------------------- inputs

PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
    "0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082"
)


def test_path_string_and_pathlike_are_read_as_encoded_images(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(PNG_1x1)
    for item in (str(path), path):
        (message,) = to_inputs(item)
        assert message.WhichOneof("kind") == "encoded_image"
        assert message.encoded_image == PNG_1x1


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_like_are_sent_as_encoded_images(wrap: type) -> None:
    (message,) = to_inputs(wrap(PNG_1x1))
    assert message.encoded_image == PNG_1x1


def test_pil_image_is_sent_as_lossless_png_in_rgb() -> None:
    from PIL import Image

    pixels = np.random.default_rng(3).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    (message,) = to_inputs(Image.fromarray(pixels, mode="RGBA"))
    decoded = Image.open(io.BytesIO(message.encoded_image))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), pixels[..., :3])


def test_uint8_hwc_array_is_a_raw_rgb_image() -> None:
    pixels = np.random.default_rng(4).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    (message,) = to_inputs(pixels)
    assert message.WhichOneof("kind") == "rgb_image"
    assert message.rgb_image.dtype == pb.DATA_TYPE_UINT8
    np.testing.assert_array_equal(from_tensor(message.rgb_image), pixels)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_chw_array_is_a_prepared_float32_image(dtype: type) -> None:
    image = prepared(1)[0].astype(dtype)
    (message,) = to_inputs(image)
    assert message.WhichOneof("kind") == "prepared"
    assert message.prepared.dtype == pb.DATA_TYPE_FLOAT32
    np.testing.assert_array_equal(from_tensor(message.prepared), image.astype(np.float32))


def test_float_4d_batch_gives_one_prepared_input_per_image() -> None:
    batch = prepared(3)
    messages = to_inputs(batch)
    assert [m.WhichOneof("kind") for m in messages] == ["prepared"] * 3
    np.testing.assert_array_equal(from_tensor(messages[2].prepared), batch[2])


def test_uint8_4d_batch_gives_one_rgb_input_per_image() -> None:
    batch = np.zeros((2, 8, 9, 3), np.uint8)
    assert [m.WhichOneof("kind") for m in to_inputs(batch)] == ["rgb_image"] * 2


def test_list_and_tuple_mix_kinds_in_order(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG_1x1)
    items = [str(path), PNG_1x1, np.zeros((4, 4, 3), np.uint8), prepared(1)[0]]
    kinds = ["encoded_image", "encoded_image", "rgb_image", "prepared"]
    assert [m.WhichOneof("kind") for m in to_inputs(items)] == kinds
    assert [m.WhichOneof("kind") for m in to_inputs(tuple(items))] == kinds


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        ([], ValueError, "at least one image"),
        (42, TypeError, "unsupported type int"),
        (None, TypeError, "unsupported type NoneType"),
        ({"a": 1}, TypeError, "unsupported type dict"),
        ([[PNG_1x1]], TypeError, "nested lists"),
        (b"", ValueError, "empty"),
        (np.zeros((3, 224, 224), np.uint8), ValueError, r"\(H, W, 3\)"),
        (np.zeros((224, 224, 3), np.float32), ValueError, "must be prepared"),
        (np.zeros((4, 4, 3), np.int32), ValueError, "not int32"),
        (np.zeros((224, 224), np.uint8), ValueError, "neither one image"),
        (np.zeros((1, 1, 3, 224, 224), np.float32), ValueError, "neither one image"),
        (np.zeros((0, 3, 224, 224), np.float32), ValueError, "no images"),
        (np.zeros((0, 5, 3), np.uint8), ValueError, r"\(H, W, 3\)"),
    ],
)
def test_unusable_images_are_rejected_before_any_rpc(images: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        to_inputs(images)


def test_missing_image_file_raises_file_not_found(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        to_inputs(str(tmp_path / "nope.jpg"))


def test_importing_layergrad_does_not_import_pillow() -> None:
    code = "import sys, layergrad; sys.exit(1 if 'PIL' in sys.modules else 0)"
    env = {**os.environ, "PYTHONPATH": str(CLIENT_DIR)}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


# ---------------------------------------------------------------- losses


def test_sum_of_squares_defaults_to_prob() -> None:
    assert SumOfSquares()._to_proto() == pb.Loss(sum_of_squares=pb.SumOfSquares(layer="prob"))


def test_class_score_defaults_to_fc8_and_accepts_a_single_class() -> None:
    loss = ClassScore(classes=281)
    assert loss._to_proto() == pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[281]))
    assert ClassScore("prob", np.array([1, 2]))._to_proto().class_score.classes == [1, 2]


def test_softmax_cross_entropy_carries_one_label_per_input() -> None:
    proto = SoftmaxCrossEntropy([3, 999])._to_proto()
    assert proto == pb.Loss(softmax_cross_entropy=pb.SoftmaxCrossEntropy(labels=[3, 999]))


def test_squared_error_with_target_classes_sends_one_hot_classes() -> None:
    proto = SquaredError("prob", target_classes=[7])._to_proto()
    assert proto.squared_error.layer == "prob"
    assert list(proto.squared_error.target_classes) == [7]
    assert not proto.squared_error.HasField("target")


def test_squared_error_target_is_sent_as_float32() -> None:
    target = np.full((1, 1000), 0.5, dtype=np.float64)
    proto = SquaredError("fc8", target=target)._to_proto().squared_error
    assert proto.target.dtype == pb.DATA_TYPE_FLOAT32
    np.testing.assert_array_equal(from_tensor(proto.target), target.astype(np.float32))


@pytest.mark.parametrize("kwargs", [{}, {"target": np.zeros((1, 4)), "target_classes": [1]}])
def test_squared_error_needs_exactly_one_of_target_and_classes(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        SquaredError("fc8", **kwargs)


def test_upstream_gradient_is_sent_as_float32_tensor() -> None:
    gradient = np.ones((2, 512, 14, 14), np.float32)
    proto = UpstreamGradient("conv5_3", gradient)._to_proto().upstream_gradient
    assert proto.layer == "conv5_3"
    assert list(proto.gradient.shape) == [2, 512, 14, 14]


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: ClassScore(classes=[1.5]), TypeError),
        (lambda: ClassScore(classes=[True]), TypeError),
        (lambda: ClassScore(classes="1"), TypeError),
        (lambda: ClassScore(classes=[]), ValueError),
        (lambda: ClassScore("fc8"), ValueError),
        (lambda: SoftmaxCrossEntropy([]), ValueError),
        (lambda: SumOfSquares(""), TypeError),
        (lambda: SumOfSquares(3), TypeError),
        (lambda: UpstreamGradient("fc8", np.ones(3)), ValueError),
        (lambda: SquaredError("fc8", target=np.array([["a"]])), TypeError),
    ],
)
def test_malformed_losses_are_rejected_when_built(build: Any, error: type) -> None:
    with pytest.raises(error):
        build()


def test_losses_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SumOfSquares().layer = "fc8"  # type: ignore[misc]


# ---------------------------------------------------------------- errors


def test_invalid_argument_carries_message_field_violations_and_reason() -> None:
    error = errors.from_grpc_error(bad_layer_error())
    assert type(error) is errors.InvalidArgument
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "unknown layer 'conv9'"
    assert error.field_violations == [
        ("targets.layers[0]", "unknown layer 'conv9'; valid: conv1_1, ..., prob")
    ]
    assert error.reason == "UNKNOWN_LAYER"
    assert error.domain == "layergrad.dev"
    assert error.error_info is not None and error.error_info.metadata["layer"] == "conv9"
    assert [type(d) for d in error.details] == [error_details_pb2.BadRequest, error_details_pb2.ErrorInfo]
    assert str(error) == "INVALID_ARGUMENT: unknown layer 'conv9'"


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_every_status_code_maps_to_its_own_subclass(code: grpc.StatusCode) -> None:
    error = errors.from_grpc_error(FakeRpcError(code, "boom"))
    assert isinstance(error, errors.LayergradError)
    assert type(error) is not errors.LayergradError
    assert type(error).grpc_status_code is code and error.code is code
    assert type(error).__name__ == "".join(part.capitalize() for part in code.name.split("_"))
    assert getattr(layergrad, type(error).__name__) is type(error)


def test_error_without_rich_details_has_no_details_or_reason() -> None:
    error = errors.from_grpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert isinstance(error, errors.Unavailable)
    assert error.details == [] and error.reason is None and error.field_violations == []


def test_trailer_whose_message_disagrees_still_yields_its_details() -> None:
    info = error_details_pb2.ErrorInfo(reason="BATCH_TOO_LARGE", domain="layergrad.dev")
    rpc_error = rich_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many", info, status_message="other")
    error = errors.from_grpc_error(rpc_error)
    assert isinstance(error, errors.ResourceExhausted)
    assert error.message == "too many" and error.reason == "BATCH_TOO_LARGE"


def test_detail_of_unknown_type_is_kept_as_any() -> None:
    error = errors.from_grpc_error(
        rich_error(grpc.StatusCode.INTERNAL, "x", struct_pb2.Value(number_value=1))
    )
    assert len(error.details) == 1 and isinstance(error.details[0], any_pb2.Any)


def test_corrupt_status_trailer_is_ignored() -> None:
    rpc_error = FakeRpcError(grpc.StatusCode.INTERNAL, "x", [("grpc-status-details-bin", b"\xff\xff")])
    error = errors.from_grpc_error(rpc_error)
    assert isinstance(error, errors.Internal) and error.details == []


def test_rpc_error_without_call_accessors_becomes_unknown() -> None:
    error = errors.from_grpc_error(grpc.RpcError("opaque"))
    assert isinstance(error, errors.Unknown) and error.message == "opaque"


def test_locally_built_error_has_its_class_code() -> None:
    assert errors.DataLoss("torn").code is grpc.StatusCode.DATA_LOSS
    assert code_pb2.DATA_LOSS == grpc.StatusCode.DATA_LOSS.value[0]


# ---------------------------------------------------------------- client (fake stub)


def test_closed_client_refuses_every_call_and_reentry() -> None:
    client = Client("127.0.0.1:1")
    with client:
        pass
    assert client.closed
    client.close()  # a second close is harmless
    with pytest.raises(errors.ClientClosedError):
        client.model_info()
    with pytest.raises(errors.ClientClosedError):
        client.gradients(prepared(), SumOfSquares(), input=True)
    with pytest.raises(errors.ClientClosedError), client:
        pass


def test_gradients_stream_is_reassembled_into_a_result() -> None:
    grad = prepared(2)
    layer = np.ones((2, 512, 14, 14), np.float32)
    weight = np.full((1000, 4096), 0.25, np.float32)
    prob = np.full((2, 1000), 1e-3, np.float32)
    stream = (
        chunks("input", INPUT, grad, 65536, loss=2.5)
        + chunks("conv5_3", LAYER, layer, 65536)
        + chunks("fc8/W", PARAM, weight, 1 << 20)
        + chunks("prob", ACTIVATION, prob, 4096)
    )
    stub = FakeStub(stream=stream)
    with fake_client(stub) as client:
        result = client.gradients(
            prepared(2),
            SumOfSquares(),
            layers=["conv5_3"],
            parameters=["fc8/W"],
            input=True,
            activations="prob",
        )
    np.testing.assert_array_equal(result.input, grad)
    np.testing.assert_array_equal(result.layers["conv5_3"], layer)
    np.testing.assert_array_equal(result.parameters["fc8/W"], weight)
    np.testing.assert_array_equal(result.activations["prob"], prob)
    assert result.loss == 2.5
    assert list(result.as_dict()) == ["input", "layer/conv5_3", "param/fc8/W", "activation/prob"]


def test_gradients_request_carries_pattern_targets_and_dtype() -> None:
    stub = FakeStub(stream=chunks("input", INPUT, np.zeros((1, 2), np.float16), 8))
    client = fake_client(stub, timeout=12.0)
    client.gradients(
        prepared(1),
        ClassScore(classes=[1]),
        pattern="backward_retain_grad",
        parameters="all",
        layers="all",
        input=True,
        activations=["fc7", "prob"],
        dtype="float16",
        timeout=5.0,
    )
    method, request, timeout = stub.requests[0]
    assert method == "StreamGradients" and timeout == 5.0
    assert request.pattern == pb.BACKWARD_PATTERN_BACKWARD_RETAIN_GRAD
    assert request.targets == pb.GradientTargets(all_parameters=True, all_layers=True, input=True)
    assert list(request.activation_layers) == ["fc7", "prob"]
    assert request.output_dtype == pb.DATA_TYPE_FLOAT16
    assert request.loss.class_score.classes == [1]
    assert len(request.inputs) == 1


def test_call_without_timeout_uses_the_client_timeout() -> None:
    stub = FakeStub(unary=model_info_response())
    fake_client(stub, timeout=12.0).model_info()
    assert stub.requests[0][2] == 12.0


def test_convenience_methods_pick_the_matching_pattern_and_targets() -> None:
    stub = FakeStub(stream=chunks("input", INPUT, np.zeros((1, 3, 224, 224), np.float32), 1 << 20))
    client = fake_client(stub)
    assert client.input_gradient(prepared(), SumOfSquares()).shape == (1, 3, 224, 224)
    client.parameter_gradients(prepared(), SumOfSquares())
    client.layer_gradients(prepared(), SumOfSquares(), ["conv5_3", "fc7"])
    requests = [request for _, request, _ in stub.requests]
    assert (requests[0].pattern, requests[0].targets) == (
        pb.BACKWARD_PATTERN_GRAD,
        pb.GradientTargets(input=True),
    )
    assert (requests[1].pattern, requests[1].targets.all_parameters) == (pb.BACKWARD_PATTERN_BACKWARD, True)
    assert (requests[2].pattern, list(requests[2].targets.layers)) == (
        pb.BACKWARD_PATTERN_GRAD,
        ["conv5_3", "fc7"],
    )


def test_pattern_enum_and_strings_are_interchangeable() -> None:
    assert [p.value for p in Pattern] == ["backward", "backward_retain_grad", "grad"]
    stub = FakeStub(stream=chunks("input", INPUT, np.zeros(1, np.float32), 8))
    fake_client(stub).gradients(prepared(), SumOfSquares(), pattern=Pattern.BACKWARD, input=True)
    assert stub.requests[0][1].pattern == pb.BACKWARD_PATTERN_BACKWARD


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "no gradient requested"),
        ({"input": True, "pattern": "forward"}, ValueError, "unknown pattern"),
        ({"input": True, "dtype": "float64"}, ValueError, "'float32', 'float16' or 'bfloat16'"),
        ({"layers": [1]}, TypeError, "layers must be names"),
    ],
)
def test_bad_gradient_arguments_fail_before_any_rpc(kwargs: dict[str, Any], error: type, match: str) -> None:
    stub = FakeStub()
    with pytest.raises(error, match=match):
        fake_client(stub).gradients(prepared(), SumOfSquares(), **kwargs)
    assert stub.requests == []


def test_loss_that_is_not_a_layergrad_loss_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"layergrad\.losses"):
        fake_client(FakeStub()).gradients(prepared(), "sum-of-squares", input=True)  # type: ignore[arg-type]


def test_rpc_error_becomes_the_typed_error() -> None:
    client = fake_client(FakeStub(error=bad_layer_error()))
    with pytest.raises(errors.InvalidArgument) as caught:
        client.gradients(prepared(), SumOfSquares(), layers=["conv9"])
    assert caught.value.reason == "UNKNOWN_LAYER"
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_stream_failing_midway_raises_the_typed_error() -> None:
    midway = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    stream = chunks("input", INPUT, np.arange(64, dtype=np.float32), 64)
    stub = FakeStub(stream=[*stream[:2], midway])
    with pytest.raises(errors.DeadlineExceeded, match="Deadline Exceeded"):
        fake_client(stub).gradients(prepared(), SumOfSquares(), input=True)
    assert stub.streams[0].cancelled


def test_torn_stream_raises_data_loss_and_cancels_the_call() -> None:
    stream = chunks("input", INPUT, np.arange(64, dtype=np.float32), 64)
    stub = FakeStub(stream=[stream[0], stream[2]])
    with pytest.raises(errors.DataLoss, match="gap"):
        fake_client(stub).gradients(prepared(), SumOfSquares(), input=True)
    assert stub.streams[0].cancelled


def test_unary_gradients_convert_named_tensors_and_loss() -> None:
    grad = prepared(1)
    response = pb.ComputeGradientsResponse(
        gradients=[pb.NamedTensor(name="input", kind=INPUT, tensor=to_tensor(grad))],
        activations=[
            pb.NamedTensor(name="fc8", kind=ACTIVATION, tensor=to_tensor(np.ones((1, 1000), np.float32)))
        ],
        loss=3.0,
    )
    stub = FakeStub(unary=response)
    result = fake_client(stub).compute_gradients_unary(
        prepared(), SumOfSquares(), input=True, activations=["fc8"]
    )
    assert stub.requests[0][0] == "ComputeGradients"
    assert isinstance(result, GradientResult)
    np.testing.assert_array_equal(result.input, grad)
    assert result.activations["fc8"].shape == (1, 1000)
    assert result.loss == 3.0 and result.layers == {} and result.parameters == {}


def test_unary_results_carry_the_request_id_sent_and_the_server_timings() -> None:
    response = pb.ComputeGradientsResponse(
        gradients=[pb.NamedTensor(name="input", kind=INPUT, tensor=to_tensor(np.zeros(1, np.float32)))]
    )
    client = fake_client(FakeStub(unary=response))
    result = client.compute_gradients_unary(prepared(), SumOfSquares(), input=True, request_id="mine-1")
    assert result.request_id == "mine-1"
    assert result.timings == {"queue": 0.0015, "compute": 0.25, "send": 0.002}
    assert (
        client.compute_gradients_unary(prepared(), SumOfSquares(), input=True).request_id == "made-by-server"
    )
    with pytest.raises(ValueError, match="request_id"):
        client.compute_gradients_unary(prepared(), SumOfSquares(), input=True, request_id="")


def test_unary_result_without_loss_has_loss_none() -> None:
    response = pb.ComputeGradientsResponse(
        gradients=[pb.NamedTensor(name="input", kind=INPUT, tensor=to_tensor(np.zeros(1, np.float32)))]
    )
    result = fake_client(FakeStub(unary=response)).compute_gradients_unary(
        prepared(), UpstreamGradient("fc8", np.ones((1, 1000))), input=True
    )
    assert result.loss is None


def test_predict_returns_layer_outputs_by_name() -> None:
    prob = np.full((2, 1000), 1e-3, np.float32)
    response = pb.PredictResponse(
        activations=[pb.NamedTensor(name="prob", kind=ACTIVATION, tensor=to_tensor(prob))]
    )
    stub = FakeStub(unary=response)
    outputs = fake_client(stub).predict(prepared(2), "prob")
    np.testing.assert_array_equal(outputs["prob"], prob)
    assert list(stub.requests[0][1].layers) == ["prob"]


def test_model_info_is_converted_to_plain_dataclasses() -> None:
    info = fake_client(FakeStub(unary=model_info_response())).model_info()
    assert info.model_name == "VGG16"
    assert info.input_spec.shape == (3, 224, 224) and info.input_spec.dtype == "float32"
    assert info.input_spec.image_formats == ("JPEG", "PNG")
    assert info.layer_names == ("conv1_1", "prob")
    assert info.layers[0].output_shape == (64, 224, 224)
    assert info.parameters[0].shape == (1000, 4096) and info.parameters[0].dtype == "float32"
    assert info.num_parameters == 4_097_000 and info.parameter_nbytes == 4 * 4_097_000
    assert info.weights.source == "random:0" and not info.weights.pretrained
    assert info.versions == {"chainer": "7.8.1", "layergrad": "0.1.0"}
    assert info.max_batch_size == 8


def test_gradient_result_as_dict_omits_missing_input() -> None:
    result = GradientResult(parameters={"fc8/b": np.zeros(1000, np.float32)}, loss=1.0)
    assert list(result.as_dict()) == ["param/fc8/b"]


def test_public_api_is_exported_through_all() -> None:
    assert layergrad.__version__ == "0.1.0"
    for name in layergrad.__all__:
        assert hasattr(layergrad, name), name
    assert {"Client", "GradientResult", "ModelInfo", "Pattern", "from_grpc_error"} <= set(layergrad.__all__)


# ---------------------------------------------------------------- CLI


@pytest.fixture
def cli_stub(monkeypatch: pytest.MonkeyPatch) -> FakeStub:
    """Makes the CLI's Client use a FakeStub; returns the stub to load with replies."""
    stub = FakeStub()

    def make_client(target: str, **kwargs: Any) -> Client:
        client = Client(target, **kwargs)
        client._stub = stub
        return client

    monkeypatch.setattr(cli, "Client", make_client)
    return stub


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("sum-of-squares", SumOfSquares("prob")),
        ("sum-of-squares:fc7", SumOfSquares("fc7")),
        ("class-score:fc8:281,5", ClassScore("fc8", classes=[281, 5])),
        ("class-score:prob:3", ClassScore("prob", classes=[3, 3])),
        ("cross-entropy:1,2", SoftmaxCrossEntropy([1, 2])),
    ],
)
def test_cli_loss_specs_build_the_matching_loss(spec: str, expected: Any) -> None:
    assert cli._parse_loss(spec, batch=2) == expected


def test_cli_squared_error_spec_uses_one_hot_classes() -> None:
    loss = cli._parse_loss("squared-error:prob:7", batch=1)
    assert isinstance(loss, SquaredError) and loss.target_classes == (7,)


@pytest.mark.parametrize("spec", ["hinge:fc8", "class-score:fc8", "class-score:fc8:x", "cross-entropy:"])
def test_cli_malformed_loss_is_a_usage_error(spec: str, tmp_path: pathlib.Path, capsys: Any) -> None:
    code = cli.main(["grad", "a.png", "--out", str(tmp_path / "o.npz"), "--loss", spec])
    assert code == 2
    assert "error" in capsys.readouterr().err


def test_cli_grad_writes_npz_and_prints_summary(
    cli_stub: FakeStub, tmp_path: pathlib.Path, capsys: Any
) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(PNG_1x1)
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    cli_stub.stream_items = chunks("input", INPUT, np.ones((1, 3, 2, 2), np.float32), 16, loss=0.5) + chunks(
        "fc8/W", PARAM, weight, 16
    )
    out = tmp_path / "grads.npz"
    code = cli.main(
        [
            "grad",
            str(image),
            "--out",
            str(out),
            "--loss",
            "class-score:fc8:281",
            "--pattern",
            "backward",
            "--input",
            "--params",
            "fc8/W",
        ]
    )
    assert code == 0
    request = cli_stub.requests[0][1]
    assert request.pattern == pb.BACKWARD_PATTERN_BACKWARD
    assert list(request.targets.parameters) == ["fc8/W"] and request.targets.input
    with np.load(out) as saved:
        assert sorted(saved.files) == ["input", "param/fc8/W"]
        np.testing.assert_array_equal(saved["param/fc8/W"], weight)
    printed = capsys.readouterr().out
    assert "param/fc8/W" in printed and "3x4" in printed and "loss 0.5" in printed
    assert f"{np.linalg.norm(weight):.4g}" in printed


def test_cli_grad_defaults_to_the_input_gradient(cli_stub: FakeStub, tmp_path: pathlib.Path) -> None:
    cli_stub.stream_items = chunks("input", INPUT, np.ones((1, 3, 2, 2), np.float32), 64)
    image = tmp_path / "a.png"
    image.write_bytes(PNG_1x1)
    assert cli.main(["grad", str(image), "--out", str(tmp_path / "g.npz"), "--float16"]) == 0
    request = cli_stub.requests[0][1]
    assert request.targets == pb.GradientTargets(input=True)
    assert request.output_dtype == pb.DATA_TYPE_FLOAT16
    assert request.loss == SumOfSquares("prob")._to_proto()


def test_cli_dtype_picks_the_wire_type_and_saves_float32(cli_stub: FakeStub, tmp_path: pathlib.Path) -> None:
    bits = np.array([0x3F80, 0x4000], np.uint16)  # bfloat16 1.0, 2.0
    cli_stub.stream_items = chunks("input", INPUT, bits.view(np.float16).reshape(1, 2), 64)
    cli_stub.stream_items[0].dtype = pb.DATA_TYPE_BFLOAT16
    image = tmp_path / "a.png"
    image.write_bytes(PNG_1x1)
    out = tmp_path / "g.npz"
    assert cli.main(["grad", str(image), "--out", str(out), "--dtype", "bfloat16"]) == 0
    request = cli_stub.requests[0][1]
    assert request.output_dtype == pb.DATA_TYPE_BFLOAT16 and request.float16_scaling
    with np.load(out) as saved:
        assert saved["input"].dtype == np.float32 and saved["input"].tolist() == [[1.0, 2.0]]
    assert cli.main(["grad", str(image), "--out", str(out), "--dtype", "float16", "--float16"]) == 2


def test_cli_server_error_prints_code_and_message_and_exits_1(
    cli_stub: FakeStub, tmp_path: pathlib.Path, capsys: Any
) -> None:
    cli_stub.error = bad_layer_error()
    image = tmp_path / "a.png"
    image.write_bytes(PNG_1x1)
    assert cli.main(["grad", str(image), "--out", str(tmp_path / "g.npz"), "--layers", "conv9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: unknown layer 'conv9'")
    assert "targets.layers[0]: unknown layer" in err
    assert "request id req-9" in err


def test_cli_missing_image_is_a_usage_error(cli_stub: FakeStub, tmp_path: pathlib.Path, capsys: Any) -> None:
    assert cli.main(["predict", str(tmp_path / "missing.jpg")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert cli_stub.requests == []


def test_cli_predict_prints_top_classes(cli_stub: FakeStub, tmp_path: pathlib.Path, capsys: Any) -> None:
    prob = np.zeros((1, 1000), np.float32)
    prob[0, [7, 42]] = [0.3, 0.6]
    cli_stub.unary = pb.PredictResponse(
        activations=[pb.NamedTensor(name="prob", kind=ACTIVATION, tensor=to_tensor(prob))]
    )
    cli_stub.info = model_info_response()
    cli_stub.info.probability_layer = "prob"
    cli_stub.info.labels.extend(f"label {i}" for i in range(1000))
    image = tmp_path / "a.png"
    image.write_bytes(PNG_1x1)
    out = tmp_path / "p.npz"
    assert cli.main(["predict", str(image), "--top", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["1.", "class", "42", "p=0.6000", "label", "42"]
    assert lines[2].split() == ["2.", "class", "7", "p=0.3000", "label", "7"]
    with np.load(out) as saved:
        assert saved.files == ["prob"]


def test_cli_info_json_is_the_model_info(cli_stub: FakeStub, capsys: Any) -> None:
    import json

    cli_stub.unary = model_info_response()
    assert cli.main(["--target", "example:1", "info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model_name"] == "VGG16" and data["layers"][1] == {"name": "prob", "output_shape": [1000]}


def test_cli_info_summary_lists_weights_and_layers(cli_stub: FakeStub, capsys: Any) -> None:
    cli_stub.unary = model_info_response()
    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "random, random:0" in printed and "ab" * 32 in printed
    assert "conv1_1  64x224x224" in printed and "4,097,000 values" in printed


def test_cli_target_defaults_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERGRAD_TARGET", "gradhost:9000")
    assert cli._parser().parse_args(["info"]).target == "gradhost:9000"
    monkeypatch.delenv("LAYERGRAD_TARGET")
    assert cli._parser().parse_args(["info"]).target == "127.0.0.1:50051"


def test_cli_without_command_is_a_usage_error(capsys: Any) -> None:
    assert cli.main([]) == 2


def test_cli_progress_draws_a_bar_on_stderr(cli_stub: FakeStub, tmp_path: pathlib.Path, capsys: Any) -> None:
    prob = np.full((1, 1000), 1e-3, np.float32)
    cli_stub.unary = pb.PredictResponse(
        activations=[pb.NamedTensor(name="prob", kind=ACTIVATION, tensor=to_tensor(prob))]
    )
    cli_stub.info = model_info_response()
    image = tmp_path / "a.png"
    image.write_bytes(PNG_1x1)
    assert cli.main(["--progress", "predict", str(image), "--top", "1"]) == 0
    assert capsys.readouterr().err.endswith("] 1/1 inputs\n")
