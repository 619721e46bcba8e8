"""Attribution methods computed on the server from raw Chainer gradients.

Knows nothing of gRPC or protobuf. Every gradient comes from the engine's own
``Engine.gradients`` (pattern GRAD, a ``ClassScore`` loss on the score layer) and
every score from ``Engine.predict``, so a map is built from exactly the tensors the
gradient RPCs return, under the engine's lock, for any model adapter. A call is cut
into internal batches of at most the engine's batch limit; ``checkpoint`` is called
before each (and, inside the engine, between Chainer functions), so a call whose
caller went away stops between batches; accumulators hold one float64 map per
target, never every sample.

What is explained is one *target* per row: an input and a class, whose *score* is
``score_layer[class]`` for that input (the model's logits layer by default, before
softmax). A call explains the rows in input order, each input's classes in the order
given (or by decreasing score for top-k). Every convention is in
``docs/explanations.md``.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Iterator, Sequence

import chainer
import numpy as np

from layergrad_server import engine as engine_module
from layergrad_server.errors import InvalidArgument, names_hint, shown
from layergrad_server.explain import ops
from layergrad_server.explain.guided import guided_relus

Checkpoint = Callable[[], None]

#: Most noise samples of SmoothGrad and steps of Integrated Gradients per target.
MAX_SAMPLES = 1024
#: Most backward passes of one call (targets times samples or steps).
MAX_PASSES = 8192
#: Most classes per input (top-k).
MAX_TOP_K = 20

SMOOTHGRAD_VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")
BASELINES = ("mean", "black", "noise", "blur", "tensor")
CAM_RELU = ("before", "after", "none")
UPSAMPLING = ("bilinear", "nearest")


@dataclasses.dataclass(frozen=True)
class Saliency:
    """The input gradient of the score; also its max of absolute values over channels."""

    method = "saliency"


@dataclasses.dataclass(frozen=True)
class GradientTimesInput:
    """The input gradient times the prepared input, element by element."""

    method = "gradient_x_input"


@dataclasses.dataclass(frozen=True)
class SmoothGrad:
    """Input gradients averaged over ``samples`` noisy copies of the input (Smilkov et al.).

    Noise sample s is ``sigma * N(0, 1)`` drawn by :func:`ops.standard_noise` (seed, s),
    with ``sigma = noise_level * (max(x) - min(x))`` over the prepared input. ``variant``:
    ``smoothgrad`` (mean of gradients), ``smoothgrad_sq`` (mean of squared gradients) or
    ``vargrad`` (their variance: biased, divided by n, unless ``unbiased``).
    """

    samples: int = 32
    noise_level: float = 0.15
    seed: int = 0
    variant: str = "smoothgrad"
    unbiased: bool = False

    @property
    def method(self) -> str:
        return self.variant


@dataclasses.dataclass(frozen=True)
class IntegratedGradients:
    """(x - x') times the integral over alpha of the gradient at x' + alpha (x - x') (Sundararajan et al.)."""

    steps: int = 64
    rule: str = "gauss_legendre"
    baseline: str = "mean"
    baseline_tensor: np.ndarray | None = None
    seed: int = 0
    blur_sigma: float = 10.0

    method = "integrated_gradients"


@dataclasses.dataclass(frozen=True)
class GradCAM:
    """ReLU(sum_k alpha_k A_k) at a convolutional layer (Selvaraju et al.); Grad-CAM++ weights
    with ``plus_plus`` (Chattopadhay et al.)."""

    layer: str = ""
    plus_plus: bool = False
    relu: str = "before"
    upsampling: str = "bilinear"
    align_corners: bool = False

    @property
    def method(self) -> str:
        return "gradcam_pp" if self.plus_plus else "gradcam"


@dataclasses.dataclass(frozen=True)
class GuidedBackprop:
    """The input gradient with every ReLU's backward replaced by the guided rule."""

    method = "guided_backprop"


@dataclasses.dataclass(frozen=True)
class GuidedGradCAM:
    """Guided backpropagation times the Grad-CAM map upsampled to the input."""

    cam: GradCAM = dataclasses.field(default_factory=GradCAM)

    method = "guided_gradcam"


Method = (
    Saliency
    | GradientTimesInput
    | SmoothGrad
    | IntegratedGradients
    | GradCAM
    | GuidedBackprop
    | GuidedGradCAM
)

#: Method names as the API spells them.
METHODS = (
    "saliency",
    "gradient_x_input",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "integrated_gradients",
    "gradcam",
    "gradcam_pp",
    "guided_backprop",
    "guided_gradcam",
)


@dataclasses.dataclass(frozen=True)
class ExplainQuery:
    """One explanation call, in numpy terms. ``inputs`` is the prepared batch.

    Targets: ``classes`` (one class per input), or the ``top_k`` highest-scoring classes of
    each input (top-1 when neither is given). ``image_sizes`` holds each input's original
    (height, width), for the image-size Grad-CAM maps (the prepared size when None).
    """

    inputs: np.ndarray
    method: Method
    classes: np.ndarray | None = None
    top_k: int = 0
    score_layer: str = ""
    image_sizes: Sequence[tuple[int, int]] | None = None
    output_dtype: np.dtype = dataclasses.field(default_factory=lambda: np.dtype(np.float32))


@dataclasses.dataclass(frozen=True)
class ExplainPlan:
    """A validated query: the score layer, the Grad-CAM layer, how many rows and passes."""

    query: ExplainQuery
    score_layer: str
    cam_layer: str
    rows: int
    passes: int


@dataclasses.dataclass(frozen=True)
class Target:
    """One explained row: input index, class, its name (or ""), its score, and for Integrated
    Gradients the baseline's score and the completeness delta."""

    input: int
    class_index: int
    class_name: str
    score: float
    baseline_score: float | None = None
    delta: float | None = None


@dataclasses.dataclass(frozen=True)
class MapTensor:
    """One map: ``array`` holds every row ([rows, ...]) or, when ``row`` is set, that row only."""

    name: str
    array: np.ndarray
    row: int | None = None


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Targets in row order and the maps, the method's main map first."""

    method: str
    score_layer: str
    layer: str
    targets: list[Target]
    maps: list[MapTensor]


def passes_per_target(method: Method) -> int:
    """Backward passes one target costs (noise samples, integration points, or 1 or 2)."""
    if isinstance(method, SmoothGrad):
        return method.samples
    if isinstance(method, IntegratedGradients):
        return method.steps + 1 if method.rule == "trapezoid" else method.steps
    if isinstance(method, GuidedGradCAM):
        return 2
    return 1


# ---- validation --------------------------------------------------------------------


_CONV_LAYERS: weakref.WeakKeyDictionary[object, tuple[str, ...]] = weakref.WeakKeyDictionary()


def conv_layers(model: engine_module.Engine) -> tuple[str, ...]:
    """The layers Grad-CAM accepts, in forward order: outputs of shape (channels, h, w) with
    h * w > 1 that no pooling function produced (VGG16: conv1_1 ... conv5_3; ResNet: conv1,
    res2 ... res5; GoogLeNet: conv1, conv2_reduce, conv2 and the inception modules)."""
    found = _CONV_LAYERS.get(model)
    if found is None:
        names = [n for n in model.layer_names if len(model.layer_shapes[n]) == 3]
        x = chainer.Variable(model.device.xp.zeros((1, *model.input_shape), dtype=np.float32))
        with (
            model._lock,
            chainer.using_config("train", False),
            chainer.using_config("enable_backprop", True),
            chainer.using_device(model.device),
        ):
            acts = model._forward(x, names)
        found = tuple(
            name
            for name in names
            if math.prod(acts[name].shape[2:]) > 1 and "Pooling" not in type(acts[name].creator).__name__
        )
        _CONV_LAYERS[model] = found
    return found


def _score_layer(model: engine_module.Engine, name: str) -> str:
    if not name:
        name = model.adapter.logits_layer or ""
        if not name:
            raise InvalidArgument(
                f"model {model.adapter.name} has no logits layer: name a score_layer",
                field="score_layer",
                reason="MISSING_SCORE_LAYER",
            )
    model._check_layer(name, "score_layer")
    model._check_vector_layer(name, "score_layer")
    return name


def _check_range(value: float, low: float, high: float, field: str, reason: str, what: str) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(
            f"{what} must be in [{low:g}, {high:g}], got {value:g}", field=field, reason=reason
        )


def _check_choice(value: str, choices: Sequence[str], field: str, reason: str, what: str) -> None:
    if value not in choices:
        raise InvalidArgument(
            f"unknown {what} {shown(value)}; {names_hint(what + 's', list(choices))}",
            field=field,
            reason=reason,
        )


def _check_cam(model: engine_module.Engine, cam: GradCAM, score_layer: str, field: str) -> str:
    _check_choice(cam.relu, CAM_RELU, f"{field}.relu", "UNKNOWN_OPTION", "relu placement")
    _check_choice(cam.upsampling, UPSAMPLING, f"{field}.upsampling", "UNKNOWN_OPTION", "upsampling")
    eligible = [n for n in conv_layers(model) if model._loss_reaches(score_layer, n)]
    if not cam.layer:
        if not eligible:
            raise InvalidArgument(
                f"model {model.adapter.name} has no convolutional layer before {score_layer!r}",
                field=f"{field}.layer",
                reason="NOT_A_CONV_LAYER",
            )
        return eligible[-1]
    layer = model._check_layer(cam.layer, f"{field}.layer")
    if layer not in eligible:
        raise InvalidArgument(
            f"layer {layer!r} (output shape {list(model.layer_shapes[layer])}) is not a convolutional "
            f"layer that {score_layer!r} depends on; Grad-CAM layers: {', '.join(eligible)}",
            field=f"{field}.layer",
            reason="NOT_A_CONV_LAYER",
        )
    return layer


def check_method(model: engine_module.Engine, method: Method, score_layer: str = "") -> str:
    """Validates a method's options (no input needed: callable before admission); returns the
    score layer."""
    score_layer = _score_layer(model, score_layer)
    if isinstance(method, SmoothGrad):
        _check_choice(method.variant, SMOOTHGRAD_VARIANTS, "smoothgrad.variant", "UNKNOWN_OPTION", "variant")
        _check_range(method.samples, 1, MAX_SAMPLES, "smoothgrad.samples", "BAD_SAMPLES", "samples")
        if method.variant == "vargrad" and method.unbiased and method.samples < 2:
            raise InvalidArgument(
                "the unbiased variance needs at least 2 samples",
                field="smoothgrad.samples",
                reason="BAD_SAMPLES",
            )
        _check_range(
            method.noise_level, 1e-6, 10.0, "smoothgrad.noise_level", "BAD_NOISE_LEVEL", "noise_level"
        )
    elif isinstance(method, IntegratedGradients):
        _check_choice(
            method.rule, ops.INTEGRATION_RULES, "integrated_gradients.rule", "UNKNOWN_OPTION", "rule"
        )
        _check_choice(
            method.baseline, BASELINES, "integrated_gradients.baseline", "UNKNOWN_OPTION", "baseline"
        )
        _check_range(method.steps, 1, MAX_SAMPLES, "integrated_gradients.steps", "BAD_STEPS", "steps")
        if method.baseline == "blur":
            _check_range(
                method.blur_sigma,
                0.1,
                1000.0,
                "integrated_gradients.blur_sigma",
                "BAD_BLUR_SIGMA",
                "blur_sigma",
            )
        if method.baseline == "tensor" and method.baseline_tensor is None:
            raise InvalidArgument(
                "baseline TENSOR needs integrated_gradients.baseline_tensor",
                field="integrated_gradients.baseline_tensor",
                reason="MISSING_BASELINE",
            )
        if method.baseline != "tensor" and method.baseline_tensor is not None:
            raise InvalidArgument(
                "baseline_tensor is only used with baseline TENSOR",
                field="integrated_gradients.baseline_tensor",
                reason="AMBIGUOUS_BASELINE",
            )
    elif isinstance(method, GradCAM):
        _check_cam(model, method, score_layer, "gradcam")
    elif isinstance(method, GuidedGradCAM):
        _check_cam(model, method.cam, score_layer, "guided_gradcam.cam")
    return score_layer


def check_passes(rows: int, method: Method) -> int:
    """The backward passes of ``rows`` targets; refuses more than ``MAX_PASSES``."""
    passes = rows * passes_per_target(method)
    if passes > MAX_PASSES:
        raise InvalidArgument(
            f"the call needs {passes} backward passes ({rows} targets x {passes_per_target(method)}); "
            f"the most one call may take is {MAX_PASSES}: send fewer inputs, targets, samples or steps",
            reason="TOO_MANY_SAMPLES",
            metadata={"passes": str(passes), "max_passes": str(MAX_PASSES)},
        )
    return passes


def check_targets(
    model: engine_module.Engine, score_layer: str, classes: np.ndarray | None, top_k: int, batch: int
) -> int:
    """Validates the targets of ``batch`` inputs (no input needed); returns the number of rows."""
    width = model.layer_shapes[score_layer][0]
    if classes is not None and top_k:
        raise InvalidArgument(
            "set either targets.classes or targets.top_k, not both",
            field="targets",
            reason="AMBIGUOUS_TARGET",
        )
    if classes is not None:
        model._check_classes(np.asarray(classes), batch, width, "targets.classes")
        rows = batch
    else:
        top_k = top_k or 1
        if not 1 <= top_k <= min(MAX_TOP_K, width):
            raise InvalidArgument(
                f"top_k must be in [1, {min(MAX_TOP_K, width)}], got {top_k}",
                field="targets.top_k",
                reason="BAD_TOP_K",
            )
        rows = batch * top_k
    return rows


def plan(model: engine_module.Engine, query: ExplainQuery) -> ExplainPlan:
    """Validates ``query`` against ``model``; computes nothing."""
    batch = model._check_batch(query.inputs)
    if query.output_dtype not in engine_module.OUTPUT_DTYPES:
        raise InvalidArgument(
            "output_dtype must be FLOAT32 or FLOAT16", field="output_dtype", reason="BAD_DTYPE"
        )
    score_layer = _score_layer(model, query.score_layer)
    rows = check_targets(model, score_layer, query.classes, query.top_k, batch)
    check_method(model, query.method, score_layer)
    method = query.method
    if isinstance(method, IntegratedGradients) and method.baseline == "tensor":
        tensor = method.baseline_tensor
        shapes = (tuple(query.inputs.shape[1:]), tuple(query.inputs.shape))
        if tensor is not None and tuple(tensor.shape) not in shapes:
            raise InvalidArgument(
                f"baseline_tensor has shape {list(tensor.shape)}; expected {list(shapes[0])} "
                f"(one for every input) or {list(shapes[1])} (one per input), prepared like the inputs",
                field="integrated_gradients.baseline_tensor",
                reason="SHAPE_MISMATCH",
            )
    cam_layer = ""
    if isinstance(method, GradCAM):
        cam_layer = _check_cam(model, method, score_layer, "gradcam")
    elif isinstance(method, GuidedGradCAM):
        cam_layer = _check_cam(model, method.cam, score_layer, "guided_gradcam.cam")
    passes = check_passes(rows, method)
    if query.image_sizes is not None and len(query.image_sizes) != batch:
        raise ValueError("one image size per input")
    return ExplainPlan(query, score_layer, cam_layer, rows, passes)


# ---- compute -----------------------------------------------------------------------


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


class _Runner:
    """The engine calls of one explanation: scores and gradients, one internal batch at a time."""

    def __init__(
        self, model: engine_module.Engine, plan: ExplainPlan, checkpoint: Checkpoint | None, batch: int | None
    ) -> None:
        self.model = model
        self.plan = plan
        self.checkpoint = checkpoint
        self.batch = min(batch or model.max_batch_size, model.max_batch_size)

    def _check(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint()

    def scores(self, inputs: np.ndarray) -> np.ndarray:
        """Score-layer outputs [n, width] (float32), by internal batches."""
        out = []
        for part in _chunks(len(inputs), self.batch):
            self._check()
            (tensor,) = self.model.predict(
                inputs[part], (self.plan.score_layer,), np.dtype(np.float32), checkpoint=self.checkpoint
            )
            out.append(tensor.array)
        return np.concatenate(out)

    def gradients(
        self, inputs: np.ndarray, classes: np.ndarray, *, layer: str = "", guided: bool = False
    ) -> dict[str, np.ndarray]:
        """One internal batch through ``Engine.gradients``: ``input`` (the input gradient), or
        ``activation`` and ``gradient`` of ``layer``."""
        self._check()
        query = engine_module.GradientQuery(
            inputs=np.ascontiguousarray(inputs, dtype=np.float32),
            loss=engine_module.ClassScore(self.plan.score_layer, np.asarray(classes, dtype=np.int64)),
            pattern=engine_module.Pattern.GRAD,
            input=not layer,
            layers=(layer,) if layer else (),
            activations=(layer,) if layer else (),
        )
        gradient_plan = self.model.plan(query)
        if guided:
            with guided_relus():
                result = self.model.gradients(gradient_plan, checkpoint=self.checkpoint)
        else:
            result = self.model.gradients(gradient_plan, checkpoint=self.checkpoint)
        found = {}
        for tensor in result.tensors:
            if tensor.kind is engine_module.Kind.INPUT_GRADIENT:
                found["input"] = tensor.array
            elif tensor.kind is engine_module.Kind.LAYER_GRADIENT:
                found["gradient"] = tensor.array
            else:
                found["activation"] = tensor.array
        return found

    def input_gradients(
        self, rows: int, point: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], *, guided: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """For flat sample indexes 0..rows-1 in internal batches: (indexes, input gradients), where
        ``point(indexes)`` gives the batch's inputs and classes."""
        for part in _chunks(rows, self.batch):
            indexes = np.arange(part.start, part.stop)
            inputs, classes = point(indexes)
            yield indexes, self.gradients(inputs, classes, guided=guided)["input"]


def _targets(
    model: engine_module.Engine, plan: ExplainPlan, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(input index, class) of every row."""
    query = plan.query
    batch = len(query.inputs)
    if query.classes is not None:
        return np.arange(batch), np.asarray(query.classes, dtype=np.int64)
    top_k = query.top_k or 1
    order = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")[:, :top_k]
    return np.repeat(np.arange(batch), top_k), order.reshape(-1).astype(np.int64)


def explain(
    model: engine_module.Engine,
    plan: ExplainPlan,
    *,
    checkpoint: Checkpoint | None = None,
    batch_size: int | None = None,
) -> Explanation:
    """Computes a planned explanation in internal batches of ``batch_size`` passes (at most, and by
    default, the engine's batch limit)."""
    query = plan.query
    method = query.method
    runner = _Runner(model, plan, checkpoint, batch_size)
    inputs = query.inputs
    scores = runner.scores(inputs)
    items, classes = _targets(model, plan, scores)
    rows = len(items)
    row_scores = scores[items, classes].astype(np.float64)
    labels = model.adapter.labels() or ()
    names = [labels[c] if c < len(labels) else "" for c in classes]
    maps: list[MapTensor] = []
    baseline_scores: np.ndarray | None = None
    deltas: np.ndarray | None = None
    layer = ""

    def plain_gradients(guided: bool = False) -> np.ndarray:
        grads = np.empty((rows, *inputs.shape[1:]), dtype=np.float32)
        for indexes, g in runner.input_gradients(
            rows, lambda ix: (inputs[items[ix]], classes[ix]), guided=guided
        ):
            grads[indexes] = g
        return grads

    if isinstance(method, Saliency):
        grads = plain_gradients()
        maps += [MapTensor("saliency", grads), MapTensor("saliency_max_abs", np.abs(grads).max(axis=1))]
    elif isinstance(method, GradientTimesInput):
        maps.append(MapTensor("gradient_x_input", plain_gradients() * inputs[items]))
    elif isinstance(method, GuidedBackprop):
        maps.append(MapTensor("guided_backprop", plain_gradients(guided=True)))
    elif isinstance(method, SmoothGrad):
        maps.append(MapTensor(method.variant, _smoothgrad(runner, method, inputs, items, classes)))
    elif isinstance(method, IntegratedGradients):
        attributions, baseline_scores, deltas = _integrated_gradients(
            runner, method, inputs, items, classes, row_scores
        )
        maps.append(MapTensor("integrated_gradients", attributions))
    elif isinstance(method, GradCAM | GuidedGradCAM):
        cam = method if isinstance(method, GradCAM) else method.cam
        layer = plan.cam_layer
        cam_maps = _gradcam(runner, cam, layer, inputs, items, classes, query.image_sizes)
        if isinstance(method, GuidedGradCAM):
            guided = plain_gradients(guided=True)
            maps.append(MapTensor("guided_gradcam", (guided * cam_maps[1].array[:, None]).astype(np.float32)))
        maps += cam_maps
    targets = [
        Target(
            input=int(items[r]),
            class_index=int(classes[r]),
            class_name=names[r],
            score=float(row_scores[r]),
            baseline_score=None if baseline_scores is None else float(baseline_scores[r]),
            delta=None if deltas is None else float(deltas[r]),
        )
        for r in range(rows)
    ]
    dtype = query.output_dtype
    maps = [MapTensor(m.name, m.array.astype(dtype, copy=False), m.row) for m in maps]
    return Explanation(method.method, plan.score_layer, layer, targets, maps)


def _smoothgrad(
    runner: _Runner, method: SmoothGrad, inputs: np.ndarray, items: np.ndarray, classes: np.ndarray
) -> np.ndarray:
    n = method.samples
    rows = len(items)
    shape = inputs.shape[1:]
    sigmas = method.noise_level * (inputs.max(axis=(1, 2, 3)) - inputs.min(axis=(1, 2, 3)))
    total = np.zeros((rows, *shape))
    squares = np.zeros((rows, *shape)) if method.variant != "smoothgrad" else None

    def point(indexes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        row, sample = np.divmod(indexes, n)
        noisy = np.empty((len(indexes), *shape), dtype=np.float32)
        for j, (r, s) in enumerate(zip(row, sample, strict=True)):
            item = items[r]
            noisy[j] = inputs[item] + np.float32(sigmas[item]) * ops.standard_noise(
                method.seed, int(s), shape
            )
        return noisy, classes[row]

    for indexes, grads in runner.input_gradients(rows * n, point):
        row = indexes // n
        g = grads.astype(np.float64)
        np.add.at(total, row, g)
        if squares is not None:
            np.add.at(squares, row, g * g)
    mean = total / n
    if method.variant == "smoothgrad":
        return mean.astype(np.float32)
    mean_square = squares / n
    if method.variant == "smoothgrad_sq":
        return mean_square.astype(np.float32)
    variance = np.maximum(mean_square - mean * mean, 0.0)
    if method.unbiased:
        variance *= n / (n - 1)
    return variance.astype(np.float32)


def baselines(model: engine_module.Engine, method: IntegratedGradients, inputs: np.ndarray) -> np.ndarray:
    """The baseline of every input, prepared like the inputs (float32, [batch, C, H, W])."""
    shape = inputs.shape
    mean = np.asarray(model.adapter.input_spec.mean or (0.0,) * shape[1], dtype=np.float32)[:, None, None]
    if method.baseline == "mean":
        return np.zeros(shape, dtype=np.float32)
    if method.baseline == "black":
        return np.broadcast_to(-mean, shape).astype(np.float32)
    if method.baseline == "noise":
        noise = ops.noise_generator(method.seed, 0).uniform(0.0, 255.0, shape[1:]).astype(np.float32)
        return np.broadcast_to(noise - mean, shape).astype(np.float32)
    if method.baseline == "blur":
        return np.stack([ops.gaussian_blur(x, method.blur_sigma) for x in inputs])
    tensor = np.asarray(method.baseline_tensor, dtype=np.float32)
    return np.broadcast_to(tensor, shape).astype(np.float32)


def _integrated_gradients(
    runner: _Runner,
    method: IntegratedGradients,
    inputs: np.ndarray,
    items: np.ndarray,
    classes: np.ndarray,
    row_scores: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    alphas, weights = ops.integration_points(method.rule, method.steps)
    points = len(alphas)
    rows = len(items)
    base = baselines(runner.model, method, inputs)
    diffs = inputs - base  # float32
    total = np.zeros((rows, *inputs.shape[1:]))

    def point(indexes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        row, step = np.divmod(indexes, points)
        item = items[row]
        scale = alphas[step].astype(np.float32)[:, None, None, None]
        return base[item] + scale * diffs[item], classes[row]

    for indexes, grads in runner.input_gradients(rows * points, point):
        row, step = np.divmod(indexes, points)
        np.add.at(total, row, weights[step][:, None, None, None] * grads.astype(np.float64))
    attributions = diffs[items].astype(np.float64) * total
    base_scores = runner.scores(base)[items, classes].astype(np.float64)
    deltas = attributions.sum(axis=(1, 2, 3)) - (row_scores - base_scores)
    return attributions.astype(np.float32), base_scores, deltas


def cam_weights(activation: np.ndarray, gradient: np.ndarray, plus_plus: bool) -> np.ndarray:
    """Channel weights [n, K] from a layer's activation and gradient [n, K, h, w] (float64).

    Grad-CAM: the spatial mean of the gradient. Grad-CAM++: sum_ij a_kij ReLU(g_kij) with
    a_kij = g^2 / (2 g^2 + sum_ab A_kab g^3), zero where the denominator is.
    """
    g = gradient.astype(np.float64)
    if not plus_plus:
        return g.mean(axis=(2, 3))
    a = activation.astype(np.float64)
    g2 = g * g
    denominator = 2.0 * g2 + a.sum(axis=(2, 3), keepdims=True) * g2 * g
    safe = np.where(denominator != 0.0, denominator, 1.0)
    alpha = np.where(denominator != 0.0, g2 / safe, 0.0)
    return (alpha * np.maximum(g, 0.0)).sum(axis=(2, 3))


def _gradcam(
    runner: _Runner,
    cam: GradCAM,
    layer: str,
    inputs: np.ndarray,
    items: np.ndarray,
    classes: np.ndarray,
    image_sizes: Sequence[tuple[int, int]] | None,
) -> list[MapTensor]:
    rows = len(items)
    size = tuple(inputs.shape[2:])
    h, w = runner.model.layer_shapes[layer][1:]
    raw = np.empty((rows, h, w))
    for part in _chunks(rows, runner.batch):
        found = runner.gradients(inputs[items[part]], classes[part], layer=layer)
        weights = cam_weights(found["activation"], found["gradient"], cam.plus_plus)
        raw[part] = np.einsum("nk,nkhw->nhw", weights, found["activation"].astype(np.float64))

    def finish(array: np.ndarray, target: tuple[int, int]) -> np.ndarray:
        if cam.relu == "before":
            array = np.maximum(array, 0.0)
        out = ops.resize(array, target, cam.upsampling, cam.align_corners)
        if cam.relu == "after":
            out = np.maximum(out, 0.0)
        return out.astype(np.float32)

    name = cam.method
    layer_map = raw if cam.relu == "none" else np.maximum(raw, 0.0)
    maps = [
        MapTensor(name, layer_map.astype(np.float32)),
        MapTensor(f"{name}_input", finish(raw, size)),
    ]
    sizes = image_sizes or [size] * len(inputs)
    for r in range(rows):
        maps.append(MapTensor(f"{name}_image", finish(raw[r], tuple(sizes[items[r]])), row=r))
    return maps
