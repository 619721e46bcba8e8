"""Caffe ``.caffemodel`` -> ``.npz`` conversion for Chainer's ``VGG16Layers``.

The output has exactly the keys and layout that ``chainer.serializers.load_npz``
expects for ``chainer.links.VGG16Layers`` (the same layout Chainer's own
``CaffeFunction`` conversion writes): ``conv1_1/W`` of shape (64, 3, 3, 3),
``conv1_1/b`` of shape (64,), ..., ``fc8/W`` of shape (1000, 4096), ``fc8/b``.

The blob mapping is the one ``CaffeFunction`` uses: a convolution weight blob is
row-major (out, in, kh, kw) and an InnerProduct weight blob is row-major
(out, in), both copied as they are; a bias blob is copied flat.
Both the current ``layer`` and the legacy V1 ``layers`` network formats are read.
Nothing here imports Chainer.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from layergrad_server.weights import WeightsError
from layergrad_server.weights._gen import caffe_pb2

logger = logging.getLogger(__name__)

# (layer name, in channels or features, out channels or features) for VGG16.
_CONV_LAYERS: tuple[tuple[str, int, int], ...] = (
    ("conv1_1", 3, 64),
    ("conv1_2", 64, 64),
    ("conv2_1", 64, 128),
    ("conv2_2", 128, 128),
    ("conv3_1", 128, 256),
    ("conv3_2", 256, 256),
    ("conv3_3", 256, 256),
    ("conv4_1", 256, 512),
    ("conv4_2", 512, 512),
    ("conv4_3", 512, 512),
    ("conv5_1", 512, 512),
    ("conv5_2", 512, 512),
    ("conv5_3", 512, 512),
)
_FC_LAYERS: tuple[tuple[str, int, int], ...] = (
    ("fc6", 512 * 7 * 7, 4096),
    ("fc7", 4096, 4096),
    ("fc8", 4096, 1000),
)


def _build_layout() -> dict[str, tuple[int, ...]]:
    layout: dict[str, tuple[int, ...]] = {}
    for name, n_in, n_out in _CONV_LAYERS:
        layout[f"{name}/W"] = (n_out, n_in, 3, 3)
        layout[f"{name}/b"] = (n_out,)
    for name, n_in, n_out in _FC_LAYERS:
        layout[f"{name}/W"] = (n_out, n_in)
        layout[f"{name}/b"] = (n_out,)
    return layout


#: Every parameter of ``chainer.links.VGG16Layers``: npz key -> array shape.
VGG16_LAYOUT: Mapping[str, tuple[int, ...]] = _build_layout()

#: Caffe layer name -> the layer type it must have, in the current string form.
VGG16_LAYER_TYPES: Mapping[str, str] = {
    **{name: "Convolution" for name, _, _ in _CONV_LAYERS},
    **{name: "InnerProduct" for name, _, _ in _FC_LAYERS},
}

_V1_TYPE_NAMES: Mapping[int, str] = {
    caffe_pb2.V1LayerParameter.CONVOLUTION: "Convolution",
    caffe_pb2.V1LayerParameter.INNER_PRODUCT: "InnerProduct",
}

#: Total number of float parameters in VGG16 (138,357,544).
VGG16_PARAMETER_COUNT: int = sum(math.prod(shape) for shape in VGG16_LAYOUT.values())


def _format_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _declared_shape(blob: caffe_pb2.BlobProto) -> tuple[int, ...] | None:
    """The shape a blob declares: ``shape.dim``, else the legacy 4-D fields, else None."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    legacy = (blob.num, blob.channels, blob.height, blob.width)
    if any(legacy):
        return tuple(int(d) for d in legacy)
    return None


def _strip_leading_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    index = 0
    while index < len(shape) - 1 and shape[index] == 1:
        index += 1
    return shape[index:]


def _shape_matches(declared: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Whether a blob's declared shape is ``expected``, allowing Caffe's legacy padding.

    Legacy blobs are always 4-D: an InnerProduct weight is (1, 1, out, in) and a
    bias is (1, 1, 1, out). Leading ones are therefore ignored.
    """
    return _strip_leading_ones(declared) == _strip_leading_ones(expected)


def _blob_values(blob: caffe_pb2.BlobProto) -> np.ndarray:
    """The blob's values as a flat float32 array (``data``, else ``double_data``)."""
    if len(blob.data):
        return np.asarray(blob.data, dtype=np.float32)
    if len(blob.double_data):
        return np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    return np.empty((0,), dtype=np.float32)


def _layer_type(layer: caffe_pb2.LayerParameter | caffe_pb2.V1LayerParameter) -> str:
    """The layer's type as a string; V1 enum values are named like the current format."""
    if isinstance(layer, caffe_pb2.V1LayerParameter):
        if layer.type in _V1_TYPE_NAMES:
            return _V1_TYPE_NAMES[layer.type]
        try:
            return caffe_pb2.V1LayerParameter.LayerType.Name(layer.type)
        except ValueError:
            return str(layer.type)
    return layer.type


def parse_caffemodel(
    data: bytes | bytearray | memoryview, *, source: str = "caffemodel"
) -> dict[str, np.ndarray]:
    """Parses a serialized Caffe ``NetParameter`` into VGG16 arrays keyed like the npz.

    Every expected blob is checked for presence, type of its layer, shape and
    element count; all problems are collected and raised together as one
    :class:`WeightsError` whose message names each of them. ``source`` names
    the file in messages.
    """
    return _extract(_parse_net(data, source), source)


def _parse_net(data: bytes | bytearray | memoryview, source: str) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except DecodeError as exc:
        raise WeightsError(
            f"{source}: cannot parse as a Caffe model (truncated or not a .caffemodel): {exc}"
        ) from exc
    return net


def _extract(net: caffe_pb2.NetParameter, source: str) -> dict[str, np.ndarray]:
    """The VGG16 arrays of a parsed network; raises WeightsError listing every problem."""
    # Like Chainer's CaffeFunction: the current format wins when it has layers.
    layers = list(net.layer) if len(net.layer) else list(net.layers)
    if not layers:
        raise WeightsError(f"{source}: no layers found (empty, truncated or not a .caffemodel)")
    by_name: dict[str, caffe_pb2.LayerParameter | caffe_pb2.V1LayerParameter] = {}
    for layer in layers:
        by_name.setdefault(layer.name, layer)

    problems: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    for layer_name, wanted_type in VGG16_LAYER_TYPES.items():
        layer = by_name.get(layer_name)
        if layer is None:
            problems.append(f"missing layer {layer_name!r}")
            continue
        got_type = _layer_type(layer)
        if got_type != wanted_type:
            problems.append(f"layer {layer_name!r} has type {got_type}, expected {wanted_type}")
            continue
        for index, suffix in enumerate(("W", "b")):
            key = f"{layer_name}/{suffix}"
            expected = VGG16_LAYOUT[key]
            if index >= len(layer.blobs):
                problems.append(f"missing blob {key} (layer {layer_name!r} has {len(layer.blobs)} blob(s))")
                continue
            blob = layer.blobs[index]
            declared = _declared_shape(blob)
            if declared is not None and not _shape_matches(declared, expected):
                problems.append(
                    f"wrong shape for {key}: expected {_format_shape(expected)}, "
                    f"got {_format_shape(declared)}"
                )
                continue
            values = _blob_values(blob)
            if values.size != math.prod(expected):
                problems.append(
                    f"wrong size for {key}: expected {math.prod(expected)} values "
                    f"{_format_shape(expected)}, got {values.size}"
                )
                continue
            arrays[key] = values.reshape(expected)
    if problems:
        raise WeightsError(f"{source}: not a usable VGG16 model: " + "; ".join(problems))
    return arrays


def read_caffemodel(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads and checks a VGG16 ``.caffemodel`` file; returns its arrays keyed like the npz."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read: {exc}") from exc
    net = _parse_net(data, str(path))
    del data  # the file's bytes are not needed once parsed: lowers peak memory by ~0.5 GB
    return _extract(net, str(path))


def write_npz_atomic(arrays: Mapping[str, np.ndarray], dst: str | os.PathLike[str]) -> Path:
    """Writes ``arrays`` as an uncompressed npz at ``dst`` atomically.

    The data goes to a temporary file in the same directory, is flushed to disk,
    and is then renamed over ``dst``; a reader never sees a partial file, and the
    temporary file is removed on any failure.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # Unlike mkstemp's 0600, this honours the umask, so the npz is as readable as any other file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **{key: np.ascontiguousarray(value) for key, value in arrays.items()})
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(dst.parent)
    return dst


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def convert_caffemodel(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Converts the VGG16 caffemodel ``src`` into a Chainer ``VGG16Layers`` npz at ``dst``.

    Raises :class:`WeightsError` naming every missing layer or blob, wrong shape
    (expected vs got) or parse failure; ``dst`` is then left untouched. Returns
    the path written.
    """
    arrays = read_caffemodel(src)
    written = write_npz_atomic(arrays, dst)
    logger.info("converted %s -> %s", src, written)
    return written


def check_npz(path: str | os.PathLike[str], *, deep: bool = False) -> list[str]:
    """Lists the problems that keep ``path`` from loading into ``VGG16Layers``; empty if none.

    Checks that the file is a readable npz holding every expected key with the
    expected shape and a floating dtype, reading only the array headers. With
    ``deep`` it also reads every array (which verifies the zip checksums) and
    rejects non-finite values.
    """
    path = Path(path)
    problems: list[str] = []
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            for key, expected in VGG16_LAYOUT.items():
                member = f"{key}.npy"
                if member not in members:
                    problems.append(f"missing array {key}")
                    continue
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
                    if tuple(shape) != expected:
                        problems.append(
                            f"wrong shape for {key}: expected {_format_shape(expected)}, "
                            f"got {_format_shape(tuple(shape))}"
                        )
                        continue
                    if dtype.kind != "f":
                        problems.append(f"wrong dtype for {key}: expected float, got {dtype}")
                        continue
                if deep:
                    with archive.open(member) as stream:  # read_array wants the whole member
                        array = np.lib.format.read_array(stream)
                    if not np.isfinite(array).all():
                        problems.append(f"non-finite values in {key}")
    except FileNotFoundError:
        return [f"{path}: no such file"]
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        return [*problems, f"{path}: not a readable npz (truncated or corrupt): {exc}"]
    return problems


def check_caffemodel(path: str | os.PathLike[str]) -> list[str]:
    """Lists the problems that keep ``path`` from converting; empty if none."""
    try:
        arrays = read_caffemodel(path)
    except WeightsError as exc:
        return [str(exc)]
    return [f"non-finite values in {key}" for key, value in arrays.items() if not np.isfinite(value).all()]
