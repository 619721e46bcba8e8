"""A user's own ``chainer.Chain`` as a served model.

A :class:`ChainConfig` (read from the server's own configuration on disk, never from
a request) names a Python import path ``module:attribute`` whose attribute is a
``chainer.Chain`` subclass or a callable returning one, an npz of its weights, the
input spec, the preprocessing and the layers it exposes:

* ``layers_from="forward"``: the chain's ``forward(x, layers=[...])`` returns a dict
  of named outputs, as ``VGG16Layers.forward`` does; ``layers`` lists the names in
  forward order;
* ``layers_from="links"``: ``layers`` are link paths (``block3/conv``), each layer
  being that link's output during ``chain(x)``, captured with a ``chainer.LinkHook``.

Preprocessing is ``"caffe"`` (resize with Pillow's default filter, RGB to BGR when
the input spec says BGR, subtract the spec's mean, HWC to CHW: what Chainer's vision
models do) or an import path of a callable ``(image, size) -> float32 array``.
Labels come from a text file with one class name per line.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Sequence

import chainer
import numpy as np

from layergrad_server.models.base import InputSpec, ModelAdapter, WeightsFile, capture_links, loaded


def import_object(path: str) -> object:
    """The object at ``module.sub:attribute`` (``attribute`` may be dotted)."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"import path {path!r} must look like 'package.module:name'")
    target: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def caffe_prepare(image: object, spec: InputSpec, size: tuple[int, int] | None = None) -> np.ndarray:
    """Chainer's vision ``prepare`` for any mean and channel order: resize, RGB->BGR, mean, CHW."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    height, width = size or spec.size
    image = image.resize((width, height))
    array = np.asarray(image, dtype=np.float32)
    if spec.channel_order == "BGR":
        array = array[:, :, ::-1]
    if spec.mean:
        array = array - np.asarray(spec.mean, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    """A user model: where its code, weights, input spec, layers and labels are."""

    name: str
    factory: str
    input_spec: InputSpec
    layers: tuple[str, ...]
    layers_from: str = "forward"  # or "links"
    preprocess: str = "caffe"
    logits_layer: str | None = None
    probability_layer: str | None = None
    labels_file: str | os.PathLike[str] | None = None
    version: str = "1"
    factory_kwargs: dict[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layers_from not in ("forward", "links"):
            raise ValueError(f"layers_from must be 'forward' or 'links', not {self.layers_from!r}")
        if not self.layers:
            raise ValueError("a user model must expose at least one layer")
        for layer in (self.logits_layer, self.probability_layer):
            if layer is not None and layer not in self.layers:
                raise ValueError(f"layer {layer!r} is not among the exposed layers {list(self.layers)}")


class ChainAdapter(ModelAdapter):
    """Adapts a user's ``chainer.Chain`` described by a :class:`ChainConfig`."""

    def __init__(self, config: ChainConfig) -> None:
        self.config = config
        self.name = config.name
        self.version = config.version
        self.input_spec = config.input_spec
        self.layer_names = tuple(config.layers)
        self.logits_layer = config.logits_layer
        self.probability_layer = config.probability_layer
        self.default_output = config.probability_layer or config.logits_layer or config.layers[-1]
        factory = import_object(config.factory)
        if not callable(factory):
            raise TypeError(f"{config.factory} is not callable")
        self._factory: Callable[..., chainer.Chain] = factory
        self._preprocess: Callable[..., np.ndarray] | None = (
            None if config.preprocess == "caffe" else import_object(config.preprocess)
        )
        self.resize = "bicubic" if self._preprocess is None else "custom"
        self._labels = _read_labels(config.labels_file) if config.labels_file is not None else None

    def skeleton(self) -> chainer.Link:
        net = self._factory(**self.config.factory_kwargs)
        if not isinstance(net, chainer.Link):
            raise TypeError(f"{self.config.factory} returned {type(net).__name__}, not a chainer.Link")
        return net

    def load(self, weights: WeightsFile) -> chainer.Link:
        net = self.skeleton()
        chainer.serializers.load_npz(weights, net)
        return loaded(net)

    def prepare(self, image: object, size: tuple[int, int] | None = None) -> np.ndarray:
        if self._preprocess is None:
            return caffe_prepare(image, self.input_spec, size)
        return np.asarray(self._preprocess(image, size or self.input_spec.size), dtype=np.float32)

    def forward_layers(
        self, net: chainer.Link, x: chainer.Variable, layers: Sequence[str]
    ) -> dict[str, chainer.Variable]:
        unknown = [name for name in layers if name not in self.layer_names]
        if unknown:
            raise KeyError(unknown[0])
        if self.config.layers_from == "forward":
            outputs = net.forward(x, layers=list(layers))
            return {name: outputs[name] for name in layers}
        with capture_links(net, list(layers)) as recorder:
            net(x)
        return {name: recorder.outputs[name] for name in layers}

    def labels(self) -> tuple[str, ...] | None:
        return self._labels


def _read_labels(path: str | os.PathLike[str]) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as handle:
        return tuple(line.rstrip("\n") for line in handle if line.strip())
