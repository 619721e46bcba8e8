"""The StreamGradients fast path: hand-serialized frames on the server, a hand parser in the SDK.

Both must be exactly the protobuf wire format: frames parse with the generated
class into the same messages (and bytes) as the reference encoding, and the SDK's
parser agrees with the generated class, falling back to it on anything unusual.
"""

from __future__ import annotations

import threading
import time

import layergrad_server  # noqa: F401  (applies the numpy 2 shim Chainer needs)

# isort: split
import grpc
import layergrad
import numpy as np
import pytest
from conftest import make_rgb
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad._tensors import _ChunkAssembler, parse_stream_chunk
from layergrad_server import convert, engine, precision
from layergrad_server.config import DEFAULT_STREAM_CHUNK_BYTES
from layergrad_server.errors import OutOfRange
from layergrad_server.launch import ServerProcess

Kind = engine.Kind
F32 = np.float32


def result_tensors(defer: bool) -> list[engine.ResultTensor]:
    """Tensors of every shape class; ``defer`` leaves the float16 one unconverted (as the server does)."""
    rng = np.random.default_rng(0)
    half = rng.standard_normal((2, 3, 5)).astype(np.float32)
    return [
        engine.ResultTensor("input", Kind.INPUT_GRADIENT, half, np.dtype(np.float16))
        if defer
        else engine.ResultTensor("input", Kind.INPUT_GRADIENT, half.astype(np.float16)),
        engine.ResultTensor("conv5_3", Kind.LAYER_GRADIENT, rng.standard_normal((1, 7, 3, 3)).astype(F32)),
        engine.ResultTensor("fc8/W", Kind.PARAMETER_GRADIENT, rng.standard_normal((300, 7)).astype(F32)),
        engine.ResultTensor("empty", Kind.LAYER_GRADIENT, np.zeros((0, 4), np.float32)),
        engine.ResultTensor("scalar", Kind.ACTIVATION, np.array(3.5, np.float32)),
        engine.ResultTensor("prob", Kind.ACTIVATION, np.arange(6, dtype=np.float32).reshape(2, 3)),
    ]


@pytest.mark.parametrize("chunk_bytes", [1, 3, 8, 1000, 1 << 20])
@pytest.mark.parametrize("loss", [None, 0.0, -1.25])
def test_frames_are_byte_identical_to_the_generated_serialization(chunk_bytes, loss):
    reference = [
        message.SerializeToString()
        for message in convert.gradient_chunks(
            engine.GradientResult(result_tensors(False), loss), chunk_bytes
        )
    ]
    frames = list(convert.gradient_frames(engine.GradientResult(result_tensors(True), loss), chunk_bytes))
    assert frames == reference
    parsed = [pb.StreamGradientsResponse.FromString(frame) for frame in frames]
    assert parsed[0].HasField("loss") == (loss is not None)
    assert not any(message.HasField("loss") for message in parsed[1:])
    assert all(len(message.data) <= chunk_bytes for message in parsed)


def test_frames_reassemble_to_the_tensors_with_the_sdk_parser_and_the_generated_class():
    tensors = result_tensors(True)
    frames = list(convert.gradient_frames(engine.GradientResult(tensors, 2.5), 16))
    for parse in (parse_stream_chunk, pb.StreamGradientsResponse.FromString):
        assembler = _ChunkAssembler()
        for frame in frames:
            assembler.add(parse(frame))
        assembled = assembler.finish()
        assert assembler.loss == 2.5
        assert [(t.name, t.kind) for t in assembled] == [(t.name, convert.KINDS[t.kind]) for t in tensors]
        for got, sent in zip(assembled, tensors, strict=True):
            assert got.array.dtype == np.float32  # float16 widened
            np.testing.assert_array_equal(got.array, sent.converted())


def encoded_result(scaling: bool) -> tuple[engine.GradientResult, list[int]]:
    """A result with a scaled float16 tensor (tiny values), a large one, and a bfloat16 tensor."""
    rng = np.random.default_rng(5)
    tiny = (rng.standard_normal((3, 7)) * 1e-9).astype(F32)
    large = (rng.standard_normal(11) * 1e7).astype(F32)
    tensors = [
        engine.ResultTensor("input", Kind.INPUT_GRADIENT, tiny, np.dtype(np.float16)),
        engine.ResultTensor("fc8/W", Kind.PARAMETER_GRADIENT, large, np.dtype(np.float16)),
        engine.ResultTensor("fc8/b", Kind.PARAMETER_GRADIENT, tiny[0], precision.BFLOAT16),
        engine.ResultTensor("prob", Kind.ACTIVATION, large[:3], None),
    ]
    return convert.encode_result(engine.GradientResult(tensors, 0.5), scaling)


@pytest.mark.parametrize("chunk_bytes", [1, 3, 1 << 20])
def test_scaled_and_bfloat16_frames_match_the_generated_serialization_and_decode(chunk_bytes):
    result, exponents = encoded_result(True)
    assert exponents[0] > 0 > exponents[1] and exponents[2:] == [0, 0]
    reference = [m.SerializeToString() for m in convert.gradient_chunks(result, chunk_bytes, exponents)]
    frames = list(convert.gradient_frames(result, chunk_bytes, exponents))
    assert frames == reference
    for parse in (parse_stream_chunk, pb.StreamGradientsResponse.FromString):
        assembler = _ChunkAssembler()
        for frame in frames:
            assembler.add(parse(frame))
        for got, sent, exponent in zip(assembler.finish(), result.tensors, exponents, strict=True):
            assert got.array.dtype == np.float32
            sent_values = sent.array if sent.array.dtype == F32 else precision.decode(sent.array, exponent)
            np.testing.assert_array_equal(got.array, sent_values)


@pytest.mark.parametrize("loss", [None, 0.0, -1.25])
def test_unary_response_bytes_are_the_generated_serialization(loss):
    plain = engine.GradientResult(result_tensors(False), loss)
    assert convert.gradients_response_bytes(plain) == convert.gradients_response(plain).SerializeToString()
    result, exponents = encoded_result(True)
    reference = convert.gradients_response(result, exponents).SerializeToString()
    assert convert.gradients_response_bytes(result, exponents) == reference
    parsed = pb.ComputeGradientsResponse.FromString(convert.gradients_response_bytes(plain))
    assert [t.name for t in parsed.gradients] == ["input", "conv5_3", "fc8/W", "empty"]
    assert [t.name for t in parsed.activations] == ["scalar", "prob"]
    assert parsed.HasField("loss") == (loss is not None)


def test_unscaled_float16_of_values_out_of_range_is_refused_with_counts():
    with pytest.raises(OutOfRange) as caught:
        encoded_result(False)
    assert caught.value.reason == "FLOAT16_OUT_OF_RANGE"
    assert caught.value.metadata == {"tensor": "input", "overflow": "0", "underflow": "21", "tensors": "2"}


def test_sdk_parser_returns_a_view_of_the_data_not_a_copy():
    frame = next(convert.gradient_frames(engine.GradientResult(result_tensors(True)[2:3], None), 1 << 20))
    chunk = parse_stream_chunk(frame)
    assert isinstance(chunk.data, memoryview) and chunk.data.obj is frame
    assert (chunk.name, chunk.shape, chunk.offset, chunk.loss) == ("fc8/W", (300, 7), 0, None)


def _as_tuple(message: pb.StreamGradientsResponse) -> tuple:
    return (
        message.name,
        message.kind,
        message.dtype,
        tuple(message.shape),
        message.offset,
        bytes(message.data),
        message.loss if message.HasField("loss") else None,
        message.scale_exponent,
    )


@pytest.mark.parametrize(
    "message",
    [
        pb.StreamGradientsResponse(),
        pb.StreamGradientsResponse(
            name="x", kind=3, dtype=1, shape=[2, 0, 1 << 40], offset=1 << 33, data=b"ab"
        ),
        pb.StreamGradientsResponse(name="ü/W", dtype=2, shape=[5], loss=float("inf")),
        pb.StreamGradientsResponse(name="neg", kind=-1, dtype=-5, shape=[-3], offset=-7),  # fallback
        pb.StreamGradientsResponse(name="s", dtype=2, shape=[1], data=b"ab", scale_exponent=-7),
        pb.StreamGradientsResponse(dtype=2, scale_exponent=33, loss=1.0),
        pb.StreamGradientsResponse(dtype=7, scale_exponent=-(2**31)),
        pb.StreamGradientsResponse(dtype=7, scale_exponent=2**31 - 1),
    ],
)
def test_sdk_parser_agrees_with_the_generated_class(message):
    raw = message.SerializeToString()
    chunk = parse_stream_chunk(raw)
    assert (
        chunk.name,
        chunk.kind,
        chunk.dtype,
        chunk.shape,
        chunk.offset,
        bytes(chunk.data),
        chunk.loss,
        chunk.scale_exponent,
    ) == (_as_tuple(message))


def test_sdk_parser_falls_back_to_the_generated_class_on_unknown_or_unpacked_fields():
    message = pb.StreamGradientsResponse(name="fc8/b", kind=3, dtype=1, shape=[4], offset=8, data=b"\x01" * 8)
    raw = message.SerializeToString()
    unknown = raw + b"\x98\x06\x05"  # field 99, varint 5: an unknown field from a newer server
    unpacked = raw.replace(b"\x22\x01\x04", b"\x20\x04")  # shape as an unpacked repeated field
    for variant in (unknown, unpacked):
        chunk = parse_stream_chunk(variant)
        assert (chunk.name, chunk.shape, chunk.offset, bytes(chunk.data)) == ("fc8/b", (4,), 8, b"\x01" * 8)
    with pytest.raises(Exception):  # noqa: B017  (protobuf's DecodeError, as before the fast path)
        parse_stream_chunk(raw[:-3])


def test_default_chunk_keeps_every_message_under_grpcs_default_receive_limit():
    name = "x" * 64
    tensor = engine.ResultTensor(name, Kind.PARAMETER_GRADIENT, np.zeros((2, 3 << 20), np.float32))
    frames = convert.gradient_frames(engine.GradientResult([tensor], 1.0), DEFAULT_STREAM_CHUNK_BYTES)
    assert max(len(frame) for frame in frames) < 4 * 1024 * 1024


def test_stream_through_the_service_matches_the_unary_call_and_the_generated_stub(client, server):
    """The SDK (fast parser), the generated stub (FromString) and the unary RPC agree exactly."""
    image = make_rgb(3)
    loss = layergrad.SumOfSquares("fc7")
    for dtype in ("float32", "float16"):
        kwargs = dict(pattern="backward", parameters=["fc8/W", "fc7/b"], input=True, dtype=dtype)
        streamed = client.gradients(image, loss, **kwargs)
        unary = client.compute_gradients_unary(image, loss, **kwargs)
        assert streamed.loss == unary.loss
        np.testing.assert_array_equal(streamed.input, unary.input)
        assert streamed.input.dtype == np.float32  # float16 comes back widened, its scale undone
        for name in ("fc8/W", "fc7/b"):
            np.testing.assert_array_equal(streamed.parameters[name], unary.parameters[name])
            assert streamed.parameters[name].dtype == np.float32

    request = pb.StreamGradientsRequest(
        inputs=[pb.Input(prepared=layergrad._tensors.to_tensor(np.zeros((3, 224, 224), np.float32)))],
        loss=loss._to_proto(),
        pattern=pb.BACKWARD_PATTERN_BACKWARD,
        targets=pb.GradientTargets(parameters=["fc8/W"]),
    )
    with grpc.insecure_channel(
        server.address, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        messages = list(pb_grpc.GradientServiceStub(channel).StreamGradients(request, timeout=120))
    assembler = _ChunkAssembler()
    for message in messages:
        assembler.add(message)
    generated = assembler.finish()[0].array
    expected = client.parameter_gradients(np.zeros((3, 224, 224), np.float32), loss, ["fc8/W"])["fc8/W"]
    np.testing.assert_array_equal(generated, expected)
    assert messages[0].HasField("loss") and all(len(m.data) <= DEFAULT_STREAM_CHUNK_BYTES for m in messages)


# ---- destinations: the caller's arrays (out=) and arrays prepared ahead of the stream ----------------


def _assembled(frames: list[bytes], out=None, prepared=None) -> list:
    assembler = _ChunkAssembler(out, prepared)
    for frame in frames:
        assembler.add(parse_stream_chunk(frame))
    return assembler.finish()


def test_assembler_writes_into_out_and_matching_prepared_arrays_and_allocates_the_rest():
    tensors = result_tensors(True)
    frames = list(convert.gradient_frames(engine.GradientResult(tensors, None), 16))
    param, layer, act = (
        pb.TENSOR_KIND_PARAMETER_GRADIENT,
        pb.TENSOR_KIND_LAYER_GRADIENT,
        pb.TENSOR_KIND_ACTIVATION,
    )
    out = {(param, "fc8/W"): np.full((300, 7), np.nan, np.float32)}
    prepared = {
        (layer, "conv5_3"): np.full((1, 7, 3, 3), np.nan, np.float32),
        (act, "prob"): np.zeros((3, 2), np.float32),  # another shape: not used
        (param, "conv5_3"): np.zeros((1, 7, 3, 3), np.float32),  # another kind: not used
    }
    assembled = {(t.kind, t.name): t.array for t in _assembled(frames, out, prepared)}
    assert assembled[(param, "fc8/W")] is out[(param, "fc8/W")]
    assert assembled[(layer, "conv5_3")] is prepared[(layer, "conv5_3")]
    assert assembled[(act, "prob")] is not prepared[(act, "prob")]
    for sent in tensors:
        np.testing.assert_array_equal(assembled[(convert.KINDS[sent.kind], sent.name)], sent.converted())


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((7, 300), np.float32), r"float32 \[7, 300\] but the result is float32 \[300, 7\]"),
        (np.zeros((300, 7), np.float64), "float64"),
        (np.zeros((7, 300), np.float32).T, "C-contiguous"),
        ([[0.0] * 7] * 300, "numpy array"),
    ],
)
def test_out_array_that_cannot_take_the_tensor_in_place_is_a_value_error(array, message):
    frames = list(convert.gradient_frames(engine.GradientResult(result_tensors(True)[2:3], None), 64))
    with pytest.raises(ValueError, match=message):
        _assembled(frames, {(pb.TENSOR_KIND_PARAMETER_GRADIENT, "fc8/W"): array})


def test_read_only_out_array_is_a_value_error():
    frames = list(convert.gradient_frames(engine.GradientResult(result_tensors(True)[2:3], None), 64))
    array = np.zeros((300, 7), np.float32)
    array.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _assembled(frames, {(pb.TENSOR_KIND_PARAMETER_GRADIENT, "fc8/W"): array})


def test_out_arrays_are_filled_in_place_with_the_values_of_a_fresh_call(client):
    loss = layergrad.SumOfSquares("fc7")
    kwargs = dict(pattern="backward", parameters=["fc8/W", "fc7/b"], input=True)
    first = client.gradients(make_rgb(5), loss, **kwargs)
    fresh = client.gradients(make_rgb(6), loss, **kwargs)
    reused = client.gradients(make_rgb(6), loss, **kwargs, out=first)
    assert reused.input is first.input
    assert all(reused.parameters[name] is first.parameters[name] for name in ("fc8/W", "fc7/b"))
    np.testing.assert_array_equal(reused.input, fresh.input)
    for name in ("fc8/W", "fc7/b"):
        np.testing.assert_array_equal(reused.parameters[name], fresh.parameters[name])

    grads = client.parameter_gradients(make_rgb(5), loss, ["fc8/W"])
    again = client.parameter_gradients(make_rgb(6), loss, ["fc8/W"], out=grads)
    assert again["fc8/W"] is grads["fc8/W"]
    np.testing.assert_array_equal(again["fc8/W"], fresh.parameters["fc8/W"])


def test_a_repeated_call_gets_its_large_arrays_prepared_while_the_server_computes(client, monkeypatch):
    touched: list[np.ndarray] = []
    real_touch = layergrad.client.touch_pages
    monkeypatch.setattr(layergrad.client, "touch_pages", lambda a: (touched.append(a), real_touch(a)))
    loss = layergrad.ClassScore("fc8", [3])
    targets = dict(pattern="backward", parameters=["fc8/W", "fc8/b", "fc7/W"], dtype="float16")
    first = client.gradients(make_rgb(7), loss, **targets)
    assert not touched  # nothing known about this request's result yet
    second = client.gradients(make_rgb(7), loss, **targets)
    assert len(touched) == 2  # fc8/W and fc7/W; fc8/b is under 1 MiB
    assert {id(second.parameters["fc7/W"]), id(second.parameters["fc8/W"])} == {id(a) for a in touched}
    for name, array in first.parameters.items():
        assert second.parameters[name].dtype == np.float32
        np.testing.assert_array_equal(second.parameters[name], array)
    touched.clear()
    client.gradients(make_rgb(7), loss, **{**targets, "dtype": "float32"})
    assert not touched  # another output dtype: another layout


# ---- the SDK stops the server's stream when it gives up part-way ---------------------------------------


@pytest.fixture(scope="module")
def lone_server(weights_file, tmp_path_factory):
    """A server admitting one call at a time: a stream that kept its place would refuse the next call."""
    process = ServerProcess(
        ["--weights", str(weights_file), "--max-queue", "0"], tmp_path_factory.mktemp("lone") / "server.log"
    )
    try:
        process.wait_serving()
        yield process
    finally:
        process.terminate()


def _assert_place_given_back(server: ServerProcess) -> None:
    request = pb.ComputeGradientsRequest(
        inputs=[pb.Input(prepared=layergrad._tensors.to_tensor(np.zeros((3, 224, 224), np.float32)))],
        loss=pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[1])),
        pattern=pb.BACKWARD_PATTERN_GRAD,
        targets=pb.GradientTargets(parameters=["fc8/b"]),
    )
    deadline = time.monotonic() + 10
    with grpc.insecure_channel(server.address, options=[("grpc.enable_retries", 0)]) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        while True:
            try:
                stub.ComputeGradients(request, timeout=60)
                return
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert time.monotonic() < deadline, "the abandoned stream kept its place"
            time.sleep(0.2)


def test_an_sdk_error_at_the_first_chunk_cancels_the_stream(lone_server):
    x = np.zeros((3, 224, 224), np.float32)
    with layergrad.Client(lone_server.address, timeout=120) as sdk:
        with pytest.raises(ValueError, match="conv1_1/W"):
            sdk.parameter_gradients(
                x, layergrad.SumOfSquares("fc8"), out={"conv1_1/W": np.zeros(3, np.float32)}
            )
        _assert_place_given_back(lone_server)


def _closing_after_the_first_message(sdk: layergrad.Client) -> layergrad.Client:
    """``sdk``, made to close itself (from another thread) once a stream's first message arrived."""
    original = sdk._stub.StreamGradients

    def closing_after_the_first_message(*args, **kwargs):
        stream = original(*args, **kwargs)

        class Stream:
            def __iter__(self):
                for number, chunk in enumerate(stream):
                    if number == 0:
                        threading.Thread(target=sdk.close).start()
                    yield chunk

            def cancel(self) -> bool:
                return stream.cancel()

        return Stream()

    sdk._stub.StreamGradients = closing_after_the_first_message
    return sdk


def test_closing_the_client_mid_stream_stops_the_stream(lone_server):
    x = np.zeros((3, 224, 224), np.float32)
    sdk = _closing_after_the_first_message(layergrad.Client(lone_server.address, timeout=120))
    with pytest.raises((layergrad.errors.Cancelled, layergrad.errors.ClientClosedError)):
        sdk.parameter_gradients(x, layergrad.SumOfSquares("fc8"))
    _assert_place_given_back(lone_server)


def test_frames_made_ahead_arrive_complete_and_in_order():
    frames = [bytes([i]) * (i + 1) for i in range(50)]
    assert list(convert.ahead(iter(frames), 4)) == frames
    assert list(convert.ahead(iter([]), 4)) == []


def test_an_error_while_making_frames_ahead_reaches_the_consumer_after_the_frames_before_it():
    def failing():
        yield b"a"
        yield b"b"
        raise RuntimeError("conversion failed")

    got = []
    with pytest.raises(RuntimeError, match="conversion failed"):
        for frame in convert.ahead(failing(), 1):
            got.append(frame)
    assert got == [b"a", b"b"]


def test_closing_the_consumer_stops_the_frames_made_ahead():
    made, closed = [], threading.Event()

    def endless():
        try:
            while True:
                made.append(len(made))
                yield b"x"
        finally:
            closed.set()

    frames = convert.ahead(endless(), 3)
    assert next(frames) == b"x"
    frames.close()
    assert closed.is_set()
    count = len(made)
    time.sleep(0.2)
    assert len(made) == count <= 1 + 3 + 2  # the one consumed, the queue, one in hand
    assert not any(t.name == "frames-ahead" for t in threading.enumerate())


def test_float16_frames_made_ahead_are_the_frames_made_in_line():
    tensors = result_tensors(True)
    result = engine.GradientResult(tensors, 1.5)
    assert convert.converts(result)
    assert not convert.converts(engine.GradientResult(result_tensors(False), 1.5))
    in_line = list(convert.gradient_frames(result, 64))
    assert list(convert.ahead(convert.gradient_frames(result, 64), 2)) == in_line


def test_closing_the_client_mid_float16_stream_stops_the_stream(lone_server):
    """The float16 stream converts ahead in a helper thread: a caller that goes away still
    gives its place back, and the server answers the next call."""
    x = np.zeros((3, 224, 224), np.float32)
    sdk = _closing_after_the_first_message(layergrad.Client(lone_server.address, timeout=120))
    with pytest.raises((layergrad.errors.Cancelled, layergrad.errors.ClientClosedError)):
        sdk.parameter_gradients(x, layergrad.SumOfSquares("fc8"), dtype="float16")
    _assert_place_given_back(lone_server)
    with layergrad.Client(lone_server.address, timeout=120) as again:
        grads = again.parameter_gradients(x, layergrad.SumOfSquares("fc8"), ["fc8/b"], dtype="float16")
    assert grads["fc8/b"].dtype == np.float32
