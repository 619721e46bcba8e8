"""The fast CPU kernels (``layergrad_server.kernels``) give bit-identical results to stock Chainer."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import layergrad_server  # noqa: F401  (applies the numpy 2 shim Chainer needs)

# isort: split
import chainer
import chainer.functions as F  # noqa: N812
import numpy as np
import pytest
from chainer.functions.activation import relu as relu_module
from chainer.functions.connection import convolution_2d, deconvolution_2d
from chainer.functions.pooling import max_pooling_nd
from chainer.links.model.vision import vgg
from layergrad_server import engine, kernels

with warnings.catch_warnings():  # chainer.testing registers an unknown pytest mark "gpu"
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from chainer import gradient_check

# (in channels, out channels, size, input memory order) of VGG16's convolutions (3x3, stride 1,
# pad 1): after the image or a pool the input is NCHW, after a convolution + ReLU it is NHWC.
VGG_CONVS = [
    (3, 64, 224, "nchw"),
    (64, 64, 224, "nhwc"),
    (64, 128, 112, "nchw"),
    (128, 128, 112, "nhwc"),
    (128, 256, 56, "nchw"),
    (256, 256, 56, "nhwc"),
    (256, 512, 28, "nchw"),
    (512, 512, 28, "nhwc"),
    (512, 512, 14, "nchw"),
    (512, 512, 14, "nhwc"),
]
# (channels, size) of the inputs of VGG16's 2x2 stride-2 max pools.
VGG_POOLS = [(64, 224), (128, 112), (256, 56), (512, 28), (512, 14)]
LAYERS = ["conv1_2", "pool1", "conv2_1", "conv3_3", "pool4", "conv5_3", "pool5", "fc6", "fc8"]


@pytest.fixture(autouse=True)
def _stock_after() -> Iterator[None]:
    """Every test leaves Chainer's own kernels in place."""
    yield
    kernels.uninstall()


def bits(array: np.ndarray) -> np.ndarray:
    """The array's bytes as unsigned integers, so that -0.0 != +0.0 and NaN == NaN of same payload."""
    array = np.ascontiguousarray(array)
    return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[array.itemsize])


def assert_same(stock: dict[str, np.ndarray], fast: dict[str, np.ndarray]) -> None:
    assert stock.keys() == fast.keys()
    for name in stock:
        assert stock[name].dtype == fast[name].dtype, name
        assert stock[name].shape == fast[name].shape, name
        assert np.array_equal(bits(stock[name]), bits(fast[name])), name


def both(run: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``run()`` with stock kernels, then with the fast ones."""
    with kernels.installed(False):
        stock = run()
    with kernels.installed(True):
        fast = run()
    return stock, fast


def random(shape: tuple[int, ...], seed: int, layout: str = "nchw", dtype: type = np.float32) -> np.ndarray:
    """Standard normal values; ``layout='nhwc'`` gives an NCHW-shaped view of NHWC memory
    (what VGG16's convolutions and ReLUs produce)."""
    rng = np.random.default_rng(seed)
    if layout == "nhwc":
        n, c, h, w = shape
        return rng.standard_normal((n, h, w, c)).astype(dtype).transpose(0, 3, 1, 2)
    return rng.standard_normal(shape).astype(dtype)


def conv_results(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, gy: np.ndarray, **kwargs: object
) -> dict[str, np.ndarray]:
    xv, wv = chainer.Variable(x), chainer.Variable(w)
    args = (xv, wv) if b is None else (xv, wv, chainer.Variable(b))
    y = F.convolution_2d(*args, **kwargs)
    y.grad = gy
    y.backward()
    out = {"y": y.array.copy(), "gx": xv.grad.copy(), "gW": wv.grad.copy()}
    if b is not None:
        out["gb"] = args[2].grad.copy()
    out["y strides"] = np.asarray(y.array.strides)
    return out


# ---- (1) every VGG16 layer configuration, batch 1 and 2 -------------------------------------------


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("cin", "cout", "size", "layout"), VGG_CONVS)
def test_vgg_convolutions_are_bit_identical(batch: int, cin: int, cout: int, size: int, layout: str) -> None:
    x = np.maximum(random((batch, cin, size, size), 1, layout), 0)
    w = random((cout, cin, 3, 3), 2) * np.float32(np.sqrt(2.0 / (9 * cin)))
    b = random((cout,), 3) * np.float32(0.01)
    gy = random((batch, cout, size, size), 4)
    assert_same(*both(lambda: conv_results(x, w, b, gy, stride=1, pad=1)))


@pytest.mark.parametrize(("cin", "cout", "size", "layout"), [VGG_CONVS[3], VGG_CONVS[8]])
def test_vgg_convolutions_of_a_batch_of_three_are_bit_identical(
    cin: int, cout: int, size: int, layout: str
) -> None:
    """A batch's im2col written straight into the row-ordered patch matrix (see ``_patches``)."""
    x = np.maximum(random((3, cin, size, size), 5, layout), 0)
    w = random((cout, cin, 3, 3), 6) * np.float32(np.sqrt(2.0 / (9 * cin)))
    b = random((cout,), 7) * np.float32(0.01)
    gy = random((3, cout, size, size), 8)
    assert_same(*both(lambda: conv_results(x, w, b, gy, stride=1, pad=1)))


def test_convolutions_of_a_batch_of_four_split_by_image_are_bit_identical() -> None:
    """Above ``_PER_IMAGE_MIN_PRODUCT`` a batch's products run one image at a time."""
    cin, cout, size, layout = VGG_CONVS[6]
    assert kernels._per_image_products(size * size, cout, cin * 9)
    x = np.maximum(random((4, cin, size, size), 11, layout), 0)
    w = random((cout, cin, 3, 3), 12) * np.float32(np.sqrt(2.0 / (9 * cin)))
    b = random((cout,), 13) * np.float32(0.01)
    gy = random((4, cout, size, size), 14)
    assert_same(*both(lambda: conv_results(x, w, b, gy, stride=1, pad=1)))


def test_strided_non_square_convolution_split_by_image_is_bit_identical() -> None:
    """The per-image split with stride 2 (col2im's strided form) and an odd, non-square input."""
    x = random((2, 64, 65, 63), 15, "nhwc")
    w = random((128, 64, 3, 3), 16)
    b = random((128,), 17)
    gy = random((2, 128, 33, 32), 18)
    assert kernels._per_image_products(33 * 32, 128, 64 * 9)
    assert_same(*both(lambda: conv_results(x, w, b, gy, stride=2, pad=1)))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_convolution_input_layouts_are_bit_identical(layout: str) -> None:
    x = random((2, 32, 20, 20), 5, layout)
    w = random((16, 32, 3, 3), 6)
    b = random((16,), 7)
    gy = random((2, 16, 20, 20), 8)
    assert_same(*both(lambda: conv_results(x, w, b, gy, stride=1, pad=1)))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("channels", "size"), VGG_POOLS)
def test_vgg_max_pools_are_bit_identical(batch: int, channels: int, size: int) -> None:
    x = np.maximum(random((batch, channels, size, size), 9, "nhwc"), 0)
    x[:, :, ::7, ::5] = 0  # ties, including windows of zeros only
    gy_full = random((batch, channels, size // 2 + 2, size // 2 + 2), 10)
    gy = gy_full[:, :, 1:-1, 1:-1]  # strided, as a deconvolution's output is

    def run() -> dict[str, np.ndarray]:
        xv = chainer.Variable(x)
        y = F.max_pooling_2d(xv, 2, 2)
        y.grad = gy
        y.backward()
        func = y.creator
        return {
            "y": y.array.copy(),
            "indexes": func.indexes.copy(),
            "gx": xv.grad.copy(),
            "strides": np.asarray(y.array.strides + xv.grad.strides + func.indexes.strides),
        }

    assert_same(*both(run))


@pytest.mark.parametrize(
    ("channels", "size"), [(64, 224), (128, 112), (256, 56), (512, 28), (512, 14), (7, 5)]
)
def test_relu_backward_is_bit_identical(channels: int, size: int) -> None:
    y = np.maximum(random((2, channels, size, size), 11, "nhwc"), 0)
    gy_full = random((2, channels, size + 2, size + 2), 12)
    gy_full[:, :, ::3, ::4] = -0.0
    gy_full[0, 0, 1, 1:4] = [np.nan, np.inf, -np.inf]
    gy = gy_full[:, :, 1:-1, 1:-1]

    def run() -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore"):  # inf * 0.0, in stock Chainer too
            (gx,) = relu_module.ReLUGrad2(y).apply((gy,))
        return {"gx": gx.array.copy(), "strides": np.asarray(gx.array.strides)}

    assert_same(*both(run))


def test_signed_zeros_nan_and_ties_in_pooling_are_bit_identical() -> None:
    x = np.zeros((1, 3, 4, 6), np.float32)
    x[0, 0] = -0.0
    x[0, 1, 0, :2] = [-0.0, 0.0]
    x[0, 2, 1, 1] = 5.0
    x[0, 2, 0, 0] = 5.0
    gy = np.array([-0.0, 1.0, -2.0], np.float32)[None, :, None, None] * np.ones((1, 3, 2, 3), np.float32)

    def run() -> dict[str, np.ndarray]:
        xv = chainer.Variable(x)
        y = F.max_pooling_2d(xv, 2, 2)
        y.grad = gy
        y.backward()
        return {"y": y.array.copy(), "gx": xv.grad.copy(), "indexes": y.creator.indexes.copy()}

    assert_same(*both(run))
    x[0, 1, 1, 1] = np.nan  # NaN: stock Chainer's own code runs
    assert_same(*both(run))


# ---- (2) a whole VGG16 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net() -> vgg.VGG16Layers:
    return vgg.VGG16Layers(pretrained_model=engine.random_weights_npz(0))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(1).standard_normal((1, *engine.INPUT_SHAPE)) * 50).astype(np.float32)


def test_vgg16_gradients_are_bit_identical(net: vgg.VGG16Layers, image: np.ndarray) -> None:
    def run() -> dict[str, np.ndarray]:
        with chainer.using_config("train", False):
            x = chainer.Variable(image)
            fc8 = net.forward(x, layers=["fc8"])["fc8"]
            (gx,) = chainer.grad([F.sum(F.select_item(fc8, np.array([7], np.int32)))], [x])
            out = {"grad input": gx.array.copy()}
            x = chainer.Variable(image)
            acts = net.forward(x, layers=LAYERS)
            loss = F.sum(F.select_item(acts["fc8"], np.array([7], np.int32))) + F.sum(
                F.square(acts["conv3_3"])
            ) * np.float32(1e-6)
            net.cleargrads()
            loss.backward(retain_grad=True)
        out.update({f"param {name}": p.grad.copy() for name, p in net.namedparams()})
        out.update({f"layer {name}": acts[name].grad.copy() for name in LAYERS})
        out.update({f"activation {name}": acts[name].array.copy() for name in LAYERS})
        out["input"] = x.grad.copy()
        return out

    stock, fast = both(run)
    assert len(stock) == 1 + 32 + 2 * len(LAYERS) + 1
    assert_same(stock, fast)


def test_vgg16_one_blas_thread_is_bit_identical(net: vgg.VGG16Layers, image: np.ndarray) -> None:
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def run() -> dict[str, np.ndarray]:
        with chainer.using_config("train", False):
            x = chainer.Variable(image)
            fc8 = net.forward(x, layers=["fc8"])["fc8"]
            net.cleargrads()
            F.sum(fc8[:, 3]).backward()
        out = {name: p.grad.copy() for name, p in net.namedparams() if name.startswith("/conv")}
        out["input"] = x.grad.copy()
        return out

    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert_same(*both(run))


# ---- (3) gradient checks with the fast kernels on --------------------------------------------------


def distinct(shape: tuple[int, ...], seed: int, dtype: type) -> np.ndarray:
    """Well-separated values (a shuffled ramp), so that max pooling has no near ties."""
    rng = np.random.default_rng(seed)
    values = (rng.permutation(int(np.prod(shape))) + 0.5) / np.prod(shape) * 4 - 2
    return values.astype(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_convolution_gradient_check(dtype: type) -> None:
    x = random((2, 3, 6, 5), 20, dtype=dtype)
    w = random((4, 3, 3, 3), 21, dtype=dtype)
    b = random((4,), 22, dtype=dtype)
    gy = random((2, 4, 6, 5), 23, dtype=dtype)
    ggx, ggw, ggb = (
        random(x.shape, 24, dtype=dtype),
        random(w.shape, 25, dtype=dtype),
        random(b.shape, 26, dtype=dtype),
    )
    tol = {"atol": 5e-3, "rtol": 5e-2} if dtype == np.float32 else {"atol": 1e-7, "rtol": 1e-6}

    def conv(*args: chainer.Variable) -> chainer.Variable:
        return F.convolution_2d(*args, stride=1, pad=1)

    with kernels.installed():
        gradient_check.check_backward(conv, (x, w, b), gy, dtype=np.float64, **tol)
        gradient_check.check_double_backward(conv, (x, w, b), gy, (ggx, ggw, ggb), dtype=np.float64, **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_and_pooling_gradient_check(dtype: type) -> None:
    x = distinct((2, 3, 6, 8), 30, dtype)
    gy = random((2, 3, 3, 4), 31, dtype=dtype)
    ggx = random(x.shape, 32, dtype=dtype)
    tol = {"atol": 5e-3, "rtol": 5e-2} if dtype == np.float32 else {"atol": 1e-7, "rtol": 1e-6}

    def pool_relu(v: chainer.Variable) -> chainer.Variable:
        return F.max_pooling_2d(F.relu(v), 2, 2)

    with kernels.installed():
        gradient_check.check_backward(pool_relu, x, gy, dtype=np.float64, eps=1e-3, **tol)
        gradient_check.check_double_backward(pool_relu, x, gy, ggx, dtype=np.float64, eps=1e-3, **tol)


# ---- (4) configurations the fast paths leave to stock Chainer, or handle generally -------------------


@pytest.mark.parametrize(
    ("ksize", "stride", "pad", "cover_all", "shape"),
    [
        (3, 1, 1, True, (2, 4, 9, 9)),  # overlapping windows
        (2, 2, 0, True, (2, 4, 7, 9)),  # odd sizes with cover_all
        (2, 2, 0, False, (2, 4, 7, 9)),  # odd sizes without
        (2, 2, 1, True, (2, 4, 8, 8)),  # padding
        (3, 3, 0, True, (1, 2, 9, 6)),  # non-overlapping 3x3 (fast path)
        ((2, 3), (2, 3), 0, False, (1, 2, 8, 9)),  # non-square (fast path)
    ],
)
def test_other_pooling_configurations_are_bit_identical(
    ksize: int | tuple[int, int],
    stride: int | tuple[int, int],
    pad: int,
    cover_all: bool,
    shape: tuple[int, int, int, int],
) -> None:
    x = random(shape, 40, "nhwc")
    x[:, :, ::2, ::3] = 0.25

    def run() -> dict[str, np.ndarray]:
        xv = chainer.Variable(x)
        y = F.max_pooling_2d(xv, ksize, stride, pad, cover_all)
        y.grad = random(y.shape, 41)
        y.backward()
        return {"y": y.array.copy(), "gx": xv.grad.copy(), "indexes": y.creator.indexes.copy()}

    assert_same(*both(run))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stride": 2, "pad": 1},
        {"stride": 2, "pad": 0, "cover_all": True},
        {"stride": (1, 2), "pad": (0, 2)},
        {"stride": 1, "pad": 0},
        {"stride": 1, "pad": 2, "dilate": 2},
        {"stride": 1, "pad": 1, "groups": 2},
    ],
)
def test_other_convolution_configurations_are_bit_identical(kwargs: dict) -> None:
    x = random((2, 4, 11, 9), 50, "nhwc")
    w = random((6, 4 // kwargs.get("groups", 1), 3, 3), 51)
    b = random((6,), 52)
    with kernels.installed(False):
        out_shape = F.convolution_2d(x, w, b, **kwargs).shape
    gy = random(out_shape, 53)
    assert_same(*both(lambda: conv_results(x, w, b, gy, **kwargs)))


def test_non_square_kernel_and_no_bias_are_bit_identical() -> None:
    x = random((1, 5, 10, 12), 60)
    w = random((3, 5, 2, 4), 61)
    gy = random((1, 3, 11, 11), 62)
    assert_same(*both(lambda: conv_results(x, w, None, gy, stride=1, pad=(1, 1))))


def test_deconvolution_forward_is_bit_identical() -> None:
    x = random((2, 6, 7, 8), 70)
    w = random((6, 4, 3, 3), 71)
    b = random((4,), 72)
    for kwargs in (
        {"stride": 1, "pad": 1},
        {"stride": 2, "pad": 1},
        {"stride": 2, "pad": 0, "outsize": (16, 18)},
    ):
        assert_same(*both(lambda kwargs=kwargs: {"y": F.deconvolution_2d(x, w, b, **kwargs).array.copy()}))


def test_float64_and_float16_fall_back_to_stock() -> None:
    for dtype in (np.float64, np.float16):
        x = random((1, 3, 8, 8), 80, dtype=dtype)
        w = random((4, 3, 3, 3), 81, dtype=dtype)
        gy = random((1, 4, 8, 8), 82, dtype=dtype)
        assert_same(*both(lambda x=x, w=w, gy=gy: conv_results(x, w, None, gy, stride=1, pad=1)))


# ---- (5) install / uninstall ------------------------------------------------------------------------

REPLACED = [
    (convolution_2d.Convolution2DFunction, "forward_cpu"),
    (convolution_2d.Convolution2DGradW, "forward_cpu"),
    (deconvolution_2d.Deconvolution2DFunction, "forward_cpu"),
    (relu_module.ReLUGrad2, "forward_cpu"),
    (max_pooling_nd.MaxPoolingND, "forward_cpu"),
    (max_pooling_nd.MaxPoolingNDGrad, "forward_cpu"),
]


def test_install_and_uninstall_are_idempotent_and_restore_the_originals() -> None:
    kernels.uninstall()
    originals = {key: key[0].__dict__[key[1]] for key in REPLACED}
    assert not kernels.is_installed()
    kernels.install()
    kernels.install()
    assert kernels.is_installed()
    assert all(key[0].__dict__[key[1]] is not originals[key] for key in REPLACED)
    kernels.uninstall()
    kernels.uninstall()
    assert not kernels.is_installed()
    assert all(key[0].__dict__[key[1]] is originals[key] for key in REPLACED)


def test_installed_context_restores_the_previous_state() -> None:
    kernels.install()
    with kernels.installed(False):
        assert not kernels.is_installed()
    assert kernels.is_installed()
    kernels.uninstall()
    with kernels.installed():
        assert kernels.is_installed()
    assert not kernels.is_installed()


# ---- the server's switch --------------------------------------------------------------------------


def test_cpu_kernels_flag_defaults_to_fast_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from layergrad_server import config

    monkeypatch.delenv("LAYERGRAD_CPU_KERNELS", raising=False)
    assert config.from_args(config.build_parser().parse_args([])).cpu_kernels == "fast"
    assert (
        config.from_args(config.build_parser().parse_args(["--cpu-kernels", "stock"])).cpu_kernels == "stock"
    )
    monkeypatch.setenv("LAYERGRAD_CPU_KERNELS", "stock")
    assert config.from_args(config.build_parser().parse_args([])).cpu_kernels == "stock"
    monkeypatch.setenv("LAYERGRAD_CPU_KERNELS", "fastest")
    with pytest.raises(SystemExit):
        config.from_args(config.build_parser().parse_args([]))


def test_server_applies_the_cpu_kernels_only_on_the_cpu() -> None:
    from types import SimpleNamespace

    from layergrad_server.server import apply_cpu_kernels

    cpu = SimpleNamespace(device=SimpleNamespace(name="@numpy"))
    gpu = SimpleNamespace(device=SimpleNamespace(name="@cupy:0"))
    assert apply_cpu_kernels("fast", cpu) == "fast"
    assert kernels.is_installed()
    assert apply_cpu_kernels("stock", cpu) == "stock"
    assert not kernels.is_installed()
    assert apply_cpu_kernels("fast", gpu) == "-"
    assert not kernels.is_installed()


def test_buffer_pool_reuses_and_bounds_what_it_keeps() -> None:
    pool = kernels._BufferPool(keep=2, max_bytes=1000)
    float32 = np.dtype(np.float32)
    with pool.array((10,), float32) as a, pool.array((5, 4), float32) as b:
        assert a.shape == (10,) and b.shape == (5, 4) and b.flags.c_contiguous
        a_base, b_base = a.base, b.base
    with pool.array((3, 5), float32) as c:  # the smallest kept buffer that fits: b's
        assert np.shares_memory(c, b_base) and not np.shares_memory(c, a_base)
    with pool.array((1000,), float32):  # over max_bytes: allocated, not kept
        pass
    assert sorted(buffer.nbytes for buffer in pool._free) == [40, 80]
    pool.clear()
    assert pool._free == []
