"""Caffe ``.caffemodel`` -> ``.npz`` conversion for Chainer's six pretrained vision links.

The output has exactly the keys and layout that ``chainer.serializers.load_npz``
expects for the model's link (``VGG16Layers``, ``VGG19Layers``, ``GoogLeNet``,
``ResNet50Layers``, ``ResNet101Layers``, ``ResNet152Layers``): the arrays Chainer's
own ``convert_caffemodel_to_npz`` writes, persistents included.

The blob mapping is the one Chainer's ``CaffeFunction`` and its ``_transfer_*``
functions use:

* a Convolution weight blob is row-major (out, in, kh, kw) and an InnerProduct
  weight blob is row-major (out, in), both copied as they are; a bias blob is
  copied flat;
* the VGGs keep Caffe's layer names (``conv1_1`` -> ``conv1_1/W``);
* GoogLeNet renames: ``conv1/7x7_s2`` -> ``conv1``, ``inception_3a/3x3_reduce`` ->
  ``inc3a/proj3``, ``loss1/classifier`` -> ``loss1_fc2``, ``loss3/classifier`` ->
  ``loss3_fc`` and so on (:data:`GOOGLENET_NAMES`);
* ResNet's convolutions have no bias; each is followed by a Caffe ``BatchNorm``
  layer (blobs: mean, variance, scale factor) and a ``Scale`` layer (blobs:
  gamma, beta), which together become one Chainer ``BatchNormalization``:
  ``avg_mean = mean / factor``, ``avg_var = variance / factor`` (float32, as
  ``CaffeFunction`` divides; a zero factor gives zeros, as Caffe computes),
  ``gamma``, ``beta``, and the sample count ``N = 0``. ``res4b22_branch2a`` ->
  ``res4/b22/conv1``, ``bn4b22_branch2a`` and ``scale4b22_branch2a`` ->
  ``res4/b22/bn1``; branch ``1`` is the projection (``conv4``/``bn4``) of each
  stage's first block ``a``. ``conv1`` keeps a bias: ResNet-50's caffemodel has
  one, ResNet-101's and -152's do not (Chainer leaves that bias at zero, and so
  does this converter when the blob is absent).

Both the current ``layer`` and the legacy V1 ``layers`` network formats are read.
Nothing here imports Chainer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import secrets
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from layergrad_server.weights import WeightsError
from layergrad_server.weights._gen import caffe_pb2

logger = logging.getLogger(__name__)


# ---- what each model's npz holds and where its arrays come from ---------------------------------


@dataclasses.dataclass(frozen=True)
class LinearLayer:
    """A Caffe Convolution or InnerProduct layer -> ``PREFIX/W`` and ``PREFIX/b``.

    ``bias`` is the bias shape, or None when the link has none. With
    ``bias_optional`` a layer without a bias blob gives a zero bias.
    """

    caffe_name: str
    caffe_type: str
    prefix: str
    weight: tuple[int, ...]
    bias: tuple[int, ...] | None
    bias_optional: bool = False


@dataclasses.dataclass(frozen=True)
class NormLayer:
    """A Caffe BatchNorm layer and its Scale layer -> one Chainer ``BatchNormalization`` at ``PREFIX``."""

    bn_name: str
    scale_name: str
    prefix: str
    channels: int


Rule = LinearLayer | NormLayer

#: The persistent BatchNormalization keeps besides its statistics: the sample count, an integer.
_BN_COUNT = "N"


@dataclasses.dataclass(frozen=True)
class ModelWeights:
    """One built-in model's npz: its name, its arrays and the Caffe layers they come from."""

    name: str  # lowercase, as the server names the model: "vgg16"
    display: str  # as in messages: "VGG16"
    rules: tuple[Rule, ...]

    @functools.cached_property
    def layout(self) -> dict[str, tuple[int, ...]]:
        """Every array of the npz (parameters and persistents): key -> shape."""
        layout: dict[str, tuple[int, ...]] = {}
        for rule in self.rules:
            if isinstance(rule, LinearLayer):
                layout[f"{rule.prefix}/W"] = rule.weight
                if rule.bias is not None:
                    layout[f"{rule.prefix}/b"] = rule.bias
            else:
                for name in ("avg_mean", "avg_var", "gamma", "beta"):
                    layout[f"{rule.prefix}/{name}"] = (rule.channels,)
                layout[f"{rule.prefix}/{_BN_COUNT}"] = ()
        return layout

    @functools.cached_property
    def integer_keys(self) -> frozenset[str]:
        """The keys holding integers (BatchNormalization's sample counts); every other key is float."""
        return frozenset(f"{r.prefix}/{_BN_COUNT}" for r in self.rules if isinstance(r, NormLayer))

    @functools.cached_property
    def parameter_count(self) -> int:
        """The number of float values in the npz."""
        return sum(math.prod(s) for k, s in self.layout.items() if k not in self.integer_keys)


def _vgg(name: str, counts: Sequence[int]) -> ModelWeights:
    rules: list[Rule] = []
    n_in = 3
    for block, (count, width) in enumerate(zip(counts, (64, 128, 256, 512, 512), strict=True), start=1):
        for i in range(1, count + 1):
            layer = f"conv{block}_{i}"
            rules.append(LinearLayer(layer, "Convolution", layer, (width, n_in, 3, 3), (width,)))
            n_in = width
    for layer, n_in, n_out in (("fc6", 512 * 7 * 7, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 1000)):
        rules.append(LinearLayer(layer, "InnerProduct", layer, (n_out, n_in), (n_out,)))
    return ModelWeights(name.lower(), name, tuple(rules))


# (name, in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj): chainer.links.GoogLeNet's modules.
_INCEPTIONS: tuple[tuple[str, int, int, int, int, int, int, int], ...] = (
    ("3a", 192, 64, 96, 128, 16, 32, 32),
    ("3b", 256, 128, 128, 192, 32, 96, 64),
    ("4a", 480, 192, 96, 208, 16, 48, 64),
    ("4b", 512, 160, 112, 224, 24, 64, 64),
    ("4c", 512, 128, 128, 256, 24, 64, 64),
    ("4d", 512, 112, 144, 288, 32, 64, 64),
    ("4e", 528, 256, 160, 320, 32, 128, 128),
    ("5a", 832, 256, 160, 320, 32, 128, 128),
    ("5b", 832, 384, 192, 384, 48, 128, 128),
)


def _googlenet() -> ModelWeights:
    def conv(caffe: str, prefix: str, n_out: int, n_in: int, k: int) -> LinearLayer:
        return LinearLayer(caffe, "Convolution", prefix, (n_out, n_in, k, k), (n_out,))

    def fc(caffe: str, prefix: str, n_out: int, n_in: int) -> LinearLayer:
        return LinearLayer(caffe, "InnerProduct", prefix, (n_out, n_in), (n_out,))

    rules: list[Rule] = [
        conv("conv1/7x7_s2", "conv1", 64, 3, 7),
        conv("conv2/3x3_reduce", "conv2_reduce", 64, 64, 1),
        conv("conv2/3x3", "conv2", 192, 64, 3),
    ]
    for name, n_in, out1, proj3, out3, proj5, out5, projp in _INCEPTIONS:
        caffe, prefix = f"inception_{name}", f"inc{name}"
        rules += [
            conv(f"{caffe}/1x1", f"{prefix}/conv1", out1, n_in, 1),
            conv(f"{caffe}/3x3_reduce", f"{prefix}/proj3", proj3, n_in, 1),
            conv(f"{caffe}/3x3", f"{prefix}/conv3", out3, proj3, 3),
            conv(f"{caffe}/5x5_reduce", f"{prefix}/proj5", proj5, n_in, 1),
            conv(f"{caffe}/5x5", f"{prefix}/conv5", out5, proj5, 5),
            conv(f"{caffe}/pool_proj", f"{prefix}/projp", projp, n_in, 1),
        ]
    for head, n_in in ((1, 512), (2, 528)):
        rules += [
            conv(f"loss{head}/conv", f"loss{head}_conv", 128, n_in, 1),
            fc(f"loss{head}/fc", f"loss{head}_fc1", 1024, 2048),
            fc(f"loss{head}/classifier", f"loss{head}_fc2", 1000, 1024),
        ]
    rules.append(fc("loss3/classifier", "loss3_fc", 1000, 1024))
    return ModelWeights("googlenet", "GoogLeNet", tuple(rules))


# Per stage: (chainer name, in, mid, out) of chainer.links.model.vision.resnet.BuildingBlock.
_RESNET_STAGES = (
    ("res2", 64, 64, 256),
    ("res3", 256, 128, 512),
    ("res4", 512, 256, 1024),
    ("res5", 1024, 512, 2048),
)
# Caffe's branch suffix -> (chainer conv, chainer bn) within a bottleneck.
_BRANCHES = (("2a", "conv1", "bn1"), ("2b", "conv2", "bn2"), ("2c", "conv3", "bn3"), ("1", "conv4", "bn4"))


def _resnet_block_names(depth: int) -> tuple[tuple[str, ...], ...]:
    """Caffe's block names per stage, as ``_transfer_resnet{50,101,152}`` read them."""

    def lettered(stage: int, count: int) -> tuple[str, ...]:
        return tuple(f"{stage}{chr(ord('a') + i)}" for i in range(count))

    def numbered(stage: int, count: int) -> tuple[str, ...]:
        return (f"{stage}a", *(f"{stage}b{i}" for i in range(1, count)))

    if depth == 50:
        return lettered(2, 3), lettered(3, 4), lettered(4, 6), lettered(5, 3)
    if depth == 101:
        return lettered(2, 3), numbered(3, 4), numbered(4, 23), lettered(5, 3)
    return lettered(2, 3), numbered(3, 8), numbered(4, 36), lettered(5, 3)


def _resnet(depth: int) -> ModelWeights:
    rules: list[Rule] = [
        # ResNet-50's conv1 has a bias blob; ResNet-101's and -152's do not (their Chainer bias stays 0).
        LinearLayer("conv1", "Convolution", "conv1", (64, 3, 7, 7), (64,), bias_optional=depth != 50),
        NormLayer("bn_conv1", "scale_conv1", "bn1", 64),
    ]
    for (stage, n_in, mid, out), blocks in zip(_RESNET_STAGES, _resnet_block_names(depth), strict=True):
        for index, block in enumerate(blocks):
            link = f"{stage}/a" if index == 0 else f"{stage}/b{index}"
            block_in = n_in if index == 0 else out
            shapes = {
                "conv1": (mid, block_in, 1, 1),
                "conv2": (mid, mid, 3, 3),
                "conv3": (out, mid, 1, 1),
                "conv4": (out, n_in, 1, 1),
            }
            for branch, conv, bn in _BRANCHES if index == 0 else _BRANCHES[:3]:
                rules.append(
                    LinearLayer(
                        f"res{block}_branch{branch}", "Convolution", f"{link}/{conv}", shapes[conv], None
                    )
                )
                channels = shapes[conv][0]
                rules.append(
                    NormLayer(
                        f"bn{block}_branch{branch}", f"scale{block}_branch{branch}", f"{link}/{bn}", channels
                    )
                )
    rules.append(LinearLayer("fc1000", "InnerProduct", "fc6", (1000, 2048), (1000,)))
    return ModelWeights(f"resnet{depth}", f"ResNet{depth}", tuple(rules))


#: The built-in models whose weights this package converts and checks, by lowercase name.
MODELS: Mapping[str, ModelWeights] = {
    spec.name: spec
    for spec in (
        _vgg("VGG16", (2, 2, 3, 3, 3)),
        _vgg("VGG19", (2, 2, 4, 4, 4)),
        _googlenet(),
        _resnet(50),
        _resnet(101),
        _resnet(152),
    )
}
DEFAULT_MODEL = "vgg16"

#: GoogLeNet's Caffe layer name -> the npz prefix of its link.
GOOGLENET_NAMES: Mapping[str, str] = {
    rule.caffe_name: rule.prefix for rule in MODELS["googlenet"].rules if isinstance(rule, LinearLayer)
}


def model_weights(model: str) -> ModelWeights:
    """The built-in model called ``model`` (any case); raises WeightsError naming the known ones."""
    spec = MODELS.get(model.strip().lower()) if isinstance(model, str) else None
    if spec is None:
        raise WeightsError(f"no built-in weights for model {model!r}: expected one of {', '.join(MODELS)}")
    return spec


#: Every parameter of ``chainer.links.VGG16Layers``: npz key -> array shape.
VGG16_LAYOUT: Mapping[str, tuple[int, ...]] = MODELS["vgg16"].layout

#: Caffe layer name -> the layer type it must have, in the current string form.
VGG16_LAYER_TYPES: Mapping[str, str] = {
    rule.caffe_name: rule.caffe_type for rule in MODELS["vgg16"].rules if isinstance(rule, LinearLayer)
}

#: Total number of float parameters in VGG16 (138,357,544).
VGG16_PARAMETER_COUNT: int = MODELS["vgg16"].parameter_count

#: Arrays named with this prefix are the project's own markers, not weights (``layergrad_random_seed``:
#: the seed of a file of random weights); Chainer's loaders ignore them, and so does :func:`check_npz`.
MARKER_PREFIX = "layergrad_"

_V1_TYPE_NAMES: Mapping[int, str] = {
    caffe_pb2.V1LayerParameter.CONVOLUTION: "Convolution",
    caffe_pb2.V1LayerParameter.INNER_PRODUCT: "InnerProduct",
}


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
    data: bytes | bytearray | memoryview, *, source: str = "caffemodel", model: str = DEFAULT_MODEL
) -> dict[str, np.ndarray]:
    """Parses a serialized Caffe ``NetParameter`` into ``model``'s arrays keyed like the npz.

    Every expected blob is checked for presence, type of its layer, shape and
    element count; all problems are collected and raised together as one
    :class:`WeightsError` whose message names each of them. ``source`` names
    the file in messages.
    """
    return _extract(_parse_net(data, source), source, model_weights(model))


def _parse_net(data: bytes | bytearray | memoryview, source: str) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except DecodeError as exc:
        raise WeightsError(
            f"{source}: cannot parse as a Caffe model (truncated or not a .caffemodel): {exc}"
        ) from exc
    return net


Layer = caffe_pb2.LayerParameter | caffe_pb2.V1LayerParameter


class _Extraction:
    """Collects one model's arrays from a parsed network, and every problem on the way."""

    def __init__(self, net: caffe_pb2.NetParameter, source: str) -> None:
        # Like Chainer's CaffeFunction: the current format wins when it has layers.
        layers = list(net.layer) if len(net.layer) else list(net.layers)
        if not layers:
            raise WeightsError(f"{source}: no layers found (empty, truncated or not a .caffemodel)")
        self.by_name: dict[str, Layer] = {}
        for layer in layers:
            self.by_name.setdefault(layer.name, layer)
        self.problems: list[str] = []
        self.arrays: dict[str, np.ndarray] = {}

    def layer(self, name: str, wanted_type: str) -> Layer | None:
        """The layer called ``name`` if it exists and has ``wanted_type``; else None, noting why."""
        layer = self.by_name.get(name)
        if layer is None:
            self.problems.append(f"missing layer {name!r}")
            return None
        got_type = _layer_type(layer)
        if got_type != wanted_type:
            self.problems.append(f"layer {name!r} has type {got_type}, expected {wanted_type}")
            return None
        return layer

    def blob(self, layer: Layer, index: int, key: str, expected: tuple[int, ...]) -> np.ndarray | None:
        """Blob ``index`` of ``layer`` as an array of shape ``expected``; None (noting why) if it is not."""
        # VGG's npz keys are Caffe's layer names; elsewhere a message names both.
        label = key if key.rpartition("/")[0] == layer.name else f"{key} (layer {layer.name!r} blob {index})"
        if index >= len(layer.blobs):
            self.problems.append(f"missing blob {key} (layer {layer.name!r} has {len(layer.blobs)} blob(s))")
            return None
        blob = layer.blobs[index]
        declared = _declared_shape(blob)
        if declared is not None and not _shape_matches(declared, expected):
            self.problems.append(
                f"wrong shape for {label}: expected {_format_shape(expected)}, got {_format_shape(declared)}"
            )
            return None
        values = _blob_values(blob)
        if values.size != math.prod(expected):
            self.problems.append(
                f"wrong size for {label}: expected {math.prod(expected)} values "
                f"{_format_shape(expected)}, got {values.size}"
            )
            return None
        return values.reshape(expected)

    def linear(self, rule: LinearLayer) -> None:
        layer = self.layer(rule.caffe_name, rule.caffe_type)
        if layer is None:
            return
        weight = self.blob(layer, 0, f"{rule.prefix}/W", rule.weight)
        if weight is not None:
            self.arrays[f"{rule.prefix}/W"] = weight
        if rule.bias is None:
            return
        key = f"{rule.prefix}/b"
        if rule.bias_optional and len(layer.blobs) < 2:
            self.arrays[key] = np.zeros(rule.bias, dtype=np.float32)
            return
        bias = self.blob(layer, 1, key, rule.bias)
        if bias is not None:
            self.arrays[key] = bias

    def norm(self, rule: NormLayer) -> None:
        shape = (rule.channels,)
        bn = self.layer(rule.bn_name, "BatchNorm")
        if bn is not None:
            mean = self.blob(bn, 0, f"{rule.prefix}/avg_mean", shape)
            var = self.blob(bn, 1, f"{rule.prefix}/avg_var", shape)
            factor = np.float32(1.0)
            if len(bn.blobs) >= 3:
                values = _blob_values(bn.blobs[2])
                if values.size < 1:
                    self.problems.append(f"empty scale factor (layer {bn.name!r} blob 2) for {rule.prefix}")
                    mean = None
                else:
                    factor = values[0]
            if mean is not None and var is not None:
                self.arrays[f"{rule.prefix}/avg_mean"] = _unscaled(mean, factor)
                self.arrays[f"{rule.prefix}/avg_var"] = _unscaled(var, factor)
                self.arrays[f"{rule.prefix}/{_BN_COUNT}"] = np.asarray(0, dtype=np.int64)
        scale = self.layer(rule.scale_name, "Scale")
        if scale is not None:
            for index, name in enumerate(("gamma", "beta")):
                array = self.blob(scale, index, f"{rule.prefix}/{name}", shape)
                if array is not None:
                    self.arrays[f"{rule.prefix}/{name}"] = array


def _unscaled(values: np.ndarray, factor: np.float32) -> np.ndarray:
    """Caffe's stored statistic divided by its scale factor, in float32 as CaffeFunction computes it.

    Caffe reads a zero factor as "no samples yet" and uses zero statistics.
    """
    if factor == 0:
        return np.zeros_like(values)
    return np.divide(values, factor, dtype=np.float32)


def _extract(net: caffe_pb2.NetParameter, source: str, spec: ModelWeights) -> dict[str, np.ndarray]:
    """``spec``'s arrays of a parsed network; raises WeightsError listing every problem."""
    extraction = _Extraction(net, source)
    for rule in spec.rules:
        if isinstance(rule, LinearLayer):
            extraction.linear(rule)
        else:
            extraction.norm(rule)
    if extraction.problems:
        raise WeightsError(f"{source}: not a usable {spec.display} model: " + "; ".join(extraction.problems))
    return extraction.arrays


def read_caffemodel(path: str | os.PathLike[str], model: str = DEFAULT_MODEL) -> dict[str, np.ndarray]:
    """Reads and checks ``model``'s ``.caffemodel`` file; returns its arrays keyed like the npz."""
    spec = model_weights(model)
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read: {exc}") from exc
    net = _parse_net(data, str(path))
    del data  # the file's bytes are not needed once parsed: lowers peak memory by ~0.5 GB
    return _extract(net, str(path), spec)


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
            # asarray, not ascontiguousarray: that one turns 0-d arrays (BatchNormalization.N) into 1-d.
            np.savez(handle, **{key: np.asarray(value, order="C") for key, value in arrays.items()})
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


def convert_caffemodel(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], model: str = DEFAULT_MODEL
) -> Path:
    """Converts ``model``'s caffemodel ``src`` into the npz of its Chainer link at ``dst``.

    Raises :class:`WeightsError` naming every missing layer or blob, wrong shape
    (expected vs got) or parse failure; ``dst`` is then left untouched. Returns
    the path written.
    """
    arrays = read_caffemodel(src, model)
    written = write_npz_atomic(arrays, dst)
    logger.info("converted %s -> %s", src, written)
    return written


def check_npz(path: str | os.PathLike[str], *, deep: bool = False, model: str = DEFAULT_MODEL) -> list[str]:
    """Lists the problems that keep ``path`` from loading into ``model``'s link; empty if none.

    Checks that the file is a readable npz holding every expected key with the
    expected shape and a floating dtype (an integer one for BatchNormalization's
    sample counts), reading only the array headers, and no other array (another
    model's file can hold all of this one's: VGG19's holds every VGG16 key) but
    the project's own markers (:data:`MARKER_PREFIX`). With
    ``deep`` it also reads every array (which verifies the zip checksums) and
    rejects non-finite values.
    """
    spec = model_weights(model)
    path = Path(path)
    problems: list[str] = []
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            for key, expected in spec.layout.items():
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
                    wanted_kind, wanted = ("iu", "integer") if key in spec.integer_keys else ("f", "float")
                    if dtype.kind not in wanted_kind:
                        problems.append(f"wrong dtype for {key}: expected {wanted}, got {dtype}")
                        continue
                if deep:
                    with archive.open(member) as stream:  # read_array wants the whole member
                        array = np.lib.format.read_array(stream)
                    if not np.isfinite(array).all():
                        problems.append(f"non-finite values in {key}")
            extra = sorted(
                name.removesuffix(".npy")
                for name in members - {f"{k}.npy" for k in spec.layout}
                if not name.startswith(MARKER_PREFIX)
            )
            if extra:
                problems.append(
                    f"{len(extra)} array(s) that {spec.display} does not have ({', '.join(extra[:3])}"
                    + (", ..." if len(extra) > 3 else "")
                    + "): another model's weights?"
                )
    except FileNotFoundError:
        return [f"{path}: no such file"]
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        return [*problems, f"{path}: not a readable npz (truncated or corrupt): {exc}"]
    return problems


def check_caffemodel(path: str | os.PathLike[str], model: str = DEFAULT_MODEL) -> list[str]:
    """Lists the problems that keep ``path`` from converting into ``model``'s npz; empty if none."""
    try:
        arrays = read_caffemodel(path, model)
    except WeightsError as exc:
        return [str(exc)]
    return [f"non-finite values in {key}" for key, value in arrays.items() if not np.isfinite(value).all()]
