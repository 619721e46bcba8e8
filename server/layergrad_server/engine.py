"""The compute core: one Chainer model behind its adapter, and the three backward patterns.

Knows nothing of gRPC or protobuf. The model is a
:class:`layergrad_server.models.ModelAdapter` (VGG16 by default): the engine asks it
to build the network, to run the forward pass and for the logits layer; the layer
shapes, what each layer depends on and the parameters in model order come from
:func:`layergrad_server.models.trace`. ``Engine.plan`` validates a ``GradientQuery``
against the model and sizes its result without computing; ``Engine.gradients``
runs it. A layer target must be one the loss depends on in the network's graph.
Every forward pass runs with ``chainer.config.train = False`` (no
dropout), so results are deterministic. Parameters' ``.grad`` is shared state,
so compute is serialised by one lock per engine.

Compute methods take an optional ``checkpoint`` callback, called before every
function of the forward and backward passes (a Chainer function hook); what it
raises (the caller went away, the deadline passed) stops the computation there.

``Engine.gradients`` also takes an optional ``on_final`` callback: it gets each parameter
gradient as soon as the backward pass has finished it (see :class:`_FinalGradients`), while
the rest of the backward pass still runs, so that a consumer can send it early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import hashlib
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import chainer  # importable on numpy 2: the package __init__ applied the shim
import chainer.functions as F  # noqa: N812
import numpy as np

from layergrad_server import precision
from layergrad_server.errors import InvalidArgument, names_hint, shown
from layergrad_server.models import Description, ModelAdapter, trace
from layergrad_server.models.base import ordered_params
from layergrad_server.models.vision import VGG16, vgg16_random_npz

logger = logging.getLogger(__name__)

#: The default model's adapter, and its name and input, for callers that serve only it.
DEFAULT_ADAPTER: ModelAdapter = VGG16()
INPUT_SHAPE = DEFAULT_ADAPTER.input_spec.shape
MEAN_BGR = DEFAULT_ADAPTER.input_spec.mean
MODEL_NAME = DEFAULT_ADAPTER.name
#: VGG16's seeded random weights as an npz (the default model's ``random:SEED``).
random_weights_npz = vgg16_random_npz
INPUT_NAME = "input"
# float32, float16 and bfloat16 (as ``precision.BFLOAT16`` bits), converted by ``precision``.
OUTPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), precision.BFLOAT16)


class Pattern(enum.Enum):
    """The backward idioms of Chainer the engine executes."""

    BACKWARD = "backward"  # net.cleargrads(); loss.backward()
    BACKWARD_RETAIN_GRAD = "backward_retain_grad"  # loss.backward(retain_grad=True)
    GRAD = "grad"  # chainer.grad([loss], [targets])


class Kind(enum.Enum):
    """What a result tensor is."""

    INPUT_GRADIENT = "input_gradient"
    LAYER_GRADIENT = "layer_gradient"
    LINK_GRADIENT = "link_gradient"
    PARAMETER_GRADIENT = "parameter_gradient"
    ACTIVATION = "activation"


# Losses. ``field`` prefixes name the request fields in error messages.


@dataclasses.dataclass(frozen=True)
class SumOfSquares:
    """sum(square(layer))."""

    layer: str


@dataclasses.dataclass(frozen=True)
class SquaredError:
    """sum(square(layer - target)); target given as a tensor or one-hot classes."""

    layer: str
    target: np.ndarray | None = None
    target_classes: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy:
    """softmax_cross_entropy(logits, labels), averaged over the batch (VGG16's logits: fc8).

    ``row_weights``, when set, weighs each input's cross entropy instead of the average (the
    sum of ``row_weights * cross_entropy``): requests computed together keep each one's mean."""

    labels: np.ndarray
    row_weights: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ClassScore:
    """sum_i layer[i, classes[i]]."""

    layer: str
    classes: np.ndarray


@dataclasses.dataclass(frozen=True)
class UpstreamGradient:
    """Backpropagation from ``layer`` with ``gradient`` as its grad."""

    layer: str
    gradient: np.ndarray


Loss = SumOfSquares | SquaredError | SoftmaxCrossEntropy | ClassScore | UpstreamGradient

_LOSS_FIELDS = {
    SumOfSquares: "loss.sum_of_squares",
    SquaredError: "loss.squared_error",
    SoftmaxCrossEntropy: "loss.softmax_cross_entropy",
    ClassScore: "loss.class_score",
    UpstreamGradient: "loss.upstream_gradient",
}


@dataclasses.dataclass(frozen=True)
class GradientQuery:
    """One gradient request, in numpy terms. ``inputs`` is the prepared batch."""

    inputs: np.ndarray
    loss: Loss | None
    pattern: Pattern | None
    parameters: Sequence[str] = ()
    all_parameters: bool = False
    layers: Sequence[str] = ()
    all_layers: bool = False
    input: bool = False
    links: Sequence[str] = ()
    activations: Sequence[str] = ()
    output_dtype: np.dtype = dataclasses.field(default_factory=lambda: np.dtype(np.float32))


@dataclasses.dataclass(frozen=True)
class ResultSpec:
    """Name, kind, shape and dtype of one result tensor, known before compute."""

    name: str
    kind: Kind
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated query with the ordered list of tensors it will return."""

    query: GradientQuery
    loss_layer: str
    layers: tuple[str, ...]
    parameters: tuple[str, ...]
    results: tuple[ResultSpec, ...]
    links: tuple[str, ...] = ()

    @property
    def result_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.results)


@dataclasses.dataclass(frozen=True)
class ResultTensor:
    """One computed tensor.

    ``dtype``, when set, is the requested output element type that ``array`` (still
    in the compute type) has not been converted to yet: the consumer converts it,
    for example chunk by chunk while streaming. ``converted()`` does it at once.
    """

    name: str
    kind: Kind
    array: np.ndarray
    dtype: np.dtype | None = None

    @property
    def output_dtype(self) -> np.dtype:
        """The element type the tensor is returned in."""
        return self.array.dtype if self.dtype is None else self.dtype

    def converted(self) -> np.ndarray:
        """The array in its output element type."""
        return self.array.astype(self.output_dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class GradientResult:
    """Tensors in plan order (input, layers, links, parameters, activations) and the loss."""

    tensors: list[ResultTensor]
    loss: float | None
    # With ``Engine.gradients(members=...)``: each member's own loss value, in order.
    member_losses: tuple[float | None, ...] = ()


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from: an npz file or a random seed."""

    source: str
    pretrained: bool
    npz_path: str | None = None
    random_seed: int | None = None
    file_sha256: str = ""


Checkpoint = Callable[[], None]
#: Gets one result tensor that is final before the computation ends, and the loss value.
OnFinal = Callable[["ResultTensor", float | None], None]


class _CheckpointHook(chainer.FunctionHook):
    """Calls ``checkpoint`` before each function node runs forward or backward."""

    name = "layergrad-checkpoint"

    def __init__(self, checkpoint: Checkpoint) -> None:
        self._checkpoint = checkpoint

    def forward_preprocess(self, function: object, in_data: object) -> None:
        self._checkpoint()

    def backward_preprocess(self, function: object, in_data: object, out_grad: object) -> None:
        self._checkpoint()


@contextmanager
def _checkpoints(checkpoint: Checkpoint | None) -> Iterator[None]:
    """Installs ``checkpoint`` for this thread's Chainer calls in the block (none if None)."""
    if checkpoint is None:
        yield
        return
    checkpoint()
    with _CheckpointHook(checkpoint):
        yield


class Engine:
    """Holds one model (its adapter and network) and computes gradients and activations."""

    def __init__(
        self,
        weights: WeightsSource,
        *,
        adapter: ModelAdapter | None = None,
        max_batch_size: int = 32,
        device: str = "@numpy",
    ) -> None:
        self.weights = weights
        self.adapter = adapter if adapter is not None else DEFAULT_ADAPTER
        # A Chainer device specifier: "@numpy" (CPU), "@cupy:0" (GPU 0, needs CuPy).
        self.device = chainer.get_device(device)
        self.max_batch_size = max_batch_size
        self._lock = threading.Lock()
        if weights.npz_path is not None:
            self.net = self.adapter.load(weights.npz_path)
        elif weights.random_seed is not None:
            self.net = self.adapter.random(weights.random_seed)
        else:
            raise ValueError("weights need an npz path or a random seed")
        self.net.to_device(self.device)
        self.description = trace(self.adapter, self.net, device=self.device)
        self.input_shape: tuple[int, ...] = self.description.input_shape
        # Descriptions at other input sizes (models that accept several), traced on first use.
        self._descriptions: dict[tuple[int, ...], Description] = {self.input_shape: self.description}
        self._link_index = {info.name: i for i, info in enumerate(self.description.links)}
        self.layer_names: tuple[str, ...] = self.adapter.layer_names
        self._layer_index = {name: i for i, name in enumerate(self.layer_names)}
        self._params = ordered_params(self.net, self.description)  # model order
        self.parameter_names: tuple[str, ...] = tuple(self._params)
        self.parameters_sha256 = self._parameters_digest()
        self.layer_shapes: dict[str, tuple[int, ...]] = {
            info.name: info.shape for info in self.description.layers
        }

    # ---- model description -------------------------------------------------

    def parameter_info(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """(name, shape, dtype) of every parameter in model order."""
        return [(name, p.shape, p.dtype) for name, p in self._params.items()]

    def layer_info(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, per-input output shape) of every layer in forward order."""
        return [(name, self.layer_shapes[name]) for name in self.layer_names]

    def _parameters_digest(self) -> str:
        digest = hashlib.sha256()
        for name, param in self._params.items():
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(_to_host(param.array), dtype="<f4").tobytes())
        return digest.hexdigest()

    def warm_up(self) -> None:
        """Runs one forward and backward pass on a zero image; records layer output shapes."""
        x = chainer.Variable(self.device.xp.zeros((1, *self.input_shape), dtype=np.float32))
        output = self.adapter.probability_layer or self.adapter.default_output
        with self._lock, chainer.using_config("train", False), chainer.using_device(self.device):
            acts = self._forward(x, self.layer_names)
            chainer.grad([F.sum(acts[output])], [x])
        self.layer_shapes = {name: tuple(acts[name].shape[1:]) for name in self.layer_names}

    # ---- input preparation ---------------------------------------------------

    @staticmethod
    def prepare(image: object) -> np.ndarray:
        """The default model's preparation of a PIL image (VGG16: Chainer's own ``vgg.prepare``).

        An engine's own model prepares with ``engine.adapter.prepare``.
        """
        return DEFAULT_ADAPTER.prepare(image)

    def _forward_links(
        self, x: chainer.Variable, layers: set[str], links: Sequence[str]
    ) -> tuple[dict[str, chainer.Variable], dict[str, chainer.Variable]]:
        """The forward computing ``layers``, with the outputs of the links at ``links`` captured."""
        if not links:
            return self._forward(x, layers), {}
        ordered = sorted(set(layers), key=self._layer_index.__getitem__)
        outputs = self.adapter.forward(self.net, x, ordered, links)
        return outputs.layers, outputs.links

    def _forward(self, x: chainer.Variable, layers: Sequence[str]) -> dict[str, chainer.Variable]:
        """The model's forward computing ``layers`` (their union, in forward order)."""
        return self.adapter.forward_layers(
            self.net, x, sorted(set(layers), key=self._layer_index.__getitem__)
        )

    def _loss_reaches(self, loss_layer: str, layer: str) -> bool:
        """Whether a loss on ``loss_layer`` depends on ``layer``: read from the graph, not the list order."""
        return self.description.loss_depends_on_layer(loss_layer, layer)

    # ---- validation ----------------------------------------------------------

    def _check_batch(self, inputs: np.ndarray) -> int:
        if inputs.ndim != 4 or inputs.shape[0] == 0:
            raise InvalidArgument(
                "the batch is empty: send at least one input", field="inputs", reason="EMPTY_BATCH"
            )
        if inputs.shape[0] > self.max_batch_size:
            raise InvalidArgument(
                f"batch of {inputs.shape[0]} inputs exceeds the limit of {self.max_batch_size}",
                field="inputs",
                reason="BATCH_TOO_LARGE",
            )
        if not self.adapter.input_spec.accepts(inputs.shape[1:]):
            raise InvalidArgument(
                f"model {self.adapter.name} does not accept inputs of shape {list(inputs.shape[1:])}; "
                f"{self.accepted_shapes()}",
                field="inputs",
                reason="SHAPE_MISMATCH",
            )
        return int(inputs.shape[0])

    def accepted_shapes(self) -> str:
        """The prepared input shapes the model accepts, in words."""
        spec = self.adapter.input_spec
        if spec.min_size is None:
            return f"it takes {list(spec.shape)}"
        return f"it takes [{spec.shape[0]}, H, W] with H >= {spec.min_size[0]} and W >= {spec.min_size[1]}"

    def describe(self, input_shape: Sequence[int]) -> Description:
        """Layer and link shapes at one prepared input shape (traced once per shape, then cached)."""
        key = tuple(int(n) for n in input_shape)
        description = self._descriptions.get(key)
        if description is None:
            with self._lock:
                description = trace(self.adapter, self.net, size=key[1:], device=self.device)
            if len(self._descriptions) >= 16:  # a few sizes stay known; the default one always
                for old in list(self._descriptions)[1:2]:
                    del self._descriptions[old]
            self._descriptions[key] = description
        return description

    def _check_link(self, path: str, field: str) -> str:
        if path not in self._link_index:
            message = f"unknown link {shown(path)}" if path else "no link given"
            close = difflib.get_close_matches(path, list(self._link_index), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            hint += names_hint("links", list(self._link_index))
            raise InvalidArgument(f"{message}; {hint}", field=field, reason="UNKNOWN_LINK")
        return path

    def _check_layer(self, name: str, field: str) -> str:
        if name not in self._layer_index:
            message = f"unknown layer {shown(name)}" if name else "no layer given"
            raise InvalidArgument(
                f"{message}; {names_hint('layers', self.layer_names)}", field=field, reason="UNKNOWN_LAYER"
            )
        return name

    def _check_parameter(self, name: str, field: str) -> str:
        if name not in self._params:
            raise InvalidArgument(
                f"unknown parameter {shown(name)}; {names_hint('parameters', self.parameter_names)}",
                field=field,
                reason="UNKNOWN_PARAMETER",
            )
        return name

    def _check_classes(self, classes: np.ndarray, batch: int, width: int, field: str) -> None:
        if classes.shape != (batch,):
            raise InvalidArgument(
                f"expected one class per input ({batch}), got {classes.size}",
                field=field,
                reason="CLASS_COUNT_MISMATCH",
            )
        bad = classes[(classes < 0) | (classes >= width)]
        if bad.size:
            raise InvalidArgument(
                f"class {int(bad[0])} is out of range: classes must be in [0, {width})",
                field=field,
                reason="CLASS_OUT_OF_RANGE",
            )

    def _check_vector_layer(self, layer: str, field: str) -> int:
        shape = self.layer_shapes[layer]  # 1-D outputs do not depend on the input size
        if len(shape) != 1:
            vector_layers = [n for n in self.layer_names if len(self.layer_shapes[n]) == 1]
            raise InvalidArgument(
                f"layer {layer!r} has output shape {list(shape)}; class-based losses need a layer with "
                f"a 1-D output: {', '.join(vector_layers)}",
                field=field,
                reason="LAYER_HAS_NO_CLASSES",
            )
        return shape[0]

    def _check_tensor_shape(
        self, array: np.ndarray, layer: str, batch: int, field: str, description: Description
    ) -> None:
        expected = (batch, *description.layer(layer).shape)
        if array.shape != expected:
            raise InvalidArgument(
                f"shape {list(array.shape)} does not match layer {layer!r} output {list(expected)} "
                f"([batch] + layer shape)",
                field=field,
                reason="SHAPE_MISMATCH",
            )

    def _check_loss(self, loss: Loss | None, batch: int, description: Description) -> str:
        """Validates the loss; returns the layer it is computed on."""
        if loss is None:
            raise InvalidArgument(
                "no loss given: set one of sum_of_squares, squared_error, softmax_cross_entropy, "
                "class_score, upstream_gradient",
                field="loss",
                reason="MISSING_LOSS",
            )
        field = _LOSS_FIELDS[type(loss)]
        if isinstance(loss, SoftmaxCrossEntropy):
            logits = self.adapter.logits_layer
            if logits is None:
                raise InvalidArgument(
                    f"model {self.adapter.name} has no logits layer for softmax cross-entropy",
                    field=f"{field}.labels",
                )
            self._check_classes(loss.labels, batch, self.layer_shapes[logits][0], f"{field}.labels")
            return logits
        layer = self._check_layer(loss.layer, f"{field}.layer")
        if isinstance(loss, ClassScore):
            width = self._check_vector_layer(layer, f"{field}.layer")
            self._check_classes(loss.classes, batch, width, f"{field}.classes")
        elif isinstance(loss, SquaredError):
            if (loss.target is None) == (loss.target_classes is None):
                raise InvalidArgument(
                    "set exactly one of target and target_classes",
                    field=f"{field}.target",
                    reason="AMBIGUOUS_TARGET",
                )
            if loss.target is not None:
                self._check_tensor_shape(loss.target, layer, batch, f"{field}.target", description)
            else:
                width = self._check_vector_layer(layer, f"{field}.layer")
                self._check_classes(loss.target_classes, batch, width, f"{field}.target_classes")
        elif isinstance(loss, UpstreamGradient):
            self._check_tensor_shape(loss.gradient, layer, batch, f"{field}.gradient", description)
        return layer

    def plan(self, query: GradientQuery) -> Plan:
        """Validates ``query`` and lists the tensors it returns; computes nothing."""
        batch = self._check_batch(query.inputs)
        description = self.describe(query.inputs.shape[1:])
        loss_layer = self._check_loss(query.loss, batch, description)
        if query.pattern is None:
            raise InvalidArgument(
                "no backward pattern given: BACKWARD, BACKWARD_RETAIN_GRAD or GRAD",
                field="pattern",
                reason="MISSING_PATTERN",
            )
        if query.output_dtype not in OUTPUT_DTYPES:
            raise InvalidArgument(
                "output_dtype must be FLOAT32, FLOAT16 or BFLOAT16", field="output_dtype", reason="BAD_DTYPE"
            )
        if query.all_layers:
            layers = tuple(n for n in self.layer_names if self._loss_reaches(loss_layer, n))
        else:
            layers = tuple(dict.fromkeys(self._check_layer(n, "targets.layers") for n in query.layers))
        for name in layers:
            if not self._loss_reaches(loss_layer, name):
                raise InvalidArgument(
                    f"layer {name!r} comes after the loss layer {loss_layer!r}: the loss does not depend "
                    f"on it; ask for layers up to {loss_layer!r}",
                    field="targets.layers",
                    reason="LAYER_AFTER_LOSS",
                )
        links = tuple(dict.fromkeys(self._check_link(p, "targets.links") for p in query.links))
        for path in links:
            if not self.description.loss_depends_on_link(loss_layer, path):
                raise InvalidArgument(
                    f"the loss on layer {loss_layer!r} does not depend on link {path!r}'s output (it is "
                    "computed after the loss layer or off its branch)",
                    field="targets.links",
                    reason="LINK_AFTER_LOSS",
                )
        links = tuple(sorted(links, key=self._link_index.__getitem__))
        for targets, field in ((layers, "targets.layers"), (links, "targets.links")):
            if targets and query.pattern is Pattern.BACKWARD:
                raise InvalidArgument(
                    "BACKWARD (loss.backward()) does not keep intermediate outputs' gradients (Chainer "
                    "leaves their .grad None); use BACKWARD_RETAIN_GRAD or GRAD for layer and link "
                    "gradients",
                    field=field,
                    reason="PATTERN_TARGET_CONFLICT",
                )
        if query.all_parameters:
            parameters = self.parameter_names
        else:
            parameters = tuple(
                dict.fromkeys(self._check_parameter(n, "targets.parameters") for n in query.parameters)
            )
        activations = tuple(
            dict.fromkeys(self._check_layer(n, "activation_layers") for n in query.activations)
        )
        activations = tuple(sorted(activations, key=self._layer_index.__getitem__))
        if not (query.input or layers or links or parameters):
            raise InvalidArgument(
                "no gradient requested: set targets.input, targets.layers, targets.all_layers, "
                "targets.links, targets.parameters or targets.all_parameters",
                field="targets",
                reason="NO_TARGETS",
            )
        dtype = query.output_dtype
        results: list[ResultSpec] = []
        if query.input:
            results.append(ResultSpec(INPUT_NAME, Kind.INPUT_GRADIENT, tuple(query.inputs.shape), dtype))
        results += [
            ResultSpec(n, Kind.LAYER_GRADIENT, (batch, *description.layer(n).shape), dtype)
            for n in sorted(layers, key=self._layer_index.__getitem__)
        ]
        results += [
            ResultSpec(p, Kind.LINK_GRADIENT, (batch, *description.link(p).shape), dtype) for p in links
        ]
        results += [
            ResultSpec(n, Kind.PARAMETER_GRADIENT, tuple(self._params[n].shape), dtype) for n in parameters
        ]
        results += [
            ResultSpec(n, Kind.ACTIVATION, (batch, *description.layer(n).shape), dtype) for n in activations
        ]
        return Plan(query, loss_layer, layers, parameters, tuple(results), links)

    def check_predict(
        self, inputs: np.ndarray, layers: Sequence[str], output_dtype: np.dtype
    ) -> tuple[str, ...]:
        """Validates a Predict call; returns its layers in forward order."""
        self._check_batch(inputs)
        if output_dtype not in OUTPUT_DTYPES:
            raise InvalidArgument(
                "output_dtype must be FLOAT32, FLOAT16 or BFLOAT16", field="output_dtype", reason="BAD_DTYPE"
            )
        names = dict.fromkeys(
            self._check_layer(n, "layers") for n in (layers or [self.adapter.default_output])
        )
        return tuple(sorted(names, key=self._layer_index.__getitem__))

    def predict_bytes(
        self,
        batch: int,
        layers: Sequence[str],
        output_dtype: np.dtype,
        input_shape: Sequence[int] | None = None,
    ) -> int:
        """The size of a Predict result of ``batch`` inputs, before any input is decoded.

        ``input_shape`` is the prepared shape of the inputs when the caller knows it
        (prepared tensors), else the model's default."""
        names = dict.fromkeys(
            self._check_layer(n, "layers") for n in (layers or [self.adapter.default_output])
        )
        shapes = self.layer_shapes
        if input_shape is not None and tuple(input_shape) != self.input_shape:
            if not self.adapter.input_spec.accepts(input_shape):
                raise InvalidArgument(
                    f"model {self.adapter.name} does not accept inputs of shape {list(input_shape)}; "
                    f"{self.accepted_shapes()}",
                    field="inputs",
                    reason="SHAPE_MISMATCH",
                )
            shapes = {info.name: info.shape for info in self.describe(input_shape).layers}
        itemsize = np.dtype(output_dtype).itemsize
        return sum(batch * math.prod(shapes[n]) * itemsize for n in names)

    # ---- compute ---------------------------------------------------------------

    def predict(
        self,
        inputs: np.ndarray,
        layers: Sequence[str],
        output_dtype: np.dtype,
        *,
        checkpoint: Checkpoint | None = None,
    ) -> list[ResultTensor]:
        """Forward only, like ``VGG16Layers.extract``: the requested layers' outputs."""
        names = self.check_predict(inputs, layers, output_dtype)
        with (
            self._lock,
            chainer.using_config("train", False),
            chainer.using_config("enable_backprop", False),
            chainer.using_device(self.device),
            _checkpoints(checkpoint),
        ):
            acts = self._forward(self.device.send(inputs), names)
            arrays = {n: _to_host(acts[n].array) for n in names}
        # Left in float32 with the output type attached: the caller converts through ``precision``.
        return [
            ResultTensor(
                n, Kind.ACTIVATION, arrays[n], None if arrays[n].dtype == output_dtype else output_dtype
            )
            for n in names
        ]

    def gradients(
        self,
        plan: Plan,
        *,
        checkpoint: Checkpoint | None = None,
        defer_dtype: bool = False,
        on_final: OnFinal | None = None,
        members: Sequence[tuple[int, int, Loss]] = (),
    ) -> GradientResult:
        """Runs a planned query with the requested backward pattern.

        With ``defer_dtype`` the arrays stay in the compute type and each result
        tensor carries the output type for its consumer to convert to. ``on_final``,
        if given, is called in this thread with each parameter gradient that is final
        before the backward pass ends (as the returned result holds it, and with
        ``defer_dtype``'s typing), and the loss value; the result still holds every
        tensor. A parameter gets no such call when more than one function of the
        graph uses it, or the backward pass does not reach it.

        ``members`` (``(start, stop, loss)`` for rows ``start:stop`` of a batch that joins
        several requests) asks for each member's own loss value, computed the way ``loss``
        alone would be on those rows of the loss layer, in ``member_losses``.
        """
        query = plan.query
        with (
            self._lock,
            chainer.using_config("train", False),
            chainer.using_config("enable_backprop", True),
            chainer.using_device(self.device),
            _checkpoints(checkpoint),
        ):
            x = chainer.Variable(self.device.send(query.inputs))
            wanted = {plan.loss_layer, *plan.layers, *query.activations}
            acts, link_outputs = self._forward_links(x, wanted, plan.links)
            root, root_grad, loss_value = self._objective(query.loss, acts[plan.loss_layer])
            member_losses = tuple(self._member_loss(acts[plan.loss_layer], *member) for member in members)
            final = None
            if on_final is not None and plan.parameters:
                specs = {spec.name: spec for spec in plan.results if spec.kind is Kind.PARAMETER_GRADIENT}
                final = _FinalGradients(
                    {name: self._params[name] for name in plan.parameters},
                    root,
                    lambda name, array: on_final(
                        _result_tensor(specs[name], _to_host(array), defer_dtype), loss_value
                    ),
                )
            with final if final is not None else contextlib.nullcontext():
                if query.pattern is Pattern.GRAD:
                    grads = self._run_grad(plan, x, acts, link_outputs, root, root_grad)
                else:
                    grads = self._run_backward(plan, x, acts, link_outputs, root, root_grad)
            arrays = [
                _to_host(acts[spec.name].array if spec.kind is Kind.ACTIVATION else grads[spec.name])
                for spec in plan.results
            ]
        tensors = [
            _result_tensor(spec, array, defer_dtype) for spec, array in zip(plan.results, arrays, strict=True)
        ]
        return GradientResult(tensors, loss_value, member_losses)

    def _member_loss(self, y: chainer.Variable, start: int, stop: int, loss: Loss) -> float | None:
        """The value of ``loss`` on rows ``start:stop`` of ``y``, outside the graph."""
        with chainer.using_config("enable_backprop", False):
            return self._objective(loss, chainer.Variable(y.array[start:stop]))[2]

    def _objective(
        self, loss: Loss, y: chainer.Variable
    ) -> tuple[chainer.Variable, np.ndarray | None, float | None]:
        """(variable to backpropagate from, its upstream gradient or None, loss value)."""
        send = self.device.send
        if isinstance(loss, UpstreamGradient):
            return y, send(loss.gradient), None
        if isinstance(loss, SumOfSquares):
            value = F.sum(F.square(y))
        elif isinstance(loss, SquaredError):
            if loss.target is not None:
                target = loss.target
            else:
                target = np.zeros(y.shape, dtype=y.dtype)
                target[np.arange(y.shape[0]), loss.target_classes] = 1
            value = F.sum(F.square(y - send(target)))
        elif isinstance(loss, SoftmaxCrossEntropy):
            labels = send(loss.labels.astype(np.int32))
            if loss.row_weights is None:
                value = F.softmax_cross_entropy(y, labels)
            else:
                value = F.sum(F.softmax_cross_entropy(y, labels, reduce="no") * send(loss.row_weights))
        else:
            value = F.sum(F.select_item(y, send(loss.classes.astype(np.int32))))
        return value, None, float(value.array)

    def _run_backward(
        self,
        plan: Plan,
        x: chainer.Variable,
        acts: dict[str, chainer.Variable],
        link_outputs: dict[str, chainer.Variable],
        root: chainer.Variable,
        root_grad: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """Patterns 1 and 2: ``loss.backward()`` / ``loss.backward(retain_grad=True)`` and read ``.grad``."""
        retain = plan.query.pattern is Pattern.BACKWARD_RETAIN_GRAD
        self.net.cleargrads()
        try:
            if root_grad is not None:
                root.grad = root_grad
            root.backward(retain_grad=retain)
            grads = {INPUT_NAME: x.grad}
            grads.update({name: acts[name].grad for name in plan.layers})
            grads.update({path: _grad_or_zeros(link_outputs[path]) for path in plan.links})
            grads.update({name: self._param_grad(name) for name in plan.parameters})
        finally:
            # The arrays are ours now; the next request starts from cleared grads.
            self.net.cleargrads()
        return grads

    def _param_grad(self, name: str) -> np.ndarray:
        param = self._params[name]
        return param.grad if param.grad is not None else self.device.xp.zeros_like(param.array)

    def _run_grad(
        self,
        plan: Plan,
        x: chainer.Variable,
        acts: dict[str, chainer.Variable],
        link_outputs: dict[str, chainer.Variable],
        root: chainer.Variable,
        root_grad: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """Pattern 3: ``chainer.grad([loss], [targets])``; parameters' ``.grad`` is untouched."""
        names = [INPUT_NAME] if plan.query.input else []
        names += list(plan.layers) + list(plan.links) + list(plan.parameters)
        variables = [x] if plan.query.input else []
        variables += [acts[n] for n in plan.layers] + [link_outputs[p] for p in plan.links]
        variables += [self._params[n] for n in plan.parameters]
        grad_outputs = None if root_grad is None else [chainer.Variable(root_grad)]
        results = chainer.grad([root], variables, grad_outputs=grad_outputs)
        grads = {}
        for name, variable, grad in zip(names, variables, results, strict=True):
            if grad is not None:
                grads[name] = grad.array
            elif variable is root and root_grad is not None:
                grads[name] = root_grad  # d root / d root applied to the upstream gradient
            else:
                grads[name] = self.device.xp.zeros_like(variable.array)
        return grads


def _result_tensor(spec: ResultSpec, array: np.ndarray, defer_dtype: bool) -> ResultTensor:
    """``array`` as the result tensor ``spec`` describes: converted to its output type, or
    (``defer_dtype``, and always for bfloat16) carrying that type for its consumer."""
    if (defer_dtype or spec.dtype == precision.BFLOAT16) and array.dtype != spec.dtype:
        return ResultTensor(spec.name, spec.kind, array, spec.dtype)
    return ResultTensor(spec.name, spec.kind, array.astype(spec.dtype, copy=False))


class _FinalGradients:
    """Reports parameter gradients the moment the backward pass has finished them.

    Chainer sets a parameter's ``.grad`` (``loss.backward()``) or returns it
    (``chainer.grad``) only once the whole backward pass is over, yet the
    gradient of a parameter that one function of the graph uses is complete as
    soon as that function's backward has run: it is the array that function
    returns for it, the very array Chainer later hands out as the gradient (a
    single contribution is not summed with anything). On entering, the graph
    below ``root`` is walked to count each parameter's uses; the backward method
    of each function that is a parameter's only user is wrapped, on that function
    object alone, to pass the parameter's gradient to ``report(name, array)`` as
    the function returns it. Parameters used more than once, or not reached by
    the backward pass, are not reported. Leaving restores the functions.
    """

    def __init__(
        self,
        params: dict[str, chainer.Parameter],
        root: chainer.Variable,
        report: Callable[[str, object], None],
    ) -> None:
        self._params = params
        self._root = root
        self._report = report
        self._wrapped: list[tuple[chainer.FunctionNode, str]] = []

    def __enter__(self) -> _FinalGradients:
        uses = self._uses()
        by_function: dict[chainer.FunctionNode, dict[int, str]] = {}
        for name, found in uses.items():
            if len(found) == 1:
                function, index = found[0]
                by_function.setdefault(function, {})[index] = name
        for function, names in by_function.items():
            self._wrap(function, names)
        return self

    def __exit__(self, *exc: object) -> None:
        for function, attribute in self._wrapped:
            function.__dict__.pop(attribute, None)
        self._wrapped.clear()

    def _uses(self) -> dict[str, list[tuple[chainer.FunctionNode, int]]]:
        """Every (function, input index) of the graph below the root that takes each parameter."""
        wanted = {id(param.node): name for name, param in self._params.items()}
        uses: dict[str, list[tuple[chainer.FunctionNode, int]]] = {name: [] for name in self._params}
        creator = self._root.creator_node
        pending = [] if creator is None else [creator]
        seen = {id(creator)}
        while pending:
            function = pending.pop()
            for index, node in enumerate(function.inputs):
                name = wanted.get(id(node))
                if name is not None:
                    uses[name].append((function, index))
                upstream = node.creator_node
                if upstream is not None and id(upstream) not in seen:
                    seen.add(id(upstream))
                    pending.append(upstream)
        return uses

    def _wrap(self, function: chainer.FunctionNode, names: dict[int, str]) -> None:
        """Wraps the method Chainer's backward step calls on ``function``: ``backward_accumulate``
        where its class overrides it, else ``backward``."""
        report = self._report
        accumulates = (
            type(function).backward_accumulate.__code__
            is not chainer.FunctionNode.backward_accumulate.__code__
        )
        attribute = "backward_accumulate" if accumulates else "backward"
        original = getattr(function, attribute)
        count = len(function.inputs)

        def reporting(target_input_indexes: tuple[int, ...], *args: object) -> object:
            gxs = original(target_input_indexes, *args)
            # ``backward`` may return a gradient for every input or for the targets only.
            by_input = not accumulates and len(gxs) == count
            for position, index in enumerate(target_input_indexes):
                name = names.get(index)
                if name is None:
                    continue
                gx = gxs[index] if by_input else gxs[position]
                if gx is not None and gx.raw_array is not None:
                    report(name, gx.array)
            return gxs

        setattr(function, attribute, reporting)
        self._wrapped.append((function, attribute))


def _grad_or_zeros(variable: chainer.Variable) -> object:
    """A retained output's gradient (zeros where the loss did not reach it)."""
    return variable.grad if variable.grad is not None else variable.xp.zeros_like(variable.array)


def _to_host(array: object) -> np.ndarray:
    """A device array as a numpy array (no copy when it already is one)."""
    return chainer.backend.CpuDevice().send(array)
