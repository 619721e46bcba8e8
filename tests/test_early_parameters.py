"""StreamGradients with ``parameters_when_ready``: parameter gradients sent while the backward runs.

Against real servers: the tensors' bytes must be exactly those of the same call without the
flag, for every pattern and output type; only the order of the tensors changes (parameters
first, as the backward pass finishes them), each message carries its tensor's documented
position, and the SDK puts the tensors back in that order. A parameter used twice (shared
weights) or not reached by the backward pass comes with the other tensors.
"""

from __future__ import annotations

import pathlib
import textwrap

import layergrad_server  # noqa: F401  (applies the numpy 2 shim Chainer needs)

# isort: split
import chainer
import chainer.functions as F  # noqa: N812
import grpc
import layergrad
import numpy as np
import pytest
from conftest import serving
from layergrad import ClassScore, SoftmaxCrossEntropy
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad_server.launch import ServerProcess

VGG_PARAMETER_ORDER_START = ["conv1_1/W", "conv1_1/b", "conv1_2/W"]


def prepared(batch: int = 1, seed: int = 3, shape: tuple[int, ...] = (3, 224, 224)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32) * 40


def request(
    x: np.ndarray, loss: pb.Loss, pattern: int, targets: pb.GradientTargets, **fields: object
) -> pb.StreamGradientsRequest:
    inputs = []
    for item in x:
        tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=item.shape, data=item.astype("<f4").tobytes())
        inputs.append(pb.Input(prepared=tensor))
    return pb.StreamGradientsRequest(inputs=inputs, loss=loss, pattern=pattern, targets=targets, **fields)


def streamed(address: str, message: pb.StreamGradientsRequest) -> list[pb.StreamGradientsResponse]:
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        return list(pb_grpc.GradientServiceStub(channel).StreamGradients(message, timeout=600))


def by_tensor(messages: list[pb.StreamGradientsResponse]) -> list[tuple[tuple[int, str], dict]]:
    """Each tensor of a stream in stream order: its key and header, data joined, positions seen."""
    tensors: list[tuple[tuple[int, str], dict]] = []
    for message in messages:
        key = (message.kind, message.name)
        if not tensors or tensors[-1][0] != key:
            assert key not in [k for k, _ in tensors], f"{key} sent twice"
            tensors.append((key, {"data": bytearray(), "positions": set(), "header": None}))
        entry = tensors[-1][1]
        header = (message.dtype, tuple(message.shape), message.scale_exponent)
        assert entry["header"] in (None, header)
        entry["header"] = header
        assert message.offset == len(entry["data"])
        entry["data"] += message.data
        entry["positions"].add(message.position)
    return tensors


def loss_of(messages: list[pb.StreamGradientsResponse]) -> float | None:
    assert not any(m.HasField("loss") for m in messages[1:]), "the loss goes on the first message only"
    return messages[0].loss if messages[0].HasField("loss") else None


def compare(address: str, message: pb.StreamGradientsRequest) -> tuple[list, list]:
    """The same request without and with the flag: same tensors, same bytes, same loss."""
    plain_messages = streamed(address, message)
    early_message = pb.StreamGradientsRequest()
    early_message.CopyFrom(message)
    early_message.parameters_when_ready = True
    early_messages = streamed(address, early_message)
    plain, early = by_tensor(plain_messages), by_tensor(early_messages)
    assert all(entry["positions"] == {0} for _, entry in plain), "no position without the flag"
    assert sorted(k for k, _ in early) == sorted(k for k, _ in plain)
    plain_by_key = dict(plain)
    for key, entry in early:
        assert entry["header"] == plain_by_key[key]["header"], key
        assert bytes(entry["data"]) == bytes(plain_by_key[key]["data"]), f"{key} bytes differ"
        (position,) = entry["positions"]
        assert plain[position][0] == key, f"{key} has position {position}"
    assert loss_of(early_messages) == loss_of(plain_messages)
    return plain, early


def class_score(cls: int = 7) -> pb.Loss:
    return pb.Loss(class_score=pb.ClassScore(layer="fc8", classes=[cls]))


@pytest.mark.parametrize(
    "pattern, layers",
    [
        (pb.BACKWARD_PATTERN_BACKWARD, []),
        (pb.BACKWARD_PATTERN_BACKWARD_RETAIN_GRAD, ["conv5_3", "fc7"]),
        (pb.BACKWARD_PATTERN_GRAD, ["conv1_2"]),
    ],
)
def test_every_pattern_sends_the_same_bytes_with_parameters_first(
    server: ServerProcess, pattern: int, layers: list[str]
) -> None:
    targets = pb.GradientTargets(input=True, all_parameters=True, layers=layers)
    message = request(prepared(), class_score(), pattern, targets, activation_layers=["fc7"])
    plain, early = compare(server.address, message)
    names = [key[1] for key, _ in early]
    kinds = [key[0] for key, _ in early]
    assert names[:4] == ["fc8/W", "fc8/b", "fc7/W", "fc7/b"], "the backward pass finishes fc8 first"
    parameters = [i for i, kind in enumerate(kinds) if kind == pb.TENSOR_KIND_PARAMETER_GRADIENT]
    assert parameters == list(range(32)), "every VGG16 parameter is used once: all come first"
    assert names[32:] == [key[1] for key, _ in plain if key[0] != pb.TENSOR_KIND_PARAMETER_GRADIENT]
    assert [key[1] for key, _ in plain][1 : 1 + len(layers)] == layers  # plan order without the flag


def test_parameters_the_loss_does_not_reach_come_with_the_rest(server: ServerProcess) -> None:
    loss = pb.Loss(sum_of_squares=pb.SumOfSquares(layer="conv1_2"))
    targets = pb.GradientTargets(parameters=["fc8/b", "conv1_2/b", "conv1_1/W"], input=True)
    _, early = compare(server.address, request(prepared(), loss, pb.BACKWARD_PATTERN_BACKWARD, targets))
    assert [key[1] for key, _ in early] == ["conv1_2/b", "conv1_1/W", "input", "fc8/b"]
    assert not any(early[-1][1]["data"]), "fc8/b is not reached: zeros"


def test_reduced_output_types_convert_each_tensor_as_without_the_flag(server: ServerProcess) -> None:
    targets = pb.GradientTargets(parameters=["fc8/W", "fc6/b", "conv1_1/W", "conv5_3/b"])
    for dtype in (pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16):
        message = request(
            prepared(seed=4),
            pb.Loss(sum_of_squares=pb.SumOfSquares(layer="prob")),
            pb.BACKWARD_PATTERN_BACKWARD,
            targets,
            output_dtype=dtype,
            float16_scaling=True,
        )
        _, early = compare(server.address, message)
        assert [key[1] for key, _ in early] == ["fc8/W", "fc6/b", "conv5_3/b", "conv1_1/W"]
        assert all(entry["header"][0] == dtype for _, entry in early)


def test_a_float16_refusal_after_early_tensors_names_the_tensor_and_counts(server: ServerProcess) -> None:
    """Unscaled float16: conv1_1/W's gradient of SumOfSquares(conv1_2) overflows; conv1_2/W's fits."""
    loss = pb.Loss(sum_of_squares=pb.SumOfSquares(layer="conv1_2"))
    targets = pb.GradientTargets(parameters=["conv1_1/W", "conv1_2/W"])
    message = request(
        prepared(seed=5),
        loss,
        pb.BACKWARD_PATTERN_BACKWARD,
        targets,
        output_dtype=pb.DATA_TYPE_FLOAT16,
        parameters_when_ready=True,
    )
    with grpc.insecure_channel(server.address) as channel:
        stream = pb_grpc.GradientServiceStub(channel).StreamGradients(message, timeout=600)
        received = []
        with pytest.raises(grpc.RpcError) as raised:
            for item in stream:
                received.append(item)
    error = raised.value
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE, error.details()
    assert "conv1_1/W" in error.details() and "would become infinite" in error.details()
    # conv1_2/W is finished first and fits float16 as it is: it was sent before the refusal.
    assert {m.name for m in received} == {"conv1_2/W"}
    assert "the stream stopped after 1 tensors" in error.details()


def test_the_sdk_returns_the_documented_order_and_equal_arrays(server: ServerProcess) -> None:
    x = prepared(seed=6)
    with layergrad.Client(server.address, timeout=600) as client:
        streamed_result = client.gradients(
            x, SoftmaxCrossEntropy([3]), pattern="backward", parameters="all", input=True
        )
        unary = client.compute_gradients_unary(
            x, SoftmaxCrossEntropy([3]), pattern="backward", parameters=["fc8/W", "conv3_1/b"], input=True
        )
        chosen = client.parameter_gradients(x, ClassScore("fc8", [3]), ["fc7/b", "conv1_1/b", "fc8/W"])
    assert list(streamed_result.parameters)[:3] == VGG_PARAMETER_ORDER_START
    assert len(streamed_result.parameters) == 32
    for name in ("fc8/W", "conv3_1/b"):
        np.testing.assert_array_equal(streamed_result.parameters[name], unary.parameters[name])
    np.testing.assert_array_equal(streamed_result.input, unary.input)
    assert list(chosen) == ["fc7/b", "conv1_1/b", "fc8/W"], "the request's order, as without the flag"


def test_a_caller_leaving_mid_stream_stops_the_call_and_the_server_goes_on(server: ServerProcess) -> None:
    targets = pb.GradientTargets(all_parameters=True, input=True)
    message = request(
        prepared(seed=8), class_score(), pb.BACKWARD_PATTERN_BACKWARD, targets, parameters_when_ready=True
    )
    with grpc.insecure_channel(server.address) as channel:
        stream = pb_grpc.GradientServiceStub(channel).StreamGradients(message, timeout=600)
        first = next(stream)
        assert first.name == "fc8/W"
        stream.cancel()
        with pytest.raises(grpc.RpcError) as raised:
            for _ in stream:
                pass
        assert raised.value.code() == grpc.StatusCode.CANCELLED
    with layergrad.Client(server.address, timeout=600) as client:
        grads = client.parameter_gradients(prepared(seed=8), ClassScore("fc8", [7]), ["fc8/b"])
    assert grads["fc8/b"].shape == (1000,)


# ---- a network that uses one parameter twice ----------------------------------------------------

SHARED_CODE = '''
import chainer
import chainer.functions as F
import chainer.links as L


class SharedNet(chainer.Chain):
    """A convolution, then one Linear applied twice (shared weights), then a classifier;
    ``spare`` is never called."""

    names = ("conv", "hidden", "again", "fc")

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(3, 4, 3, pad=1)
            self.shared = L.Linear(4 * 4 * 4, 64)
            self.back = L.Linear(64, 4 * 4 * 4)
            self.fc = L.Linear(64, 5)
            self.spare = L.Linear(5, 5)

    def forward(self, x, layers=("fc",)):
        out = {}
        h = out["conv"] = F.relu(self.conv(x))
        h = F.average_pooling_2d(h, 2)
        h = out["hidden"] = F.relu(self.shared(h))
        h = out["again"] = F.relu(self.shared(self.back(h)))
        out["fc"] = self.fc(h)
        return {name: out[name] for name in layers}


def build():
    return SharedNet()
'''

SHARED_YAML = """\
architecture: chain
python_path: ../../code
factory: sharednet:build
input:
  shape: [3, 8, 8]
  channel_order: BGR
  mean: [0.0, 0.0, 0.0]
layers: [conv, hidden, again, fc]
logits: fc
"""


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("shared-repo")
    (root / "code").mkdir()
    (root / "code" / "sharednet.py").write_text(textwrap.dedent(SHARED_CODE))
    directory = root / "models" / "shared"
    (directory / "1").mkdir(parents=True)
    (directory / "model.yaml").write_text(SHARED_YAML)
    net = build_shared(root)
    chainer.serializers.save_npz(str(directory / "1" / "weights.npz"), net)
    with serving(["--model-repository", str(root / "models")], tmp_path_factory.mktemp("shared")) as process:
        yield process, root


def build_shared(root: pathlib.Path) -> chainer.Chain:
    namespace: dict[str, object] = {}
    exec(compile(textwrap.dedent(SHARED_CODE), "sharednet", "exec"), namespace)  # the same class
    net = namespace["SharedNet"]()
    rng = np.random.default_rng(11)
    for _, param in sorted(net.namedparams()):
        param.array[...] = rng.standard_normal(param.shape).astype(np.float32) * 0.3
    return net


def test_a_shared_parameter_comes_after_the_early_ones_with_chainers_own_sum(shared_server) -> None:
    process, root = shared_server
    x = prepared(batch=2, seed=9, shape=(3, 8, 8))
    targets = pb.GradientTargets(all_parameters=True, input=True)
    loss = pb.Loss(class_score=pb.ClassScore(layer="fc", classes=[1, 4]))
    for pattern in (pb.BACKWARD_PATTERN_BACKWARD, pb.BACKWARD_PATTERN_GRAD):
        message = request(x, loss, pattern, targets, model="shared")
        plain, early = compare(process.address, message)
        names = [key[1] for key, _ in early]
        assert names[:6] == ["fc/W", "fc/b", "back/W", "back/b", "conv/W", "conv/b"], names
        # shared/* is used twice and spare/* not at all: they come with the rest, in plan order.
        assert names[6:] == ["input", "shared/W", "shared/b", "spare/W", "spare/b"]
        assert names[6:] == [key[1] for key, _ in plain if key[1] not in names[:6]]

    net = build_shared(root)
    with chainer.using_config("train", False):
        net.cleargrads()
        y = net.forward(chainer.Variable(x), ["fc"])["fc"]
        F.sum(F.select_item(y, np.array([1, 4], np.int32))).backward()
    with layergrad.Client(process.address, timeout=600, model="shared") as client:
        result = client.parameter_gradients(x, ClassScore("fc", [1, 4]), "all")
    assert list(result)[:2] == ["conv/W", "conv/b"]
    for name, param in net.namedparams():
        expected = param.grad if param.grad is not None else np.zeros_like(param.array)
        np.testing.assert_array_equal(result[name.lstrip("/")], expected, err_msg=name)
