"""Explain: every attribution method against the same recipe written here with plain Chainer on the
same weights, through a real server and the real SDK; errors, scopes, determinism, no guided leak,
rendering and the CLI's pictures.

Maps are compared with rtol 1e-5 and an absolute tolerance of 1e-5 times the map's largest magnitude
(the server batches samples together, the references run them one by one: float32 sums then differ
in their last bits, which matters only for elements near zero).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import layergrad_server  # noqa: F401  (the numpy 2 shim Chainer needs)

# isort: split
import chainer
import chainer.functions as F  # noqa: N812
import grpc
import layergrad
import layergrad.aio
import numpy as np
import pytest
from chainer.links.model.vision import vgg
from conftest import encode, make_rgb, serving
from layergrad import cli, render
from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad_server import auth, explain_rpc
from layergrad_server.explain import ops
from layergrad_server.explain.guided import guided_relus
from layergrad_server.models.vision import imagenet_labels
from layergrad_server.status import required_scopes
from PIL import Image

pytestmark = pytest.mark.timeout(900)

CLASS = 7
RGB = make_rgb(21)  # 180 x 240
PREPARED = vgg.prepare(RGB)
X = PREPARED[None]


def close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * float(np.abs(expected).max()))


# ---- references, written plainly ----------------------------------------------------


def ref_input_gradient(net: vgg.VGG16Layers, x: np.ndarray, cls: int) -> np.ndarray:
    with chainer.using_config("train", False):
        v = chainer.Variable(x.astype(np.float32))
        y = net.forward(v, layers=["fc8"])["fc8"]
        (g,) = chainer.grad([y[0, cls]], [v])
    return g.array[0]


def ref_input_gradients(net: vgg.VGG16Layers, xs: np.ndarray, cls: int) -> np.ndarray:
    """Each row's input gradient of its score ``cls``, the rows computed as one batch, as the
    server computes an explanation's samples (one internal batch of up to --explain-batch-size).
    A batch of another size rounds its products differently, which can move a ReLU or max-pool
    input across its tie and the gradient with it: the reference must batch as the server does."""
    with chainer.using_config("train", False):
        v = chainer.Variable(xs.astype(np.float32))
        y = net.forward(v, layers=["fc8"])["fc8"]
        (g,) = chainer.grad([F.sum(y[:, cls])], [v])
    return g.array


def ref_score(net: vgg.VGG16Layers, x: np.ndarray, cls: int) -> float:
    with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
        return float(net.forward(chainer.Variable(x.astype(np.float32)), layers=["fc8"])["fc8"].array[0, cls])


def ref_guided_backprop(net: vgg.VGG16Layers, x: np.ndarray, cls: int, guided: bool = True) -> np.ndarray:
    """Function by function through VGG16Layers.functions, backward by hand: a ReLU passes
    max(g, 0) where its output is positive; every other function's backward is Chainer's."""
    steps = []
    h = chainer.Variable(x.astype(np.float32))
    with chainer.using_config("train", False):
        for name, functions in net.functions.items():
            for function in functions:
                out = function(h)
                steps.append((function, h, out))
                h = out
            if name == "fc8":
                break
        g = np.zeros(h.shape, dtype=np.float32)
        g[0, cls] = 1.0
        for function, inp, out in reversed(steps):
            if function is F.relu:
                g = g * (out.array > 0) * ((g > 0) if guided else 1.0)
                continue
            fresh = chainer.Variable(inp.array)
            result = function(fresh)
            if result is fresh:  # dropout at test time returns its input
                continue
            (grad,) = chainer.grad([result], [fresh], grad_outputs=[chainer.Variable(g.astype(np.float32))])
            g = grad.array
    return g[0].astype(np.float32)


def ref_layer(net: vgg.VGG16Layers, x: np.ndarray, cls: int, layer: str) -> tuple[np.ndarray, np.ndarray]:
    with chainer.using_config("train", False):
        v = chainer.Variable(x.astype(np.float32))
        acts = net.forward(v, layers=[layer, "fc8"])
        (g,) = chainer.grad([acts["fc8"][0, cls]], [acts[layer]])
    return acts[layer].array[0].astype(np.float64), g.array[0].astype(np.float64)


def ref_bilinear(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel bilinear resampling, clamped at the border, by gathering the four neighbours."""
    h, w = m.shape

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n_in - 1), src - low

    y0, y1, fy = axis(height, h)
    x0, x1, fx = axis(width, w)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


# ---- the methods ---------------------------------------------------------------------


def test_saliency_is_the_input_gradient_and_its_channel_max(client, reference_net):
    explanation = client.explain(PREPARED, method="saliency", target=CLASS)
    expected = ref_input_gradient(reference_net, X, CLASS)
    close(explanation.maps["saliency"][0], expected)
    close(explanation.maps["saliency_max_abs"][0], np.abs(expected).max(axis=0))
    (target,) = explanation.targets
    assert (target.input, target.class_index) == (0, CLASS)
    assert target.class_name == imagenet_labels()[CLASS]
    assert target.score == pytest.approx(ref_score(reference_net, X, CLASS), rel=1e-5)


def test_gradient_times_input(client, reference_net):
    explanation = client.explain(encode(RGB, "PNG"), method="gradient_x_input", target=[CLASS])
    close(explanation.map[0], ref_input_gradient(reference_net, X, CLASS) * PREPARED)


@pytest.fixture(scope="module")
def smooth_reference(reference_net):
    """The three SmoothGrad maps for samples=3, noise_level=0.2, seed=5, from this module's loop."""
    samples, level, seed = 3, 0.2, 5
    sigma = np.float32(level) * (PREPARED.max() - PREPARED.min())
    noisy = []
    for s in range(samples):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, s])))
        noisy.append(PREPARED + sigma * rng.standard_normal(PREPARED.shape, dtype=np.float32))
    stack = ref_input_gradients(reference_net, np.stack(noisy), CLASS).astype(np.float64)
    return {
        "smoothgrad": stack.mean(axis=0),
        "smoothgrad_sq": (stack**2).mean(axis=0),
        "vargrad": stack.var(axis=0),
        "vargrad_unbiased": stack.var(axis=0, ddof=1),
    }


@pytest.mark.parametrize("method", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smoothgrad_variants_equal_the_noise_loop(client, smooth_reference, method):
    explanation = client.explain(RGB, method=method, target=CLASS, samples=3, noise_level=0.2, seed=5)
    close(explanation.maps[method][0], smooth_reference[method])


def test_vargrad_unbiased_and_a_seed_repeats_exactly_and_another_differs(client, smooth_reference):
    options = {"target": CLASS, "samples": 3, "noise_level": 0.2}
    unbiased = client.explain(RGB, method="vargrad", seed=5, unbiased=True, **options).map[0]
    close(unbiased, smooth_reference["vargrad_unbiased"])
    first = client.explain(RGB, method="smoothgrad", seed=5, **options).map
    again = client.explain(RGB, method="smoothgrad", seed=5, **options).map
    other = client.explain(RGB, method="smoothgrad", seed=6, **options).map
    assert np.array_equal(first, again)
    assert not np.allclose(first, other, rtol=1e-3, atol=0)


def test_integrated_gradients_and_its_completeness_delta(client, reference_net):
    steps = 4
    explanation = client.explain(
        RGB, method="integrated_gradients", target=CLASS, steps=steps, rule="gauss_legendre", baseline="black"
    )
    base = vgg.prepare(np.zeros((224, 224, 3), dtype=np.uint8))  # a black image, prepared
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    points = np.stack([base + np.float32((t + 1) / 2) * (PREPARED - base) for t in nodes])
    total = np.zeros(PREPARED.shape)
    for w, gradient in zip(weights, ref_input_gradients(reference_net, points, CLASS), strict=True):
        total += (w / 2) * gradient
    attributions = (PREPARED - base).astype(np.float64) * total
    close(explanation.map[0], attributions)
    (target,) = explanation.targets
    f_x, f_base = ref_score(reference_net, X, CLASS), ref_score(reference_net, base[None], CLASS)
    assert target.baseline_score == pytest.approx(f_base, rel=1e-5, abs=1e-6)
    expected_delta = attributions.sum() - (f_x - f_base)
    assert target.delta == pytest.approx(expected_delta, rel=1e-4, abs=1e-5 * abs(f_x - f_base))
    assert explanation.deltas.shape == (1,)


@pytest.mark.parametrize("rule", ops.INTEGRATION_RULES)
def test_integration_points_and_weights(rule):
    m = 5
    alphas, weights = ops.integration_points(rule, m)
    k = np.arange(m)
    expected = {
        "riemann_left": (k / m, np.full(m, 1 / m)),
        "riemann_right": ((k + 1) / m, np.full(m, 1 / m)),
        "riemann_middle": ((k + 0.5) / m, np.full(m, 1 / m)),
        "trapezoid": (np.arange(m + 1) / m, np.r_[0.5, np.ones(m - 1), 0.5] / m),
    }
    if rule in expected:
        np.testing.assert_allclose(alphas, expected[rule][0])
        np.testing.assert_allclose(weights, expected[rule][1])
    else:  # Gauss-Legendre: exact for polynomials of degree 2m - 1 on [0, 1]
        for degree in range(2 * m):
            assert (weights * alphas**degree).sum() == pytest.approx(1 / (degree + 1), rel=1e-12)


def test_gradcam_on_conv5_3_is_relu_of_the_alpha_weighted_activations(client, reference_net):
    explanation = client.explain(encode(RGB, "PNG"), method="gradcam", target=CLASS, layer="conv5_3")
    assert explanation.layer == "conv5_3"
    a, g = ref_layer(reference_net, X, CLASS, "conv5_3")
    alpha = g.mean(axis=(1, 2))
    cam = np.maximum((alpha[:, None, None] * a).sum(axis=0), 0.0)
    close(explanation.maps["gradcam"][0], cam)
    close(explanation.maps["gradcam_input"][0], ref_bilinear(cam, 224, 224))
    (image_map,) = explanation.image_maps["gradcam_image"]
    assert image_map.shape == RGB.shape[:2]
    close(image_map, ref_bilinear(cam, *RGB.shape[:2]))


def test_float16_maps_are_the_float32_maps_rounded(client, reference_net):
    explanation = client.explain(RGB, method="gradcam", target=CLASS, dtype="float16", relu="after")
    a, g = ref_layer(reference_net, X, CLASS, "conv5_3")
    raw = (g.mean(axis=(1, 2))[:, None, None] * a).sum(axis=0)
    assert explanation.maps["gradcam_input"].dtype == np.float16
    close(explanation.maps["gradcam_input"][0], np.maximum(ref_bilinear(raw, 224, 224), 0), rtol=1e-3)


def test_gradcam_defaults_to_the_last_conv_layer_and_gradcam_pp_weights(client, reference_net):
    explanation = client.explain(RGB, method="gradcam++", target=CLASS)
    assert explanation.layer == "conv5_3" and explanation.method == "gradcam_pp"
    a, g = ref_layer(reference_net, X, CLASS, "conv5_3")
    weights = np.zeros(len(a))
    for k in range(len(a)):
        denominator = 2 * g[k] ** 2 + a[k].sum() * g[k] ** 3
        coefficient = np.divide(g[k] ** 2, denominator, out=np.zeros_like(g[k]), where=denominator != 0)
        weights[k] = (coefficient * np.maximum(g[k], 0)).sum()
    cam = np.maximum(np.tensordot(weights, a, axes=1), 0.0)
    close(explanation.maps["gradcam_pp"][0], cam)


def test_guided_backprop_and_guided_gradcam(client, reference_net):
    explanation = client.explain(RGB, method="guided_gradcam", target=CLASS, layer="conv4_3")
    guided = ref_guided_backprop(reference_net, X, CLASS)
    plain = ref_guided_backprop(reference_net, X, CLASS, guided=False)
    close(plain, ref_input_gradient(reference_net, X, CLASS))  # the hand-written walk is sound
    a, g = ref_layer(reference_net, X, CLASS, "conv4_3")
    cam = np.maximum((g.mean(axis=(1, 2))[:, None, None] * a).sum(axis=0), 0.0)
    close(explanation.maps["gradcam"][0], cam)
    close(explanation.maps["guided_gradcam"][0], guided * ref_bilinear(cam, 224, 224)[None])
    assert not np.allclose(guided, plain, rtol=1e-2)


def test_the_guided_rule_never_leaks_into_other_calls(client, reference_net):
    plain = ref_input_gradient(reference_net, X, CLASS)
    guided = ref_guided_backprop(reference_net, X, CLASS)
    loss = layergrad.ClassScore("fc8", [CLASS])
    with futures.ThreadPoolExecutor(3) as pool:
        explained = pool.submit(client.explain, PREPARED, method="guided_backprop", target=CLASS)
        others = [pool.submit(client.input_gradient, X, loss) for _ in range(2)]
        close(explained.result().map[0], guided)
        for other in others:
            close(other.result()[0], plain)
    close(client.input_gradient(X, loss)[0], plain)  # and afterwards


def test_the_guided_switch_belongs_to_the_thread_that_set_it(reference_net):
    entered, done = threading.Event(), threading.Event()

    def hold() -> None:
        with guided_relus():
            entered.set()
            done.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(60)
        here = ref_input_gradient(reference_net, X, CLASS)  # chainer.grad: the ReLUs' own backward
    finally:
        done.set()
        holder.join()
    close(here, ref_guided_backprop(reference_net, X, CLASS, guided=False))


def test_top_k_explains_several_classes_per_input_in_score_order(client, reference_net):
    explanation = client.explain([RGB, PREPARED * 0.5], method="gradcam", target="top2")
    assert [t.input for t in explanation.targets] == [0, 0, 1, 1]
    for item, x in enumerate([X, X * 0.5]):
        with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
            logits = reference_net.forward(chainer.Variable(x), layers=["fc8"])["fc8"].array[0]
        best = [int(c) for c in np.argsort(-logits, kind="stable")[:2]]
        assert [t.class_index for t in explanation.targets[2 * item : 2 * item + 2]] == best
    assert explanation.maps["gradcam"].shape == (4, 14, 14)
    assert [m.shape for m in explanation.image_maps["gradcam_image"]] == [(180, 240)] * 2 + [(224, 224)] * 2


def test_the_asyncio_client_explains_the_same(server, client):
    async def run() -> layergrad.Explanation:
        async with layergrad.aio.Client(server.address, timeout=300) as aio_client:
            return await aio_client.explain(RGB, method="gradcam", target=CLASS)

    explained = asyncio.run(run())
    expected = client.explain(RGB, method="gradcam", target=CLASS)
    assert np.array_equal(explained.maps["gradcam"], expected.maps["gradcam"])
    assert explained.targets == expected.targets


# ---- errors, scopes, a second server ------------------------------------------------


def _raw_explain(address: str, request: pb.ExplainRequest, metadata=()) -> None:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream(
            "/layergrad.v1.GradientService/Explain",
            request_serializer=pb.ExplainRequest.SerializeToString,
            response_deserializer=pb.ExplainResponse.FromString,
        )
        try:
            list(call(request, timeout=300, metadata=metadata))
        except grpc.RpcError as exc:
            raise layergrad.from_grpc_error(exc) from None


def _request(**fields) -> pb.ExplainRequest:
    request = pb.ExplainRequest(inputs=[pb.Input(encoded_image=encode(RGB, "PNG"))], **fields)
    return request


BAD_REQUESTS = {
    "no method": (_request(), "MISSING_METHOD"),
    "unknown rule": (_request(integrated_gradients=pb.IntegratedGradientsOptions(rule=99)), "UNKNOWN_OPTION"),
    "unknown baseline": (
        _request(integrated_gradients=pb.IntegratedGradientsOptions(baseline=42)),
        "UNKNOWN_OPTION",
    ),
    "unknown variant": (_request(smoothgrad=pb.SmoothGradOptions(variant=9)), "UNKNOWN_OPTION"),
    "unknown cam relu": (_request(gradcam=pb.GradCamOptions(relu=7)), "UNKNOWN_OPTION"),
    "fc layer for gradcam": (_request(gradcam=pb.GradCamOptions(layer="fc7")), "NOT_A_CONV_LAYER"),
    "pooling layer for gradcam": (_request(gradcam=pb.GradCamOptions(layer="pool5")), "NOT_A_CONV_LAYER"),
    "unknown layer": (_request(gradcam=pb.GradCamOptions(layer="conv9_9")), "UNKNOWN_LAYER"),
    "too many samples": (_request(smoothgrad=pb.SmoothGradOptions(samples=5000)), "BAD_SAMPLES"),
    "too many passes": (
        _request(smoothgrad=pb.SmoothGradOptions(samples=1000), targets=pb.ExplainTargets(top_k=20)),
        "TOO_MANY_SAMPLES",
    ),
    "too many steps": (
        _request(integrated_gradients=pb.IntegratedGradientsOptions(steps=4096)),
        "BAD_STEPS",
    ),
    "noise level": (_request(smoothgrad=pb.SmoothGradOptions(noise_level=-1)), "BAD_NOISE_LEVEL"),
    "tensor baseline missing": (
        _request(integrated_gradients=pb.IntegratedGradientsOptions(baseline=pb.BASELINE_TENSOR)),
        "MISSING_BASELINE",
    ),
    "class out of range": (
        _request(saliency=pb.SaliencyOptions(), targets=pb.ExplainTargets(classes=[1000])),
        "CLASS_OUT_OF_RANGE",
    ),
    "top_k too large": (
        _request(saliency=pb.SaliencyOptions(), targets=pb.ExplainTargets(top_k=50)),
        "BAD_TOP_K",
    ),
    "score layer without classes": (
        _request(saliency=pb.SaliencyOptions(), score_layer="conv5_3"),
        "LAYER_HAS_NO_CLASSES",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_invalid_argument_with_a_reason(server, client, case):
    request, reason = BAD_REQUESTS[case]
    with pytest.raises(layergrad.InvalidArgument) as caught:
        _raw_explain(server.address, request)
    assert caught.value.reason == reason
    assert client.model_info().model_name == "VGG16"  # still serving


def test_a_call_past_its_deadline_stops_and_the_server_keeps_serving(client):
    # 1024 backward passes of VGG16 take minutes on any CPU: a 2 s deadline always passes first.
    with pytest.raises(layergrad.DeadlineExceeded):
        client.explain(RGB, method="smoothgrad", target=CLASS, samples=1024, timeout=2)
    assert client.explain(PREPARED, method="gradcam", target=CLASS).maps["gradcam"].shape == (1, 14, 14)


def test_an_unknown_model_is_not_found(server):
    with pytest.raises(layergrad.NotFound) as caught:
        _raw_explain(server.address, _request(saliency=pb.SaliencyOptions(), model="resnet9"))
    assert caught.value.reason == "MODEL_NOT_FOUND"


def test_explain_needs_the_input_gradients_scope():
    assert required_scopes("Explain", _request(gradcam=pb.GradCamOptions())) == {auth.INPUT_GRADIENTS}


def test_admission_counts_every_pass():
    request = _request(smoothgrad=pb.SmoothGradOptions(samples=40), targets=pb.ExplainTargets(top_k=3))
    assert explain_rpc.passes_of(request) == 120
    ig = _request(integrated_gradients=pb.IntegratedGradientsOptions(rule=pb.INTEGRATION_RULE_TRAPEZOID))
    assert explain_rpc.passes_of(ig) == 65


def test_a_second_server_gives_the_same_smoothgrad_and_checks_scopes(client, weights_file, tmp_path):
    env = {"LAYERGRAD_TOKENS": "explain-predict-token predict; explain-input-token input-gradients"}
    with serving(["--weights", str(weights_file)], tmp_path, env=env) as second:
        with layergrad.Client(second.address, timeout=300, token="explain-predict-token") as narrow:
            with pytest.raises(layergrad.PermissionDenied) as caught:
                narrow.explain(RGB, method="gradcam", target=CLASS)
            assert "input-gradients" in str(caught.value)
        with layergrad.Client(second.address, timeout=300, token="explain-input-token") as wide:
            again = wide.explain(RGB, method="smoothgrad", target=CLASS, samples=3, noise_level=0.2, seed=5)
    first = client.explain(RGB, method="smoothgrad", target=CLASS, samples=3, noise_level=0.2, seed=5)
    assert np.array_equal(again.map, first.map)


# ---- pictures ------------------------------------------------------------------------


def test_normalize_clips_outliers_at_the_percentile_and_handles_sign():
    heat = np.linspace(-1, 1, 101).reshape(1, -1)
    heat[0, -1] = 100.0  # an outlier
    scaled = render.normalize(heat, "absolute", percentile=98)
    assert scaled.max() == 1.0 and scaled.min() == 0.0
    assert scaled[0, 75] == pytest.approx(0.5 / 0.99, rel=0.02)  # not washed out by the outlier
    assert render.normalize(heat, "positive")[0, :50].max() == 0.0
    assert render.normalize(heat, "negative")[0, 51:].max() == 0.0
    assert render.normalize(heat, "all").min() < 0


def test_the_colormap_rises_in_lightness():
    luma = render.INFERNO.astype(float) @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(luma) > 0)
    assert render.INFERNO.shape == (256, 3) and render.DIVERGING[128].min() > 240


def test_the_cli_writes_a_map_and_a_labelled_grid(server, tmp_path, capsys):
    picture = tmp_path / "picture.png"
    Image.fromarray(RGB).save(picture)
    single, sheet = tmp_path / "gradcam.png", tmp_path / "grid.png"
    base = ["--target", server.address, "--timeout", "600", "explain", str(picture)]
    assert cli.main([*base, "--method", "gradcam", "--target", "top1", "--out", str(single)]) == 0
    with Image.open(single) as image:
        assert image.size[0] == 256 and image.mode == "RGB"
    assert cli.main([*base, "--method", "gradcam,saliency", "--target", str(CLASS), "--out", str(sheet)]) == 0
    with Image.open(sheet) as image:
        width = image.size[0]
    assert width == 3 * 256 + 4 * 4  # input, gradcam, saliency
    printed = capsys.readouterr().out
    assert f"saliency: class {CLASS}" in printed and "saved" in printed
    assert cli.main([*base, "--method", "nonsense", "--out", str(single)]) == 2
