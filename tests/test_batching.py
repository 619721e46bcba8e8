"""Batches larger than the server's limit, split by the SDK and joined, against one big call.

Two real servers on the same weights: the session's (``--max-batch-size`` 32) answers
each batch of 3 in one call; a second one, started with ``--max-batch-size 2``, gets
it from the SDK as 2 + 1 (an uneven split, so a batch mean must be weighted).

Forward outputs and loss values agree within float32 rounding. Gradients are compared by
their relative L2 distance: batches of other sizes round the matrix products differently, and
where that moves a ReLU or max-pool input across its tie the gradient takes the other branch,
so single elements can differ by far more than rounding (how often depends on the machine's
BLAS kernels). A wrong weight or a misplaced row is off by tens of percent.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import layergrad
import numpy as np
import pytest
from conftest import make_rgb, serving
from layergrad import _batching
from layergrad.client import GradientResult
from layergrad.losses import (
    ClassScore,
    Loss,
    SoftmaxCrossEntropy,
    SquaredError,
    SumOfSquares,
    UpstreamGradient,
)
from layergrad_server.launch import ServerProcess

BATCH = 3
SMALL_LIMIT = 2
# Each forward output of the joined result is within this share of its largest magnitude of one
# big call; each gradient within FLIP_L2 of it in relative L2 distance.
RTOL = 1e-4
FLIP_L2 = 0.05
RNG = np.random.default_rng(5)
LOSSES: dict[str, Loss] = {
    "sum-of-squares": SumOfSquares("prob"),
    "squared-error": SquaredError("fc7", target=RNG.standard_normal((BATCH, 4096)).astype(np.float32)),
    "class-score": ClassScore("fc8", classes=[281, 5, 999]),
    "cross-entropy": SoftmaxCrossEntropy(labels=[281, 5, 999]),
    "upstream": UpstreamGradient("conv5_3", RNG.standard_normal((BATCH, 512, 14, 14)).astype(np.float32)),
}


@pytest.fixture(scope="module")
def small_server(
    weights_file: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    args = ["--weights", str(weights_file), "--max-batch-size", str(SMALL_LIMIT)]
    with serving(args, tmp_path_factory.mktemp("small-batch")) as process:
        yield process


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [make_rgb(20 + i) for i in range(BATCH)]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = float(np.abs(want).max())
    return float(np.abs(got.astype(np.float64) - want).max()) / (scale or 1.0)


def relative_l2(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and got.dtype == want.dtype
    norm = float(np.linalg.norm(want.astype(np.float64)))
    return float(np.linalg.norm(got.astype(np.float64) - want)) / (norm or 1.0)


def assert_joined_equals(joined: GradientResult, big: GradientResult) -> float:
    """Asserts the activations agree within RTOL and the gradients within FLIP_L2; returns the
    largest gradient's relative L2 distance."""
    assert joined.as_dict().keys() == big.as_dict().keys()
    errors = {}
    for key, want in big.as_dict().items():
        got = joined.as_dict()[key]
        if key.startswith("activation/"):
            assert relative_error(got, want) <= RTOL, key
        else:
            errors[key] = relative_l2(got, want)
    if big.loss is None:
        assert joined.loss is None
    else:
        assert joined.loss == pytest.approx(big.loss, rel=RTOL)
    assert max(errors.values()) <= FLIP_L2, errors
    return max(errors.values())


@pytest.mark.parametrize("name", list(LOSSES))
def test_split_batch_equals_one_big_call(
    name: str, images: list[np.ndarray], client: layergrad.Client, small_server: ServerProcess
) -> None:
    loss = LOSSES[name]
    request = dict(
        pattern="backward_retain_grad",
        parameters=["conv1_1/W", "fc8/W", "fc8/b"],
        layers=["conv4_3"],
        input=True,
        activations=["pool4"],
    )
    big = client.gradients(images, loss, **request)
    steps: list[tuple[int, int]] = []
    with layergrad.Client(small_server.address, timeout=300) as small:
        joined = small.gradients(
            images, loss, **request, progress=lambda done, total: steps.append((done, total))
        )
    assert steps == [(2, BATCH), (BATCH, BATCH)]  # refused as too large, then sent as 2 + 1
    error = assert_joined_equals(joined, big)
    print(f"\n{name}: largest relative L2 distance {error:.2e} (loss {joined.loss} vs {big.loss})")
    assert joined.input is not None and joined.input.shape == (BATCH, 3, 224, 224)
    assert joined.parameters["fc8/W"].shape == (1000, 4096)


def test_split_predict_concatenates_layer_outputs(
    images: list[np.ndarray], client: layergrad.Client, small_server: ServerProcess
) -> None:
    big = client.predict(images, ["prob", "fc7"])
    with layergrad.Client(small_server.address, timeout=300) as small:
        small.model_info()  # the limit known ahead: no refused call
        joined = small.predict(images, ["prob", "fc7"])
    assert joined.keys() == big.keys()
    for layer in big:
        assert relative_error(joined[layer], big[layer]) <= RTOL


def test_splitting_can_be_turned_off(images: list[np.ndarray], small_server: ServerProcess) -> None:
    with layergrad.Client(small_server.address, timeout=300, split_batches=False) as small:
        with pytest.raises(layergrad.InvalidArgument) as refused:
            small.predict(images)
    assert refused.value.reason == "BATCH_TOO_LARGE"


def test_loss_without_one_entry_per_input_cannot_be_split(
    images: list[np.ndarray], small_server: ServerProcess
) -> None:
    with layergrad.Client(small_server.address, timeout=300) as small:
        small.model_info()
        with pytest.raises(ValueError, match="one per input"):
            small.input_gradient(images, ClassScore("fc8", classes=[281]))


# ---------------------------------------------------------------- joining, no server


def part(rows: np.ndarray, param: np.ndarray, loss: float | None) -> GradientResult:
    return GradientResult(input=rows, parameters={"w": param}, activations={"a": rows * 10}, loss=loss)


def test_mean_loss_parts_are_weighted_by_their_share_of_the_inputs() -> None:
    join = _batching.GradientJoin(3, "mean", None)
    join.add(part(np.full((2, 2), 6.0, np.float32), np.full(4, 3.0, np.float32), 1.5), 0, 2)
    join.add(part(np.full((1, 2), 9.0, np.float32), np.full(4, 6.0, np.float32), 3.0), 2, 3)
    result = join.finish()
    np.testing.assert_allclose(result.parameters["w"], 3.0 * 2 / 3 + 6.0 / 3)
    np.testing.assert_allclose(result.input, [[4.0, 4.0], [4.0, 4.0], [3.0, 3.0]])
    np.testing.assert_allclose(result.activations["a"], [[60.0, 60.0], [60.0, 60.0], [90.0, 90.0]])
    assert result.loss == pytest.approx(1.5 * 2 / 3 + 3.0 / 3)


def test_sum_loss_parts_add_up_and_fill_the_given_arrays() -> None:
    out = GradientResult(input=np.zeros((3, 2), np.float16), parameters={"w": np.zeros(4, np.float16)})
    join = _batching.GradientJoin(3, "sum", out)
    join.add(part(np.ones((2, 2), np.float16), np.full(4, 0.5, np.float16), None), 0, 2)
    join.add(part(np.full((1, 2), 2.0, np.float16), np.full(4, 0.25, np.float16), None), 2, 3)
    result = join.finish()
    assert result.input is out.input and result.parameters["w"] is out.parameters["w"]
    np.testing.assert_array_equal(out.parameters["w"], np.full(4, 0.75, np.float16))
    np.testing.assert_array_equal(out.input, [[1, 1], [1, 1], [2, 2]])
    assert result.loss is None


def test_given_array_of_the_wrong_shape_is_a_value_error() -> None:
    join = _batching.GradientJoin(3, "sum", GradientResult(parameters={"w": np.zeros(5, np.float32)}))
    join.add(part(np.ones((3, 2), np.float32), np.ones(4, np.float32), 1.0), 0, 3)
    with pytest.raises(ValueError, match="shape"):
        join.finish()


def test_sub_batches_cover_the_batch_in_order() -> None:
    assert _batching.bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert _batching.bounds(4, 4) == [(0, 4)]
