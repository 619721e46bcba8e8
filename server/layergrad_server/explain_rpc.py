"""Explain's proto side: ExplainRequest -> ``explain.ExplainQuery``, the result -> stream messages.

Option enums map to the names ``layergrad_server.explain`` uses; a value this server
does not know (a newer client's) is INVALID_ARGUMENT with reason UNKNOWN_OPTION. Zero
numeric options take their documented defaults.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb

from layergrad_server import convert, explain, images
from layergrad_server.errors import InvalidArgument
from layergrad_server.models import ModelAdapter

_VARIANTS = {
    pb.SMOOTH_GRAD_VARIANT_UNSPECIFIED: "smoothgrad",
    pb.SMOOTH_GRAD_VARIANT_SMOOTHGRAD: "smoothgrad",
    pb.SMOOTH_GRAD_VARIANT_SQUARED: "smoothgrad_sq",
    pb.SMOOTH_GRAD_VARIANT_VARGRAD: "vargrad",
}
_BASELINES = {
    pb.BASELINE_UNSPECIFIED: "mean",
    pb.BASELINE_MEAN: "mean",
    pb.BASELINE_BLACK: "black",
    pb.BASELINE_NOISE: "noise",
    pb.BASELINE_BLUR: "blur",
    pb.BASELINE_TENSOR: "tensor",
}
_RULES = {
    pb.INTEGRATION_RULE_UNSPECIFIED: "gauss_legendre",
    pb.INTEGRATION_RULE_RIEMANN_LEFT: "riemann_left",
    pb.INTEGRATION_RULE_RIEMANN_RIGHT: "riemann_right",
    pb.INTEGRATION_RULE_RIEMANN_MIDDLE: "riemann_middle",
    pb.INTEGRATION_RULE_TRAPEZOID: "trapezoid",
    pb.INTEGRATION_RULE_GAUSS_LEGENDRE: "gauss_legendre",
}
_CAM_RELU = {
    pb.CAM_RELU_UNSPECIFIED: "before",
    pb.CAM_RELU_BEFORE_UPSAMPLING: "before",
    pb.CAM_RELU_AFTER_UPSAMPLING: "after",
    pb.CAM_RELU_NONE: "none",
}
_UPSAMPLING = {
    pb.UPSAMPLING_UNSPECIFIED: "bilinear",
    pb.UPSAMPLING_BILINEAR: "bilinear",
    pb.UPSAMPLING_NEAREST: "nearest",
}


def _option(table: dict[int, str], value: int, field: str, enum: str) -> str:
    name = table.get(value)
    if name is None:
        known = ", ".join(pb.DESCRIPTOR.enum_types_by_name[enum].values_by_number[v].name for v in table)
        raise InvalidArgument(
            f"unknown {field} value {value}; valid values: {known}", field=field, reason="UNKNOWN_OPTION"
        )
    return name


def _cam(message: pb.GradCamOptions, field: str) -> explain.GradCAM:
    return explain.GradCAM(
        layer=message.layer,
        plus_plus=message.plus_plus,
        relu=_option(_CAM_RELU, message.relu, f"{field}.relu", "CamRelu"),
        upsampling=_option(_UPSAMPLING, message.upsampling, f"{field}.upsampling", "Upsampling"),
        align_corners=message.align_corners,
    )


def method_from_proto(request: pb.ExplainRequest) -> explain.Method:
    """The method and its options (numeric ones not yet range-checked: ``explain.plan`` does)."""
    kind = request.WhichOneof("method")
    if kind == "saliency":
        return explain.Saliency()
    if kind == "gradient_x_input":
        return explain.GradientTimesInput()
    if kind == "guided_backprop":
        return explain.GuidedBackprop()
    if kind == "smoothgrad":
        m = request.smoothgrad
        return explain.SmoothGrad(
            samples=m.samples or 32,
            noise_level=float(m.noise_level) or 0.15,
            seed=m.seed,
            variant=_option(_VARIANTS, m.variant, "smoothgrad.variant", "SmoothGradVariant"),
            unbiased=m.unbiased_variance,
        )
    if kind == "integrated_gradients":
        m = request.integrated_gradients
        tensor = None
        if m.HasField("baseline_tensor"):
            tensor = convert.tensor_to_array(
                m.baseline_tensor,
                "integrated_gradients.baseline_tensor",
                dtypes=[convert.DTYPES[pb.DATA_TYPE_FLOAT32]],
                finite=True,
            )
        return explain.IntegratedGradients(
            steps=m.steps or 64,
            rule=_option(_RULES, m.rule, "integrated_gradients.rule", "IntegrationRule"),
            baseline=_option(_BASELINES, m.baseline, "integrated_gradients.baseline", "Baseline"),
            baseline_tensor=tensor,
            seed=m.seed,
            blur_sigma=float(m.blur_sigma) or 10.0,
        )
    if kind == "gradcam":
        return _cam(request.gradcam, "gradcam")
    if kind == "guided_gradcam":
        return explain.GuidedGradCAM(_cam(request.guided_gradcam.cam, "guided_gradcam.cam"))
    raise InvalidArgument(
        "no method given: set one of saliency, gradient_x_input, smoothgrad, integrated_gradients, gradcam, "
        "guided_backprop, guided_gradcam",
        field="method",
        reason="MISSING_METHOD",
    )


def rows_of(request: pb.ExplainRequest) -> int:
    """Targets a request asks for, read before any input is decoded."""
    if request.targets.classes:
        return len(request.inputs)
    return len(request.inputs) * max(request.targets.top_k, 1)


def passes_of(request: pb.ExplainRequest) -> int:
    """Backward passes a request costs (its admission size), read before any input is decoded:
    targets times samples or steps; an unusable method counts one."""
    kind = request.WhichOneof("method")
    if kind == "smoothgrad":
        per_target = request.smoothgrad.samples or 32
    elif kind == "integrated_gradients":
        m = request.integrated_gradients
        per_target = (m.steps or 64) + (1 if m.rule == pb.INTEGRATION_RULE_TRAPEZOID else 0)
    elif kind == "guided_gradcam":
        per_target = 2
    else:
        per_target = 1
    return max(rows_of(request) * min(per_target, explain.MAX_SAMPLES + 1), 1)


def cost_kind(request: pb.ExplainRequest) -> str:
    """Explain calls are of one kind when they share the method and, for the CAM methods, the layer
    and score layer (how far the backward pass goes); the admission counts every pass."""
    kind = request.WhichOneof("method") or "-"
    layer = request.gradcam.layer if kind == "gradcam" else request.guided_gradcam.cam.layer
    parts = ["explain", kind, layer, request.score_layer]
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).hexdigest()
    return f"explain/{digest}"


def query_from_proto(
    request: pb.ExplainRequest,
    adapter: ModelAdapter | None,
    image_limits: images.ImageLimits,
    max_batch_size: int,
) -> explain.ExplainQuery:
    """The request in numpy terms: method first (no input decoded for a bad option), then inputs."""
    method = method_from_proto(request)
    output_dtype = convert.output_dtype(request.output_dtype)
    convert.check_batch_count(request.inputs, max_batch_size)
    arrays, sizes = [], []
    for i, message in enumerate(request.inputs):
        array, size = convert.input_and_size(message, f"inputs[{i}]", image_limits, adapter)
        if arrays and array.shape != arrays[0].shape:
            raise InvalidArgument(
                f"every input of one request must have the same prepared shape: inputs[0] has "
                f"{list(arrays[0].shape)}, inputs[{i}] {list(array.shape)}",
                field=f"inputs[{i}]",
                reason="SHAPE_MISMATCH",
            )
        arrays.append(array)
        sizes.append(size)
    targets = request.targets
    return explain.ExplainQuery(
        inputs=np.stack(arrays).astype(np.float32, copy=False),
        method=method,
        classes=np.asarray(targets.classes, dtype=np.int64) if targets.classes else None,
        top_k=targets.top_k,
        score_layer=request.score_layer,
        image_sizes=tuple(sizes),
        output_dtype=output_dtype,
    )


def _target(target: explain.Target) -> pb.ExplainedTarget:
    message = pb.ExplainedTarget(
        input=target.input, class_index=target.class_index, class_name=target.class_name, score=target.score
    )
    if target.baseline_score is not None:
        message.baseline_score = target.baseline_score
    if target.delta is not None:
        message.delta = target.delta
    return message


def frames(result: explain.Explanation, chunk_bytes: int) -> Iterator[pb.ExplainResponse]:
    """The stream: each map in chunks of at most ``chunk_bytes`` data bytes, as StreamGradients
    chunks a tensor; the first message also carries the method, layers and targets."""
    first = True
    for tensor in result.maps:
        array = np.ascontiguousarray(tensor.array).astype(tensor.array.dtype.newbyteorder("<"), copy=False)
        data = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
        header = {
            "name": tensor.name,
            "dtype": convert.dtype_enum(tensor.array.dtype),
            "shape": array.shape,
        }
        offsets = range(0, max(len(data), 1), chunk_bytes)
        for offset in offsets:
            message = pb.ExplainResponse(
                offset=offset, data=bytes(data[offset : offset + chunk_bytes]), **header
            )
            if tensor.row is not None:
                message.row = tensor.row
            if first:
                message.method = result.method
                message.score_layer = result.score_layer
                message.layer = result.layer
                message.targets.extend(_target(t) for t in result.targets)
                first = False
            yield message
