"""Weights for every built-in model: conversion from Caffe, checks, cache, download, CLI.

Each model's synthetic caffemodel (seeded random blobs, named and shaped like the
published model's layers) is written with the server's Caffe schema, converted,
loaded into the model's Chainer link through its adapter, and compared bit for
bit with the link Chainer's own ``_transfer_*`` functions fill from the same
blobs (VGG19, which Chainer converts without renaming, with the blobs
themselves). Each big link is built once. Downloads go to a local HTTP server
on 127.0.0.1 only.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import layergrad_server  # noqa: F401  (applies the numpy 2 shim Chainer needs)

# isort: split
import chainer
import numpy as np
import pytest
from chainer.links.model.vision import googlenet, resnet
from layergrad_server.models.vision import BUILTINS
from layergrad_server.weights import WeightsError, resolve_weights, store
from layergrad_server.weights._gen import caffe_pb2
from layergrad_server.weights.cli import weights_main
from layergrad_server.weights.convert import MODELS, LinearLayer, check_npz, convert_caffemodel

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = {name.lower(): cls for name, cls in BUILTINS.items()}


# --- synthetic caffemodels -------------------------------------------------------------------------

Blobs = dict[str, list[np.ndarray]]  # Caffe layer name -> its blobs, in order


@dataclass
class Caffe:
    """One synthetic Caffe model: its layers' blobs and the file they were written to."""

    model: str
    blobs: Blobs
    types: dict[str, str]
    path: Path


def _synthetic_blobs(model: str, seed: int) -> tuple[Blobs, dict[str, str]]:
    """Random blobs for every weighted layer of ``model``'s published caffemodel.

    ResNet-101's and -152's conv1 have no bias blob, as published. Batch norm
    variances are positive and scale factors vary around 1, as Caffe stores them.
    """
    rng = np.random.default_rng(seed)
    blobs: Blobs = {}
    types_: dict[str, str] = {}
    for rule in MODELS[model].rules:
        if isinstance(rule, LinearLayer):
            arrays = [rng.standard_normal(rule.weight, dtype=np.float32)]
            if rule.bias is not None and not rule.bias_optional:
                arrays.append(rng.standard_normal(rule.bias, dtype=np.float32))
            blobs[rule.caffe_name], types_[rule.caffe_name] = arrays, rule.caffe_type
        else:
            c = rule.channels
            factor = np.array([rng.uniform(0.5, 2.0)], dtype=np.float32)
            blobs[rule.bn_name] = [
                rng.standard_normal(c, dtype=np.float32),
                rng.random(c, dtype=np.float32) + np.float32(0.1),
                factor,
            ]
            blobs[rule.scale_name] = [rng.standard_normal(c, dtype=np.float32) for _ in range(2)]
            types_[rule.bn_name], types_[rule.scale_name] = "BatchNorm", "Scale"
    return blobs, types_


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _blob(values: np.ndarray) -> caffe_pb2.BlobProto:
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(values.shape)
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()  # packed field 5 (data), merged at once
    blob.MergeFromString(_varint((5 << 3) | 2) + _varint(len(raw)) + raw)
    return blob


_V1 = {
    "Convolution": caffe_pb2.V1LayerParameter.CONVOLUTION,
    "InnerProduct": caffe_pb2.V1LayerParameter.INNER_PRODUCT,
}


def _net(blobs: Blobs, types_: dict[str, str], *, v1: bool = False) -> caffe_pb2.NetParameter:
    """The network, a ReLU after every weighted layer (layers without blobs are skipped by the converter)."""
    net = caffe_pb2.NetParameter(name="synthetic")
    for name, arrays in blobs.items():
        layer = net.layers.add() if v1 else net.layer.add()
        layer.name = name
        layer.type = _V1[types_[name]] if v1 else types_[name]
        layer.blobs.extend(_blob(array) for array in arrays)
        relu = net.layers.add() if v1 else net.layer.add()
        relu.name = f"{name}/relu"
        relu.type = caffe_pb2.V1LayerParameter.RELU if v1 else "ReLU"
    return net


def _write(model: str, directory: Path, seed: int = 0, *, v1: bool = False) -> Caffe:
    blobs, types_ = _synthetic_blobs(model, seed)
    path = directory / f"{model}.caffemodel"
    path.write_bytes(_net(blobs, types_, v1=v1).SerializeToString())
    return Caffe(model, blobs, types_, path)


def _rewrite(caffe: Caffe, path: Path, change) -> Path:
    """A copy of ``caffe``'s file with ``change(net)`` applied."""
    net = caffe_pb2.NetParameter.FromString(caffe.path.read_bytes())
    change(net)
    path.write_bytes(net.SerializeToString())
    return path


def _layer(net: caffe_pb2.NetParameter, name: str) -> caffe_pb2.LayerParameter:
    return next(layer for layer in net.layer if layer.name == name)


# --- Chainer's own transfer, fed from the blobs like CaffeFunction feeds it -------------------------


class _CaffeLinks:
    """What ``CaffeFunction`` holds after reading the blobs, for Chainer's ``_transfer_*`` functions.

    Convolution/InnerProduct: ``W`` and ``b``; BatchNorm: ``avg_mean`` and ``avg_var``
    divided in place by the scale factor (``CaffeFunction._setup_batchnorm``); Scale:
    ``W`` and ``bias.b`` (``_setup_scale``). Reached by ``src[name]`` and ``src.name``.
    """

    def __init__(self, blobs: Blobs, types_: dict[str, str]) -> None:
        self._blobs, self._types = blobs, types_

    def __getitem__(self, name: str) -> types.SimpleNamespace:
        arrays = [array.copy() for array in self._blobs[name]]
        kind = self._types[name]
        if kind == "BatchNorm":
            mean, var, factor = arrays
            mean /= factor.tolist()[0]
            var /= factor.tolist()[0]
            return types.SimpleNamespace(avg_mean=mean, avg_var=var)
        if kind == "Scale":
            return types.SimpleNamespace(
                W=types.SimpleNamespace(array=arrays[0]),
                bias=types.SimpleNamespace(b=types.SimpleNamespace(array=arrays[1])),
            )
        bias = types.SimpleNamespace(array=arrays[1]) if len(arrays) > 1 else None
        return types.SimpleNamespace(W=types.SimpleNamespace(array=arrays[0]), b=bias)

    def __getattr__(self, name: str) -> types.SimpleNamespace:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]


def _chainer_reference(caffe: Caffe, adapter) -> dict[str, np.ndarray]:
    """The arrays Chainer's own conversion of ``caffe``'s blobs gives the model's link."""
    if caffe.model.startswith("vgg"):  # Chainer saves CaffeFunction itself: the npz keys are Caffe's names
        return {
            f"{name}/{suffix}": caffe.blobs[name][i] for name in caffe.blobs for i, suffix in enumerate("Wb")
        }
    src = _CaffeLinks(caffe.blobs, caffe.types)
    net = adapter.skeleton()
    if caffe.model == "googlenet":
        googlenet._transfer_googlenet(src, net)
    else:
        getattr(resnet, f"_transfer_{caffe.model}")(src, net)
    return _arrays(net)


def _arrays(net: chainer.Link) -> dict[str, np.ndarray]:
    serializer = chainer.serializers.DictionarySerializer()
    serializer.save(net)
    return {key: np.asarray(value) for key, value in serializer.target.items()}


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert np.array_equal(got[key], value), key


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every default location (our cache, Chainer's) in tmp_path; no mirror variables."""
    monkeypatch.setenv(store.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(store.CHAINER_DATASET_ROOT_ENV, str(tmp_path / "chainer-root"))
    for info in store.PRETRAINED.values():
        for name in (*info.url_envs, *info.sha256_envs):
            monkeypatch.delenv(name, raising=False)
    return tmp_path


# --- every model: converted, loaded into its link, equal to Chainer's own conversion --------------


@pytest.mark.parametrize("model", list(MODELS)[1:])  # VGG16: tests/test_weights.py
def test_converted_caffemodel_loads_into_the_link_as_chainers_conversion_would(
    model: str, isolated_env: Path
) -> None:
    caffe = _write(model, isolated_env, seed=len(model), v1=model == "vgg19")
    resolved = resolve_weights(str(caffe.path), model)
    digest = store.sha256_file(caffe.path)
    assert resolved.npz_path == (isolated_env / "cache" / f"{model}-caffemodel-{digest}.npz").resolve()
    assert (resolved.model, resolved.pretrained, resolved.source) == (model, True, f"caffemodel:{caffe.path}")
    caffe.path.unlink()
    # No other model takes this file, not even VGG16 a VGG19 file holding every VGG16 array.
    for other in MODELS:
        assert bool(check_npz(resolved.npz_path, model=other)) == (other != model), other
    if model == "vgg19":
        assert check_npz(resolved.npz_path, model="vgg16") == [
            "6 array(s) that VGG16 does not have (conv3_4/W, conv3_4/b, conv4_4/W, ...): "
            "another model's weights?"
        ]

    adapter = ADAPTERS[model]()
    loaded = _arrays(adapter.load(resolved.npz_path))
    # The static layout is the link's, persistents included.
    assert {key: value.shape for key, value in loaded.items()} == MODELS[model].layout
    _assert_same(loaded, _chainer_reference(caffe, adapter))


def test_the_stand_in_reads_blobs_as_chainers_caffe_function_does(tmp_path: Path) -> None:
    """_CaffeLinks against Chainer's own CaffeFunction (in a process of its own) on a small network.

    With Chainer's ``_transfer_*`` functions, which the test above calls, this makes
    the reference Chainer's own conversion; the same comparison at full size for
    GoogLeNet, ResNet50 and ResNet101 is ``chainer_caffe_reference.py MODEL ...``
    (minutes each: Chainer's schema needs protobuf's pure-Python parser).
    """
    rng = np.random.default_rng(5)
    blobs: Blobs = {
        "conv": [
            rng.standard_normal((4, 3, 3, 3), dtype=np.float32),
            rng.standard_normal(4, dtype=np.float32),
        ],
        "bn": [
            rng.standard_normal(4, dtype=np.float32),
            rng.random(4, dtype=np.float32) + np.float32(0.1),
            np.array([1.37], np.float32),
        ],
        "scale": [rng.standard_normal(4, dtype=np.float32) for _ in range(2)],
        "fc": [rng.standard_normal((5, 36), dtype=np.float32)],
    }
    types_ = {"conv": "Convolution", "bn": "BatchNorm", "scale": "Scale", "fc": "InnerProduct"}
    layers = [{"name": name, "type": types_[name], "blobs": len(arrays)} for name, arrays in blobs.items()]
    (tmp_path / "layers.json").write_text(json.dumps(layers))
    np.savez(
        tmp_path / "blobs.npz", **{f"{n}|{i}": a for n, arrays in blobs.items() for i, a in enumerate(arrays)}
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "client"), str(REPO / "server")])}
    paths = [str(tmp_path / name) for name in ("layers.json", "blobs.npz", "small.caffemodel", "chainer.npz")]
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "chainer_caffe_reference.py"), "caffe-function", *paths],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    src = _CaffeLinks(blobs, types_)
    ours = {
        "conv/W": src.conv.W.array,
        "conv/b": src.conv.b.array,
        "bn/avg_mean": src.bn.avg_mean,
        "bn/avg_var": src.bn.avg_var,
        "scale/W": src.scale.W.array,
        "scale/bias/b": src.scale.bias.b.array,
        "fc/W": src.fc.W.array,
    }
    assert src.fc.b is None
    with np.load(tmp_path / "chainer.npz") as chainers:
        assert not np.array_equal(chainers["bn/avg_mean"], blobs["bn"][0])  # the factor was applied
        _assert_same({key: chainers[key] for key in ours}, ours)


# --- bad files --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory: pytest.TempPathFactory) -> Caffe:
    return _write("resnet50", tmp_path_factory.mktemp("resnet50"), seed=50)


def test_defects_of_a_resnet_caffemodel_are_all_named_and_nothing_is_written(
    resnet50: Caffe, tmp_path: Path
) -> None:
    def damage(net: caffe_pb2.NetParameter) -> None:
        index = next(i for i, layer in enumerate(net.layer) if layer.name == "scale3a_branch2b")
        del net.layer[index]
        _layer(net, "scale2b_branch2a").blobs.pop()  # no beta
        mean = _layer(net, "bn4c_branch2c").blobs[0]
        del mean.shape.dim[:]
        mean.shape.dim.extend([1024, 1])
        _layer(net, "bn5a_branch1").type = "Scale"
        _layer(net, "res2a_branch1").blobs[0].ClearField("shape")
        del _layer(net, "res2a_branch1").blobs[0].data[-1]

    src = _rewrite(resnet50, tmp_path / "damaged.caffemodel", damage)
    with pytest.raises(WeightsError) as info:
        convert_caffemodel(src, tmp_path / "out.npz", "resnet50")
    message = str(info.value)
    assert message.startswith(f"{src}: not a usable ResNet50 model: ")
    problems = message.split(": not a usable ResNet50 model: ")[1].split("; ")
    assert problems == [
        "wrong size for res2/a/conv4/W (layer 'res2a_branch1' blob 0): "
        "expected 16384 values (256, 64, 1, 1), got 16383",
        "missing blob res2/b1/bn1/beta (layer 'scale2b_branch2a' has 1 blob(s))",
        "missing layer 'scale3a_branch2b'",
        "wrong shape for res4/b2/bn3/avg_mean (layer 'bn4c_branch2c' blob 0): expected (1024), got (1024, 1)",
        "layer 'bn5a_branch1' has type Scale, expected BatchNorm",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.caffemodel"]


def test_zero_batch_norm_scale_factor_gives_zero_statistics_as_caffe_computes(
    resnet50: Caffe, tmp_path: Path
) -> None:
    def zero(net: caffe_pb2.NetParameter) -> None:
        factor = _layer(net, "bn_conv1").blobs[2]
        factor.ClearField("data")
        factor.data.append(0.0)

    out = convert_caffemodel(
        _rewrite(resnet50, tmp_path / "zero.caffemodel", zero), tmp_path / "z.npz", "resnet50"
    )
    with np.load(out) as npz:
        assert not npz["bn1/avg_mean"].any() and not npz["bn1/avg_var"].any()
        assert npz["bn1/gamma"].tolist() == resnet50.blobs["scale_conv1"][0].tolist()
        assert npz["res2/a/bn1/avg_mean"].any()


def test_a_model_file_given_for_another_model_is_rejected_naming_what_is_missing(
    resnet50: Caffe, isolated_env: Path
) -> None:
    with pytest.raises(WeightsError) as info:
        resolve_weights(str(resnet50.path), "resnet101")
    message = str(info.value)
    assert "not a usable ResNet101 model: " in message
    assert "missing layer 'res3b1_branch2a'" in message and "missing layer 'res4b22_branch2c'" in message
    assert "'res3b_branch2a'" not in message  # ResNet-50's layers that 101 lacks are not problems
    with pytest.raises(WeightsError, match=r"not a usable GoogLeNet model: missing layer 'conv1/7x7_s2'; "):
        resolve_weights(str(resnet50.path), "googlenet")
    assert not list((isolated_env / "cache").glob("*.npz"))


def test_npz_for_a_model_is_checked_against_its_layout(isolated_env: Path) -> None:
    layout = MODELS["resnet50"].layout
    arrays = {
        key: np.zeros(shape, np.float32) for key, shape in layout.items() if key.startswith(("conv1", "bn1"))
    }
    arrays["bn1/N"] = np.zeros((), np.float32)  # a count must be an integer
    arrays["conv1/b"] = np.zeros(3, np.float32)
    path = isolated_env / "partial.npz"
    np.savez(path, **arrays)
    assert check_npz(path, model="resnet50")[:3] == [
        "wrong shape for conv1/b: expected (64), got (3)",
        "wrong dtype for bn1/N: expected integer, got float32",
        "missing array res2/a/conv1/W",
    ]
    with pytest.raises(WeightsError) as info:
        resolve_weights(str(path), "resnet50")
    message = str(info.value)
    assert message.startswith(f"weights file {path} cannot be loaded into ResNet50 (npz:{path}): ")
    assert "missing array fc6/b" in message and message.endswith(". Delete or replace it.")


def test_npz_with_arrays_the_model_lacks_is_rejected_but_the_projects_markers_are_not(
    resnet50: Caffe, tmp_path: Path
) -> None:
    path = convert_caffemodel(resnet50.path, tmp_path / "r50.npz", "resnet50")
    with zipfile.ZipFile(path, "a") as archive:
        with archive.open("layergrad_random_seed.npy", "w") as member:
            np.lib.format.write_array(member, np.array(3, dtype=np.int64))
    assert check_npz(path, model="resnet50", deep=True) == []
    with zipfile.ZipFile(path, "a") as archive:
        with archive.open("res6/a/conv1/W.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros(2, np.float32))
    assert check_npz(path, model="resnet50") == [
        "1 array(s) that ResNet50 does not have (res6/a/conv1/W): another model's weights?"
    ]


def test_unknown_model_is_rejected_naming_the_built_in_ones(isolated_env: Path) -> None:
    with pytest.raises(
        WeightsError,
        match=r"no built-in weights for model 'alexnet': expected one of vgg16, vgg19, "
        r"googlenet, resnet50, resnet101, resnet152$",
    ):
        resolve_weights("random:1", "alexnet")
    assert resolve_weights("random:1", "ResNet50").model == "resnet50"  # adapters' names are accepted too


# --- auto, the default and the cache per model --------------------------------------------------------


def test_auto_for_resnet_without_a_caffemodel_explains_how_to_get_one(isolated_env: Path) -> None:
    with pytest.raises(WeightsError) as info:
        resolve_weights("auto", "resnet152")
    message = str(info.value)
    cache = isolated_env / "cache"
    assert message.startswith(
        f"no pretrained ResNet152 weights here (looked for {cache / 'ResNet-152-model.npz'}, "
    )
    for part in (
        "cannot be downloaded automatically",
        store.RESNET_WEIGHTS_PAGE,
        "layergrad-server weights fetch --model resnet152 --caffemodel ResNet-152-model.caffemodel",
        str(cache / "ResNet-152-model.caffemodel"),
        "$LAYERGRAD_RESNET152_WEIGHTS_URL",
        "--weights random:SEED",
    ):
        assert part in message
    assert not cache.exists() or not list(cache.iterdir())


def test_default_without_weights_warns_naming_the_model_and_serves_random(
    isolated_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=store.__name__):
        resolved = resolve_weights(None, "resnet101")
    assert (resolved.random_seed, resolved.npz_path, resolved.pretrained, resolved.model) == (
        0,
        None,
        False,
        "resnet101",
    )
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "NO PRETRAINED RESNET101 WEIGHTS FOUND" in warning
    assert "`layergrad-server weights fetch --model resnet101`" in warning


def test_auto_converts_a_resnet_caffemodel_placed_in_the_cache_then_reuses_the_npz(
    resnet50: Caffe, isolated_env: Path
) -> None:
    cache = isolated_env / "cache"
    cache.mkdir()
    placed = cache / "ResNet-50-model.caffemodel"
    os.symlink(resnet50.path, placed)
    first = resolve_weights("auto", "resnet50")
    assert first.source == f"caffemodel:{placed}"
    assert first.npz_path == (cache / "ResNet-50-model.npz").resolve()
    for spec in ("auto", None):
        again = resolve_weights(spec, "resnet50")
        assert again.source == f"cache:{cache / 'ResNet-50-model.npz'}"
        assert again.file_sha256 == first.file_sha256


def test_chainers_converted_cache_is_found_per_model(resnet50: Caffe, isolated_env: Path) -> None:
    chainer_dir = isolated_env / "chainer-root" / "pfnet" / "chainer" / "models"
    convert_caffemodel(resnet50.path, chainer_dir / "ResNet-50-model.npz", "resnet50")
    resolved = resolve_weights(None, "resnet50")
    assert resolved.source == f"chainer-cache:{chainer_dir / 'ResNet-50-model.npz'}" and resolved.pretrained
    assert not resolve_weights(None, "resnet101").pretrained  # another model's file is not taken


# --- downloads ----------------------------------------------------------------------------------------


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str, list[str]]]:
    """A local HTTP server for a directory: (directory, base URL, requested paths)."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_auto_downloads_googlenet_into_its_cache_name(
    http_dir: tuple[Path, str, list[str]], isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, base, requests = http_dir
    caffe = _write("googlenet", root, seed=3)
    url = f"{base}/googlenet.caffemodel"
    resolved = resolve_weights("auto", "googlenet", url=url)
    cache = isolated_env / "cache"
    assert resolved.source == f"download:{url}" and resolved.model == "googlenet"
    assert resolved.npz_path == (cache / "bvlc_googlenet.npz").resolve()
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "bvlc_googlenet.npz"]
    assert capsys.readouterr().err.splitlines()[-1].startswith("bvlc_googlenet.caffemodel: ")
    direct = convert_caffemodel(caffe.path, isolated_env / "direct.npz", "googlenet")
    assert store.sha256_file(direct) == resolved.file_sha256
    assert resolve_weights(None, "googlenet").source == f"cache:{cache / 'bvlc_googlenet.npz'}"
    assert requests == ["/googlenet.caffemodel"]
    assert store.default_weights_url("googlenet") == store.GOOGLENET_WEIGHTS_URL


def test_resnet_mirror_variable_is_downloaded_and_a_wrong_file_is_rejected(
    resnet50: Caffe,
    http_dir: tuple[Path, str, list[str]],
    isolated_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, base, requests = http_dir
    shutil.copyfile(resnet50.path, root / "r50.caffemodel")
    (root / "wrong.caffemodel").write_bytes(_net(*_synthetic_blobs("googlenet", 1)).SerializeToString())
    monkeypatch.setenv("LAYERGRAD_RESNET101_WEIGHTS_URL", f"{base}/wrong.caffemodel")
    with pytest.raises(
        WeightsError, match=r"is not a usable ResNet101 caffemodel and was deleted: .*missing layer"
    ):
        resolve_weights("auto", "resnet101", progress=False)
    monkeypatch.setenv("LAYERGRAD_RESNET50_WEIGHTS_URL", f"{base}/r50.caffemodel")
    resolved = resolve_weights("auto", "resnet50", progress=False)
    assert resolved.source == f"download:{base}/r50.caffemodel"
    assert sorted(p.name for p in (isolated_env / "cache").iterdir()) == [".lock", "ResNet-50-model.npz"]
    assert requests == ["/wrong.caffemodel", "/r50.caffemodel"]
    assert check_npz(resolved.npz_path, model="resnet50", deep=True) == []


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_fetch_from_a_local_caffemodel_then_show_and_verify(
    resnet50: Caffe, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = isolated_env / "cache"
    assert weights_main(["fetch", "--model", "resnet50", "--caffemodel", str(resnet50.path), "--quiet"]) == 0
    npz = cache / "ResNet-50-model.npz"
    assert capsys.readouterr().out.splitlines() == [str(npz.resolve()), f"sha256 {store.sha256_file(npz)}"]

    assert weights_main(["show"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"cache {cache}"
    assert f"resnet50: {npz} (sha256 {store.sha256_file(npz)})" in out
    assert "vgg19: not cached" in out and "resnet152: not cached" in out
    assert f"  fetch downloads {store.VGG19_WEIGHTS_URL} (mirror: $LAYERGRAD_VGG19_WEIGHTS_URL)" in out
    assert any(
        line.startswith("  not publicly downloadable: get ResNet-101-model.caffemodel") for line in out
    )

    assert weights_main(["verify", "--model", "resnet50", str(npz), str(resnet50.path)]) == 0
    out = capsys.readouterr().out
    assert out.count("OK (sha256 ") == 2 and "ResNet50 weights" in out
    assert weights_main(["verify", str(npz)]) == 1  # checked as VGG16, the default
    out = capsys.readouterr().out
    assert f"{npz}: missing array conv1_1/W" in out
    assert out.endswith(f"{npz}: holds every array of resnet50: pass --model resnet50\n")


def test_cli_convert_for_a_model_and_the_errors_it_reports(
    resnet50: Caffe, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = isolated_env / "r50.npz"
    assert weights_main(["convert", "--model", "RESNET50", str(resnet50.path), str(dst)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(dst)
    assert check_npz(dst, model="resnet50") == []
    assert (
        weights_main(["convert", "--model", "resnet152", str(resnet50.path), str(isolated_env / "x.npz")])
        == 1
    )
    assert "not a usable ResNet152 model: missing layer 'res3b1_branch2a'" in capsys.readouterr().err
    assert weights_main(["fetch", "--model", "resnet101", "--quiet"]) == 1
    assert "no pretrained ResNet101 weights here" in capsys.readouterr().err
    assert weights_main(["fetch", "--model", "alexnet"]) == 2
    assert "unknown model 'alexnet'" in capsys.readouterr().err
    assert not (isolated_env / "x.npz").exists()
