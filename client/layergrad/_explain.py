"""``Client.explain``: attribution maps computed by the server's Explain RPC.

::

    explanation = client.explain("cat.jpg", method="gradcam", target="top1")
    explanation.targets[0].class_name       # 'tabby, tabby cat'
    explanation.map                         # the main map, [targets, 14, 14] for Grad-CAM
    explanation.render().save("cat-gradcam.png")

Methods: ``saliency``, ``gradient_x_input``, ``smoothgrad``, ``smoothgrad_sq``, ``vargrad``,
``integrated_gradients``, ``gradcam``, ``gradcam_pp``, ``guided_backprop``, ``guided_gradcam``.
Conventions (score, channel order, upsampling, noise, integration points) are in
``docs/explanations.md``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._inputs import Images, to_inputs
from layergrad._tensors import to_tensor

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
#: Short names accepted for ``method``.
ALIASES = {"ig": "integrated_gradients", "gxi": "gradient_x_input", "gradcam++": "gradcam_pp"}
_CAM = ("gradcam", "gradcam_pp", "guided_gradcam")
_OPTIONS = {
    "smoothgrad": {"samples", "noise_level", "seed", "unbiased"},
    "integrated_gradients": {"steps", "rule", "baseline", "seed", "blur_sigma"},
    "gradcam": {"layer", "relu", "upsampling", "align_corners"},
}
_RULES = {
    "riemann_left": pb.INTEGRATION_RULE_RIEMANN_LEFT,
    "riemann_right": pb.INTEGRATION_RULE_RIEMANN_RIGHT,
    "riemann_middle": pb.INTEGRATION_RULE_RIEMANN_MIDDLE,
    "trapezoid": pb.INTEGRATION_RULE_TRAPEZOID,
    "gauss_legendre": pb.INTEGRATION_RULE_GAUSS_LEGENDRE,
}
_BASELINES = {
    "mean": pb.BASELINE_MEAN,
    "black": pb.BASELINE_BLACK,
    "noise": pb.BASELINE_NOISE,
    "blur": pb.BASELINE_BLUR,
}
_CAM_RELU = {
    "before": pb.CAM_RELU_BEFORE_UPSAMPLING,
    "after": pb.CAM_RELU_AFTER_UPSAMPLING,
    "none": pb.CAM_RELU_NONE,
}
_UPSAMPLING = {"bilinear": pb.UPSAMPLING_BILINEAR, "nearest": pb.UPSAMPLING_NEAREST}
_VARIANTS = {
    "smoothgrad": pb.SMOOTH_GRAD_VARIANT_SMOOTHGRAD,
    "smoothgrad_sq": pb.SMOOTH_GRAD_VARIANT_SQUARED,
    "vargrad": pb.SMOOTH_GRAD_VARIANT_VARGRAD,
}
_DTYPES = {pb.DATA_TYPE_FLOAT32: np.dtype("<f4"), pb.DATA_TYPE_FLOAT16: np.dtype("<f2")}


@dataclasses.dataclass(frozen=True)
class ExplainedTarget:
    """One explained row: the input's index, the class, its name ("" without labels), the score
    explained; for Integrated Gradients the baseline's score and the completeness delta."""

    input: int
    class_index: int
    class_name: str
    score: float
    baseline_score: float | None = None
    delta: float | None = None


@dataclasses.dataclass
class Explanation:
    """What ``Client.explain`` returns.

    ``maps`` holds every map of all targets (``[targets, ...]``), the main one first;
    ``image_maps`` the per-target maps at each original image's size (Grad-CAM's
    ``<method>_image``), one array per target.
    """

    method: str
    score_layer: str
    layer: str
    targets: list[ExplainedTarget]
    maps: dict[str, np.ndarray]
    image_maps: dict[str, list[np.ndarray]]
    images: list[Any] = dataclasses.field(default_factory=list, repr=False)

    @property
    def map(self) -> np.ndarray:
        """The method's main map, for every target."""
        return next(iter(self.maps.values()))

    @property
    def deltas(self) -> np.ndarray | None:
        """Integrated Gradients' completeness deltas, one per target (None for other methods)."""
        if not self.targets or self.targets[0].delta is None:
            return None
        return np.array([t.delta for t in self.targets])

    def heatmap(self, row: int = 0) -> np.ndarray:
        """A 2-D map of target ``row`` for display: Grad-CAM's at the original image size; an
        input-space map reduced over channels (saliency: its max of |.|; others: the sum)."""
        method = self.method
        if method in ("gradcam", "gradcam_pp"):
            return self.image_maps[f"{method}_image"][row].astype(np.float32)
        if method == "saliency":
            return self.maps["saliency_max_abs"][row].astype(np.float32)
        return self.maps[method][row].astype(np.float32).sum(axis=0)

    def render(
        self,
        row: int = 0,
        image: Any = None,
        *,
        sign: str | None = None,
        percentile: float = 99.0,
        alpha: float = 0.55,
        label: bool = False,
    ) -> Any:
        """Target ``row``'s heat map blended over its original image, as a PIL image (see
        :func:`layergrad.render.overlay`). ``image`` defaults to the image the call was given."""
        from layergrad import render

        source = image if image is not None else self.images[self.targets[row].input]
        picture = render.overlay(
            render.load_rgb(source),
            self.heatmap(row),
            sign=sign or default_sign(self.method),
            percentile=percentile,
            alpha=alpha,
        )
        if label:
            picture = render.labelled(picture, self.caption(row))
        return picture

    def caption(self, row: int = 0) -> str:
        """ "<method>: <class name or index>" for target ``row``."""
        target = self.targets[row]
        name = target.class_name.split(",")[0] if target.class_name else f"class {target.class_index}"
        return f"{self.method}: {name}"


def default_sign(method: str) -> str:
    """Which part of a map is shown by default: Grad-CAM is positive by construction; gradient x
    input and Integrated Gradients are signed contributions (both signs); gradient magnitudes
    otherwise (absolute value)."""
    if method in ("gradcam", "gradcam_pp"):
        return "positive"
    if method in ("gradient_x_input", "integrated_gradients"):
        return "all"
    return "absolute"


def method_name(method: str) -> str:
    name = ALIASES.get(method.lower(), method.lower())
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    return name


def _targets(target: int | Sequence[int] | str | None, batch: int) -> pb.ExplainTargets:
    if target is None:
        return pb.ExplainTargets(top_k=1)
    if isinstance(target, str):
        match = re.fullmatch(r"top(\d+)", target.strip().lower())
        if match is None:
            raise ValueError(f"target {target!r}: give a class index, one per image, or 'topK' (top1, top3)")
        return pb.ExplainTargets(top_k=int(match.group(1)))
    if isinstance(target, int | np.integer):
        return pb.ExplainTargets(classes=[int(target)] * batch)
    classes = [int(c) for c in target]
    return pb.ExplainTargets(classes=classes)


def build_request(
    images: Images,
    method: str,
    target: int | Sequence[int] | str | None = None,
    *,
    score_layer: str = "",
    dtype: str = "float32",
    model: str = "",
    **options: Any,
) -> pb.ExplainRequest:
    """The ExplainRequest of a ``Client.explain`` call; a misspelt option is a TypeError."""
    name = method_name(method)
    inputs = to_inputs(images)
    family = (
        "smoothgrad"
        if name in _VARIANTS
        else "integrated_gradients"
        if name == "integrated_gradients"
        else "gradcam"
        if name in _CAM
        else None
    )
    allowed = _OPTIONS.get(family, set()) if family else set()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"method {name!r} takes no option {', '.join(unknown)}; "
            f"its options: {', '.join(sorted(allowed)) or 'none'}"
        )
    if dtype not in ("float32", "float16"):
        raise ValueError("dtype must be 'float32' or 'float16'")
    request = pb.ExplainRequest(
        inputs=inputs,
        targets=_targets(target, len(inputs)),
        score_layer=score_layer,
        output_dtype=pb.DATA_TYPE_FLOAT16 if dtype == "float16" else pb.DATA_TYPE_FLOAT32,
        model=model,
    )
    if name == "saliency":
        request.saliency.SetInParent()
    elif name == "gradient_x_input":
        request.gradient_x_input.SetInParent()
    elif name == "guided_backprop":
        request.guided_backprop.SetInParent()
    elif family == "smoothgrad":
        smooth = request.smoothgrad
        smooth.variant = _VARIANTS[name]
        smooth.samples = int(options.get("samples", 32))
        smooth.noise_level = float(options.get("noise_level", 0.15))
        smooth.seed = int(options.get("seed", 0))
        smooth.unbiased_variance = bool(options.get("unbiased", False))
    elif family == "integrated_gradients":
        ig = request.integrated_gradients
        ig.steps = int(options.get("steps", 64))
        ig.rule = _choice(_RULES, options.get("rule", "gauss_legendre"), "rule")
        baseline = options.get("baseline", "mean")
        if isinstance(baseline, str):
            ig.baseline = _choice(_BASELINES, baseline, "baseline")
        else:
            ig.baseline = pb.BASELINE_TENSOR
            ig.baseline_tensor.CopyFrom(to_tensor(np.ascontiguousarray(baseline, dtype=np.float32)))
        ig.seed = int(options.get("seed", 0))
        ig.blur_sigma = float(options.get("blur_sigma", 10.0))
    else:
        cam = request.guided_gradcam.cam if name == "guided_gradcam" else request.gradcam
        cam.SetInParent()
        cam.layer = str(options.get("layer", ""))
        cam.plus_plus = name == "gradcam_pp"
        cam.relu = _choice(_CAM_RELU, options.get("relu", "before"), "relu")
        cam.upsampling = _choice(_UPSAMPLING, options.get("upsampling", "bilinear"), "upsampling")
        cam.align_corners = bool(options.get("align_corners", False))
    return request


def _choice(table: Mapping[str, int], value: str, what: str) -> int:
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(table)}")
    return table[value]


def assemble(messages: Iterable[pb.ExplainResponse], images: list[Any]) -> Explanation:
    """Joins the stream's chunks into an ``Explanation``."""
    buffers: dict[tuple[str, int | None], tuple[bytearray, np.dtype, tuple[int, ...]]] = {}
    order: list[tuple[str, int | None]] = []
    head: pb.ExplainResponse | None = None
    for message in messages:
        if head is None:
            head = message
        key = (message.name, message.row if message.HasField("row") else None)
        if key not in buffers:
            dtype = _DTYPES[message.dtype]
            shape = tuple(message.shape)
            buffers[key] = (bytearray(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize), dtype, shape)
            order.append(key)
        buffer = buffers[key][0]
        buffer[message.offset : message.offset + len(message.data)] = message.data
    if head is None:
        raise ValueError("the server sent no explanation")
    maps: dict[str, np.ndarray] = {}
    image_maps: dict[str, list[np.ndarray]] = {}
    for key in order:
        buffer, dtype, shape = buffers[key]
        array = np.frombuffer(buffer, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
        if key[1] is None:
            maps[key[0]] = array
        else:
            image_maps.setdefault(key[0], []).append(array)
    targets = [
        ExplainedTarget(
            input=t.input,
            class_index=t.class_index,
            class_name=t.class_name,
            score=t.score,
            baseline_score=t.baseline_score if t.HasField("baseline_score") else None,
            delta=t.delta if t.HasField("delta") else None,
        )
        for t in head.targets
    ]
    return Explanation(head.method, head.score_layer, head.layer, targets, maps, image_maps, images)


def image_list(images: Images) -> list[Any]:
    """The images as given, one per input (for rendering)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    items = list(images) if isinstance(images, list | tuple) else [images]
    return [os.fspath(i) if isinstance(i, os.PathLike) else i for i in items]


__all__ = ["METHODS", "ExplainedTarget", "Explanation", "assemble", "build_request"]
