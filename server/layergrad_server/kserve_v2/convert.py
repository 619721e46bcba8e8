"""Open Inference Protocol (KServe v2) messages <-> layergrad.v1 requests and responses.

``to_v1`` turns a ModelInferRequest into the layergrad.v1 request that asks for the
same thing: a ``PredictRequest`` when every requested output is a layer's activation,
else a ``ComputeGradientsRequest`` (the unary gradient call, whose result cap applies
to ModelInfer's unary response as well). ``to_v2`` turns that call's response into
the ModelInferResponse outputs, in the order the outputs were requested. Nothing
here computes, admits or validates what layergrad.v1 validates itself (layer names
a loss uses, class ranges, image sizes, batch limits): the v1 behaviour does that.
What only ModelInfer has (datatypes, shapes, raw contents, parameters, output names)
is checked here, each with a specific INVALID_ARGUMENT. docs/kserve-v2.md has the
whole mapping.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb

from layergrad_server._gen.inference import grpc_predict_v2_pb2 as v2
from layergrad_server.errors import InvalidArgument, names_hint, shown
from layergrad_server.models.base import InputSpec

#: The input tensor holding the images (any of the three forms).
IMAGE_INPUT = "input"
#: The input tensor holding one class index per item (the loss's classes or labels).
TARGETS_INPUT = "targets"
#: Requested outputs whose name starts with this are gradients: ``grad/input``,
#: ``grad/<layer>``, ``grad/<parameter>``.
GRADIENT_PREFIX = "grad/"
#: The input gradient's output name.
INPUT_GRADIENT = GRADIENT_PREFIX + "input"
#: The requested output holding the loss value (FP64, shape [1]), for gradient calls.
LOSS_OUTPUT = "loss"

#: v2 datatype -> numpy element type of the tensors ModelInfer reads or writes.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
#: layergrad.v1 tensor dtype -> v2 datatype of an output.
OUTPUT_DATATYPES = {
    pb.DATA_TYPE_FLOAT32: "FP32",
    pb.DATA_TYPE_FLOAT16: "FP16",
    pb.DATA_TYPE_BFLOAT16: "BF16",
    pb.DATA_TYPE_FLOAT64: "FP64",
}
#: The ``output_datatype`` parameter -> layergrad.v1 output dtype.
OUTPUT_DTYPE_PARAMETER = {
    "FP32": pb.DATA_TYPE_FLOAT32,
    "FP16": pb.DATA_TYPE_FLOAT16,
    "BF16": pb.DATA_TYPE_BFLOAT16,
}
#: Which InferTensorContents field holds each datatype's elements.
_CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_PATTERNS = {
    "grad": pb.BACKWARD_PATTERN_GRAD,
    "backward": pb.BACKWARD_PATTERN_BACKWARD,
    "backward_retain_grad": pb.BACKWARD_PATTERN_BACKWARD_RETAIN_GRAD,
}
_LOSSES = ("class_score", "softmax_cross_entropy", "sum_of_squares", "squared_error")
#: Request parameters ModelInfer reads; any other is refused (a misspelt option would
#: otherwise be ignored silently). Input and output parameters are ignored: clients add
#: their own (kserve's ``binary_data_size``).
REQUEST_PARAMETERS = ("pattern", "loss", "loss_layer", "target_class", "output_datatype", "exact")
_TARGET_INTEGERS = ("INT64", "INT32")


@dataclasses.dataclass(frozen=True)
class ModelNames:
    """What a model exposes by name: its layers and parameters in model order."""

    layers: tuple[str, ...]
    parameters: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class V1Call:
    """The layergrad.v1 call equivalent to a ModelInfer request."""

    method: str  # "Predict" or "ComputeGradients"
    request: pb.PredictRequest | pb.ComputeGradientsRequest
    outputs: tuple[str, ...]  # the v2 output names, in the requested order


# ---- parameters ------------------------------------------------------------------


def _parameter(value: v2.InferParameter) -> bool | int | float | str | None:
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def _text_parameter(
    parameters: Mapping[str, v2.InferParameter], name: str, valid: Sequence[str]
) -> str | None:
    """A string option, one of ``valid`` in any letter case; returned as ``valid`` spells it."""
    if name not in parameters:
        return None
    value = _parameter(parameters[name])
    spelled = {choice.lower(): choice for choice in valid}
    if not isinstance(value, str) or value.strip().lower() not in spelled:
        raise InvalidArgument(
            f"parameter {name!r} must be a string, one of {', '.join(valid)}; got {_shown_value(value)}",
            field=f"parameters[{name}]",
            reason="BAD_PARAMETER",
        )
    return spelled[value.strip().lower()]


def _integer_parameter(parameters: Mapping[str, v2.InferParameter], name: str) -> int | None:
    """An integer option, sent as int64_param, uint64_param, a whole double_param (tritonclient
    sends Python floats so) or a decimal string_param (kserve refuses float parameters)."""
    if name not in parameters:
        return None
    value = _parameter(parameters[name])
    if isinstance(value, bool):
        value = None
    elif isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    elif isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            value = None
    if not isinstance(value, int):
        raise InvalidArgument(
            f"parameter {name!r} must be an integer (int64, a whole double or a decimal string); "
            f"got {_shown_value(_parameter(parameters[name]))}",
            field=f"parameters[{name}]",
            reason="BAD_PARAMETER",
        )
    return value


def _bool_parameter(parameters: Mapping[str, v2.InferParameter], name: str) -> bool:
    """A yes/no option (False when absent): a bool_param, or a string_param ``true``/``false`` in
    any letter case (for clients that send strings only)."""
    if name not in parameters:
        return False
    value = _parameter(parameters[name])
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise InvalidArgument(
            f"parameter {name!r} must be a bool (or the string true or false); got {_shown_value(value)}",
            field=f"parameters[{name}]",
            reason="BAD_PARAMETER",
        )
    return value


def _shown_value(value: object) -> str:
    return shown(value) if isinstance(value, str) else "no value" if value is None else repr(value)


# ---- inputs ----------------------------------------------------------------------


def _shape(tensor: v2.ModelInferRequest.InferInputTensor, field: str) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if not shape or len(shape) > 8 or any(d < 0 for d in shape):
        raise InvalidArgument(
            f"input {shown(tensor.name)} has shape {list(shape[:8])}: expected 1 to 8 dimensions, "
            "none negative",
            field=f"{field}.shape",
            reason="BAD_SHAPE",
        )
    return shape


def _elements(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _split_bytes(data: bytes, name: str, field: str) -> list[bytes]:
    """BYTES raw contents: each element a 4-byte little-endian length, then that many bytes."""
    elements = []
    at = 0
    while at < len(data):
        if at + 4 > len(data):
            raise InvalidArgument(
                f"BYTES input {shown(name)}: {len(data) - at} byte(s) left where a 4-byte length belongs",
                field=field,
                reason="BYTE_LENGTH_MISMATCH",
            )
        (length,) = struct.unpack_from("<I", data, at)
        at += 4
        if at + length > len(data):
            raise InvalidArgument(
                f"BYTES input {shown(name)}: element {len(elements)} claims {length} bytes but only "
                f"{len(data) - at} remain",
                field=field,
                reason="BYTE_LENGTH_MISMATCH",
            )
        elements.append(bytes(data[at : at + length]))
        at += length
    return elements


def _input_data(
    request: v2.ModelInferRequest, index: int, shape: tuple[int, ...]
) -> np.ndarray | list[bytes]:
    """Input ``index``'s elements: an array of its datatype in ``shape``, or BYTES' elements."""
    tensor = request.inputs[index]
    field = f"inputs[{index}]"
    datatype = tensor.datatype
    count = _elements(shape)
    if request.raw_input_contents:
        raw = request.raw_input_contents[index]
        raw_field = f"raw_input_contents[{index}]"
        if datatype == "BYTES":
            elements = _split_bytes(raw, tensor.name, raw_field)
        else:
            dtype = DATATYPES[datatype]
            if len(raw) != count * dtype.itemsize:
                raise InvalidArgument(
                    f"input {shown(tensor.name)}: raw contents have {len(raw)} bytes but shape "
                    f"{list(shape)} of {datatype} needs {count * dtype.itemsize}",
                    field=raw_field,
                    reason="BYTE_LENGTH_MISMATCH",
                )
            return np.frombuffer(raw, dtype=dtype).reshape(shape)
    else:
        contents_field = _CONTENTS_FIELDS.get(datatype)
        if contents_field is None:
            raise InvalidArgument(
                f"input {shown(tensor.name)}: {datatype} elements travel only in raw_input_contents",
                field=f"{field}.contents",
                reason="BAD_CONTENTS",
            )
        values = getattr(tensor.contents, contents_field)
        if datatype == "BYTES":
            elements = [bytes(value) for value in values]
        else:
            if len(values) != count:
                raise InvalidArgument(
                    f"input {shown(tensor.name)}: contents.{contents_field} has {len(values)} elements but "
                    f"shape {list(shape)} needs {count}",
                    field=f"{field}.contents.{contents_field}",
                    reason="BYTE_LENGTH_MISMATCH",
                )
            return np.asarray(values, dtype=DATATYPES[datatype]).reshape(shape)
    if len(elements) != count:
        raise InvalidArgument(
            f"BYTES input {shown(tensor.name)} has {len(elements)} elements but shape {list(shape)} "
            f"needs {count}",
            field=f"{field}.shape",
            reason="BAD_SHAPE",
        )
    return elements


def prepared_shape(spec: InputSpec) -> list[int]:
    """One prepared input's shape as v2 metadata gives it: -1 for a height and width of any size
    above the model's minimum."""
    if spec.min_size is None:
        return list(spec.shape)
    return [spec.shape[0], *([-1] * (len(spec.shape) - 1))]


def _images(request: v2.ModelInferRequest, index: int, spec: InputSpec) -> list[pb.Input]:
    """The image input as layergrad.v1 inputs, one per item of the batch."""
    tensor = request.inputs[index]
    field = f"inputs[{index}]"
    shape = _shape(tensor, field)
    datatype = tensor.datatype
    if datatype == "FP32":
        if not spec.accepts(shape[1:]):
            sizes = ", ".join(map(str, spec.shape))
            if spec.min_size is not None:
                sizes = f"{spec.shape[0]}, H, W] with H >= {spec.min_size[0]} and W >= {spec.min_size[1]}"
            else:
                sizes += "]"
            raise InvalidArgument(
                f"an FP32 input {IMAGE_INPUT!r} is a prepared batch of shape [N, {sizes} "
                f"(NCHW, {spec.channel_order}, mean subtracted); got {list(shape)}",
                field=f"{field}.shape",
                reason="BAD_SHAPE",
            )
        batch = _input_data(request, index, shape)
        return [
            pb.Input(prepared=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=item.shape, data=item.tobytes()))
            for item in batch
        ]
    if datatype == "UINT8":
        if len(shape) != 4 or shape[3] != 3:
            raise InvalidArgument(
                f"a UINT8 input {IMAGE_INPUT!r} is a batch of RGB images of shape [N, H, W, 3] (NHWC); "
                f"got {list(shape)}",
                field=f"{field}.shape",
                reason="BAD_SHAPE",
            )
        batch = _input_data(request, index, shape)
        return [
            pb.Input(rgb_image=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=item.shape, data=item.tobytes()))
            for item in batch
        ]
    if datatype == "BYTES":
        if len(shape) != 1:
            raise InvalidArgument(
                f"a BYTES input {IMAGE_INPUT!r} is a batch of encoded images of shape [N]; got {list(shape)}",
                field=f"{field}.shape",
                reason="BAD_SHAPE",
            )
        return [pb.Input(encoded_image=data) for data in _input_data(request, index, shape)]
    raise InvalidArgument(
        f"input {IMAGE_INPUT!r} has datatype {shown(datatype)}; expected FP32 (a prepared NCHW batch), "
        "UINT8 (RGB images, NHWC) or BYTES (encoded images)",
        field=f"{field}.datatype",
        reason="BAD_DATATYPE",
    )


def _targets(request: v2.ModelInferRequest, index: int) -> list[int]:
    tensor = request.inputs[index]
    field = f"inputs[{index}]"
    if tensor.datatype not in _TARGET_INTEGERS:
        raise InvalidArgument(
            f"input {TARGETS_INPUT!r} holds one class index per item: datatype INT64 (or INT32), "
            f"got {shown(tensor.datatype)}",
            field=f"{field}.datatype",
            reason="BAD_DATATYPE",
        )
    shape = _shape(tensor, field)
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise InvalidArgument(
            f"input {TARGETS_INPUT!r} has shape {list(shape)}: expected [N] or [N, 1], one class per item",
            field=f"{field}.shape",
            reason="BAD_SHAPE",
        )
    return [int(value) for value in np.asarray(_input_data(request, index, shape)).reshape(-1)]


# ---- outputs ---------------------------------------------------------------------


def _gradient_target(name: str, names: ModelNames, targets: pb.GradientTargets, field: str) -> None:
    target = name.removeprefix(GRADIENT_PREFIX)
    if name == INPUT_GRADIENT:
        targets.input = True
    elif target in names.parameters:
        targets.parameters.append(target)
    elif target in names.layers:
        targets.layers.append(target)
    else:
        raise InvalidArgument(
            f"requested output {shown(name)} names no gradient of this model: ask for {INPUT_GRADIENT}, "
            f"grad/<layer> or grad/<parameter> ({names_hint('layers', names.layers)}; parameters look "
            f"like {', '.join(names.parameters[:2])})",
            field=field,
            reason="UNKNOWN_OUTPUT",
        )


def to_v1(
    request: v2.ModelInferRequest,
    names: ModelNames,
    input_spec: InputSpec,
    default_output: str,
    default_loss_layer: str,
    *,
    with_inputs: bool = True,
) -> V1Call:
    """The layergrad.v1 call asking for what ``request`` asks for (without the inputs when
    ``with_inputs`` is False: enough to know the call's scopes). ``default_output`` is the
    output of a request naming none, ``default_loss_layer`` the layer of a loss whose
    request has no ``loss_layer``."""
    parameters = request.parameters
    unknown = sorted(set(parameters) - set(REQUEST_PARAMETERS))
    if unknown:
        raise InvalidArgument(
            f"unknown request parameter {shown(unknown[0])}: {names_hint('parameters', REQUEST_PARAMETERS)}",
            field=f"parameters[{unknown[0]}]",
            reason="UNKNOWN_PARAMETER",
        )
    outputs = tuple(output.name for output in request.outputs) or (default_output,)
    seen: set[str] = set()
    for i, name in enumerate(outputs):
        if name in seen:
            raise InvalidArgument(
                f"output {shown(name)} is requested twice",
                field=f"outputs[{i}].name",
                reason="DUPLICATE_OUTPUT",
            )
        seen.add(name)
    output_name = _text_parameter(parameters, "output_datatype", tuple(OUTPUT_DTYPE_PARAMETER))
    dtype = pb.DATA_TYPE_FLOAT32 if output_name is None else OUTPUT_DTYPE_PARAMETER[output_name]
    exact = _bool_parameter(parameters, "exact")
    gradients = any(name.startswith(GRADIENT_PREFIX) for name in outputs)
    layers: list[str] = []
    targets = pb.GradientTargets()
    for i, name in enumerate(outputs):
        field = f"outputs[{i}].name"
        if name.startswith(GRADIENT_PREFIX):
            _gradient_target(name, names, targets, field)
        elif name == LOSS_OUTPUT and gradients:
            continue
        elif name in names.layers:
            layers.append(name)
        else:
            hint = f"; {LOSS_OUTPUT!r} comes with gradient outputs" if name == LOSS_OUTPUT else ""
            raise InvalidArgument(
                f"requested output {shown(name)} is neither a layer of this model nor a gradient "
                f"(grad/...){hint}; {names_hint('layers', names.layers)}",
                field=field,
                reason="UNKNOWN_OUTPUT",
            )

    inputs: list[pb.Input] = []
    classes: list[int] | None = None
    input_names = [tensor.name for tensor in request.inputs]
    for i, name in enumerate(input_names):
        if name not in (IMAGE_INPUT, TARGETS_INPUT):
            raise InvalidArgument(
                f"unknown input {shown(name)}: this model takes {IMAGE_INPUT!r} (the images) and, for "
                f"gradients, {TARGETS_INPUT!r} (one class index per item)",
                field=f"inputs[{i}].name",
                reason="UNKNOWN_INPUT",
            )
        if name in input_names[:i]:
            raise InvalidArgument(
                f"input {name!r} is given twice", field=f"inputs[{i}].name", reason="DUPLICATE_INPUT"
            )
    if IMAGE_INPUT not in input_names:
        raise InvalidArgument(
            f"the request has no input {IMAGE_INPUT!r} (the images: FP32 NCHW prepared, UINT8 NHWC or BYTES "
            "encoded)",
            field="inputs",
            reason="MISSING_INPUT",
        )
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(request.inputs)} "
            "inputs: give one per input, in the order of inputs",
            field="raw_input_contents",
            reason="BAD_CONTENTS",
        )
    if with_inputs:
        inputs = _images(request, input_names.index(IMAGE_INPUT), input_spec)
    if TARGETS_INPUT in input_names:
        if not gradients:
            raise InvalidArgument(
                f"input {TARGETS_INPUT!r} is for gradient outputs (grad/...), and none is requested",
                field=f"inputs[{input_names.index(TARGETS_INPUT)}]",
                reason="UNUSED_INPUT",
            )
        if with_inputs:
            classes = _targets(request, input_names.index(TARGETS_INPUT))

    if not gradients:
        for name in ("pattern", "loss", "loss_layer", "target_class"):
            if name in parameters:
                raise InvalidArgument(
                    f"parameter {name!r} is for gradient outputs (grad/...), and none is requested",
                    field=f"parameters[{name}]",
                    reason="UNUSED_PARAMETER",
                )
        predict = pb.PredictRequest(inputs=inputs, layers=layers, output_dtype=dtype, exact=exact)
        return V1Call("Predict", predict, outputs)

    pattern = _text_parameter(parameters, "pattern", tuple(_PATTERNS)) or "grad"
    loss_kind = _text_parameter(parameters, "loss", _LOSSES)
    loss_layer = _text_parameter_any(parameters, "loss_layer") or default_loss_layer
    target_class = _integer_parameter(parameters, "target_class")
    if classes is None and target_class is not None and with_inputs:
        classes = [target_class] * len(inputs)
    elif classes is not None and target_class is not None:
        raise InvalidArgument(
            f"give the classes once: the {TARGETS_INPUT!r} input or the 'target_class' parameter",
            field="parameters[target_class]",
            reason="CONFLICTING_TARGETS",
        )
    if loss_kind is None:
        loss_kind = "class_score" if classes is not None or target_class is not None else "sum_of_squares"
    if (
        loss_kind in ("class_score", "softmax_cross_entropy", "squared_error")
        and with_inputs
        and classes is None
    ):
        raise InvalidArgument(
            f"loss {loss_kind} needs one class per item: an INT64 input {TARGETS_INPUT!r} of shape [N] or "
            "the 'target_class' parameter",
            field="inputs",
            reason="MISSING_TARGETS",
        )
    loss = pb.Loss()
    if loss_kind == "class_score":
        loss.class_score.SetInParent()
        loss.class_score.layer = loss_layer
        loss.class_score.classes.extend(classes or ())
    elif loss_kind == "softmax_cross_entropy":
        if "loss_layer" in parameters:
            raise InvalidArgument(
                "loss softmax_cross_entropy is taken on the model's logits: leave out 'loss_layer'",
                field="parameters[loss_layer]",
                reason="UNUSED_PARAMETER",
            )
        loss.softmax_cross_entropy.SetInParent()
        loss.softmax_cross_entropy.labels.extend(classes or ())
    elif loss_kind == "squared_error":
        loss.squared_error.SetInParent()
        loss.squared_error.layer = loss_layer
        loss.squared_error.target_classes.extend(classes or ())
    else:
        loss.sum_of_squares.layer = loss_layer
        loss.sum_of_squares.SetInParent()
    v1 = pb.ComputeGradientsRequest(
        inputs=inputs,
        loss=loss,
        pattern=_PATTERNS[pattern],
        targets=targets,
        activation_layers=layers,
        output_dtype=dtype,
        exact=exact,
    )
    return V1Call("ComputeGradients", v1, outputs)


def _text_parameter_any(parameters: Mapping[str, v2.InferParameter], name: str) -> str:
    if name not in parameters:
        return ""
    value = _parameter(parameters[name])
    if not isinstance(value, str):
        raise InvalidArgument(
            f"parameter {name!r} must be a string (a layer name); got {_shown_value(value)}",
            field=f"parameters[{name}]",
            reason="BAD_PARAMETER",
        )
    return value


# ---- layergrad.v1 response -> ModelInferResponse ------------------------------------


def _output_name(tensor: pb.NamedTensor) -> str:
    if tensor.kind == pb.TENSOR_KIND_INPUT_GRADIENT:
        return INPUT_GRADIENT
    if tensor.kind in (pb.TENSOR_KIND_LAYER_GRADIENT, pb.TENSOR_KIND_PARAMETER_GRADIENT):
        return GRADIENT_PREFIX + tensor.name
    return tensor.name


def to_v2(
    call: V1Call,
    response: pb.PredictResponse | pb.ComputeGradientsResponse,
    model_name: str,
    model_version: str,
    request_id: str,
) -> v2.ModelInferResponse:
    """The v1 call's response as ModelInfer outputs, in ``call.outputs``' order, raw contents."""
    tensors: dict[str, tuple[str, Sequence[int], bytes]] = {}
    named: list[Any] = list(response.activations)
    if isinstance(response, pb.ComputeGradientsResponse):
        named = [*response.gradients, *named]
        if response.HasField("loss"):
            tensors[LOSS_OUTPUT] = ("FP64", [1], struct.pack("<d", response.loss))
    for tensor in named:
        tensors[_output_name(tensor)] = (
            OUTPUT_DATATYPES[tensor.tensor.dtype],
            tensor.tensor.shape,
            tensor.tensor.data,
        )
    answer = v2.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for name in call.outputs:
        if name not in tensors:
            raise InvalidArgument(
                f"output {name!r} was not computed for this request (the loss has no value here)",
                field="outputs",
                reason="UNKNOWN_OUTPUT",
            )
        datatype, shape, data = tensors[name]
        answer.outputs.add(name=name, datatype=datatype, shape=shape)
        answer.raw_output_contents.append(data)
    return answer
