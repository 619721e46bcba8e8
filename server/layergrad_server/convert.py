"""Protobuf <-> numpy and engine types, in one place.

Requests become ``engine`` dataclasses (structural checks: dtypes, shapes, byte
lengths, finite values); engine results become responses or stream chunks.
Tensors on the wire are flattened row-major little-endian with no padding.
"""

from __future__ import annotations

import queue
import struct
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb

from layergrad_server import engine, images, precision
from layergrad_server.errors import InvalidArgument, OutOfRange
from layergrad_server.models import ModelAdapter

DTYPES = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_UINT8: np.dtype("u1"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_BFLOAT16: precision.BFLOAT16.newbyteorder("<"),  # bit patterns, see precision
}
_DTYPE_ENUMS = {dtype.newbyteorder("="): value for value, dtype in DTYPES.items()}

PATTERNS = {
    pb.BACKWARD_PATTERN_BACKWARD: engine.Pattern.BACKWARD,
    pb.BACKWARD_PATTERN_BACKWARD_RETAIN_GRAD: engine.Pattern.BACKWARD_RETAIN_GRAD,
    pb.BACKWARD_PATTERN_GRAD: engine.Pattern.GRAD,
}

KINDS = {
    engine.Kind.INPUT_GRADIENT: pb.TENSOR_KIND_INPUT_GRADIENT,
    engine.Kind.LAYER_GRADIENT: pb.TENSOR_KIND_LAYER_GRADIENT,
    engine.Kind.PARAMETER_GRADIENT: pb.TENSOR_KIND_PARAMETER_GRADIENT,
    engine.Kind.ACTIVATION: pb.TENSOR_KIND_ACTIVATION,
    engine.Kind.LINK_GRADIENT: pb.TENSOR_KIND_LINK_GRADIENT,
}

MAX_DIMS = 8
# The most bytes a tensor's dimensions may describe, counting a zero dimension as one: far
# above any request, far below what numpy refuses.
MAX_TENSOR_EXTENT = 1 << 40


def _shown_shape(shape: tuple[int, ...]) -> str:
    return str(list(shape[:MAX_DIMS])) + ("" if len(shape) <= MAX_DIMS else f" ({len(shape)} dimensions)")


# ---- protobuf -> numpy -----------------------------------------------------------


def tensor_to_array(
    tensor: pb.Tensor,
    field: str,
    *,
    dtypes: Sequence[np.dtype],
    ndim: int | None = None,
    finite: bool = False,
) -> np.ndarray:
    """Decodes a Tensor, checking dtype, shape and byte length; the array is read-only."""
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None or dtype not in dtypes:
        allowed = ", ".join(pb.DataType.Name(_DTYPE_ENUMS[d.newbyteorder("=")]) for d in dtypes)
        raise InvalidArgument(
            f"dtype {_dtype_name(tensor.dtype)} is not accepted here; expected {allowed}",
            field=f"{field}.dtype",
            reason="BAD_DTYPE",
        )
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape) or (ndim is not None and len(shape) != ndim):
        expected = f"{ndim} non-negative dimensions" if ndim is not None else "non-negative dimensions"
        raise InvalidArgument(
            f"shape {_shown_shape(shape)} is invalid: expected {expected}",
            field=f"{field}.shape",
            reason="BAD_SHAPE",
        )
    # Even an empty tensor's other dimensions must make an array numpy can describe.
    extent = dtype.itemsize
    for d in shape:
        extent *= max(d, 1)
    if extent > MAX_TENSOR_EXTENT:
        raise InvalidArgument(
            f"shape {_shown_shape(shape)} is invalid: its dimensions describe more than "
            f"{MAX_TENSOR_EXTENT} bytes",
            field=f"{field}.shape",
            reason="BAD_SHAPE",
        )
    count = 1
    for d in shape:
        count *= d
    expected_bytes = count * dtype.itemsize
    if len(tensor.data) != expected_bytes:
        raise InvalidArgument(
            f"data has {len(tensor.data)} bytes but shape {_shown_shape(shape)} of "
            f"{pb.DataType.Name(tensor.dtype)} needs {expected_bytes}",
            field=f"{field}.data",
            reason="BYTE_LENGTH_MISMATCH",
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if finite and dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidArgument("values must be finite (no NaN or infinity)", field=field, reason="NON_FINITE")
    return array.astype(dtype.newbyteorder("="), copy=False)


def _dtype_name(value: int) -> str:
    try:
        return pb.DataType.Name(value)
    except ValueError:
        return f"<unknown {value}>"


def input_to_array(
    message: pb.Input, field: str, image_limits: images.ImageLimits, adapter: ModelAdapter | None = None
) -> np.ndarray:
    """One Input as the model's prepared float32 array (for VGG16, Chainer's ``vgg.prepare``)."""
    return input_and_size(message, field, image_limits, adapter)[0]


def input_and_size(
    message: pb.Input, field: str, image_limits: images.ImageLimits, adapter: ModelAdapter | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """One Input prepared by the model's own preparation, with the (height, width) of the image it
    came from (for a prepared input: its own)."""
    adapter = adapter if adapter is not None else engine.DEFAULT_ADAPTER
    spec = adapter.input_spec
    kind = message.WhichOneof("kind")
    if kind == "prepared":
        array = tensor_to_array(
            message.prepared, f"{field}.prepared", dtypes=[DTYPES[pb.DATA_TYPE_FLOAT32]], finite=True
        )
        if not spec.accepts(array.shape):
            accepted = (
                f"{list(spec.shape)}"
                if spec.min_size is None
                else f"[{spec.shape[0]}, H, W] with H >= {spec.min_size[0]}, W >= {spec.min_size[1]}"
            )
            raise InvalidArgument(
                f"a prepared input of model {adapter.name} must have shape {accepted} ({spec.layout}, "
                f"{spec.channel_order}, mean subtracted), got {list(array.shape)}",
                field=f"{field}.prepared.shape",
                reason="SHAPE_MISMATCH",
            )
        return array, (int(array.shape[1]), int(array.shape[2]))
    if kind == "rgb_image":
        array = tensor_to_array(
            message.rgb_image, f"{field}.rgb_image", dtypes=[DTYPES[pb.DATA_TYPE_UINT8]], ndim=3
        )
        image = images.from_rgb_array(array, f"{field}.rgb_image", image_limits)
    elif kind == "encoded_image":
        image = images.decode(message.encoded_image, f"{field}.encoded_image", image_limits)
    else:
        raise InvalidArgument(
            "input has no content: set encoded_image, rgb_image or prepared",
            field=field,
            reason="EMPTY_INPUT",
        )
    return adapter.prepare(image), (image.height, image.width)


def prepared_shape(messages: Sequence[pb.Input]) -> tuple[int, ...] | None:
    """The shape every input declares when all are prepared tensors of one shape, else None
    (read from the messages without decoding anything)."""
    shapes = {tuple(m.prepared.shape) for m in messages if m.WhichOneof("kind") == "prepared"}
    if len(shapes) != 1 or any(m.WhichOneof("kind") != "prepared" for m in messages):
        return None
    return shapes.pop()


def check_batch_count(messages: Sequence[pb.Input], max_batch_size: int) -> None:
    """At least one input and at most ``max_batch_size``, checked before any is decoded."""
    if not messages:
        raise InvalidArgument(
            "the batch is empty: send at least one input", field="inputs", reason="EMPTY_BATCH"
        )
    if len(messages) > max_batch_size:
        raise InvalidArgument(
            f"batch of {len(messages)} inputs exceeds the limit of {max_batch_size}",
            field="inputs",
            reason="BATCH_TOO_LARGE",
        )


def inputs_to_batch(
    messages: Sequence[pb.Input],
    adapter: ModelAdapter | None,
    image_limits: images.ImageLimits,
    max_batch_size: int,
) -> np.ndarray:
    """The request's inputs as one prepared (N, *input shape) float32 batch (one shape for all)."""
    check_batch_count(messages, max_batch_size)
    first = input_to_array(messages[0], "inputs[0]", image_limits, adapter)
    batch = np.empty((len(messages), *first.shape), dtype=np.float32)
    batch[0] = first
    for i, message in enumerate(messages[1:], start=1):
        array = input_to_array(message, f"inputs[{i}]", image_limits, adapter)
        if array.shape != first.shape:
            raise InvalidArgument(
                f"every input of one request must have the same prepared shape: inputs[0] has "
                f"{list(first.shape)}, inputs[{i}] {list(array.shape)}",
                field=f"inputs[{i}]",
                reason="SHAPE_MISMATCH",
            )
        batch[i] = array
    return batch


def _classes(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def loss_from_proto(message: pb.Loss) -> engine.Loss | None:
    """The request's loss, or None when unset."""
    kind = message.WhichOneof("kind")
    float32 = [DTYPES[pb.DATA_TYPE_FLOAT32]]
    if kind == "sum_of_squares":
        return engine.SumOfSquares(message.sum_of_squares.layer)
    if kind == "squared_error":
        m = message.squared_error
        target = (
            tensor_to_array(m.target, "loss.squared_error.target", dtypes=float32, finite=True)
            if m.HasField("target")
            else None
        )
        classes = _classes(m.target_classes) if m.target_classes else None
        return engine.SquaredError(m.layer, target=target, target_classes=classes)
    if kind == "softmax_cross_entropy":
        return engine.SoftmaxCrossEntropy(_classes(message.softmax_cross_entropy.labels))
    if kind == "class_score":
        return engine.ClassScore(message.class_score.layer, _classes(message.class_score.classes))
    if kind == "upstream_gradient":
        m = message.upstream_gradient
        if not m.HasField("gradient"):
            raise InvalidArgument(
                "upstream_gradient needs a gradient tensor",
                field="loss.upstream_gradient.gradient",
                reason="MISSING_GRADIENT",
            )
        gradient = tensor_to_array(m.gradient, "loss.upstream_gradient.gradient", dtypes=float32, finite=True)
        return engine.UpstreamGradient(m.layer, gradient)
    return None


def output_dtype(value: int) -> np.dtype:
    """The requested output element type; UNSPECIFIED means float32, BFLOAT16 is
    ``precision.BFLOAT16``."""
    if value == pb.DATA_TYPE_UNSPECIFIED:
        return np.dtype(np.float32)
    if value in (pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16):
        return DTYPES[value].newbyteorder("=")
    raise InvalidArgument(
        f"output_dtype {_dtype_name(value)} is not supported; use DATA_TYPE_FLOAT32, DATA_TYPE_FLOAT16 "
        "or DATA_TYPE_BFLOAT16",
        field="output_dtype",
        reason="BAD_DTYPE",
    )


def query_from_proto(
    request: pb.ComputeGradientsRequest | pb.StreamGradientsRequest | pb.ExportGradientsRequest,
    adapter: ModelAdapter | None,
    image_limits: images.ImageLimits,
    max_batch_size: int,
) -> engine.GradientQuery:
    """A gradient request (unary, stream or export: same fields) as an engine query."""
    targets = request.targets
    return engine.GradientQuery(
        inputs=inputs_to_batch(request.inputs, adapter, image_limits, max_batch_size),
        loss=loss_from_proto(request.loss),
        pattern=PATTERNS.get(request.pattern),
        parameters=tuple(targets.parameters),
        all_parameters=targets.all_parameters,
        layers=tuple(targets.layers),
        all_layers=targets.all_layers,
        input=targets.input,
        links=tuple(targets.links),
        activations=tuple(request.activation_layers),
        output_dtype=output_dtype(request.output_dtype),
    )


# ---- output types -----------------------------------------------------------------


def encode_outputs(
    tensors: Sequence[engine.ResultTensor], scaling: bool, *, defer: bool = False, sent: int = 0
) -> tuple[list[engine.ResultTensor], list[int]]:
    """Tensors in their output types through ``precision``, with their scale exponents.

    Tensors whose output type is their compute type (float32) pass as they are, with
    exponent 0. Raises OutOfRange, before anything is sent, when a tensor would lose
    values: a finite value becoming infinite or a non-zero value becoming zero (see
    ``ComputeGradientsRequest.output_dtype`` in the contract). With ``defer`` the tensors
    are checked and their exponents found, but they stay unconverted, for the stream to
    convert chunk by chunk (``precision.convert`` is elementwise). ``sent`` is how many
    tensors of the result were already sent (a stream checking each tensor when it is final).
    """
    out: list[engine.ResultTensor] = []
    exponents: list[int] = []
    refused: list[tuple[engine.ResultTensor, precision.Fit]] = []
    for tensor in tensors:
        if tensor.array.dtype == tensor.output_dtype:
            out.append(tensor)
            exponents.append(0)
            continue
        how = precision.fit(tensor.array, tensor.output_dtype, scaling=scaling)
        if how.overflow or how.underflow:
            refused.append((tensor, how))
        elif not defer:
            data = precision.convert(tensor.array, tensor.output_dtype, how.exponent)
            tensor = engine.ResultTensor(tensor.name, tensor.kind, data)
        out.append(tensor)
        exponents.append(how.exponent)
    if refused:
        raise _out_of_range(refused, scaling, sent)
    return out, exponents


def _out_of_range(
    refused: list[tuple[engine.ResultTensor, precision.Fit]], scaling: bool, sent: int = 0
) -> OutOfRange:
    tensor, how = refused[0]
    bfloat16 = tensor.output_dtype == precision.BFLOAT16
    name = "BFLOAT16" if bfloat16 else "FLOAT16"
    if bfloat16:
        advice = "ask for FLOAT32"
    elif scaling:
        advice = (
            "even scaled by a power of two its values span more than float16 holds (about 2**39 "
            "between the largest and the smallest kept); ask for BFLOAT16 or FLOAT32"
        )
    else:
        advice = "set float16_scaling to have each tensor scaled into range, or ask for BFLOAT16 or FLOAT32"
    others = f" (and {len(refused) - 1} more tensors)" if len(refused) > 1 else ""
    return OutOfRange(
        f"{name} output would lose values: {tensor.name!r}{others} has {how.overflow} finite values "
        f"that would become infinite and {how.underflow} non-zero values that would become zero; "
        f"{f'the stream stopped after {sent} tensors' if sent else 'nothing was sent'}: {advice}",
        field="output_dtype",
        reason=f"{name}_OUT_OF_RANGE",
        metadata={
            "tensor": tensor.name,
            "overflow": str(how.overflow),
            "underflow": str(how.underflow),
            "tensors": str(len(refused)),
        },
    )


def encode_result(
    result: engine.GradientResult, scaling: bool, *, defer: bool = False
) -> tuple[engine.GradientResult, list[int]]:
    """``encode_outputs`` of a gradient result: the result (in its output types unless
    ``defer``) and the exponents."""
    tensors, exponents = encode_outputs(result.tensors, scaling, defer=defer)
    return engine.GradientResult(tensors, result.loss), exponents


# ---- numpy -> protobuf -----------------------------------------------------------


def dtype_enum(dtype: np.dtype) -> int:
    """The DataType enum value of a numpy dtype."""
    return _DTYPE_ENUMS[np.dtype(dtype).newbyteorder("=")]


def _little_endian(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def array_to_tensor(array: np.ndarray, scale_exponent: int = 0) -> pb.Tensor:
    """A numpy array (bfloat16 as ``precision.BFLOAT16`` bits) as a Tensor."""
    return pb.Tensor(
        dtype=dtype_enum(array.dtype),
        shape=array.shape,
        data=_little_endian(array).tobytes(),
        scale_exponent=scale_exponent,
    )


def named_tensor(tensor: engine.ResultTensor, scale_exponent: int = 0) -> pb.NamedTensor:
    """An encoded result tensor (see ``encode_outputs``) as a NamedTensor."""
    return pb.NamedTensor(
        name=tensor.name, kind=KINDS[tensor.kind], tensor=array_to_tensor(tensor.converted(), scale_exponent)
    )


def _exponents(result: engine.GradientResult, exponents: Sequence[int] | None) -> Sequence[int]:
    return [0] * len(result.tensors) if exponents is None else exponents


def gradients_response(
    result: engine.GradientResult, exponents: Sequence[int] | None = None
) -> pb.ComputeGradientsResponse:
    """An encoded gradient result (see ``encode_result``) as one unary response."""
    pairs = list(zip(result.tensors, _exponents(result, exponents), strict=True))
    response = pb.ComputeGradientsResponse(
        gradients=[named_tensor(t, e) for t, e in pairs if t.kind is not engine.Kind.ACTIVATION],
        activations=[named_tensor(t, e) for t, e in pairs if t.kind is engine.Kind.ACTIVATION],
    )
    if result.loss is not None:
        response.loss = result.loss
    return response


def gradients_response_bytes(result: engine.GradientResult, exponents: Sequence[int] | None = None) -> bytes:
    """``gradients_response(result, exponents)``, serialized: the same bytes, built with one ``join``
    of each tensor's encoded fields and a view of its data (one copy of the data; the generated
    class copies it into each message it is set in, then serializes)."""
    parts: list[bytes | memoryview] = []
    pairs = list(zip(result.tensors, _exponents(result, exponents), strict=True))
    for field, activations in ((_GRADIENTS, False), (_ACTIVATIONS, True)):
        for tensor, exponent in pairs:
            if (tensor.kind is engine.Kind.ACTIVATION) == activations:
                parts.extend(_named_tensor_parts(field, tensor, exponent))
    if result.loss is not None:
        parts.append(_RESPONSE_LOSS + struct.pack("<d", result.loss))
    return b"".join(parts)


def _named_tensor_parts(field: bytes, tensor: engine.ResultTensor, exponent: int) -> list[bytes | memoryview]:
    """One NamedTensor of a ComputeGradientsResponse, as the field ``field`` (proto3 defaults omitted)."""
    converted = tensor.converted()
    array = _little_endian(converted)  # at least 1-D: the shape is the converted array's
    data = memoryview(array.reshape(-1).view(np.uint8))
    shape = b"".join(_varint(size) for size in converted.shape)
    dtype = dtype_enum(array.dtype)
    body = b"".join(
        (
            _TENSOR_DTYPE + _varint(dtype) if dtype else b"",
            _TENSOR_SHAPE + _varint(len(shape)) + shape if shape else b"",
            _TENSOR_DATA + _varint(len(data)) if len(data) else b"",
        )
    )
    tail = _TENSOR_SCALE + _varint(_zigzag(exponent)) if exponent else b""
    tensor_length = len(body) + len(data) + len(tail)
    name = tensor.name.encode()
    kind = KINDS[tensor.kind]
    head = b"".join(
        (
            _NAME + _varint(len(name)) + name if name else b"",
            _KIND + _varint(kind) if kind else b"",
            _NAMED_TENSOR + _varint(tensor_length),
        )
    )
    return [field + _varint(len(head) + tensor_length) + head + body, data, tail]


def gradient_chunks(
    result: engine.GradientResult,
    chunk_bytes: int,
    exponents: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> Iterator[pb.StreamGradientsResponse]:
    """A gradient result as stream messages of at most ``chunk_bytes`` data bytes each, each
    tensor's messages carrying its ``positions`` entry if given.

    The reference encoding, through the generated class; the server sends the
    byte-identical ``gradient_frames`` (``tensor_frames``).
    """
    first = True
    for index, (tensor, exponent) in enumerate(
        zip(result.tensors, _exponents(result, exponents), strict=True)
    ):
        header = {
            "name": tensor.name,
            "kind": KINDS[tensor.kind],
            "dtype": dtype_enum(tensor.output_dtype),
            "shape": tensor.array.shape,
            "scale_exponent": exponent,
            "position": 0 if positions is None else positions[index],
        }
        for offset, data in _byte_chunks(tensor, chunk_bytes, exponent):
            message = pb.StreamGradientsResponse(offset=offset, data=bytes(data), **header)
            if first and result.loss is not None:
                message.loss = result.loss
            first = False
            yield message


# Wire format of StreamGradientsResponse (field number << 3 | wire type), in field order.
_NAME = b"\x0a"  # 1, length-delimited
_KIND = b"\x10"  # 2, varint
_DTYPE = b"\x18"  # 3, varint
_SHAPE = b"\x22"  # 4, packed varints
_OFFSET = b"\x28"  # 5, varint
_DATA = b"\x32"  # 6, length-delimited
_LOSS = b"\x39"  # 7, 64-bit
_SCALE = b"\x40"  # 8, varint (sint32: zigzag)
_POSITION = b"\x48"  # 9, varint
# ComputeGradientsResponse: gradients 1 and activations 2 (NamedTensor), loss 3 (double).
_GRADIENTS = b"\x0a"
_ACTIVATIONS = b"\x12"
_RESPONSE_LOSS = b"\x19"
# NamedTensor: name 1 and kind 2 as in StreamGradientsResponse, tensor 3 (Tensor).
_NAMED_TENSOR = b"\x1a"
# Tensor: dtype 1, shape 2 (packed), data 3, scale_exponent 4 (sint32).
_TENSOR_DTYPE = b"\x08"
_TENSOR_SHAPE = b"\x12"
_TENSOR_DATA = b"\x1a"
_TENSOR_SCALE = b"\x20"


def _varint(value: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _frame_header(name: str, kind: int, dtype: int, shape: tuple[int, ...]) -> bytes:
    """Fields 1-4 of a StreamGradientsResponse, encoded once per tensor (proto3: defaults omitted)."""
    parts = []
    encoded = name.encode()
    if encoded:
        parts += [_NAME, _varint(len(encoded)), encoded]
    if kind:
        parts += [_KIND, _varint(kind)]
    if dtype:
        parts += [_DTYPE, _varint(dtype)]
    if shape:
        packed = b"".join(_varint(d) for d in shape)
        parts += [_SHAPE, _varint(len(packed)), packed]
    return b"".join(parts)


def _zigzag(value: int) -> int:
    """A sint32 as the unsigned integer its varint encodes."""
    return (value << 1) ^ (value >> 31)


def gradient_frames(
    result: engine.GradientResult, chunk_bytes: int, exponents: Sequence[int] | None = None
) -> Iterator[bytes]:
    """The messages of ``gradient_chunks``, serialized: the same bytes, with one copy of the data
    (see ``tensor_frames``); the loss goes on the first message."""
    loss = result.loss
    for tensor, exponent in zip(result.tensors, _exponents(result, exponents), strict=True):
        yield from tensor_frames(tensor, chunk_bytes, exponent, loss)
        loss = None


def tensor_frames(
    tensor: engine.ResultTensor,
    chunk_bytes: int,
    exponent: int = 0,
    loss: float | None = None,
    position: int = 0,
) -> Iterator[bytes]:
    """One tensor's StreamGradientsResponse messages, serialized, ``loss`` on the first one and
    ``position`` on each (0 is not written, as proto3 omits it).

    Each message is built with one ``join`` of the tensor's header (encoded once),
    the offset, the data's length and a memoryview slice of the tensor, so the data
    is copied once (no ``bytes()`` slice, no message object). A tensor whose output
    type differs from its compute type is converted chunk by chunk, so its first
    message leaves before the whole tensor is converted.
    """
    header = _frame_header(
        tensor.name, KINDS[tensor.kind], dtype_enum(tensor.output_dtype), tensor.array.shape
    )
    tail = (_SCALE + _varint(_zigzag(exponent)) if exponent else b"") + (
        _POSITION + _varint(position) if position else b""
    )
    for offset, data in _byte_chunks(tensor, chunk_bytes, exponent):
        yield b"".join(
            (
                header,
                _OFFSET + _varint(offset) if offset else b"",
                _DATA + _varint(len(data)) if len(data) else b"",
                data,
                b"" if loss is None else _LOSS + struct.pack("<d", loss),
                tail,
            )
        )
        loss = None


def _byte_chunks(
    tensor: engine.ResultTensor, chunk_bytes: int, exponent: int = 0
) -> Iterator[tuple[int, memoryview]]:
    """(offset, bytes) pieces of at most ``chunk_bytes`` of the tensor in its output type,
    little-endian, converted piece by piece (with scale ``exponent``) if it is not yet;
    one piece, empty, for an empty tensor."""
    dtype = tensor.output_dtype.newbyteorder("<")
    if tensor.array.dtype == dtype:
        flat = memoryview(np.ascontiguousarray(tensor.array).reshape(-1).view(np.uint8))
        for offset in range(0, max(len(flat), 1), chunk_bytes):
            yield offset, flat[offset : offset + chunk_bytes]
        return
    source = tensor.array.reshape(-1)
    total = source.size * dtype.itemsize
    for offset in range(0, max(total, 1), chunk_bytes):
        end = min(offset + chunk_bytes, total)
        first, last = offset // dtype.itemsize, -(-end // dtype.itemsize)
        block = memoryview(_converted(source[first:last], dtype, exponent).view(np.uint8))
        skip = offset - first * dtype.itemsize
        yield offset, block[skip : skip + end - offset]


def _converted(array: np.ndarray, dtype: np.dtype, exponent: int) -> np.ndarray:
    if dtype in (precision.FLOAT16, precision.BFLOAT16) and array.dtype == np.float32:
        return precision.convert(array, dtype, exponent)
    return array.astype(dtype)


def converts(result: engine.GradientResult) -> bool:
    """Whether streaming ``result`` converts some tensor to another element type."""
    return any(tensor.array.dtype != tensor.output_dtype for tensor in result.tensors)


def ahead(frames: Iterator[bytes], depth: int) -> Iterator[bytes]:
    """``frames``, produced by a helper thread up to ``depth`` messages ahead of the consumer.

    gRPC's handler thread waits for each message to be handed to the transport before
    it asks for the next, so building a message (converting its chunk to float16,
    joining it) and sending the previous one would otherwise take turns; numpy's casts
    and copies release the GIL, so here they overlap. The consumer gets every message
    or the producer's exception, in order; closing the consumer early (the caller went
    away) stops the producer at its next message.
    """
    messages: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(item: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                messages.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for frame in frames:
                if not put((True, frame)):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            put((False, error))
            return
        put((False, None))

    producer = threading.Thread(target=produce, name="frames-ahead", daemon=True)
    producer.start()
    try:
        while True:
            ok, item = messages.get()
            if not ok:
                if item is not None:
                    raise item  # type: ignore[misc]
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        producer.join()
        close = getattr(frames, "close", None)
        if close is not None:
            close()


def stream_response_serializer(response: bytes | pb.StreamGradientsResponse) -> bytes:
    """StreamGradients' response serializer: frames pass through, messages are serialized."""
    if isinstance(response, bytes):
        return response
    return response.SerializeToString()


def predict_response(tensors: Sequence[engine.ResultTensor], scaling: bool = False) -> pb.PredictResponse:
    """Predict's outputs, converted to their output type (OutOfRange if that would lose values)."""
    encoded, exponents = encode_outputs(tensors, scaling)
    return pb.PredictResponse(
        activations=[named_tensor(t, e) for t, e in zip(encoded, exponents, strict=True)]
    )
