"""Every pattern x every loss x every input kind through the real server and SDK equals the
same Chainer code run in-process on the same weights and input."""

from __future__ import annotations

import io
import threading

import chainer
import chainer.functions as F  # noqa: N812
import layergrad
import numpy as np
import pytest
from conftest import encode, make_rgb, prepared_reference
from layergrad_server import precision
from PIL import Image

PARAMS = ["conv1_1/W", "conv5_3/b", "fc7/W", "fc8/W"]
PATTERNS = ["backward", "backward_retain_grad", "grad"]
INPUT_KINDS = ["jpeg", "png", "rgb_uint8", "prepared"]
LOSSES = [
    "sum_of_squares",
    "squared_error_one_hot",
    "squared_error_tensor",
    "cross_entropy",
    "class_score",
    "upstream",
]
LOSS_LAYER = {
    "sum_of_squares": "prob",
    "squared_error_one_hot": "prob",
    "squared_error_tensor": "conv5_3",
    "cross_entropy": "fc8",
    "class_score": "fc8",
    "upstream": "pool4",
}
CLASS = 7


def make_input(kind: str, seed: int = 3) -> object:
    rgb = make_rgb(seed)
    if kind == "jpeg":
        return encode(rgb, "JPEG")
    if kind == "png":
        return encode(rgb, "PNG")
    if kind == "rgb_uint8":
        return rgb
    return prepared_reference(encode(rgb, "PNG")) * np.float32(0.9)


def sdk_loss(name: str) -> object:
    rng = np.random.default_rng(11)
    if name == "sum_of_squares":
        return layergrad.SumOfSquares("prob")
    if name == "squared_error_one_hot":
        return layergrad.SquaredError("prob", target_classes=[CLASS])
    if name == "squared_error_tensor":
        return layergrad.SquaredError(
            "conv5_3", target=rng.standard_normal((1, 512, 14, 14)).astype(np.float32)
        )
    if name == "cross_entropy":
        return layergrad.SoftmaxCrossEntropy([CLASS])
    if name == "class_score":
        return layergrad.ClassScore("fc8", [CLASS])
    return layergrad.UpstreamGradient("pool4", rng.standard_normal((1, 512, 14, 14)).astype(np.float32))


def chainer_objective(name: str, acts: dict, loss: object) -> tuple:
    """(variable to backpropagate from, its upstream gradient) written as plain Chainer code."""
    if name == "sum_of_squares":
        return F.sum(F.square(acts["prob"])), None
    if name == "squared_error_one_hot":
        one_hot = np.zeros((1, 1000), dtype=np.float32)
        one_hot[0, CLASS] = 1
        return F.sum(F.square(acts["prob"] - one_hot)), None
    if name == "squared_error_tensor":
        return F.sum(F.square(acts["conv5_3"] - loss.target)), None
    if name == "cross_entropy":
        return F.softmax_cross_entropy(acts["fc8"], np.array([CLASS], dtype=np.int32)), None
    if name == "class_score":
        return F.sum(acts["fc8"][:, CLASS]), None
    return acts["pool4"], loss.gradient


def reference(net, x: np.ndarray, loss_name: str, loss: object, pattern: str, layers: list[str]) -> dict:
    """The gradients the same request gets from Chainer in-process."""
    x = chainer.Variable(x[None])
    with chainer.using_config("train", False):
        acts = net(x, layers=[LOSS_LAYER[loss_name], *layers])
        root, upstream = chainer_objective(loss_name, acts, loss)
        named = dict(net.namedparams())
        params = {name: named["/" + name] for name in PARAMS}
        out = {}
        if pattern == "grad":
            targets = [x] + [acts[n] for n in layers] + list(params.values())
            grads = chainer.grad([root], targets, grad_outputs=None if upstream is None else [upstream])
            names = ["input", *layers, *params]
            # chainer.grad hands back the upstream array itself for the root variable.
            out = {n: getattr(g, "array", g) for n, g in zip(names, grads, strict=True)}
        else:
            net.cleargrads()
            if upstream is not None:
                root.grad = upstream
            root.backward(retain_grad=pattern == "backward_retain_grad")
            out = {
                "input": x.grad,
                **{n: acts[n].grad for n in layers},
                **{n: p.grad for n, p in params.items()},
            }
            net.cleargrads()
        loss_value = None if upstream is not None else float(root.array)
    zero_like = {n: p.array for n, p in params.items()}
    out = {n: (np.zeros_like(zero_like[n]) if g is None else g) for n, g in out.items()}
    return {"grads": out, "loss": loss_value}


def assert_same(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    assert actual.shape == expected.shape, name
    assert actual.dtype == np.float32, name
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=0, err_msg=name)


@pytest.mark.parametrize("input_kind", INPUT_KINDS)
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_service_gradients_equal_in_process_chainer(client, reference_net, pattern, loss_name, input_kind):
    item = make_input(input_kind)
    loss = sdk_loss(loss_name)
    layers = [] if pattern == "backward" else ["conv1_2", LOSS_LAYER[loss_name]]
    result = client.gradients(
        [item], loss, pattern=pattern, parameters=PARAMS, layers=layers or None, input=True
    )
    expected = reference(reference_net, prepared_reference(item), loss_name, loss, pattern, layers)

    assert_same(result.input, expected["grads"]["input"], "input")
    assert sorted(result.layers) == sorted(layers)
    for name in layers:
        assert_same(result.layers[name], expected["grads"][name], name)
    assert list(result.parameters) == PARAMS
    for name in PARAMS:
        assert_same(result.parameters[name], expected["grads"][name], name)
    if expected["loss"] is None:
        assert result.loss is None
    else:
        assert result.loss == pytest.approx(expected["loss"], rel=1e-6)
    assert np.abs(result.input).max() > 0


def test_three_patterns_agree_where_they_overlap(client):
    item = make_input("png", seed=5)
    loss = layergrad.ClassScore("fc8", [3])
    results = {
        p: client.gradients(
            [item],
            loss,
            pattern=p,
            parameters=PARAMS,
            input=True,
            layers=None if p == "backward" else ["conv4_3", "fc7"],
        )
        for p in PATTERNS
    }
    for pattern in ("backward_retain_grad", "grad"):
        np.testing.assert_array_equal(results[pattern].input, results["backward"].input)
        for name in PARAMS:
            np.testing.assert_array_equal(
                results[pattern].parameters[name], results["backward"].parameters[name]
            )
    for name in ("conv4_3", "fc7"):
        np.testing.assert_array_equal(
            results["grad"].layers[name], results["backward_retain_grad"].layers[name]
        )


def test_input_gradient_matches_finite_differences(client, reference_net):
    """Central differences of the float64 network at several coordinates of the prepared input.

    The float32 and float64 networks may pick different max-pool winners where two
    values nearly tie, so agreement is checked to 2%, not to rounding error; exact
    equality with Chainer is proven by the other tests.
    """
    x = prepared_reference(encode(make_rgb(21), "PNG"))
    grad = client.input_gradient([x], layergrad.ClassScore("fc8", [5]))[0]

    net64 = reference_net.copy(mode="copy")
    for param in net64.params():
        param.array = param.array.astype(np.float64)

    def score(image: np.ndarray) -> float:
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            return float(net64(image[None], layers=["fc8"])["fc8"].array[0, 5])

    rng = np.random.default_rng(0)
    flat_order = np.argsort(-np.abs(grad).ravel())
    coordinates = [np.unravel_index(i, grad.shape) for i in flat_order[:3]]
    coordinates += [tuple(int(rng.integers(0, s)) for s in grad.shape) for _ in range(3)]
    base = x.astype(np.float64)
    eps = 1e-3
    for coordinate in coordinates:
        plus, minus = base.copy(), base.copy()
        plus[coordinate] += eps
        minus[coordinate] -= eps
        numeric = (score(plus) - score(minus)) / (2 * eps)
        assert grad[coordinate] == pytest.approx(numeric, rel=2e-2, abs=1e-6), coordinate


def test_all_parameter_gradients_stream_in_one_call_and_match(client, reference_net):
    item = make_input("jpeg", seed=9)
    loss = layergrad.SoftmaxCrossEntropy([42])
    grads = client.parameter_gradients([item], loss, parameters="all")
    total = sum(g.nbytes for g in grads.values())
    assert total > 550_000_000
    names = list(grads)
    assert len(names) == 32 and names[0] == "conv1_1/W" and names[-1] == "fc8/b"

    x = chainer.Variable(prepared_reference(item)[None])
    with chainer.using_config("train", False):
        loss_var = F.softmax_cross_entropy(
            reference_net(x, layers=["fc8"])["fc8"], np.array([42], dtype=np.int32)
        )
    reference_net.cleargrads()
    loss_var.backward()
    try:
        for name, param in sorted(reference_net.namedparams()):
            assert_same(grads[name.lstrip("/")], param.grad, name)
    finally:
        reference_net.cleargrads()


def test_float16_output_rounds_float32_after_a_power_of_two_scale(client):
    """float16 on the wire; the SDK hands back float32 with the server's scale undone (the
    conversions themselves are proven in test_precision)."""
    item = make_input("png", seed=4)
    loss = layergrad.SumOfSquares("fc7")
    full = client.gradients([item], loss, pattern="grad", layers=["conv5_3"], input=True)
    half = client.gradients([item], loss, pattern="grad", layers=["conv5_3"], input=True, dtype="float16")
    for got, want in ((half.input, full.input), (half.layers["conv5_3"], full.layers["conv5_3"])):
        encoded = precision.encode(want, precision.FLOAT16, scaling=True)
        assert got.dtype == np.float32 and encoded.underflow == encoded.overflow == 0
        np.testing.assert_array_equal(got, precision.decode(encoded.data, encoded.exponent))


def test_batch_of_mixed_input_kinds_equals_chainer_on_the_same_batch(client, reference_net):
    # Against Chainer on the same batch, not each item alone: a batch's matrix products round
    # differently, and where that moves a ReLU or max-pool input across its tie the gradient
    # takes the other branch (elements off by far more than rounding, on some machines' BLAS).
    items = [make_input(kind, seed=30 + i) for i, kind in enumerate(INPUT_KINDS)]
    loss = layergrad.ClassScore("prob", [1, 2, 3, 4])
    batch = client.input_gradient(items, loss)
    assert batch.shape == (4, 3, 224, 224)
    x = chainer.Variable(np.stack([prepared_reference(item) for item in items]))
    with chainer.using_config("train", False):
        prob = reference_net(x, layers=["prob"])["prob"]
        (expected,) = chainer.grad([F.sum(F.select_item(prob, np.array([1, 2, 3, 4], np.int32)))], [x])
    assert_same(batch, expected.array, "input")


def test_two_concurrent_clients_each_get_their_own_serial_gradients(server):
    items = [make_input("png", seed=50), make_input("jpeg", seed=51)]
    loss = layergrad.SumOfSquares("fc8")
    with layergrad.Client(server.address, timeout=300) as sdk:
        serial = [
            sdk.gradients([item], loss, pattern="backward", parameters=["fc8/W"], input=True)
            for item in items
        ]
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def call(index: int) -> None:
        try:
            with layergrad.Client(server.address, timeout=300) as own:
                for _ in range(2):
                    results.setdefault(index, []).append(
                        own.gradients(
                            [items[index]], loss, pattern="backward", parameters=["fc8/W"], input=True
                        )
                    )
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index in range(2):
        for result in results[index]:
            np.testing.assert_array_equal(result.input, serial[index].input)
            np.testing.assert_array_equal(result.parameters["fc8/W"], serial[index].parameters["fc8/W"])
    assert not np.array_equal(serial[0].input, serial[1].input)


def test_predict_equals_chainer_extract(client, reference_net):
    item = make_input("png", seed=8)
    acts = client.predict([item], layers=["prob", "fc7"])
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        expected = reference_net.extract(
            [Image.open(io.BytesIO(item)).convert("RGB")], layers=["prob", "fc7"]
        )
    np.testing.assert_allclose(acts["prob"], expected["prob"].array, rtol=1e-6, atol=0)
    np.testing.assert_allclose(acts["fc7"], expected["fc7"].array, rtol=1e-6, atol=0)
    assert acts["prob"].sum() == pytest.approx(1.0, rel=1e-5)

    top = client.top_classes([item, item], k=3)
    order = np.argsort(-expected["prob"].array[0])[:3]
    # The two rows of one batch are the same image, but a row's products may round differently
    # at another place in the batch: the same classes, probabilities within float32 rounding.
    for row in top:
        assert [t.index for t in row] == [int(c) for c in order]
        want = [float(expected["prob"].array[0, c]) for c in order]
        assert [t.probability for t in row] == pytest.approx(want, rel=1e-5)
