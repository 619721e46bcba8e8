"""Dynamic batching (``--batch-delay-ms``): concurrent callers computed as one batch each get
their own results.

One real server holds a small user Chain (``tiny``), VGG16 on seeded random weights, and a
``gate`` model whose forward pass waits while a file exists. A call to the gate holds the
server's only compute slot; callers started meanwhile wait in one open batch, and the test
watches ``layergrad_batch_waiting`` until every one has joined before it opens the gate. So
which calls share a batch is decided by the test, never by timing, and the batch counters
say exactly how many batches were computed.

Each caller's rows are bit-identical to the same Chainer code run here in-process on the
merged batch (the callers' inputs concatenated, one loss whose gradient on each caller's rows is
its own loss's). Against the caller's own call (``exact``, computed alone): forward outputs and
loss values agree within float32 rounding; gradients within FLIP_L2, because where rounding
moves a ReLU or max-pooling input across its tie, the backward pass takes the other branch
(Chainer's own batches of another size differ from batch 1 in the same way).
"""

from __future__ import annotations

import contextlib
import pathlib
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import chainer
import chainer.functions as F  # noqa: N812
import grpc
import layergrad
import numpy as np
import pytest
from conftest import metrics_url, scrape, serving
from layergrad import ClassScore, SoftmaxCrossEntropy, SquaredError, SumOfSquares, UpstreamGradient
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._gen.layergrad.v1 import gradient_service_pb2_grpc as pb_grpc
from layergrad.client import GradientResult, _gradients_request
from layergrad.losses import Loss
from layergrad_server import config as server_config
from layergrad_server.models import vision

SHAPE = (3, 16, 16)
# A merged forward output is within this share of the largest magnitude of the caller's own
# (exact) output: float32 rounding of products of another shape.
RTOL = 1e-5
# A merged gradient's L2 distance to the caller's own, as a share of the latter's norm.
FLIP_L2 = 0.05

NET_CODE = '''
import os
import time

import chainer
import chainer.functions as F
import chainer.links as L

HOLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hold")


class SmallNet(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(3, 8, 3, pad=1)
            self.conv2 = L.Convolution2D(8, 8, 3, pad=1)
            self.fc = L.Linear(8 * 4 * 4, 10)

    def forward(self, x, layers=("prob",)):
        out = {}
        h = out["block1"] = F.relu(self.conv1(x))
        h = out["block2"] = F.relu(self.conv2(h))
        h = F.average_pooling_2d(h, 4)
        h = out["fc"] = self.fc(h)
        out["prob"] = F.softmax(h)
        return {name: out[name] for name in layers}


class GateNet(SmallNet):
    """Computes only once the hold file is gone (a call that holds the compute slot)."""

    def forward(self, x, layers=("prob",)):
        deadline = time.monotonic() + 900
        while os.path.exists(HOLD) and time.monotonic() < deadline:
            time.sleep(0.02)
        return super().forward(x, layers)


def small():
    return SmallNet()


def gate():
    return GateNet()
'''

MODEL_YAML = """\
architecture: chain
python_path: ../../code
factory: nets:{factory}
input:
  shape: [3, 16, 16]
  channel_order: BGR
  mean: [0.0, 0.0, 0.0]
layers: [block1, block2, fc, prob]
logits: fc
probability: prob
"""


def small_net() -> chainer.Chain:
    namespace: dict[str, object] = {"__file__": "nets.py"}
    exec(compile(textwrap.dedent(NET_CODE), "nets", "exec"), namespace)
    net = namespace["SmallNet"]()
    rng = np.random.default_rng(21)
    for _, param in sorted(net.namedparams()):
        param.array[...] = rng.standard_normal(param.shape).astype(np.float32) * 0.2
    return net


def objective(loss: Loss, out: dict[str, chainer.Variable], weights: np.ndarray | None = None):
    """The loss as the server computes it; ``weights``: a merged cross entropy's row weights."""
    if isinstance(loss, SumOfSquares):
        return F.sum(F.square(out[loss.layer]))
    if isinstance(loss, SquaredError):
        y = out[loss.layer]
        if loss.target is not None:
            target = loss.target
        else:
            target = np.zeros(y.shape, y.dtype)
            target[np.arange(y.shape[0]), list(loss.target_classes)] = 1
        return F.sum(F.square(y - target))
    if isinstance(loss, ClassScore):
        return F.sum(F.select_item(out[loss.layer], np.array(loss.classes, np.int32)))
    assert isinstance(loss, SoftmaxCrossEntropy)
    labels = np.array(loss.labels, np.int32)
    if weights is None:
        return F.softmax_cross_entropy(out["fc"], labels)
    return F.sum(F.softmax_cross_entropy(out["fc"], labels, reduce="no") * weights)


def merged_loss(losses: list[Loss], sizes: list[int]) -> tuple[Loss, np.ndarray | None]:
    """One loss over the concatenated rows, as the server merges them (and the row weights)."""
    first = losses[0]
    if isinstance(first, SumOfSquares):
        return first, None
    if isinstance(first, SoftmaxCrossEntropy):
        weights = np.concatenate([np.full(n, 1.0 / n, np.float32) for n in sizes])
        return SoftmaxCrossEntropy([c for loss in losses for c in loss.labels]), weights
    if isinstance(first, ClassScore):
        return ClassScore(first.layer, [c for loss in losses for c in loss.classes]), None
    if isinstance(first, UpstreamGradient):
        return UpstreamGradient(first.layer, np.concatenate([loss.gradient for loss in losses])), None
    if first.target is not None:
        return SquaredError(first.layer, target=np.concatenate([loss.target for loss in losses])), None
    return SquaredError(first.layer, target_classes=[c for loss in losses for c in loss.target_classes]), None


def in_process_merged(
    net: chainer.Chain,
    asks: list[tuple[np.ndarray, Loss]],
    layers: tuple[str, ...] = (),
    activations: tuple[str, ...] = (),
) -> list[GradientResult]:
    """Each caller's rows of ``chainer.grad`` over the merged batch, and its own loss value."""
    sizes = [len(x) for x, _ in asks]
    loss, weights = merged_loss([loss for _, loss in asks], sizes)
    with chainer.using_config("train", False):
        variable = chainer.Variable(np.concatenate([x for x, _ in asks]))
        loss_layer = getattr(loss, "layer", "fc")
        out = net.forward(variable, sorted({*layers, *activations, loss_layer}))
        targets = [variable, *(out[layer] for layer in layers)]
        if isinstance(loss, UpstreamGradient):
            grads = chainer.grad([out[loss.layer]], targets, [loss.gradient])
        else:
            grads = chainer.grad([objective(loss, out, weights)], targets)
    results, start = [], 0
    for (_, own), size in zip(asks, sizes, strict=True):
        rows = slice(start, start + size)
        start += size
        value = None
        if not isinstance(own, UpstreamGradient):
            with chainer.using_config("train", False), chainer.no_backprop_mode():
                value = float(
                    objective(own, {loss_layer: chainer.Variable(out[loss_layer].array[rows])}).array
                )
        results.append(
            GradientResult(
                input=grads[0].array[rows],
                layers={name: g.array[rows] for name, g in zip(layers, grads[1:], strict=True)},
                activations={name: out[name].array[rows] for name in activations},
                loss=value,
            )
        )
    return results


class Server:
    def __init__(self, process, root: pathlib.Path) -> None:
        self.process = process
        self.hold = root / "code" / "hold"
        self.url = metrics_url(process)
        self.client = layergrad.Client(process.address, timeout=600)
        self.pool = ThreadPoolExecutor(16)

    def metric(self, name: str) -> float:
        return scrape(self.url).get((name, frozenset()), 0.0)

    def wait_metric(self, name: str, value: float) -> None:
        """Waits (for a state, not a time) until the metric reads ``value``."""
        give_up = time.monotonic() + 600
        while (got := self.metric(name)) != value:
            assert time.monotonic() < give_up, f"{name} stayed {got}, not {value}"
            time.sleep(0.02)

    @contextlib.contextmanager
    def gate_held(self) -> Iterator[None]:
        """The compute slot held by a call to the gate model for the block."""
        self.hold.touch()
        gate = self.pool.submit(
            self.client.predict, np.zeros((1, *SHAPE), np.float32), model="gate", exact=True
        )
        try:
            self.wait_metric("layergrad_calls_computing", 1)
            self.wait_metric("layergrad_batch_waiting", 0)
            yield
        finally:
            self.hold.unlink()
            gate.result(timeout=600)

    def joined(self, calls: list[Callable[[], object]], waiting: int | None = None) -> list[Future]:
        """Starts each call in turn once the one before has joined a batch (so the first leads)."""
        futures = []
        start = self.metric("layergrad_batch_waiting")
        for number, call in enumerate(calls, 1):
            futures.append(self.pool.submit(call))
            if waiting is None:
                self.wait_metric("layergrad_batch_waiting", start + number)
        if waiting is not None:
            self.wait_metric("layergrad_batch_waiting", start + waiting)
        return futures

    def batches(self) -> tuple[float, float]:
        sample = scrape(self.url)
        return (
            sample.get(("layergrad_batches_total", frozenset()), 0.0),
            sample.get(("layergrad_batched_calls_total", frozenset()), 0.0),
        )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("batching-repo")
    (root / "code").mkdir()
    (root / "code" / "nets.py").write_text(textwrap.dedent(NET_CODE))
    for name, factory in (("tiny", "small"), ("gate", "gate")):
        directory = root / "models" / name
        (directory / "1").mkdir(parents=True)
        (directory / "model.yaml").write_text(MODEL_YAML.format(factory=factory))
        chainer.serializers.save_npz(str(directory / "1" / "weights.npz"), small_net())
    args = [
        "--model-repository",
        str(root / "models"),
        "--model=vgg16=random:0",
        "--batch-delay-ms",
        "20",
        "--max-batch-size",
        "8",
        "--max-queue",
        "16",
        "--metrics-address",
        "127.0.0.1:0",
    ]
    with serving(args, tmp_path_factory.mktemp("batching")) as process:
        server = Server(process, root)
        try:
            for model in ("tiny", "gate", "vgg16"):
                server.client.model_info(model=model, wait_for_ready=True)
            yield server
        finally:
            server.pool.shutdown(wait=False, cancel_futures=True)
            server.client.close()


def inputs(batch: int, seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, *shape)) * 10).astype(np.float32)


def near(got: GradientResult, alone: GradientResult) -> None:
    """A merged result against the caller's own: the same tensors, gradients within FLIP_L2,
    forward outputs and the loss within float32 rounding."""
    assert sorted(got.as_dict()) == sorted(alone.as_dict())
    for name, own in alone.as_dict().items():
        merged = got.as_dict()[name]
        assert merged.shape == own.shape, name
        if name.startswith("activation/"):
            scale = float(np.abs(own).max())
            np.testing.assert_allclose(merged, own, rtol=0, atol=RTOL * scale, err_msg=name)
        else:
            share = np.linalg.norm(merged - own) / np.linalg.norm(own)
            assert share <= FLIP_L2, (name, share)
    if alone.loss is None:
        assert got.loss is None
    else:
        assert got.loss == pytest.approx(alone.loss, rel=RTOL, abs=1e-6)


def same(got: GradientResult, want: GradientResult) -> None:
    assert sorted(got.as_dict()) == sorted(want.as_dict())
    for name, expected in want.as_dict().items():
        np.testing.assert_array_equal(got.as_dict()[name], expected, err_msg=name)
    assert got.loss == want.loss


SIZES = (1, 2, 1)  # uneven: a batch mean is weighed per caller


def losses(kind: str, seed: int, batch: int) -> Loss:
    rng = np.random.default_rng(seed)
    if kind == "sum-of-squares":
        return SumOfSquares("block2")
    if kind == "squared-error":
        return SquaredError("fc", target=rng.standard_normal((batch, 10)).astype(np.float32))
    if kind == "squared-error-classes":
        return SquaredError("prob", target_classes=rng.integers(0, 10, batch).tolist())
    if kind == "class-score":
        return ClassScore("fc", classes=rng.integers(0, 10, batch).tolist())
    if kind == "cross-entropy":
        return SoftmaxCrossEntropy(labels=rng.integers(0, 10, batch).tolist())
    assert kind == "upstream"
    return UpstreamGradient("block2", rng.standard_normal((batch, 8, 16, 16)).astype(np.float32))


KINDS = (
    "sum-of-squares",
    "squared-error",
    "squared-error-classes",
    "class-score",
    "cross-entropy",
    "upstream",
)


@pytest.mark.parametrize("kind", KINDS)
def test_callers_merged_into_one_batch_each_get_their_own_gradients(served: Server, kind: str) -> None:
    client = served.client
    asks = [(inputs(size, seed), losses(kind, seed, size)) for seed, size in enumerate(SIZES, 10)]
    wanted = dict(input=True, layers=["block1"], activations=["fc"], model="tiny")
    with served.gate_held():
        before = served.batches()
        futures = served.joined(
            [lambda x=x, loss=loss: client.gradients(x, loss, **wanted) for x, loss in asks]
        )
    merged = [future.result(timeout=600) for future in futures]
    after = served.batches()
    assert (after[0] - before[0], after[1] - before[1]) == (1, len(asks)), "one batch of every caller"
    references = in_process_merged(small_net(), asks, ("block1",), ("fc",))
    for (x, loss), got, reference in zip(asks, merged, references, strict=True):
        assert got.input.shape == x.shape
        same(got, reference)
        near(got, client.gradients(x, loss, exact=True, **wanted))


def test_merged_rows_of_vgg16_equal_each_callers_own_call_within_the_tolerance(served: Server) -> None:
    client = served.client
    asks = [(inputs(1, seed, (3, 224, 224)), ClassScore("fc8", [seed * 7])) for seed in (1, 2, 3)]
    with served.gate_held():
        before = served.batches()
        futures = served.joined(
            [lambda x=x, loss=loss: client.gradients(x, loss, input=True, model="vgg16") for x, loss in asks]
        )
    merged = [future.result(timeout=600) for future in futures]
    after = served.batches()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)
    references = in_process_merged(vision.VGG16().random(0), asks)
    for (x, loss), got, reference in zip(asks, merged, references, strict=True):
        same(got, reference)
        near(got, client.gradients(x, loss, input=True, model="vgg16", exact=True))


def test_merged_predictions_are_each_callers_own(served: Server) -> None:
    client = served.client
    batches = [inputs(size, seed) for seed, size in enumerate(SIZES, 30)]
    with served.gate_held():
        before = served.batches()
        futures = served.joined(
            [lambda x=x: client.predict(x, ["block1", "prob"], model="tiny") for x in batches]
        )
    merged = [future.result(timeout=600) for future in futures]
    after = served.batches()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)
    for x, got in zip(batches, merged, strict=True):
        alone = client.predict(x, ["block1", "prob"], model="tiny", exact=True)
        for layer in ("block1", "prob"):
            scale = float(np.abs(alone[layer]).max())
            np.testing.assert_allclose(got[layer], alone[layer], rtol=0, atol=RTOL * scale)


def test_only_calls_asking_for_the_same_tensors_share_a_batch(served: Server) -> None:
    client = served.client
    x = [inputs(1, seed) for seed in range(40, 45)]
    calls = [
        lambda: client.gradients(x[0], ClassScore("fc", [1]), input=True, model="tiny"),
        lambda: client.gradients(x[1], ClassScore("fc", [2]), input=True, model="tiny"),
        lambda: client.gradients(x[2], SumOfSquares("fc"), input=True, model="tiny"),
        lambda: client.gradients(x[3], ClassScore("fc", [3]), layers=["block1"], model="tiny"),
        lambda: client.gradients(x[4], ClassScore("fc", [4]), input=True, dtype="bfloat16", model="tiny"),
    ]
    with served.gate_held():
        before = served.batches()
        futures = served.joined(calls)
    results = [future.result(timeout=600) for future in futures]
    after = served.batches()
    assert (after[0] - before[0], after[1] - before[1]) == (4, 5), "the first two together, the rest alone"
    asks = [(x[index], ClassScore("fc", [index + 1])) for index in (0, 1)]
    for (one, loss), got, reference in zip(
        asks, results[:2], in_process_merged(small_net(), asks), strict=True
    ):
        same(got, reference)
        near(got, client.gradients(one, loss, input=True, model="tiny", exact=True))
    # Computed alone: exactly what the exact call returns.
    same(results[2], client.gradients(x[2], SumOfSquares("fc"), input=True, model="tiny", exact=True))
    same(
        results[3], client.gradients(x[3], ClassScore("fc", [3]), layers=["block1"], model="tiny", exact=True)
    )


def test_parameter_gradients_are_never_merged(served: Server) -> None:
    client = served.client
    asks = [(inputs(1, seed), ClassScore("fc", [seed % 10])) for seed in (50, 51)]
    wanted = dict(input=True, parameters=["fc/W", "conv1/b"], model="tiny")
    with served.gate_held():
        before = served.batches()
        futures = [served.pool.submit(client.gradients, x, loss, **wanted) for x, loss in asks]
        served.wait_metric("layergrad_queue_depth", 2)  # both wait for a slot of their own
        assert served.metric("layergrad_batch_waiting") == 0
    results = [future.result(timeout=600) for future in futures]
    assert served.batches() == before
    for (x, loss), got in zip(asks, results, strict=True):
        same(got, client.gradients(x, loss, exact=True, **wanted))


def test_an_exact_call_is_computed_alone_bit_identical_to_chainer_in_process(served: Server) -> None:
    client = served.client
    x = inputs(2, 60)
    with served.gate_held():
        before = served.batches()
        merged = served.joined(
            [lambda: client.gradients(inputs(1, 61), ClassScore("fc", [1]), input=True, model="tiny")]
        )
        exact = served.pool.submit(
            client.gradients,
            x,
            ClassScore("fc", [3, 8]),
            input=True,
            layers=["block1"],
            model="tiny",
            exact=True,
        )
        served.wait_metric("layergrad_queue_depth", 2)  # the batch's leader and the exact call
    got = exact.result(timeout=600)
    merged[0].result(timeout=600)
    after = served.batches()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)

    net = small_net()
    with chainer.using_config("train", False):
        variable = chainer.Variable(x.copy())
        out = net.forward(variable, ["block1", "fc"])
        loss = F.sum(F.select_item(out["fc"], np.array([3, 8], np.int32)))
        gx, gblock1 = chainer.grad([loss], [variable, out["block1"]])
    np.testing.assert_array_equal(got.input, gx.array)
    np.testing.assert_array_equal(got.layers["block1"], gblock1.array)
    assert got.loss == float(loss.array)


def _future(client: layergrad.Client, stub: pb_grpc.GradientServiceStub, seed: int) -> grpc.Future:
    request = _gradients_request(
        pb.ComputeGradientsRequest,
        inputs(1, seed),
        ClassScore("fc", [seed % 10]),
        "grad",
        None,
        None,
        True,
        (),
        "float32",
        "tiny",
    )
    return stub.ComputeGradients.future(request, timeout=600)


def test_callers_who_leave_an_open_batch_leave_the_others_their_results(served: Server) -> None:
    client = served.client
    with grpc.insecure_channel(served.process.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        with served.gate_held():
            before = served.batches()
            calls: list[grpc.Future] = []
            for number, seed in enumerate(range(70, 74), 1):
                calls.append(_future(client, stub, seed))
                served.wait_metric("layergrad_batch_waiting", number)
            calls[0].cancel()  # the leader, waiting for the slot: the next caller leads
            calls[2].cancel()  # a follower
            served.wait_metric("layergrad_batch_waiting", 2)
        for call in (calls[0], calls[2]):
            assert call.cancelled()
        answers = {seed: calls[index].result(timeout=600) for index, seed in ((1, 71), (3, 73))}
    after = served.batches()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)
    asks = [(inputs(1, seed), ClassScore("fc", [seed % 10])) for seed in answers]
    for (x, loss), answer, reference in zip(
        asks, answers.values(), in_process_merged(small_net(), asks), strict=True
    ):
        (tensor,) = answer.gradients
        assert tensor.name == "input"
        got = GradientResult(
            input=np.frombuffer(tensor.tensor.data, "<f4").reshape(x.shape), loss=answer.loss
        )
        same(got, reference)
        near(got, client.gradients(x, loss, input=True, model="tiny", exact=True))
    # The server goes on serving with batching.
    assert client.predict(inputs(1, 80), model="tiny")["prob"].shape == (1, 10)


@pytest.mark.parametrize("value", ["-1", "1001", "nan"])
def test_batch_delay_outside_its_range_is_refused(value: str) -> None:
    with pytest.raises(SystemExit, match="--batch-delay-ms"):
        server_config.from_args(server_config.build_parser().parse_args(["--batch-delay-ms", value]))
