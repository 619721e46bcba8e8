"""Conversion between numpy arrays and ``layergrad.v1.Tensor``, and stream reassembly.

A wire tensor holds its elements flattened in row-major order, little-endian,
with no padding. :func:`to_tensor` writes that layout with a validated
``tobytes()``; :func:`from_tensor` reads it back with ``np.frombuffer``.
:class:`_ChunkAssembler` rebuilds the tensors of a StreamGradients response
by copying each chunk straight into a preallocated array: the caller's own
(``out=``), one prepared while the server computed (see :func:`touch_pages`),
or a fresh one.

FLOAT16 and BFLOAT16 results are handed to the caller as float32 arrays holding
exactly the values received: bfloat16 bit patterns widened (numpy has no
bfloat16), float16 elements times ``2**-scale_exponent`` (the server's
power-of-two scale undone); see :func:`decode_into`.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad.errors import DataLoss

_WIRE_DTYPES: dict[int, np.dtype[Any]] = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_UINT8: np.dtype("u1"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_BFLOAT16: np.dtype("<u2"),  # the bit patterns; see decode_into
}
_ENUM_BY_KIND: dict[tuple[str, int], int] = {
    (dt.kind, dt.itemsize): enum for enum, dt in _WIRE_DTYPES.items() if enum != pb.DATA_TYPE_BFLOAT16
}
#: Output types received in fewer bytes and handed over as float32 (see decode_into).
REDUCED = frozenset({pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16})


def numpy_dtype(wire_dtype: int) -> np.dtype[Any]:
    """The little-endian numpy dtype of a ``DataType`` value; ValueError if unsupported."""
    try:
        return _WIRE_DTYPES[wire_dtype]
    except KeyError:
        raise ValueError(f"unsupported tensor dtype {_enum_name(wire_dtype)}") from None


def wire_dtype(dtype: npt.DTypeLike) -> int:
    """The ``DataType`` value of a numpy dtype (any byte order); ValueError if unsupported."""
    dt = np.dtype(dtype)
    try:
        return _ENUM_BY_KIND[(dt.kind, dt.itemsize)]
    except KeyError:
        supported = ", ".join(_WIRE_DTYPES[enum].name for enum in _ENUM_BY_KIND.values())
        raise ValueError(f"unsupported dtype {dt.name}; supported: {supported}") from None


def dtype_name(wire_dtype_value: int) -> str:
    """The numpy name ("float32", ...) of a ``DataType`` value, or its enum name if unsupported."""
    if wire_dtype_value == pb.DATA_TYPE_BFLOAT16:
        return "bfloat16"
    dt = _WIRE_DTYPES.get(wire_dtype_value)
    return dt.name if dt is not None else _enum_name(wire_dtype_value).removeprefix("DATA_TYPE_").lower()


def to_tensor(array: npt.ArrayLike) -> pb.Tensor:
    """A wire tensor holding ``array``'s elements in row-major little-endian order."""
    return fill_tensor(pb.Tensor(), array)


def fill_tensor(message: pb.Tensor, array: npt.ArrayLike) -> pb.Tensor:
    """Sets an empty ``message`` (typically a field of the request being built, so that the
    data is copied into the message once, not again into each message holding it) to ``array``."""
    arr = np.asarray(array)
    enum = wire_dtype(arr.dtype)
    little = np.ascontiguousarray(arr, dtype=_WIRE_DTYPES[enum])
    data = little.tobytes(order="C")
    if len(data) != little.size * little.itemsize:
        raise ValueError(f"array of shape {arr.shape} serialized to {len(data)} bytes")
    message.dtype = enum
    message.shape.extend(arr.shape)
    message.data = data
    return message


def from_tensor(tensor: pb.Tensor, *, copy: bool = True) -> np.ndarray:
    """The numpy array a wire tensor holds; raises DataLoss if its size disagrees with its shape.

    With ``copy=False`` the array is a read-only view of the message's bytes.
    """
    dt = _checked_dtype(tensor.dtype, "tensor")
    shape = _checked_shape(tensor.shape, "tensor")
    expected = _nbytes(shape, dt)
    if len(tensor.data) != expected:
        raise DataLoss(
            f"tensor of shape {list(shape)} {dt.name} needs {expected} bytes, got {len(tensor.data)}"
        )
    arr = np.frombuffer(tensor.data, dtype=dt).reshape(shape)
    return arr.copy() if copy else arr


def result_dtype(wire_dtype_value: int) -> np.dtype[Any]:
    """The dtype of the array a result tensor of this wire type is handed over in."""
    if wire_dtype_value in REDUCED:
        return np.dtype(np.float32)
    return numpy_dtype(wire_dtype_value)


def decode_into(wire: np.ndarray, wire_dtype_value: int, scale_exponent: int, out: np.ndarray) -> None:
    """The float32 values of received FLOAT16 or BFLOAT16 elements ``wire``, written into ``out``.

    bfloat16 bits become the upper half of float32 patterns; float16 elements are
    widened and multiplied by ``2**-scale_exponent``. Both are exact.
    """
    if wire_dtype_value == pb.DATA_TYPE_BFLOAT16:
        bits = out.view(np.uint32)
        np.copyto(bits, wire, casting="safe")
        np.left_shift(bits, np.uint32(16), out=bits)
        return
    np.copyto(out, wire, casting="safe")
    if scale_exponent:
        np.ldexp(out, np.int32(-scale_exponent), out=out)


def decoded(wire: np.ndarray, wire_dtype_value: int, scale_exponent: int) -> np.ndarray:
    """A received tensor's values: float32 for FLOAT16 and BFLOAT16 (see :func:`decode_into`);
    other types as they are (a nonzero scale on them is DataLoss)."""
    if wire_dtype_value not in REDUCED:
        if scale_exponent:
            raise DataLoss(
                f"a {dtype_name(wire_dtype_value)} tensor came with scale_exponent {scale_exponent}"
            )
        return wire
    out = np.empty(wire.shape, np.float32)
    decode_into(wire, wire_dtype_value, scale_exponent, out)
    return out


def result_from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """A received result tensor's values as an array the caller owns (see :func:`decoded`)."""
    if tensor.dtype in REDUCED:
        return decoded(from_tensor(tensor, copy=False), tensor.dtype, tensor.scale_exponent)
    return decoded(from_tensor(tensor), tensor.dtype, tensor.scale_exponent)


def _checked_dtype(wire_dtype_value: int, name: str) -> np.dtype[Any]:
    try:
        return numpy_dtype(wire_dtype_value)
    except ValueError as exc:
        raise DataLoss(f"{name}: {exc}") from None


def _checked_shape(dims: Iterable[int], name: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise DataLoss(f"{name}: negative dimension in shape {list(shape)}")
    return shape


def _nbytes(shape: tuple[int, ...], dt: np.dtype[Any]) -> int:
    return math.prod(shape) * dt.itemsize


def _enum_name(value: int) -> str:
    try:
        return pb.DataType.Name(value)
    except ValueError:
        return f"DataType({value})"


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One StreamGradientsResponse, with ``data`` a view of the received bytes (not a copy)."""

    name: str
    kind: int
    dtype: int
    shape: tuple[int, ...]
    offset: int
    data: memoryview | bytes
    loss: float | None
    scale_exponent: int = 0
    position: int = 0

    @classmethod
    def from_message(cls, message: pb.StreamGradientsResponse) -> StreamChunk:
        return cls(
            message.name,
            message.kind,
            message.dtype,
            tuple(message.shape),
            message.offset,
            message.data,
            message.loss if message.HasField("loss") else None,
            message.scale_exponent,
            message.position,
        )


class _Unusual(Exception):
    """Raised by the fast parser on anything it leaves to the generated class."""


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Unusual


def parse_stream_chunk(raw: bytes) -> StreamChunk:
    """StreamGradients' response deserializer: a StreamGradientsResponse without copying its data.

    Reads the wire format directly and returns ``data`` as a memoryview of ``raw``;
    any message it does not expect (unknown fields, an unpacked shape, negative or
    oversized values, truncation) is parsed by the generated class instead.
    """
    try:
        return _parse_fast(raw)
    except (_Unusual, IndexError, UnicodeDecodeError):
        return StreamChunk.from_message(pb.StreamGradientsResponse.FromString(raw))


def _parse_fast(raw: bytes) -> StreamChunk:
    view = memoryview(raw)
    size = len(raw)
    name, kind, dtype, shape, offset, data, loss, scale, position = "", 0, 0, (), 0, b"", None, 0, 0
    pos = 0
    while pos < size:
        tag = raw[pos]
        pos += 1
        if tag in (0x0A, 0x22, 0x32):  # name, packed shape, data: length-delimited
            length, pos = _read_varint(raw, pos)
            end = pos + length
            if end > size:
                raise _Unusual
            if tag == 0x32:
                data = view[pos:end]
            elif tag == 0x0A:
                name = raw[pos:end].decode()
            else:
                dims = []
                while pos < end:
                    dim, pos = _read_varint(raw, pos)
                    if dim >= 1 << 63:
                        raise _Unusual  # a negative dimension
                    dims.append(dim)
                if pos != end:
                    raise _Unusual
                shape = (*shape, *dims)
            pos = end
        elif tag in (0x10, 0x18, 0x28, 0x48):  # kind, dtype, offset, position: varints
            value, pos = _read_varint(raw, pos)
            if (value >= 1 << 31 and tag != 0x28) or value >= 1 << 63:
                raise _Unusual  # negative as int32/int64: let protobuf decide
            if tag == 0x10:
                kind = value
            elif tag == 0x18:
                dtype = value
            elif tag == 0x48:
                position = value
            else:
                offset = value
        elif tag == 0x40:  # scale_exponent: sint32, zigzag
            value, pos = _read_varint(raw, pos)
            if value >= 1 << 32:
                raise _Unusual
            scale = (value >> 1) ^ -(value & 1)
        elif tag == 0x39:  # loss: double
            if pos + 8 > size:
                raise _Unusual
            (loss,) = struct.unpack_from("<d", raw, pos)
            pos += 8
        else:
            raise _Unusual
    return StreamChunk(name, kind, dtype, shape, offset, data, loss, scale, position)


@dataclass
class _Pending:
    """A tensor being filled from stream chunks.

    ``flat`` is the uint8 view of the received elements: of ``array`` itself, or, for
    FLOAT16 and BFLOAT16, of a buffer decoded into the float32 ``array`` once complete.
    """

    name: str
    kind: int
    dtype: int
    scale_exponent: int
    array: np.ndarray
    flat: np.ndarray
    position: int = 0
    received: int = 0
    chunks: int = 0

    @property
    def complete(self) -> bool:
        return self.received == self.flat.size


@dataclass
class AssembledTensor:
    """One tensor rebuilt from a stream."""

    name: str
    kind: int
    array: np.ndarray
    #: Its index in the result's documented order when the stream sent another order, else 0.
    position: int = 0


TensorKey = tuple[int, str]
"""A streamed tensor's identity: its ``TensorKind`` value and its name."""


def touch_pages(array: np.ndarray) -> None:
    """Writes one byte in every memory page of ``array`` so that the OS maps them now.

    A fresh multi-megabyte array is only address space until first written. Mapping
    its pages (each zeroed by the kernel) costs about as much as copying into them, and
    several times more in a virtual machine whose host has taken freed memory back.
    Done while the server computes, the stream's copies then write into memory that
    is already there.
    """
    flat = array.reshape(-1).view(np.uint8)
    flat[:: mmap.PAGESIZE] = 0


def check_out_array(array: np.ndarray, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    """Raises ValueError unless ``array`` can receive the tensor ``name`` in place."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"out[{name!r}] must be a numpy array, not {type(array).__name__}")
    if array.shape != shape or array.dtype != dtype:
        raise ValueError(
            f"out[{name!r}] is {array.dtype.name} {list(array.shape)} but the result is "
            f"{dtype.name} {list(shape)}"
        )
    if not (array.flags.c_contiguous and array.flags.writeable):
        raise ValueError(f"out[{name!r}] must be a writable C-contiguous array")


class _ChunkAssembler:
    """Rebuilds StreamGradients tensors from their chunks without joining byte strings.

    Feed every ``StreamGradientsResponse`` to :meth:`add`, then call :meth:`finish`.
    A tensor's first chunk picks its array: ``out[(kind, name)]`` when given (it must
    match the tensor's shape and dtype and be writable and C-contiguous, else
    ValueError), else ``prepared[(kind, name)]`` when it matches, else a fresh
    ``np.empty(shape, dtype)``; each chunk is then copied into that array's bytes at
    its offset. Chunks out of order, gaps, overlaps, overruns, a tensor cut short, a
    repeated tensor or a shape/dtype that changes mid-tensor raise
    :class:`~layergrad.errors.DataLoss`.
    """

    def __init__(
        self,
        out: Mapping[TensorKey, np.ndarray] | None = None,
        prepared: Mapping[TensorKey, np.ndarray] | None = None,
    ) -> None:
        self.tensors: list[AssembledTensor] = []
        self.loss: float | None = None
        self._out = out or {}
        self._prepared = prepared or {}
        self._current: _Pending | None = None
        self._seen: set[TensorKey] = set()
        self._messages = 0

    def add(self, chunk: StreamChunk | pb.StreamGradientsResponse) -> None:
        """Copies one stream message's bytes into its tensor."""
        if not isinstance(chunk, StreamChunk):
            chunk = StreamChunk.from_message(chunk)
        if self._messages == 0 and chunk.loss is not None:
            self.loss = chunk.loss
        self._messages += 1
        current = self._current
        if current is None or current.kind != chunk.kind or current.name != chunk.name:
            self._close_current()
            current = self._current = self._open(chunk)
        self._write(current, chunk)

    def finish(self) -> list[AssembledTensor]:
        """The completed tensors, in the result's documented order (their ``position``: a stream
        with parameter gradients sent as they were ready arrives in another); raises DataLoss if
        the last is incomplete."""
        self._close_current()
        if not self.tensors:
            raise DataLoss("gradient stream ended without any tensor")
        self.tensors.sort(key=lambda tensor: tensor.position)  # stable: all 0 keeps stream order
        return self.tensors

    def _open(self, chunk: StreamChunk) -> _Pending:
        key = (chunk.kind, chunk.name)
        if key in self._seen:
            raise DataLoss(f"tensor {chunk.name!r} was sent twice in the stream")
        self._seen.add(key)
        wire = _checked_dtype(chunk.dtype, f"tensor {chunk.name!r}")
        dt = result_dtype(chunk.dtype)
        shape = _checked_shape(chunk.shape, f"tensor {chunk.name!r}")
        if chunk.dtype not in REDUCED and chunk.scale_exponent:
            raise DataLoss(f"tensor {chunk.name!r}: {wire.name} with scale_exponent {chunk.scale_exponent}")
        array = self._out.get(key)
        if array is not None:
            check_out_array(array, chunk.name, shape, dt)
        else:
            array = self._prepared.get(key)
            if array is None or array.shape != shape or array.dtype != dt:
                array = np.empty(shape, dtype=dt)
        received = array if wire == dt else np.empty(shape, dtype=wire)
        return _Pending(
            chunk.name,
            chunk.kind,
            chunk.dtype,
            chunk.scale_exponent,
            array,
            received.reshape(-1).view(np.uint8),
            chunk.position,
        )

    def _write(self, pending: _Pending, chunk: StreamChunk) -> None:
        _check_same_layout(pending, chunk)
        size = len(chunk.data)
        _check_offset(pending, chunk.offset, size)
        end = chunk.offset + size
        pending.flat[chunk.offset : end] = np.frombuffer(chunk.data, dtype=np.uint8)
        pending.received = end
        pending.chunks += 1

    def _close_current(self) -> None:
        pending, self._current = self._current, None
        if pending is None:
            return
        if not pending.complete:
            raise DataLoss(
                f"tensor {pending.name!r} is incomplete: got {pending.received} of {pending.flat.size} bytes"
            )
        if pending.dtype in REDUCED:
            wire = pending.flat.view(_WIRE_DTYPES[pending.dtype]).reshape(pending.array.shape)
            decode_into(wire, pending.dtype, pending.scale_exponent, pending.array)
        self.tensors.append(AssembledTensor(pending.name, pending.kind, pending.array, pending.position))


def _check_same_layout(pending: _Pending, chunk: StreamChunk) -> None:
    if (
        chunk.shape != pending.array.shape
        or chunk.dtype != pending.dtype
        or chunk.scale_exponent != pending.scale_exponent
        or chunk.position != pending.position
    ):
        raise DataLoss(f"tensor {pending.name!r} changed shape, dtype, scale or position between chunks")


def _check_offset(pending: _Pending, offset: int, size: int) -> None:
    name, received, total = pending.name, pending.received, pending.flat.size
    if pending.chunks > 0 and received == total:
        raise DataLoss(f"tensor {name!r}: chunk at offset {offset} after the tensor was complete")
    if offset > received:
        raise DataLoss(f"tensor {name!r}: gap, chunk at offset {offset} but {received} bytes received")
    if offset < received:
        raise DataLoss(f"tensor {name!r}: overlap, chunk at offset {offset} but {received} bytes received")
    if offset + size > total:
        raise DataLoss(f"tensor {name!r}: chunk [{offset}, {offset + size}) overruns its {total} bytes")
