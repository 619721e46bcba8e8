"""What a served Chainer model is: the adapter interface, with no gRPC and no protobuf.

A :class:`ModelAdapter` says how to build a model's ``chainer.Link`` from weights,
how to prepare an image for it (:class:`InputSpec`, :meth:`ModelAdapter.prepare`),
which named layers its forward exposes (:meth:`ModelAdapter.forward`), which of
them hold logits and probabilities, and its class labels. :func:`trace` runs one
forward pass and reads from Chainer's computational graph what the adapter cannot
state by itself: every layer's and every link's output shape, which layers and links
each layer depends on (the graph, not the order of the layer list, decides whether
a loss depends on a target) and the parameters in model order.

Two kinds of target stay apart. A *layer* is a name the model's forward exposes
(VGG16's ``conv5_3``: after its ReLU). A *link* is the path of any link of the
network (``conv5_3``: the convolution's output, before the ReLU; ``res4/b5``;
``inception_4a``; a user's ``block3/conv``), captured with a ``chainer.LinkHook``
while the forward runs. One name can be both, with different tensors.

Model order of parameters: the order in which the forward pass first calls each
parameter's link (every layer computed), and within one link its own parameters
by name (``W`` before ``b``; ``beta`` before ``gamma``). Parameters the forward
never reaches follow in ``namedparams()`` order. Chainer's ``namedparams()`` itself
runs in alphabetical path order (``res4/b1, b10, ..., b19, b2``), which is not the
order of the network.

Every forward an adapter runs for the engine runs under ``chainer.config.train =
False``: a forward in training mode would rewrite BatchNormalization's running
statistics (persistents, not parameters) and apply dropout.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import BinaryIO

import chainer
import numpy as np

#: What ``ModelAdapter.load`` accepts: an npz path or an open npz stream.
WeightsFile = str | os.PathLike[str] | BinaryIO | io.BytesIO


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The prepared input one image becomes.

    ``shape`` is the default prepared shape of one image (``layout`` order, for
    example ``(3, 224, 224)`` in CHW). ``channel_order`` is the order of the colour
    channels after preparation (``"BGR"`` for the Caffe-trained models) and ``mean``
    the per-channel mean subtracted, in that order. ``min_size`` is ``None`` when only
    ``shape``'s height and width are accepted; otherwise the smallest (height, width)
    the network accepts, any larger size working too.
    """

    shape: tuple[int, ...]
    layout: str = "CHW"
    channel_order: str = "BGR"
    mean: tuple[float, ...] = ()
    min_size: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """The default (height, width)."""
        return (self.shape[1], self.shape[2])

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether one prepared input of ``shape`` (no batch axis) fits the network."""
        shape = tuple(shape)
        if len(shape) != len(self.shape) or shape[0] != self.shape[0]:
            return False
        if self.min_size is None:
            return shape == self.shape
        return shape[1] >= self.min_size[0] and shape[2] >= self.min_size[1]


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One named layer or link: its output shape per input and what it depends on.

    ``depends_on`` holds the layers (for a layer) whose outputs this output is
    computed from, found by walking Chainer's computational graph; ``links`` the
    link paths it is computed from.
    """

    name: str
    shape: tuple[int, ...]
    depends_on: frozenset[str] = frozenset()
    links: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class ParameterInfo:
    """One parameter: its path (``res4/b5/conv1/W``), shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class Description:
    """What :func:`trace` read from one forward pass at one input size.

    ``layers`` is in the adapter's layer order, ``links`` in the order the forward
    first calls them, ``parameters`` in model order.
    """

    input_shape: tuple[int, ...]
    layers: tuple[LayerInfo, ...]
    links: tuple[LayerInfo, ...]
    parameters: tuple[ParameterInfo, ...]

    def layer(self, name: str) -> LayerInfo:
        return self._layers[name]

    def link(self, path: str) -> LayerInfo:
        return self._links[path]

    @functools.cached_property
    def _layers(self) -> dict[str, LayerInfo]:
        return {info.name: info for info in self.layers}

    @functools.cached_property
    def _links(self) -> dict[str, LayerInfo]:
        return {info.name: info for info in self.links}

    def loss_depends_on_layer(self, loss_layer: str, layer: str) -> bool:
        """Whether a loss on ``loss_layer`` depends on ``layer`` (itself included)."""
        return layer == loss_layer or layer in self._layers[loss_layer].depends_on

    def loss_depends_on_link(self, loss_layer: str, path: str) -> bool:
        """Whether a loss on ``loss_layer`` depends on the output of link ``path``."""
        return path in self._layers[loss_layer].links


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What one forward returned: named layers' and link paths' output variables."""

    layers: dict[str, chainer.Variable]
    links: dict[str, chainer.Variable]


class ModelAdapter(abc.ABC):
    """How a Chainer network is built, fed, run and described.

    An adapter holds no weights: :meth:`load` builds the link, and the other methods
    take it. Subclasses set the class attributes and implement the abstract methods.
    """

    #: The model's name (``VGG16``) and version (``1``).
    name: str
    version: str = "1"
    input_spec: InputSpec
    #: Every layer :meth:`forward_layers` can return, in forward order.
    layer_names: tuple[str, ...]
    #: The layer holding the class scores before softmax, and the one after it (or None).
    logits_layer: str | None = None
    probability_layer: str | None = None
    #: The layer ``predict`` returns when none is asked for.
    default_output: str = ""
    #: How :meth:`prepare` resizes: "bicubic" (Pillow's default filter) or "custom".
    resize: str = "bicubic"

    # ---- building --------------------------------------------------------------

    @abc.abstractmethod
    def load(self, weights: WeightsFile) -> chainer.Link:
        """Builds the network and loads ``weights`` (an npz in :meth:`weight_layout`)."""

    @abc.abstractmethod
    def skeleton(self) -> chainer.Link:
        """The network with placeholder weights, to be overwritten (for example by random weights)."""

    def random(self, seed: int) -> chainer.Link:
        """The network with seeded random weights (``random:SEED``), calibrated layer by layer."""
        from layergrad_server.models.calibrate import calibrated_random_weights

        net = self.skeleton()
        calibrated_random_weights(self, net, seed)
        return loaded(net)

    def weight_layout(self, net: chainer.Link) -> dict[str, tuple[int, ...]]:
        """Every array the network's npz holds (parameters and persistents): key -> shape."""
        serializer = chainer.serializers.DictionarySerializer()
        serializer.save(net)
        return {key: tuple(np.shape(value)) for key, value in serializer.target.items()}

    # ---- input -----------------------------------------------------------------

    @abc.abstractmethod
    def prepare(self, image: object, size: tuple[int, int] | None = None) -> np.ndarray:
        """One image (PIL image or ``HxWx3`` RGB uint8 array) as a prepared float32 input.

        ``size`` is (height, width), default the input spec's.
        """

    # ---- forward ---------------------------------------------------------------

    @abc.abstractmethod
    def forward_layers(
        self, net: chainer.Link, x: chainer.Variable, layers: Sequence[str]
    ) -> dict[str, chainer.Variable]:
        """The network's own forward returning the named layers (``VGG16Layers.forward``)."""

    def forward(
        self, net: chainer.Link, x: chainer.Variable, layers: Sequence[str], links: Sequence[str] = ()
    ) -> Outputs:
        """Runs the forward pass far enough to compute ``layers``, capturing ``links`` on the way.

        Runs under the caller's configuration: callers set ``train = False``.
        A link called more than once in one forward is captured at its last call.
        """
        if not links:
            return Outputs(self.forward_layers(net, x, list(layers)), {})
        with capture_links(net, links) as recorder:
            acts = self.forward_layers(net, x, list(layers))
        captured = recorder.outputs
        missing = [path for path in links if path not in captured]
        if missing:
            raise ValueError(f"links {missing} were not called by a forward computing layers {list(layers)}")
        return Outputs(acts, {path: captured[path] for path in links})

    # ---- labels ----------------------------------------------------------------

    def labels(self) -> tuple[str, ...] | None:
        """The class names, index i naming class i of the logits and probability layers."""
        return None


# ---- tracing the graph -----------------------------------------------------------


def link_paths(net: chainer.Link) -> dict[int, str]:
    """``id(link)`` -> path (``res4/b5``) of every link below ``net``."""
    return {id(link): path.lstrip("/") for path, link in net.namedlinks(skipself=True)}


class _LinkRecorder(chainer.LinkHook):
    """Records, per link path, the output of its last call and the order of first calls."""

    name = "layergrad-link-recorder"

    def __init__(self, paths: Mapping[int, str], wanted: set[str] | None) -> None:
        self._paths = paths
        self._wanted = wanted
        self.outputs: dict[str, chainer.Variable] = {}
        self.order: list[str] = []

    def forward_postprocess(self, args: object) -> None:
        path = self._paths.get(id(args.link))
        wanted = path is not None and (self._wanted is None or path in self._wanted)
        if wanted and isinstance(args.out, chainer.Variable):
            self.outputs[path] = args.out

    def forward_preprocess(self, args: object) -> None:
        path = self._paths.get(id(args.link))
        if path is not None and path not in self.order:
            self.order.append(path)


@contextmanager
def capture_links(net: chainer.Link, links: Sequence[str] | None) -> Iterator[_LinkRecorder]:
    """Captures the outputs of the links at ``links`` (every link if None) during the block.

    Yields the recorder: ``outputs`` maps path -> output variable, ``order`` lists
    every link path in the order of first calls. Raises ``KeyError`` for an unknown path.
    """
    paths = link_paths(net)
    if links is not None:
        known = set(paths.values())
        unknown = [path for path in links if path not in known]
        if unknown:
            raise KeyError(unknown[0])
    recorder = _LinkRecorder(paths, None if links is None else set(links))
    with recorder:
        yield recorder


def _ancestors(variable: chainer.Variable, names: Mapping[int, Sequence[str]]) -> set[str]:
    """The names (by variable node id) of every variable ``variable`` is computed from."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [variable.node]
    while stack:
        node = stack.pop()
        creator = node.creator_node
        if creator is None:
            continue
        for parent in creator.inputs:
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            found.update(names.get(id(parent), ()))
            stack.append(parent)
    return found


def trace(
    adapter: ModelAdapter, net: chainer.Link, size: tuple[int, int] | None = None, device: object = None
) -> Description:
    """One forward of a zero image computing every layer, read back as a :class:`Description`."""
    spec = adapter.input_spec
    shape = (spec.shape[0], *(size or spec.size))
    dev = chainer.get_device(device if device is not None else "@numpy")
    x = chainer.Variable(dev.xp.zeros((1, *shape), dtype=np.float32))
    with (
        chainer.using_config("train", False),
        chainer.using_config("enable_backprop", True),
        chainer.using_device(dev),
        capture_links(net, None) as recorder,
    ):
        acts = adapter.forward_layers(net, x, list(adapter.layer_names))
    captured, order = recorder.outputs, recorder.order
    # One variable can be several links' output (res4/b5's is res4's) or a layer's.
    layer_ids: dict[int, list[str]] = {}
    for name in adapter.layer_names:
        layer_ids.setdefault(id(acts[name].node), []).append(name)
    link_ids: dict[int, list[str]] = {}
    for path, var in captured.items():
        link_ids.setdefault(id(var.node), []).append(path)
    layers = []
    for name in adapter.layer_names:
        var = acts[name]
        links_in = _ancestors(var, link_ids) | set(link_ids.get(id(var.node), ()))
        layers_in = _ancestors(var, layer_ids) - {name}
        layers.append(
            LayerInfo(
                name,
                tuple(var.shape[1:]),
                frozenset(layers_in),
                frozenset(links_in),
            )
        )
    links = [LayerInfo(path, tuple(captured[path].shape[1:])) for path in order if path in captured]
    return Description(shape, tuple(layers), tuple(links), tuple(model_order(net, order)))


def model_order(net: chainer.Link, call_order: Sequence[str]) -> list[ParameterInfo]:
    """Parameters in model order (see the module docstring) given the links' first-call order."""
    named = {path.lstrip("/"): param for path, param in net.namedparams()}
    ordered: dict[str, chainer.Parameter] = {}
    by_path = {path.lstrip("/"): link for path, link in net.namedlinks(skipself=True)}
    for path in call_order:
        link = by_path[path]
        own = sorted(name.lstrip("/") for name, _ in link.namedparams() if name.count("/") == 1)
        for pname in own:
            ordered.setdefault(f"{path}/{pname}", named[f"{path}/{pname}"])
    for name, param in named.items():
        ordered.setdefault(name, param)
    return [ParameterInfo(name, tuple(p.shape), np.dtype(p.dtype)) for name, p in ordered.items()]


def ordered_params(net: chainer.Link, description: Description) -> dict[str, chainer.Parameter]:
    """name -> parameter of ``net`` in the description's model order."""
    named = {path.lstrip("/"): param for path, param in net.namedparams()}
    return {info.name: named[info.name] for info in description.parameters}


def loaded(net: chainer.Link) -> chainer.Link:
    """``net`` ready to serve: NaN-filled ``.grad`` arrays from loading dropped."""
    net.cleargrads()
    return net
