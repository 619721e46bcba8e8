"""One server serving several models at once: every built-in vision link with seeded random
weights, a user's own Chain from a model repository, a model that fails to load and one
still loading. Each served result equals the same Chainer code run here in-process.

The in-process references build each model with the same seeded weights
(``adapter.random(seed)``) and run Chainer's own idioms: ``net.forward(x, layers)`` under
``train = False``, then ``loss.backward()`` / ``loss.backward(retain_grad=True)`` /
``chainer.grad``. The big models get one call each; the pattern matrix runs on the small
ones (GoogLeNet, ResNet50 and the user Chain).
"""

from __future__ import annotations

import pathlib
import textwrap
import time

import chainer
import chainer.functions as F  # noqa: N812
import grpc
import layergrad
import numpy as np
import pytest
from conftest import encode, make_rgb, serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from layergrad import ClassScore, SoftmaxCrossEntropy, SumOfSquares
from layergrad_server.models import vision
from layergrad_server.models.base import capture_links

SEEDS = {"vgg16": 0, "vgg19": 1, "googlenet": 2, "resnet50": 3, "resnet101": 4, "resnet152": 5}
ADAPTERS = {
    "vgg16": vision.VGG16,
    "vgg19": vision.VGG19,
    "googlenet": vision.GoogLeNet,
    "resnet50": vision.ResNet50,
    "resnet101": vision.ResNet101,
    "resnet152": vision.ResNet152,
}
RTOL = 1e-6

TINY_CODE = '''
import os
import time

import chainer
import chainer.functions as F
import chainer.links as L


class Block(chainer.Chain):
    def __init__(self, channels):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(None, channels, 3, pad=1)

    def forward(self, x):
        return F.relu(self.conv(x))


class TinyNet(chainer.Chain):
    """Two conv blocks and a classifier; forward(x, layers) returns named outputs."""

    names = ("block1", "block2", "pool", "fc", "prob")

    def __init__(self, classes=5):
        super().__init__()
        with self.init_scope():
            self.block1 = Block(4)
            self.block2 = Block(6)
            self.fc = L.Linear(None, classes)

    def forward(self, x, layers=("prob",)):
        out = {}
        h = out["block1"] = self.block1(x)
        h = out["block2"] = self.block2(h)
        h = out["pool"] = F.average_pooling_2d(h, 4)
        h = out["fc"] = self.fc(h)
        out["prob"] = F.softmax(h)
        return {name: out[name] for name in layers}


def build(classes=5):
    return TinyNet(classes)


def broken(classes=5):
    raise RuntimeError("this model cannot be built")


def slow():
    """Waits for the release file next to this module before building (a model still loading)."""
    release = os.path.join(os.path.dirname(__file__), "release")
    deadline = time.monotonic() + 900
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.2)
    return TinyNet(3)
'''

TINY_YAML = """\
architecture: chain
python_path: ../../code
factory: tinynet:{factory}
factory_kwargs: {{classes: {classes}}}
input:
  shape: [3, 16, 16]
  channel_order: BGR
  mean: [100.0, 110.0, 120.0]
layers: [block1, block2, pool, fc, prob]
logits: fc
probability: prob
labels: labels.txt
"""


def tiny_weights(path: pathlib.Path, classes: int, seed: int) -> None:
    """Seeded weights for TinyNet (its npz layout), written by the test."""
    rng = np.random.default_rng(seed)
    arrays = {
        "block1/conv/W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.02,
        "block1/conv/b": rng.standard_normal(4).astype(np.float32) * 0.1,
        "block2/conv/W": rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.2,
        "block2/conv/b": rng.standard_normal(6).astype(np.float32) * 0.1,
        "fc/W": rng.standard_normal((classes, 6 * 4 * 4)).astype(np.float32) * 0.2,
        "fc/b": rng.standard_normal(classes).astype(np.float32) * 0.1,
    }
    np.savez(path, **arrays)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("repo")
    code = root / "code"
    code.mkdir()
    (code / "tinynet.py").write_text(textwrap.dedent(TINY_CODE))
    models = root / "models"
    for name, factory, classes, version in (("tiny", "build", 5, "2"), ("broken", "broken", 5, "1")):
        directory = models / name
        (directory / version).mkdir(parents=True)
        (directory / "model.yaml").write_text(TINY_YAML.format(factory=factory, classes=classes))
        (directory / "labels.txt").write_text("".join(f"{name} class {i}\n" for i in range(classes)))
        tiny_weights(directory / version / "weights.npz", classes, seed=7)
    # An older version that must not be served.
    (models / "tiny" / "1").mkdir()
    tiny_weights(models / "tiny" / "1" / "weights.npz", 5, seed=99)
    slow = models / "zslow"
    (slow / "1").mkdir(parents=True)
    (slow / "model.toml").write_text(
        'architecture = "chain"\npython_path = "../../code"\nfactory = "tinynet:slow"\n'
        'layers = ["block1", "block2", "pool", "fc", "prob"]\nlogits = "fc"\nprobability = "prob"\n'
        "[input]\nshape = [3, 16, 16]\n"
    )
    tiny_weights(slow / "1" / "weights.npz", 3, seed=8)
    return root


@pytest.fixture(scope="module")
def multi(repository: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    args = [f"--model={name}=random:{seed}" for name, seed in SEEDS.items()]
    args += ["--model-repository", str(repository / "models"), "--max-batch-size", "4"]
    with serving(args, tmp_path_factory.mktemp("multi")) as process:
        with layergrad.Client(process.address, timeout=600) as client:
            wait_settled(client, {"zslow"})
            yield process, client


def wait_settled(client: layergrad.Client, loading: set[str]) -> None:
    """Waits until every model but those in ``loading`` has loaded or failed."""
    give_up = time.monotonic() + 1200
    while True:
        states = {m.name: m.state for m in client.list_models()}
        if all(state != "loading" for name, state in states.items() if name not in loading):
            return
        assert time.monotonic() < give_up, f"models still loading: {states}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def nets():
    """The built-in models with the server's seeded weights, built here once each (lazily)."""
    built: dict[str, chainer.Link] = {}

    def get(name: str) -> chainer.Link:
        if name not in built:
            built[name] = ADAPTERS[name]().random(SEEDS[name])
        return built[name]

    return get


@pytest.fixture(scope="module")
def tiny_net(repository: pathlib.Path):
    import sys

    sys.path.insert(0, str(repository / "code"))
    try:
        import tinynet
    finally:
        sys.path.remove(str(repository / "code"))
    net = tinynet.build(5)
    chainer.serializers.load_npz(str(repository / "models" / "tiny" / "2" / "weights.npz"), net)
    return net


def prepared(name: str, seed: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """A prepared input for model ``name`` from a deterministic image (its own prepare())."""
    adapter = ADAPTERS[name]()
    return adapter.prepare(make_rgb(seed), size)[None]


def reference(net, x, loss_of, pattern: str, layers=(), links=(), params=(), forward_layers=None):
    """The plain Chainer computation: (input grad, layer grads, link grads, param grads)."""
    names = list(forward_layers or [])
    with chainer.using_config("train", False):
        v = chainer.Variable(x)
        with capture_links(net, list(links)) as recorder:
            acts = net.forward(v, layers=names)
        loss = loss_of(acts)
        link_vars = [recorder.outputs[p] for p in links]
        if pattern == "grad":
            targets = [v, *(acts[n] for n in layers), *link_vars]
            named = dict(net.namedparams())
            targets += [named["/" + p] for p in params]
            grads = chainer.grad([loss], targets)
            arrays = [g.array for g in grads]
            n_layers, n_links = len(layers), len(links)
            return (
                arrays[0],
                dict(zip(layers, arrays[1 : 1 + n_layers], strict=True)),
                dict(zip(links, arrays[1 + n_layers : 1 + n_layers + n_links], strict=True)),
                dict(zip(params, arrays[1 + n_layers + n_links :], strict=True)),
            )
        net.cleargrads()
        loss.backward(retain_grad=pattern == "backward_retain_grad")
        named = dict(net.namedparams())
        result = (
            v.grad,
            {n: acts[n].grad for n in layers},
            {p: var.grad for p, var in zip(links, link_vars, strict=True)},
            {p: named["/" + p].grad.copy() for p in params},
        )
        net.cleargrads()
        return result


def class_score(layer: str, classes: list[int]):
    return lambda acts: F.sum(F.select_item(acts[layer], np.asarray(classes, np.int32)))


def close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-6 * float(np.abs(expected).max()))


# ---- the models the server lists --------------------------------------------------


def test_the_server_lists_every_configured_model_with_its_state(multi) -> None:
    _, client = multi
    models = {m.name: m for m in client.list_models()}
    assert list(models) == [*SEEDS, "broken", "tiny", "zslow"]
    assert [m.name for m in models.values() if m.default] == ["vgg16"]
    for name in SEEDS:
        assert models[name].state == "ready" and models[name].weights_source == f"random:{SEEDS[name]}"
    assert models["resnet152"].architecture == "ResNet152"
    assert models["tiny"].version == "2" and models["tiny"].architecture == "tiny"
    assert models["broken"].state == "failed" and "cannot be built" in models["broken"].message


def test_model_info_describes_each_model(multi) -> None:
    _, client = multi
    resnet = client.model_info(model="resnet50")
    assert (resnet.model, resnet.model_name) == ("resnet50", "ResNet50")
    assert resnet.input_spec.min_size == (32, 32) and resnet.input_spec.mean == pytest.approx(
        (103.063, 115.903, 123.152)
    )
    assert resnet.logits_layer == "fc6" and resnet.labels[281] == "tabby, tabby cat"
    assert "res4/b5" in {link.name for link in resnet.links}
    assert resnet.weights.pretrained is False
    default = client.model_info()
    assert (default.model, default.model_name, default.input_spec.resize) == ("vgg16", "VGG16", "bicubic")
    tiny = client.model_info(model="tiny")
    assert tiny.labels == tuple(f"tiny class {i}" for i in range(5))
    assert tiny.input_spec.shape == (3, 16, 16) and tiny.layer_names == (
        "block1",
        "block2",
        "pool",
        "fc",
        "prob",
    )


def test_each_model_has_its_own_health_service(multi) -> None:
    process, _ = multi
    with grpc.insecure_channel(process.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name, expected in (("resnet50", "SERVING"), ("broken", "NOT_SERVING"), ("", "SERVING")):
            service = f"layergrad.model.{name}" if name else ""
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=60).status
            assert health_pb2.HealthCheckResponse.ServingStatus.Name(status) == expected


# ---- each built-in model against Chainer in-process ------------------------------


@pytest.mark.parametrize("name", list(SEEDS))
def test_input_gradient_of_each_builtin_equals_chainer(multi, nets, name: str) -> None:
    _, client = multi
    adapter = ADAPTERS[name]()
    x = prepared(name, seed=SEEDS[name])
    got = client.gradients(x, ClassScore(adapter.logits_layer, [281]), input=True, model=name)
    expected, *_ = reference(
        nets(name), x, class_score(adapter.logits_layer, [281]), "grad", forward_layers=[adapter.logits_layer]
    )
    assert np.abs(expected).max() > 0
    close(got.input, expected)


def test_an_encoded_image_is_prepared_by_its_models_own_prepare(multi, nets) -> None:
    _, client = multi
    image = encode(make_rgb(11), "png")
    for name in ("googlenet", "resnet50"):  # means differ from VGG16's
        got = client.predict([image], ["prob"], model=name)["prob"]
        import io

        from PIL import Image

        x = ADAPTERS[name]().prepare(Image.open(io.BytesIO(image)).convert("RGB"))[None]
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            expected = nets(name).forward(x, layers=["prob"])["prob"].array
        close(got, expected)


@pytest.mark.parametrize("pattern", ["backward", "backward_retain_grad", "grad"])
@pytest.mark.parametrize("name", ["googlenet", "resnet50"])
def test_every_pattern_on_the_smaller_builtins(multi, nets, name: str, pattern: str) -> None:
    _, client = multi
    adapter = ADAPTERS[name]()
    layer = {"googlenet": "inception_4a", "resnet50": "res3"}[name]
    param = {"googlenet": "loss3_fc/W", "resnet50": "res5/a/conv1/W"}[name]
    layers = [] if pattern == "backward" else [layer]
    x = prepared(name, seed=20)
    labels = [7]
    got = client.gradients(
        x,
        SoftmaxCrossEntropy(labels),
        pattern=pattern,
        input=True,
        layers=layers,
        parameters=[param],
        model=name,
    )

    def loss_of(acts):
        return F.softmax_cross_entropy(acts[adapter.logits_layer], np.asarray(labels, np.int32))

    gx, glayers, _, gparams = reference(
        nets(name), x, loss_of, pattern, layers, (), [param], [adapter.logits_layer, *layers]
    )
    close(got.input, gx)
    close(got.parameters[param], gparams[param])
    for layer_name in layers:
        close(got.layers[layer_name], glayers[layer_name])
    assert got.loss == pytest.approx(float(loss_of_value(nets(name), x, loss_of, adapter)), rel=1e-6)


def loss_of_value(net, x, loss_of, adapter) -> float:
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return float(loss_of(net.forward(x, layers=[adapter.logits_layer])).array)


def test_resnet_at_another_input_size_with_a_link_path_target(multi, nets) -> None:
    _, client = multi
    x = prepared("resnet50", seed=21, size=(160, 128))
    got = client.gradients(
        x,
        SumOfSquares("fc6"),
        input=True,
        layers=["res4"],
        links=["res4/b5", "res2/a/conv1"],
        model="resnet50",
    )
    gx, glayers, glinks, _ = reference(
        nets("resnet50"),
        x,
        lambda acts: F.sum(F.square(acts["fc6"])),
        "grad",
        ["res4"],
        ["res2/a/conv1", "res4/b5"],
        (),
        ["fc6", "res4"],
    )
    assert got.input.shape == (1, 3, 160, 128) and got.links["res4/b5"].shape == (1, 1024, 10, 8)
    close(got.input, gx)
    close(got.layers["res4"], glayers["res4"])
    for path in ("res4/b5", "res2/a/conv1"):
        close(got.links[path], glinks[path])
    # One name, two tensors: VGG16's layer conv5_3 is after its ReLU, the link conv5_3 (the
    # convolution) before it, so the link's gradient is the layer's where the ReLU passes.
    vgg = client.gradients(
        prepared("vgg16", seed=22),
        SumOfSquares("fc7"),
        layers=["conv5_3"],
        links=["conv5_3"],
        activations=["conv5_3"],
        model="vgg16",
    )
    passed = vgg.activations["conv5_3"] > 0
    assert 0 < passed.mean() < 1
    close(vgg.links["conv5_3"], np.where(passed, vgg.layers["conv5_3"], 0))


def test_resnet_refuses_an_input_below_its_minimum_size(multi) -> None:
    _, client = multi
    with pytest.raises(layergrad.InvalidArgument, match=r"H >= 32") as caught:
        client.gradients(
            np.zeros((1, 3, 16, 64), np.float32), SumOfSquares("fc6"), input=True, model="resnet50"
        )
    assert caught.value.reason == "SHAPE_MISMATCH"


def test_googlenet_aux_heads_follow_the_graph(multi, nets) -> None:
    _, client = multi
    x = prepared("googlenet", seed=23)
    # loss1_fc2 comes after prob in the layer list but branches off inception_4a.
    got = client.gradients(
        x, SumOfSquares("loss1_fc2"), layers=["inception_4a"], input=True, model="googlenet"
    )
    gx, glayers, _, _ = reference(
        nets("googlenet"),
        x,
        lambda acts: F.sum(F.square(acts["loss1_fc2"])),
        "grad",
        ["inception_4a"],
        forward_layers=["loss1_fc2", "inception_4a"],
    )
    close(got.input, gx)
    close(got.layers["inception_4a"], glayers["inception_4a"])
    for loss_layer, target in (("loss1_fc2", "inception_4b"), ("prob", "loss1_fc2")):
        with pytest.raises(layergrad.InvalidArgument) as caught:
            client.gradients(x, SumOfSquares(loss_layer), layers=[target], model="googlenet")
        assert caught.value.reason == "LAYER_AFTER_LOSS"


def test_unknown_link_is_refused_with_the_links_listed(multi) -> None:
    _, client = multi
    with pytest.raises(layergrad.InvalidArgument, match="did you mean 'res4/b5'") as caught:
        client.gradients(prepared("resnet50", 1), SumOfSquares("fc6"), links=["res4/b99"], model="resnet50")
    assert caught.value.reason == "UNKNOWN_LINK"


# ---- a user's own Chain -----------------------------------------------------------


@pytest.mark.parametrize("pattern", ["backward", "backward_retain_grad", "grad"])
def test_user_chain_from_the_repository_equals_the_chain_itself(multi, tiny_net, pattern: str) -> None:
    _, client = multi
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32) * 50
    layers = [] if pattern == "backward" else ["block2"]
    got = client.gradients(
        x,
        ClassScore("fc", [1, 3]),
        pattern=pattern,
        input=True,
        layers=layers,
        parameters=["fc/W"],
        model="tiny",
    )
    gx, glayers, _, gparams = reference(
        tiny_net, x, class_score("fc", [1, 3]), pattern, layers, (), ["fc/W"], ["fc", *layers]
    )
    close(got.input, gx)
    close(got.parameters["fc/W"], gparams["fc/W"])
    for layer in layers:
        close(got.layers[layer], glayers[layer])


def test_user_chain_top_classes_carry_its_labels(multi, tiny_net) -> None:
    _, client = multi
    image = make_rgb(3, 40, 40)
    top = client.top_classes([image], k=2, model="tiny")[0]
    from layergrad_server.models.base import InputSpec
    from layergrad_server.models.chain import caffe_prepare

    x = caffe_prepare(image, InputSpec((3, 16, 16), mean=(100.0, 110.0, 120.0)))[None]
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        prob = tiny_net.forward(x, layers=["prob"])["prob"].array[0]
    best = np.argsort(-prob, kind="stable")[:2]
    assert [t.index for t in top] == [int(c) for c in best]
    assert [t.name for t in top] == [f"tiny class {int(c)}" for c in best]
    index, probability = top[0]  # a (index, probability) pair
    assert index == int(best[0])
    assert probability == pytest.approx(float(prob[best[0]]), rel=1e-6)


# ---- models that cannot be served -------------------------------------------------


def test_unknown_model_is_not_found_listing_the_served_ones(multi) -> None:
    _, client = multi
    with pytest.raises(layergrad.NotFound, match="resnet50") as caught:
        client.predict(np.zeros((1, 3, 224, 224), np.float32), model="alexnet")
    assert caught.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(layergrad.NotFound, match="served version: '2'"):
        client.model_info(model="tiny", model_version="1")
    assert client.model_info(model="tiny", model_version="2").model == "tiny"


def test_a_model_that_failed_to_load_says_why_and_the_others_serve(multi) -> None:
    _, client = multi
    with pytest.raises(layergrad.FailedPrecondition, match="cannot be built") as caught:
        client.predict(np.zeros((1, 3, 16, 16), np.float32), model="broken")
    assert caught.value.reason == "MODEL_LOAD_FAILED"
    assert client.predict(np.zeros((1, 3, 16, 16), np.float32), model="tiny")["prob"].shape == (1, 5)


def test_a_model_still_loading_is_unavailable_then_serves(multi, repository: pathlib.Path) -> None:
    _, client = multi
    x = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(layergrad.Unavailable) as caught:
        client.predict(x, model="zslow", wait_for_ready=False)
    assert caught.value.reason == "MODEL_LOADING"
    assert client.predict(prepared("resnet50", 2), model="resnet50")["prob"].shape == (1, 1000)
    (repository / "code" / "release").write_text("")
    wait_settled(client, set())
    assert client.predict(x, model="zslow")["prob"].shape == (1, 3)


def test_a_client_default_model_applies_to_every_call(multi) -> None:
    process, _ = multi
    with layergrad.Client(process.address, timeout=600, model="tiny") as tiny:
        assert tiny.model_info().model == "tiny"
        x = np.zeros((1, 3, 16, 16), np.float32)
        assert tiny.predict(x)["prob"].shape == (1, 5)
        assert tiny.input_gradient(x, ClassScore("fc", [0])).shape == (1, 3, 16, 16)
        assert tiny.predict(prepared("vgg16", 1), model="vgg16")["prob"].shape == (1, 1000)


def test_random_weights_from_an_npz_file_are_not_reported_pretrained(client) -> None:
    """The shared server loads seeded random VGG16 weights from an npz file."""
    weights = client.model_info().weights
    assert not weights.pretrained and weights.source.endswith("(random:0)")
    assert weights.file_sha256  # still the file's digest


def test_cli_lists_the_models_and_names_the_top_classes(multi, capsys, tmp_path: pathlib.Path) -> None:
    from layergrad import cli

    process, _ = multi
    assert cli.main(["--target", process.address, "models"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["vgg16"][1:4] == ["(default)", "1", "ready"] and rows["broken"][2] == "failed"
    assert rows["resnet50"][1:4] == ["1", "ready", "ResNet50"]
    image = tmp_path / "image.png"
    image.write_bytes(encode(make_rgb(3, 40, 40), "png"))
    assert (
        cli.main(["--target", process.address, "--model", "tiny", "predict", str(image), "--top", "2"]) == 0
    )
    ranked = capsys.readouterr().out.splitlines()[1:3]
    assert all(line.split()[1] == "class" and "tiny class" in line for line in ranked)
