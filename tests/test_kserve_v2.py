"""The Open Inference Protocol (KServe v2) with the server's own generated stubs: health,
metadata, ModelInfer forward and gradients against layergrad.v1's answers from the real SDK,
every bad request's status and reason, tokens and scopes, and the unary result cap."""

from __future__ import annotations

import hashlib
import struct

import grpc
import layergrad
import numpy as np
import pytest
from conftest import encode, make_rgb, serving
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from layergrad_server._gen.inference import grpc_predict_v2_pb2 as v2
from layergrad_server._gen.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from layergrad_server.launch import ServerProcess

Input = v2.ModelInferRequest.InferInputTensor
Output = v2.ModelInferRequest.InferRequestedOutputTensor


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        yield v2_grpc.GRPCInferenceServiceStub(channel)


def image_input(array: np.ndarray, **parameters: v2.InferParameter) -> tuple[Input, bytes]:
    """A UINT8 NHWC batch as an input tensor with its raw contents."""
    return Input(name="input", datatype="UINT8", shape=array.shape, parameters=parameters), array.tobytes()


def targets_input(classes: list[int], datatype: str = "INT64") -> tuple[Input, bytes]:
    dtype = {"INT64": "<i8", "INT32": "<i4"}[datatype]
    return Input(name="targets", datatype=datatype, shape=[len(classes)]), np.asarray(
        classes, dtype
    ).tobytes()


def infer_request(
    inputs: list[tuple[Input, bytes]], outputs: list[str], **parameters: object
) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(
        model_name="vgg16",
        inputs=[tensor for tensor, _ in inputs],
        outputs=[Output(name=name) for name in outputs],
        raw_input_contents=[raw for _, raw in inputs],
    )
    for name, value in parameters.items():
        request.parameters[name].CopyFrom(parameter(value))
    return request


def parameter(value: object) -> v2.InferParameter:
    if isinstance(value, bool):
        return v2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return v2.InferParameter(int64_param=value)
    if isinstance(value, float):
        return v2.InferParameter(double_param=value)
    return v2.InferParameter(string_param=str(value))


def outputs_of(response: v2.ModelInferResponse) -> dict[str, np.ndarray]:
    assert len(response.outputs) == len(response.raw_output_contents)
    return {
        tensor.name: decode(raw, tensor.datatype).reshape(tensor.shape)
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def decode(raw: bytes, datatype: str) -> np.ndarray:
    """A v2 output's raw bytes as numpy; BF16 (the top half of float32) widened to float32."""
    if datatype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8"}[datatype])


def refused(call, request, code: grpc.StatusCode, reason: str, *words: str, metadata=None) -> str:
    """Calls ``call(request)``, expects ``code`` with ErrorInfo ``reason``; returns the message."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=120, metadata=metadata)
    error = caught.value
    assert error.code() == code, error.details()
    status = rpc_status.from_call(error)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == reason, error.details()
    for word in words:
        assert word in error.details()
    return error.details()


# ---- health and metadata -----------------------------------------------------------


def test_health_and_metadata_describe_the_served_model(stub, client):
    assert stub.ServerLive(v2.ServerLiveRequest()).live
    assert stub.ServerReady(v2.ServerReadyRequest()).ready
    assert stub.ModelReady(v2.ModelReadyRequest(name="vgg16")).ready
    assert stub.ModelReady(v2.ModelReadyRequest(name="vgg16", version="1")).ready
    server = stub.ServerMetadata(v2.ServerMetadataRequest())
    assert server.name == "layergrad" and server.version == layergrad.__version__

    info = client.model_info()
    metadata = stub.ModelMetadata(v2.ModelMetadataRequest(name="vgg16"))
    assert (metadata.name, list(metadata.versions), metadata.platform) == ("vgg16", ["1"], "chainer")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs == {"input": ("FP32", [-1, *info.input_spec.shape]), "targets": ("INT64", [-1])}
    outputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.outputs}
    for layer in info.layers:
        assert outputs[layer.name] == ("FP32", [-1, *layer.output_shape])
        assert outputs[f"grad/{layer.name}"] == ("FP32", [-1, *layer.output_shape])
    for param in info.parameters:
        assert outputs[f"grad/{param.name}"] == ("FP32", list(param.shape))
    assert outputs["grad/input"] == ("FP32", [-1, *info.input_spec.shape])
    assert outputs["loss"] == ("FP64", [1])
    assert len(outputs) == 2 * len(info.layers) + len(info.parameters) + 2


def test_reflection_and_health_know_the_inference_service(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=60))
    assert "inference.GRPCInferenceService" in [s.name for s in listed.list_services_response.service]
    file = descriptor_pb2.FileDescriptorProto.FromString(
        described.file_descriptor_response.file_descriptor_proto[0]
    )
    assert file.package == "inference"
    methods = [m.name for m in file.service[0].method]
    assert methods == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    ]
    assert server.health("inference.GRPCInferenceService") == health_pb2.HealthCheckResponse.SERVING


def test_a_loading_server_is_live_but_not_ready(weights_file, tmp_path):
    process = ServerProcess(["--weights", str(weights_file)], tmp_path / "server.log")
    try:
        # Returned once the server listens: the model is loading (seconds of work ahead).
        with grpc.insecure_channel(process.address) as channel:
            loading = v2_grpc.GRPCInferenceServiceStub(channel)
            assert loading.ServerLive(v2.ServerLiveRequest(), timeout=60).live
            assert not loading.ServerReady(v2.ServerReadyRequest(), timeout=60).ready
            assert not loading.ModelReady(v2.ModelReadyRequest(name="vgg16"), timeout=60).ready
            request = infer_request([image_input(SMALL)], ["prob"])
            refused(loading.ModelInfer, request, grpc.StatusCode.UNAVAILABLE, "MODEL_LOADING")
            process.wait_serving()
            assert loading.ServerReady(v2.ServerReadyRequest(), timeout=60).ready
            assert loading.ModelReady(v2.ModelReadyRequest(name="vgg16"), timeout=60).ready
    finally:
        assert process.terminate() == 0


def test_unknown_models_and_versions_are_not_found(stub):
    for call, request in [
        (stub.ModelInfer, v2.ModelInferRequest(model_name="resnet9")),
        (stub.ModelMetadata, v2.ModelMetadataRequest(name="resnet9")),
        (stub.ModelReady, v2.ModelReadyRequest(name="resnet9")),
    ]:
        refused(
            call, request, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "'resnet9'", "served models: vgg16"
        )
    refused(
        stub.ModelMetadata,
        v2.ModelMetadataRequest(name="vgg16", version="7"),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_VERSION_NOT_FOUND",
        "'7'",
    )


def test_methods_outside_the_served_set_are_unimplemented(server):
    with grpc.insecure_channel(server.address) as channel:
        index = channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex")
        with pytest.raises(grpc.RpcError) as caught:
            index(b"", timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- forward -------------------------------------------------------------------------


def test_forward_of_every_input_form_equals_predict(stub, client):
    images = np.stack([make_rgb(1, 160, 200), make_rgb(2, 160, 200)])
    reference = client.predict(list(images), layers=("fc7", "prob"))
    # kserve's client adds binary_data_size to every input: input parameters are ignored.
    uint8 = image_input(images, binary_data_size=v2.InferParameter(int64_param=images.nbytes))
    request = infer_request([uint8], ["prob", "fc7"])
    request.id = "forward-1"
    response = stub.ModelInfer(request, timeout=300)
    assert [t.name for t in response.outputs] == ["prob", "fc7"]  # the requested order
    assert (response.model_name, response.model_version, response.id) == ("vgg16", "1", "forward-1")
    got = outputs_of(response)
    np.testing.assert_array_equal(got["prob"], reference["prob"])
    np.testing.assert_array_equal(got["fc7"], reference["fc7"])

    png = encode(images[0], "PNG")
    encoded = (Input(name="input", datatype="BYTES", shape=[1]), struct.pack("<I", len(png)) + png)
    response = stub.ModelInfer(infer_request([encoded], []), timeout=300)  # no outputs: prob
    assert [t.name for t in response.outputs] == ["prob"]
    # Same batch size as the reference: BLAS may sum in another order for another batch size.
    np.testing.assert_array_equal(outputs_of(response)["prob"], client.predict(png, layers=("prob",))["prob"])

    prepared = layergrad_prepare(client, images[1])
    tensor = (
        Input(name="input", datatype="FP32", shape=[1, *prepared.shape]),
        prepared.astype("<f4").tobytes(),
    )
    response = stub.ModelInfer(infer_request([tensor], ["prob"], output_datatype="fp16"), timeout=300)
    assert response.outputs[0].datatype == "FP16"
    prob = client.predict(prepared, layers=("prob",))["prob"]
    np.testing.assert_array_equal(outputs_of(response)["prob"], prob.astype(np.float16))
    response = stub.ModelInfer(infer_request([tensor], ["prob"], output_datatype="BF16"), timeout=300)
    assert response.outputs[0].datatype == "BF16"
    bf16 = client.predict(prepared, layers=("prob",), dtype="bfloat16")["prob"]
    np.testing.assert_array_equal(outputs_of(response)["prob"], bf16)
    assert np.abs(bf16 - prob).max() <= 2**-8 * np.abs(prob).max()


def layergrad_prepare(client, image: np.ndarray) -> np.ndarray:
    """The prepared FP32 CHW form of an RGB image, computed the way the server does."""
    from layergrad_server.engine import Engine

    return Engine.prepare(image)


def test_typed_contents_work_like_raw_contents(stub, client):
    image = make_rgb(3, 64, 64)
    request = v2.ModelInferRequest(
        inputs=[
            Input(
                name="input",
                datatype="UINT8",
                shape=[1, *image.shape],
                contents=v2.InferTensorContents(uint_contents=image.reshape(-1).tolist()),
            )
        ],
        outputs=[Output(name="fc8")],
    )
    got = outputs_of(stub.ModelInfer(request, timeout=300))["fc8"]
    np.testing.assert_array_equal(got, client.predict(image, layers=("fc8",))["fc8"])


# ---- gradients -----------------------------------------------------------------------


def test_gradients_equal_layergrad_v1_in_the_requested_order(stub, client):
    image = make_rgb(4, 150, 150)
    names = ["fc7", "grad/fc8/W", "loss", "grad/input", "grad/conv5_3"]
    request = infer_request(
        [image_input(image[None]), targets_input([281])],
        names,
        pattern="backward_retain_grad",
        loss="class_score",
        loss_layer="fc8",
        output_datatype="BF16",
    )
    response = stub.ModelInfer(request, timeout=300)
    assert [t.name for t in response.outputs] == names
    assert [t.datatype for t in response.outputs] == ["BF16", "BF16", "FP64", "BF16", "BF16"]
    got = outputs_of(response)
    reference = client.gradients(
        image,
        layergrad.losses.ClassScore("fc8", [281]),
        pattern="backward_retain_grad",
        input=True,
        layers=["conv5_3"],
        parameters=["fc8/W"],
        activations=["fc7"],
        dtype="bfloat16",
    )
    np.testing.assert_array_equal(got["grad/input"], reference.input)
    np.testing.assert_array_equal(got["grad/conv5_3"], reference.layers["conv5_3"])
    np.testing.assert_array_equal(got["grad/fc8/W"], reference.parameters["fc8/W"])
    np.testing.assert_array_equal(got["fc7"], reference.activations["fc7"])
    assert got["loss"].tolist() == [reference.loss]


def test_fp16_gradients_that_would_lose_values_are_refused_with_counts(stub):
    """FP16 outputs are never scaled over v2 (no field carries a scale): a gradient whose small
    values would become zero is refused, counted, pointing at BF16."""
    request = infer_request(
        [image_input(make_rgb(4, 150, 150)[None]), targets_input([281])],
        ["grad/input"],
        output_datatype="FP16",
    )
    message = refused(stub.ModelInfer, request, grpc.StatusCode.OUT_OF_RANGE, "FLOAT16_OUT_OF_RANGE", "BF16")
    assert "values that would become zero" in message


@pytest.mark.parametrize("value", [7, 7.0, "7"], ids=["int64", "double", "string"])
def test_numeric_options_travel_as_ints_doubles_or_strings(stub, client, value):
    image = make_rgb(5, 64, 64)
    request = infer_request([image_input(image[None])], ["grad/fc8/b"], target_class=value)
    got = outputs_of(stub.ModelInfer(request, timeout=300))["grad/fc8/b"]
    reference = client.gradients(image, layergrad.losses.ClassScore("fc8", [7]), parameters=["fc8/b"])
    np.testing.assert_array_equal(got, reference.parameters["fc8/b"])


@pytest.mark.parametrize(
    ("parameters", "classes", "loss"),
    [
        ({"loss": "softmax_cross_entropy"}, [3], layergrad.losses.SoftmaxCrossEntropy([3])),
        (
            {"loss": "squared_error", "loss_layer": "prob"},
            [3],
            layergrad.losses.SquaredError("prob", target_classes=[3]),
        ),
        ({"loss": "sum_of_squares", "loss_layer": "fc7"}, None, layergrad.losses.SumOfSquares("fc7")),
    ],
    ids=["softmax_cross_entropy", "squared_error", "sum_of_squares"],
)
def test_every_loss_of_the_parameters_is_layergrad_v1s(stub, client, parameters, classes, loss):
    image = make_rgb(6, 64, 64)
    # INT32 classes are accepted as well as INT64.
    datatype = "INT32" if parameters["loss"] == "squared_error" else "INT64"
    inputs = [image_input(image[None])] + ([targets_input(classes, datatype)] if classes else [])
    got = outputs_of(
        stub.ModelInfer(infer_request(inputs, ["grad/fc7/b", "loss"], **parameters), timeout=300)
    )
    reference = client.gradients(image, loss, parameters=["fc7/b"])
    np.testing.assert_array_equal(got["grad/fc7/b"], reference.parameters["fc7/b"])
    assert got["loss"].tolist() == [reference.loss]


# ---- bad requests ----------------------------------------------------------------------

SMALL = make_rgb(7, 32, 32)[None]
BAD = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("request_", "reason", "words"),
    [
        (
            infer_request([(Input(name="input", datatype="INT16", shape=[1, 3]), b"\0" * 12)], []),
            "BAD_DATATYPE",
            ["'INT16'", "FP32", "UINT8", "BYTES"],
        ),
        (
            infer_request([(Input(name="input", datatype="FP32", shape=[1, 3, 224, 223]), b"")], []),
            "BAD_SHAPE",
            ["[N, 3, 224, 224]", "[1, 3, 224, 223]"],
        ),
        (
            infer_request([(Input(name="input", datatype="UINT8", shape=[1, 32, 32, 4]), b"")], []),
            "BAD_SHAPE",
            ["[N, H, W, 3]"],
        ),
        (
            infer_request([(Input(name="input", datatype="UINT8", shape=[1, 32, 32, 3]), b"\0" * 7)], []),
            "BYTE_LENGTH_MISMATCH",
            ["7 bytes", "3072"],
        ),
        (
            infer_request([(Input(name="input", datatype="BYTES", shape=[1]), b"\x09\0\0\0abc")], []),
            "BYTE_LENGTH_MISMATCH",
            ["claims 9 bytes"],
        ),
        (
            infer_request(
                [(Input(name="image", datatype="UINT8", shape=[1, 32, 32, 3]), SMALL.tobytes())], []
            ),
            "UNKNOWN_INPUT",
            ["'image'", "'input'", "'targets'"],
        ),
        (infer_request([targets_input([1])], ["grad/input"]), "MISSING_INPUT", ["no input 'input'"]),
        (infer_request([image_input(SMALL)], ["fc9"]), "UNKNOWN_OUTPUT", ["'fc9'", "conv1_1"]),
        (
            infer_request([image_input(SMALL)], ["grad/fc9/W"]),
            "UNKNOWN_OUTPUT",
            ["'grad/fc9/W'", "grad/input"],
        ),
        (infer_request([image_input(SMALL)], ["prob", "prob"]), "DUPLICATE_OUTPUT", ["twice"]),
        (infer_request([image_input(SMALL)], ["prob"], patern="grad"), "UNKNOWN_PARAMETER", ["'patern'"]),
        (infer_request([image_input(SMALL)], ["prob"], pattern="grad"), "UNUSED_PARAMETER", ["'pattern'"]),
        (
            infer_request([image_input(SMALL)], ["grad/input"], target_class=1, pattern="sideways"),
            "BAD_PARAMETER",
            ["'pattern'", "'sideways'"],
        ),
        (
            infer_request([image_input(SMALL)], ["grad/input"], target_class=1.5),
            "BAD_PARAMETER",
            ["'target_class'", "integer"],
        ),
        (
            infer_request([image_input(SMALL)], ["grad/input"], loss="class_score"),
            "MISSING_TARGETS",
            ["'targets'", "'target_class'"],
        ),
        (
            infer_request([image_input(SMALL), targets_input([1])], ["grad/input"], target_class=1),
            "CONFLICTING_TARGETS",
            ["once"],
        ),
        (
            infer_request([image_input(SMALL), targets_input([1])], ["prob"]),
            "UNUSED_INPUT",
            ["'targets'"],
        ),
        (
            infer_request(
                [image_input(SMALL), (Input(name="targets", datatype="FP32", shape=[1]), b"\0" * 4)],
                ["grad/input"],
            ),
            "BAD_DATATYPE",
            ["INT64"],
        ),
        (
            infer_request([image_input(SMALL)], ["grad/input"], output_datatype="FP64"),
            "BAD_PARAMETER",
            ["'output_datatype'", "FP32, FP16", "'FP64'"],
        ),
        (
            infer_request([image_input(SMALL)], ["prob"], exact="sometimes"),
            "BAD_PARAMETER",
            ["'exact'", "bool"],
        ),
        # What layergrad.v1 validates comes back as its own error.
        (
            infer_request([image_input(SMALL), targets_input([1000])], ["grad/input"]),
            "CLASS_OUT_OF_RANGE",
            ["1000"],
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_bad_requests_are_invalid_argument_with_a_reason(stub, request_, reason, words):
    refused(stub.ModelInfer, request_, BAD, reason, *words)
    assert stub.ServerLive(v2.ServerLiveRequest()).live


def test_raw_contents_must_cover_every_input(stub):
    request = infer_request([image_input(SMALL), targets_input([1])], ["grad/input"])
    del request.raw_input_contents[1]
    refused(stub.ModelInfer, request, BAD, "BAD_CONTENTS", "1 entries for 2 inputs")


# ---- tokens, scopes and the unary cap ----------------------------------------------------

TOKENS = {"all": "v2-all-51c3", "predict": "v2-predict-9d0e"}


@pytest.fixture(scope="module")
def guarded(weights_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("v2-guarded")
    lines = [
        f"sha256:{hashlib.sha256(TOKENS['all'].encode()).hexdigest()} *",
        f"sha256:{hashlib.sha256(TOKENS['predict'].encode()).hexdigest()} predict",
    ]
    (folder / "tokens").write_text("\n".join(lines) + "\n")
    args = ["--weights", str(weights_file), "--tokens-file", str(folder / "tokens")]
    with serving([*args, "--max-unary-response-bytes", str(1 << 20)], folder) as process:
        with grpc.insecure_channel(process.address) as channel:
            yield v2_grpc.GRPCInferenceServiceStub(channel)


def as_token(name: str):
    return (("authorization", f"Bearer {TOKENS[name]}"),)


def test_tokens_and_scopes_are_those_of_the_layergrad_v1_call(guarded):
    forward = infer_request([image_input(SMALL)], ["prob"])
    gradient = infer_request([image_input(SMALL)], ["grad/input"], target_class=1)
    refused(guarded.ModelInfer, forward, grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")
    metadata = v2.ServerMetadataRequest()
    refused(guarded.ServerMetadata, metadata, grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")
    assert guarded.ServerMetadata(metadata, metadata=as_token("predict"), timeout=60).name == "layergrad"
    # The probes answer without a token, like gRPC health.
    assert guarded.ServerLive(v2.ServerLiveRequest(), timeout=60).live
    assert guarded.ServerReady(v2.ServerReadyRequest(), timeout=60).ready
    assert guarded.ModelReady(v2.ModelReadyRequest(name="vgg16"), timeout=60).ready
    got = guarded.ModelInfer(forward, metadata=as_token("predict"), timeout=300)
    assert [t.name for t in got.outputs] == ["prob"]
    with pytest.raises(grpc.RpcError) as caught:
        guarded.ModelInfer(gradient, metadata=as_token("predict"), timeout=300)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "input-gradients" in caught.value.details()
    got = guarded.ModelInfer(gradient, metadata=as_token("all"), timeout=300)
    assert list(got.outputs[0].shape) == [1, 3, 224, 224]


def test_a_result_over_the_unary_cap_names_the_stream(guarded):
    request = infer_request([image_input(SMALL)], ["grad/fc7/W"], target_class=1)
    message = refused(
        guarded.ModelInfer,
        request,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "USE_STREAM_GRADIENTS",
        "StreamGradients",
        "1048576",
        metadata=as_token("all"),
    )
    assert "layergrad.v1" in message


def test_a_model_taking_any_size_above_a_minimum_says_so():
    """Adapters with a minimum input size (the ResNets) take FP32 batches of any larger height and
    width: metadata gives -1 for them, and a smaller batch is refused naming the minimum."""
    from layergrad_server.errors import InvalidArgument
    from layergrad_server.kserve_v2 import convert
    from layergrad_server.models.base import InputSpec

    spec = InputSpec((3, 224, 224), min_size=(32, 32))
    assert convert.prepared_shape(spec) == [3, -1, -1]
    assert convert.prepared_shape(InputSpec((3, 224, 224))) == [3, 224, 224]
    names = convert.ModelNames(layers=("prob",), parameters=())

    def call(shape: list[int]) -> convert.V1Call:
        data = np.zeros(shape, "<f4").tobytes()
        request = infer_request([(Input(name="input", datatype="FP32", shape=shape), data)], ["prob"])
        return convert.to_v1(request, names, spec, "prob", "prob")

    assert len(call([2, 3, 40, 50]).request.inputs) == 2
    assert not call([1, 3, 40, 50]).request.exact
    for value in (True, "TRUE"):
        data = np.zeros([1, 3, 40, 50], "<f4").tobytes()
        tensor = Input(name="input", datatype="FP32", shape=[1, 3, 40, 50])
        for outputs in (["prob"], ["grad/input"]):
            exact = infer_request([(tensor, data)], outputs, exact=value, target_class=1)
            if outputs == ["prob"]:
                del exact.parameters["target_class"]
            assert convert.to_v1(exact, names, spec, "prob", "prob").request.exact
    with pytest.raises(InvalidArgument) as caught:
        call([1, 3, 16, 50])
    assert "H >= 32 and W >= 32" in caught.value.message and caught.value.reason == "BAD_SHAPE"
