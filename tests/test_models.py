"""Model adapters against plain Chainer: the same weights give bit-identical layers, gradients and
preparation; the graph (not the layer list) decides what a loss depends on; links are captured by path."""

from __future__ import annotations

import pathlib

import chainer
import chainer.functions as F  # noqa: N812
import chainer.links as L  # noqa: N812
import numpy as np
import pytest
from chainer.links.model.vision import googlenet, resnet, vgg
from conftest import make_rgb
from layergrad_server.engine import (
    Engine,
    GradientQuery,
    Pattern,
    SoftmaxCrossEntropy,
    SumOfSquares,
    WeightsSource,
)
from layergrad_server.errors import InvalidArgument
from layergrad_server.models import BUILTINS, InputSpec, imagenet_labels, trace
from layergrad_server.models.chain import ChainAdapter, ChainConfig
from layergrad_server.weights.convert import VGG16_LAYOUT
from PIL import Image


def _input(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((1, *shape)) * 50).astype(np.float32)


def _saved(net: chainer.Link, path: pathlib.Path) -> pathlib.Path:
    chainer.serializers.save_npz(str(path), net, compression=False)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """name -> (adapter, its net on random:0 weights, plain Chainer link on the same weights)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            adapter = BUILTINS[name]()
            net = adapter.random(0)
            path = _saved(net, tmp_path_factory.mktemp(name) / "weights.npz")
            cache[name] = (adapter, net, adapter.link_class(pretrained_model=str(path)))
        return cache[name]

    return get


PREPARE = {
    "VGG16": vgg.prepare,
    "VGG19": vgg.prepare,
    "GoogLeNet": googlenet.prepare,
    "ResNet50": resnet.prepare,
}


@pytest.mark.parametrize("name", ["VGG16", "VGG19", "GoogLeNet", "ResNet50"])
def test_builtin_adapter_matches_the_plain_chainer_link_bit_for_bit(built, name: str) -> None:
    adapter, net, plain = built(name)
    assert adapter.layer_names == tuple(plain.available_layers)
    description = trace(adapter, net)
    named = {path.lstrip("/"): p for path, p in plain.namedparams()}
    assert sorted(p.name for p in description.parameters) == sorted(named)
    assert all(named[p.name].shape == p.shape for p in description.parameters)
    assert all(named[p.name].grad is not None for p in description.parameters)  # plain link: NaN grads
    assert all(p.grad is None for _, p in net.namedparams())  # adapter: cleared after loading

    image = Image.fromarray(make_rgb(2))
    np.testing.assert_array_equal(adapter.prepare(image), PREPARE[name](image))
    x = _input(adapter.input_spec.shape)
    layers = list(adapter.layer_names)
    with chainer.using_config("train", False):
        xa, xb = chainer.Variable(x.copy()), chainer.Variable(x.copy())
        ours = adapter.forward(net, xa, layers).layers
        theirs = plain.forward(xb, layers=layers)
        for layer in layers:
            np.testing.assert_array_equal(ours[layer].array, theirs[layer].array, err_msg=layer)
            assert ours[layer].shape[1:] == description.layer(layer).shape
        (ga,) = chainer.grad([F.sum(F.square(ours["prob"]))], [xa])
        (gb,) = chainer.grad([F.sum(F.square(theirs["prob"]))], [xb])
    np.testing.assert_array_equal(ga.array, gb.array)
    # Calibrated random weights: moderate logits, an informative softmax, a non-zero gradient.
    logits = ours[adapter.logits_layer].array
    assert 0.1 < logits.std() < 10
    assert ours["prob"].array.max() < 0.5
    assert np.count_nonzero(ga.array) > ga.size // 2


def test_random_weights_depend_on_the_seed_only(built) -> None:
    adapter, net, _ = built("ResNet50")
    again = adapter.random(0)
    other = adapter.random(1)
    ours = dict(net.namedparams())
    assert all(np.array_equal(ours[n].array, p.array) for n, p in again.namedparams())
    assert not np.array_equal(ours["/fc6/W"].array, dict(other.namedparams())["/fc6/W"].array)
    assert np.array_equal(net.res4.b5.bn1.avg_var, again.res4.b5.bn1.avg_var)


def test_googlenet_aux_heads_are_judged_by_the_graph_not_the_layer_list(built) -> None:
    adapter, net, _ = built("GoogLeNet")
    description = trace(adapter, net)
    names = adapter.layer_names
    assert names.index("loss1_fc2") > names.index("prob")  # after prob in the list...
    assert not description.loss_depends_on_layer("prob", "loss1_fc2")  # ...and not on its path
    assert not description.loss_depends_on_layer("prob", "loss2_fc2")
    assert description.loss_depends_on_layer("loss1_fc2", "inception_4a")
    assert not description.loss_depends_on_layer("loss1_fc2", "inception_4b")
    assert description.loss_depends_on_layer("loss2_fc2", "inception_4d")
    assert not description.loss_depends_on_layer("loss2_fc2", "inception_4e")
    assert description.loss_depends_on_layer("prob", "inception_5b")
    assert description.loss_depends_on_link("loss1_fc2", "loss1_conv")
    assert not description.loss_depends_on_link("prob", "loss1_conv")
    assert description.loss_depends_on_link("prob", "inc4a")


def test_resnet_link_path_is_captured_and_its_gradient_is_chainers(built) -> None:
    adapter, net, plain = built("ResNet50")
    x = _input(adapter.input_spec.shape)
    with chainer.using_config("train", False):
        out = adapter.forward(net, chainer.Variable(x.copy()), ["prob"], links=["res4/b5"])
        (g_ours,) = chainer.grad([F.sum(F.square(out.layers["prob"]))], [out.links["res4/b5"]])
        # The same tensor by hand: the network up to res4's sixth block.
        h = F.max_pooling_2d(F.relu(plain.bn1(plain.conv1(chainer.Variable(x.copy())))), ksize=3, stride=2)
        h = plain.res3(plain.res2(h))
        for block in ("a", "b1", "b2", "b3", "b4", "b5"):
            h = getattr(plain.res4, block)(h)
    np.testing.assert_array_equal(out.links["res4/b5"].array, h.array)
    assert out.links["res4/b5"].shape == (1, 1024, 14, 14)
    assert np.count_nonzero(g_ours.array) > 0
    description = trace(adapter, net)
    assert description.link("res4/b5").shape == (1024, 14, 14)
    assert description.loss_depends_on_link("prob", "res4/b5")
    assert not description.loss_depends_on_link("res3", "res4/b5")
    order = [p.name for p in description.parameters]
    # Model order follows the forward, not namedparams' alphabetical order (bn1 before conv1).
    assert order.index("res2/a/conv1/W") < order.index("res2/a/bn1/beta") < order.index("res2/a/conv2/W")
    assert order.index("conv1/W") == 0 and order[-1] == "fc6/b"


def test_a_layer_and_a_link_of_one_name_are_different_tensors(built) -> None:
    adapter, net, _ = built("VGG16")
    x = _input(adapter.input_spec.shape)
    with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
        out = adapter.forward(net, chainer.Variable(x), ["conv5_3"], links=["conv5_3"])
    layer, link = out.layers["conv5_3"].array, out.links["conv5_3"].array
    np.testing.assert_array_equal(layer, np.maximum(link, 0))  # the layer is after the ReLU
    assert (link < 0).any()


def test_resnet_accepts_other_input_sizes(built) -> None:
    adapter, net, plain = built("ResNet50")
    assert adapter.input_spec.accepts((3, 160, 192)) and not adapter.input_spec.accepts((3, 16, 16))
    assert not BUILTINS["VGG16"].input_spec.accepts((3, 160, 160))
    image = Image.fromarray(make_rgb(4))
    prepared = adapter.prepare(image, size=(160, 192))
    np.testing.assert_array_equal(prepared, resnet.prepare(image, size=(192, 160)))
    description = trace(adapter, net, size=(160, 192))
    assert description.layer("res5").shape == (2048, 5, 6)
    assert description.layer("prob").shape == (1000,)
    with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
        ours = adapter.forward(net, chainer.Variable(prepared[None]), ["res5", "prob"]).layers
        theirs = plain.forward(chainer.Variable(prepared[None].copy()), layers=["res5", "prob"])
    np.testing.assert_array_equal(ours["prob"].array, theirs["prob"].array)


def test_resnet152_random_weights_keep_logits_moderate_in_model_order() -> None:
    adapter = BUILTINS["ResNet152"]()
    net = adapter.random(0)
    description = trace(adapter, net)
    order = [p.name for p in description.parameters]
    assert order.index("res4/b9/conv3/W") < order.index("res4/b10/conv1/W") < order.index("res5/a/conv1/W")
    with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
        logits = adapter.forward(net, chainer.Variable(_input((3, 224, 224))), ["fc6"]).layers["fc6"].array
    assert 0.1 < logits.std() < 10  # Chainer's own initialisation: about 9e10


def test_imagenet_labels_follow_the_caffe_models_class_order() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[281] == "tabby, tabby cat"
    assert labels[0].startswith("tench")
    assert BUILTINS["GoogLeNet"]().labels() is labels


# ---- a user's own Chain ----------------------------------------------------------------------


class Block(chainer.Chain):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(n_in, n_out, 3, pad=1)

    def forward(self, x: chainer.Variable) -> chainer.Variable:
        return F.max_pooling_2d(F.relu(self.conv(x)), 2)


class TinyNet(chainer.Chain):
    """Three conv blocks and a classifier over 4 classes; forward(x, layers) returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        with self.init_scope():
            self.block1 = Block(3, 8)
            self.block2 = Block(8, 8)
            self.block3 = Block(8, 16)
            self.fc = L.Linear(None, 4)

    def forward(self, x: chainer.Variable, layers: list[str] | None = None):
        h1 = self.block1(x)
        h3 = self.block3(self.block2(h1))
        logits = self.fc(h3)
        acts = {"block1": h1, "block3": h3, "logits": logits, "prob": F.softmax(logits)}
        return acts if layers is not None else acts["prob"]


def build_tiny() -> TinyNet:
    return TinyNet()


SPEC = InputSpec((3, 32, 32), mean=(100.0, 110.0, 120.0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("tiny")
    labels = directory / "labels.txt"
    labels.write_text("cat\ndog\nbird\nfish\n", encoding="utf-8")
    config = ChainConfig(
        "tiny",
        "test_models:build_tiny",
        SPEC,
        ("block1", "block3", "logits", "prob"),
        logits_layer="logits",
        probability_layer="prob",
        labels_file=labels,
    )
    adapter = ChainAdapter(config)
    net = adapter.random(7)
    return adapter, net, _saved(net, directory / "weights.npz")


def test_user_chain_from_an_import_path_matches_the_chain_itself(tiny) -> None:
    adapter, _, weights = tiny
    assert adapter.labels() == ("cat", "dog", "bird", "fish")
    reference = TinyNet()
    reference(np.zeros((1, *SPEC.shape), dtype=np.float32))  # lazy shapes
    chainer.serializers.load_npz(str(weights), reference)
    loaded = adapter.load(str(weights))
    image = Image.fromarray(make_rgb(5))
    prepared = adapter.prepare(image)
    expected = np.asarray(image.resize((32, 32)), dtype=np.float32)[:, :, ::-1] - np.array(
        SPEC.mean, np.float32
    )
    np.testing.assert_array_equal(prepared, expected.transpose(2, 0, 1))
    with chainer.using_config("train", False):
        xa, xb = chainer.Variable(prepared[None].copy()), chainer.Variable(prepared[None].copy())
        ours = adapter.forward(loaded, xa, ["block3", "prob"], links=["block3/conv"])
        theirs = reference.forward(xb, layers=["prob"])
        conv = reference.block3.conv(reference.block2(reference.block1(chainer.Variable(prepared[None]))))
        (ga,) = chainer.grad([ours.layers["prob"][0, 2]], [xa])
        (gb,) = chainer.grad([theirs["prob"][0, 2]], [xb])
    np.testing.assert_array_equal(ours.layers["prob"].array, theirs["prob"].array)
    np.testing.assert_array_equal(ours.links["block3/conv"].array, conv.array)
    np.testing.assert_array_equal(ga.array, gb.array)
    assert np.count_nonzero(ga.array) > 0
    description = trace(adapter, loaded)
    assert [p.name for p in description.parameters] == [
        "block1/conv/W",
        "block1/conv/b",
        "block2/conv/W",
        "block2/conv/b",
        "block3/conv/W",
        "block3/conv/b",
        "fc/W",
        "fc/b",
    ]
    assert description.layer("block3").shape == (16, 4, 4)
    assert not description.loss_depends_on_layer("block1", "block3")


def test_user_chain_layers_by_link_path(tiny) -> None:
    _, _, weights = tiny
    config = ChainConfig(
        "tiny-links", "test_models:build_tiny", SPEC, ("block1", "block3/conv", "fc"), layers_from="links"
    )
    adapter = ChainAdapter(config)
    net = adapter.load(str(weights))
    x = chainer.Variable(_input(SPEC.shape))
    with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
        acts = adapter.forward(net, x, ["block3/conv", "fc"]).layers
        plain = net.block3.conv(net.block2(net.block1(x)))
    np.testing.assert_array_equal(acts["block3/conv"].array, plain.array)
    assert acts["fc"].shape == (1, 4)
    with pytest.raises(ValueError, match="not among the exposed layers"):
        ChainConfig("bad", "test_models:build_tiny", SPEC, ("fc",), logits_layer="logits")


# ---- the engine over an adapter ------------------------------------------------------------


def test_vgg16_model_order_is_the_npz_layout_order(built) -> None:
    adapter, net, _ = built("VGG16")
    assert [p.name for p in trace(adapter, net).parameters] == list(VGG16_LAYOUT)


def test_engine_on_googlenet_refuses_an_aux_head_target_of_a_prob_loss() -> None:
    model = Engine(
        WeightsSource("random:0", pretrained=False, random_seed=0), adapter=BUILTINS["GoogLeNet"]()
    )
    inputs = _input(model.input_shape)

    def plan(layer: str, targets: list[str], all_layers: bool = False):
        query = GradientQuery(
            inputs, SumOfSquares(layer), Pattern.GRAD, layers=targets, all_layers=all_layers
        )
        return model.plan(query)

    with pytest.raises(InvalidArgument) as caught:
        plan("prob", ["loss1_fc2"])
    assert caught.value.reason == "LAYER_AFTER_LOSS"
    assert plan("loss1_fc2", ["inception_4a"]).layers == ("inception_4a",)
    with pytest.raises(InvalidArgument):
        plan("loss1_fc2", ["inception_4b"])
    everything = plan("loss2_fc2", [], all_layers=True).layers
    assert everything[-3:] == ("inception_4c", "inception_4d", "loss2_fc2")
    assert "prob" not in everything and "inception_4e" not in everything
    result = model.gradients(plan("loss1_fc2", ["inception_4a"]))
    assert np.count_nonzero(result.tensors[0].array) > 0
    cross_entropy = GradientQuery(inputs, SoftmaxCrossEntropy(np.array([3])), Pattern.GRAD, input=True)
    assert model.plan(cross_entropy).loss_layer == "loss3_fc"  # GoogLeNet's logits
