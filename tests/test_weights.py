"""Tests for the pretrained-weights subsystem: conversion, cache, download, CLI.

A full-size synthetic VGG16 caffemodel (random values from a seeded rng) is
built once per session in both Caffe network formats and reused. Downloads go
to a local HTTP server on 127.0.0.1 only.
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import math
import os
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import layergrad
import numpy as np
import pytest
from layergrad_server import _compat
from layergrad_server.engine import random_weights_npz
from layergrad_server.launch import ServerProcess
from layergrad_server.weights import ResolvedWeights, WeightsError, convert_caffemodel, resolve_weights, store
from layergrad_server.weights._gen import caffe_pb2
from layergrad_server.weights.cli import weights_main
from layergrad_server.weights.convert import VGG16_LAYOUT, VGG16_PARAMETER_COUNT, check_npz
from PIL import Image

_compat.apply()

REPO = Path(__file__).resolve().parent.parent
NPZ_NAME = store.PRETRAINED_NPZ_NAME

# The VGG16 layer sequence, as in the published deploy network.
_SEQUENCE: list[tuple[str, str]] = []
for _block, _count in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
    for _i in range(1, _count + 1):
        _SEQUENCE += [(f"conv{_block}_{_i}", "Convolution"), (f"relu{_block}_{_i}", "ReLU")]
    _SEQUENCE.append((f"pool{_block}", "Pooling"))
for _n in (6, 7):
    _SEQUENCE += [(f"fc{_n}", "InnerProduct"), (f"relu{_n}", "ReLU"), (f"drop{_n}", "Dropout")]
_SEQUENCE += [("fc8", "InnerProduct"), ("prob", "Softmax")]

_V1_TYPES = {
    "Convolution": caffe_pb2.V1LayerParameter.CONVOLUTION,
    "ReLU": caffe_pb2.V1LayerParameter.RELU,
    "Pooling": caffe_pb2.V1LayerParameter.POOLING,
    "InnerProduct": caffe_pb2.V1LayerParameter.INNER_PRODUCT,
    "Dropout": caffe_pb2.V1LayerParameter.DROPOUT,
    "Softmax": caffe_pb2.V1LayerParameter.SOFTMAX,
}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _blob(values: np.ndarray, *, legacy: bool) -> caffe_pb2.BlobProto:
    """A BlobProto holding ``values``; legacy blobs use the 4-D num/channels/height/width fields."""
    blob = caffe_pb2.BlobProto()
    if legacy:
        padded = (1,) * (4 - values.ndim) + values.shape
        blob.num, blob.channels, blob.height, blob.width = padded
    else:
        blob.shape.dim.extend(values.shape)
    # Filling a 100M-element repeated field element by element takes many seconds;
    # merging the packed encoding of field 5 (``data``) is equivalent and fast.
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    blob.MergeFromString(_varint((5 << 3) | 2) + _varint(len(raw)) + raw)
    return blob


def _net(arrays: dict[str, np.ndarray], *, v1: bool) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter(name="VGG_ILSVRC_16_layers")
    for name, kind in _SEQUENCE:
        layer = net.layers.add() if v1 else net.layer.add()
        layer.name = name
        layer.type = _V1_TYPES[kind] if v1 else kind
        if kind in ("Convolution", "InnerProduct"):
            layer.blobs.append(_blob(arrays[f"{name}/W"], legacy=v1))
            layer.blobs.append(_blob(arrays[f"{name}/b"], legacy=v1))
    return net


@dataclass
class Models:
    """The session's synthetic model: source arrays and caffemodel files of both formats."""

    arrays: dict[str, np.ndarray]
    current: Path
    v1: Path


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    rng = np.random.default_rng(20240611)
    arrays = {key: rng.standard_normal(shape, dtype=np.float32) for key, shape in VGG16_LAYOUT.items()}
    directory = tmp_path_factory.mktemp("caffemodels")
    current = directory / "vgg16_current.caffemodel"
    current.write_bytes(_net(arrays, v1=False).SerializeToString())
    v1 = directory / "vgg16_v1.caffemodel"
    v1.write_bytes(_net(arrays, v1=True).SerializeToString())
    return Models(arrays=arrays, current=current, v1=v1)


def _write_variant(models: Models, path: Path, mutate: Callable[[caffe_pb2.NetParameter], None]) -> Path:
    net = caffe_pb2.NetParameter.FromString(models.current.read_bytes())
    mutate(net)
    path.write_bytes(net.SerializeToString())
    return path


def _layer(net: caffe_pb2.NetParameter, name: str) -> caffe_pb2.LayerParameter:
    return next(layer for layer in net.layer if layer.name == name)


def _assert_npz_equals(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with np.load(path) as npz:
        assert set(npz.files) == set(arrays)
        for key, expected in arrays.items():
            got = npz[key]
            assert got.dtype == np.float32, key
            assert got.shape == expected.shape, key
            assert np.array_equal(got, expected), key


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".part", ".tmp")))


@pytest.fixture(scope="session")
def chainer_vgg():
    import chainer

    return chainer.links.VGG16Layers(pretrained_model=None)


# --- layout and conversion -------------------------------------------------------------------------


def test_layout_matches_chainer_vgg16_params(chainer_vgg) -> None:
    params = {name.lstrip("/"): param.shape for name, param in chainer_vgg.namedparams()}
    assert params == dict(VGG16_LAYOUT)
    assert VGG16_PARAMETER_COUNT == sum(math.prod(s) for s in params.values()) == 138_357_544


def test_convert_current_format_copies_blobs_exactly(models: Models, tmp_path: Path) -> None:
    dst = convert_caffemodel(models.current, tmp_path / "out.npz")
    assert dst == tmp_path / "out.npz"
    _assert_npz_equals(dst, models.arrays)
    assert _leftovers(tmp_path) == []


def test_convert_v1_format_with_legacy_4d_shapes_copies_blobs_exactly(models: Models, tmp_path: Path) -> None:
    dst = convert_caffemodel(models.v1, tmp_path / "out.npz")
    _assert_npz_equals(dst, models.arrays)


def test_converted_npz_loads_into_chainer_vgg16_layers(models: Models, tmp_path: Path) -> None:
    import chainer

    dst = convert_caffemodel(models.v1, tmp_path / "vgg.npz")
    model = chainer.links.VGG16Layers(pretrained_model=str(dst))
    for name, param in model.namedparams():
        assert np.array_equal(param.array, models.arrays[name.lstrip("/")]), name


def test_truncated_caffemodel_is_rejected_and_nothing_written(models: Models, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.caffemodel"
    with open(models.current, "rb") as src:
        truncated.write_bytes(src.read(models.current.stat().st_size * 3 // 5))
    with pytest.raises(WeightsError, match="truncated"):
        convert_caffemodel(truncated, tmp_path / "out.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.caffemodel"]


def test_garbage_file_is_rejected(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.caffemodel"
    garbage.write_bytes(b"<html>404 Not Found</html>\n" * 100)
    with pytest.raises(WeightsError, match=r"cannot parse|no layers"):
        convert_caffemodel(garbage, tmp_path / "out.npz")


def test_missing_layer_is_named(models: Models, tmp_path: Path) -> None:
    def drop_fc7(net: caffe_pb2.NetParameter) -> None:
        index = next(i for i, layer in enumerate(net.layer) if layer.name == "fc7")
        del net.layer[index]

    src = _write_variant(models, tmp_path / "no_fc7.caffemodel", drop_fc7)
    with pytest.raises(WeightsError) as info:
        convert_caffemodel(src, tmp_path / "out.npz")
    assert str(info.value).endswith("not a usable VGG16 model: missing layer 'fc7'")
    assert not (tmp_path / "out.npz").exists()


def test_missing_bias_blob_is_named(models: Models, tmp_path: Path) -> None:
    src = _write_variant(
        models, tmp_path / "no_bias.caffemodel", lambda net: _layer(net, "conv2_1").blobs.pop()
    )
    with pytest.raises(WeightsError, match=r"missing blob conv2_1/b \(layer 'conv2_1' has 1 blob\(s\)\)$"):
        convert_caffemodel(src, tmp_path / "out.npz")


def test_wrong_shape_names_blob_with_expected_and_got(models: Models, tmp_path: Path) -> None:
    def reshape(net: caffe_pb2.NetParameter) -> None:
        shape = _layer(net, "conv3_1").blobs[0].shape
        del shape.dim[:]
        shape.dim.extend([256, 128, 1, 9])  # same element count, wrong layout

    src = _write_variant(models, tmp_path / "bad_shape.caffemodel", reshape)
    with pytest.raises(WeightsError) as info:
        convert_caffemodel(src, tmp_path / "out.npz")
    assert str(info.value).endswith(
        "wrong shape for conv3_1/W: expected (256, 128, 3, 3), got (256, 128, 1, 9)"
    )


def test_wrong_value_count_is_named(models: Models, tmp_path: Path) -> None:
    def shorten(net: caffe_pb2.NetParameter) -> None:
        blob = _layer(net, "fc8").blobs[1]
        blob.ClearField("shape")
        del blob.data[-1]

    src = _write_variant(models, tmp_path / "short_bias.caffemodel", shorten)
    with pytest.raises(WeightsError, match=r"wrong size for fc8/b: expected 1000 values \(1000\), got 999$"):
        convert_caffemodel(src, tmp_path / "out.npz")


def test_wrong_layer_type_is_named(models: Models, tmp_path: Path) -> None:
    def retype(net: caffe_pb2.NetParameter) -> None:
        _layer(net, "fc6").type = "Convolution"

    src = _write_variant(models, tmp_path / "retyped.caffemodel", retype)
    with pytest.raises(WeightsError, match=r"layer 'fc6' has type Convolution, expected InnerProduct$"):
        convert_caffemodel(src, tmp_path / "out.npz")


# --- resolve_weights -------------------------------------------------------------------------------


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Points every default location (our cache, Chainer's cache, the URL) into tmp_path."""
    monkeypatch.setenv(store.CACHE_DIR_ENV, str(tmp_path / "default-cache"))
    monkeypatch.setenv(store.CHAINER_DATASET_ROOT_ENV, str(tmp_path / "chainer-root"))
    monkeypatch.setenv(store.WEIGHTS_URL_ENV, "http://127.0.0.1:9/unreachable.caffemodel")
    monkeypatch.delenv(store.WEIGHTS_SHA256_ENV, raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def chainer_saved_npz(chainer_vgg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An npz written by Chainer's own save_npz, uncompressed as Chainer's converted cache is."""
    import chainer

    path = tmp_path_factory.mktemp("chainer") / "saved.npz"
    chainer.serializers.save_npz(str(path), chainer_vgg, compression=False)
    return path


def test_random_spec_gives_seed_and_no_file(isolated_env: Path) -> None:
    assert resolve_weights("random:7") == ResolvedWeights(
        npz_path=None, random_seed=7, source="random:7", pretrained=False, file_sha256=""
    )
    assert resolve_weights("random").random_seed == 0
    with pytest.raises(WeightsError, match="non-negative integer"):
        resolve_weights("random:x")


def test_none_without_any_cache_warns_loudly_and_falls_back_to_random(
    isolated_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="layergrad_server.weights.store"):
        resolved = resolve_weights(None)
    assert resolved.random_seed == 0 and not resolved.pretrained and resolved.npz_path is None
    assert any(r.levelno == logging.WARNING and "RANDOM weights" in r.getMessage() for r in caplog.records)


def test_chainer_saved_npz_path_is_accepted(isolated_env: Path, chainer_saved_npz: Path) -> None:
    resolved = resolve_weights(str(chainer_saved_npz))
    assert resolved.npz_path == chainer_saved_npz.resolve()
    assert resolved.pretrained and resolved.random_seed is None
    assert resolved.source == f"npz:{chainer_saved_npz}"
    assert resolved.file_sha256 == store.sha256_file(chainer_saved_npz)


def test_none_and_auto_discover_chainers_existing_cache(isolated_env: Path, chainer_saved_npz: Path) -> None:
    chainer_cache = isolated_env / "chainer-root" / "pfnet" / "chainer" / "models" / NPZ_NAME
    chainer_cache.parent.mkdir(parents=True)
    os.symlink(chainer_saved_npz, chainer_cache)
    for spec in (None, "auto"):  # "auto" must not try the (unreachable) URL
        resolved = resolve_weights(spec)
        assert resolved.source == f"chainer-cache:{chainer_cache}"
        assert resolved.npz_path == chainer_saved_npz.resolve()
        assert resolved.pretrained
        assert resolved.file_sha256 == store.sha256_file(chainer_saved_npz)


def test_missing_npz_is_rejected(isolated_env: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(str(isolated_env / "nope.npz"))


def test_npz_with_wrong_shape_and_missing_key_is_rejected_naming_both(isolated_env: Path) -> None:
    arrays = {key: np.zeros((1,) * len(shape), np.float32) for key, shape in VGG16_LAYOUT.items()}
    arrays["conv1_1/W"] = np.zeros((64, 3, 3, 3), np.float32)
    del arrays["fc8/b"]
    path = isolated_env / "small.npz"
    np.savez_compressed(path, **arrays)
    with pytest.raises(WeightsError) as info:
        resolve_weights(str(path))
    message = str(info.value)
    assert "missing array fc8/b" in message
    assert "wrong shape for fc6/W: expected (4096, 25088), got (1, 1)" in message
    assert "conv1_1/W" not in message


def test_truncated_npz_is_rejected(isolated_env: Path, chainer_saved_npz: Path) -> None:
    path = isolated_env / "cut.npz"
    with open(chainer_saved_npz, "rb") as src:
        path.write_bytes(src.read(10_000_000))
    with pytest.raises(WeightsError, match="not a readable npz"):
        resolve_weights(str(path))


def test_unknown_spec_is_rejected(isolated_env: Path) -> None:
    with pytest.raises(WeightsError, match="unrecognised weights spec"):
        resolve_weights("vgg16.h5")


def test_caffemodel_spec_converts_once_into_cache_keyed_by_sha256(models: Models, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = resolve_weights(str(models.current), cache_dir=cache)
    digest = store.sha256_file(models.current)
    assert first.npz_path == (cache / f"vgg16-caffemodel-{digest}.npz").resolve()
    assert first.source == f"caffemodel:{models.current}" and first.pretrained
    assert first.file_sha256 == store.sha256_file(first.npz_path)
    _assert_npz_equals(first.npz_path, models.arrays)
    stamp = first.npz_path.stat().st_mtime_ns
    second = resolve_weights(str(models.current), cache_dir=cache)
    assert second == first
    assert second.npz_path.stat().st_mtime_ns == stamp  # reused, not converted again
    assert _leftovers(cache) == []


def test_two_processes_resolving_one_caffemodel_produce_one_intact_npz(
    models: Models, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    code = (
        "import json, logging, sys\n"
        "from pathlib import Path\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
        "from layergrad_server.weights import resolve_weights\n"
        "r = resolve_weights(sys.argv[1], cache_dir=Path(sys.argv[2]))\n"
        "print(json.dumps([str(r.npz_path), r.file_sha256]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "client"), str(REPO / "server")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(models.v1), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    results = []
    conversions = 0
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
        conversions += err.count("layergrad_server.weights.convert: converted ")
    assert conversions == 1  # the lock made the second process reuse the first one's npz
    assert results[0] == results[1]
    assert sorted(p.name for p in cache.iterdir()) == [".lock", Path(results[0][0]).name]
    assert store.sha256_file(results[0][0]) == results[0][1]
    _assert_npz_equals(Path(results[0][0]), models.arrays)


# --- download ----------------------------------------------------------------------------------------


@dataclass
class FileServer:
    """A local HTTP server for one payload file, with switchable misbehaviour."""

    url: str
    payload: Path
    mode: str = "ok"  # "ok", "drop_once", "always_short", "not_found"
    requests: list[str | None] = field(default_factory=list)
    drops: int = 0


@pytest.fixture
def file_server(models: Models) -> Iterator[FileServer]:
    state = FileServer(url="", payload=models.v1)
    etag = '"vgg16-synthetic"'

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            state.requests.append(self.headers.get("Range"))
            if state.mode == "not_found":
                self.send_error(404, "Not Found")
                return
            size = state.payload.stat().st_size
            start = 0
            ranged = self.headers.get("Range")
            if ranged and state.mode != "always_short" and self.headers.get("If-Range") in (None, etag):
                start = int(ranged.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(size - start))
            self.send_header("ETag", etag)
            self.end_headers()
            stop = size
            if state.mode == "always_short" or (state.mode == "drop_once" and state.drops == 0):
                state.drops += 1
                stop = start + (size - start) // 2
            with open(state.payload, "rb") as src:
                src.seek(start)
                remaining = stop - start
                while remaining:
                    chunk = src.read(min(remaining, 1 << 20))
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
            self.close_connection = True

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/VGG_ILSVRC_16_layers.caffemodel"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "RETRY_BACKOFF_S", 0.01)


def test_auto_downloads_verifies_and_converts(
    models: Models, file_server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    resolved = resolve_weights("auto", cache_dir=cache, url=file_server.url, progress=True)
    assert resolved.source == f"download:{file_server.url}"
    assert resolved.npz_path == (cache / NPZ_NAME).resolve() and resolved.pretrained
    assert resolved.file_sha256 == store.sha256_file(resolved.npz_path)
    _assert_npz_equals(resolved.npz_path, models.arrays)
    assert sorted(p.name for p in cache.iterdir()) == [".lock", NPZ_NAME]
    assert file_server.requests == [None]
    progress_lines = capsys.readouterr().err.splitlines()
    assert progress_lines and progress_lines[-1].startswith("VGG_ILSVRC_16_layers.caffemodel: ")
    assert "(100%)" in progress_lines[-1] and "MiB/s" in progress_lines[-1]
    # A second resolve uses the cache without any request.
    again = resolve_weights("auto", cache_dir=cache, url=file_server.url)
    assert again.source == f"cache:{cache / NPZ_NAME}"
    assert (again.npz_path, again.file_sha256) == (resolved.npz_path, resolved.file_sha256)
    assert file_server.requests == [None]


def test_interrupted_download_resumes_with_range(
    models: Models, file_server: FileServer, tmp_path: Path, fast_retries: None
) -> None:
    file_server.mode = "drop_once"
    cache = tmp_path / "cache"
    resolved = resolve_weights("auto", cache_dir=cache, url=file_server.url, progress=False)
    assert file_server.drops == 1
    assert len(file_server.requests) == 2 and file_server.requests[0] is None
    resumed_at = int(file_server.requests[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < models.v1.stat().st_size
    _assert_npz_equals(resolved.npz_path, models.arrays)
    assert sorted(p.name for p in cache.iterdir()) == [".lock", NPZ_NAME]


def test_corrupt_download_is_rejected_and_removed(file_server: FileServer, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(np.random.default_rng(3).bytes(3 << 20))
    file_server.payload = garbage
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match="is not a usable VGG16 caffemodel and was deleted"):
        resolve_weights("auto", cache_dir=cache, url=file_server.url, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [".lock"]


def test_download_with_wrong_sha256_is_rejected_and_removed(file_server: FileServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=r"sha256 [0-9a-f]{64}, expected 0{64}; it was deleted"):
        resolve_weights(
            "auto", cache_dir=cache, url=file_server.url, progress=False, expected_sha256="0" * 64
        )
    assert sorted(p.name for p in cache.iterdir()) == [".lock"]


def test_download_that_never_completes_fails_after_bounded_retries(
    file_server: FileServer, tmp_path: Path, fast_retries: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = tmp_path / "small.bin"
    small.write_bytes(b"\0" * (2 << 20))
    file_server.payload = small
    file_server.mode = "always_short"
    monkeypatch.setattr(store, "DOWNLOAD_RETRIES", 2)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match="failed after 3 attempts"):
        resolve_weights("auto", cache_dir=cache, url=file_server.url, progress=False)
    assert len(file_server.requests) == 3
    assert sorted(p.name for p in cache.iterdir()) == [".lock"]


def test_http_error_fails_at_once_with_status(file_server: FileServer, tmp_path: Path) -> None:
    file_server.mode = "not_found"
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match="HTTP 404"):
        resolve_weights("auto", cache_dir=cache, url=file_server.url, progress=False)
    assert file_server.requests == [None]
    assert sorted(p.name for p in cache.iterdir()) == [".lock"]


def test_host_that_does_not_resolve_fails_at_once_without_retrying(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # .invalid never resolves (RFC 6761): offline and online alike, getaddrinfo fails.
    url = "http://layergrad-weights.invalid/VGG_ILSVRC_16_layers.caffemodel"
    caplog.set_level(logging.WARNING, logger=store.__name__)
    cache = tmp_path / "cache"
    assert weights_main(["fetch", "--cache-dir", str(cache), "--url", url, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cannot resolve layergrad-weights.invalid" in err
    assert "--weights PATH" in err and store.WEIGHTS_URL_ENV in err
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    assert sorted(p.name for p in cache.iterdir()) == [".lock"]


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_fetch_prints_path_and_sha256(
    file_server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    assert weights_main(["fetch", "--cache-dir", str(cache), "--url", file_server.url, "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [str((cache / NPZ_NAME).resolve()), f"sha256 {store.sha256_file(cache / NPZ_NAME)}"]


def test_cli_convert_and_verify_report_good_files(
    models: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "vgg.npz"
    assert weights_main(["convert", str(models.current), str(dst)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(dst)
    assert weights_main(["verify", str(dst), str(models.v1)]) == 0
    out = capsys.readouterr().out
    assert f"{dst}: OK (sha256 {store.sha256_file(dst)})" in out
    assert f"{models.v1}: OK (sha256 " in out


def test_cli_verify_reports_each_problem_and_exits_1(
    chainer_saved_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, **{"conv1_1/W": np.zeros((64, 3, 3, 3), np.float32)})
    bad_model = tmp_path / "bad.caffemodel"
    bad_model.write_bytes(b"\x0a\x05hello")
    assert weights_main(["verify", str(bad_npz), str(bad_model), str(tmp_path / "none.npz")]) == 1
    out = capsys.readouterr().out
    assert f"{bad_npz}: missing array conv1_1/b" in out
    assert f"{bad_npz}: missing array fc8/b" in out
    assert f"{bad_model}: " in out and "no layers found" in out
    assert f"{tmp_path / 'none.npz'}: no such file" in out


def test_cli_verify_detects_corrupted_npz_data(
    chainer_saved_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged.npz"
    shutil.copyfile(chainer_saved_npz, damaged)
    with zipfile.ZipFile(damaged) as archive:
        info = archive.getinfo("fc7/W.npy")
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 4096
    with open(damaged, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert check_npz(damaged) == []  # headers are intact ...
    assert weights_main(["verify", str(damaged)]) == 1  # ... but the data is not
    assert "not a readable npz" in capsys.readouterr().out


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_line_with_rate_and_eta(
    file_server: FileServer, tmp_path: Path
) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"\1" * (3 << 20))
    file_server.payload = payload
    terminal = _FakeTerminal()
    dest = tmp_path / "payload.bin.part"
    assert store.download_file(file_server.url, dest, stream=terminal) == 3 << 20
    assert dest.read_bytes() == payload.read_bytes()
    text = terminal.getvalue()
    assert text.startswith("\r[") and text.endswith("\n") and text.count("\n") == 1
    assert "ETA " in text and "MiB/s" in text
    assert "3.0 MiB / 3.0 MiB (100%)" in text.rsplit("\r", 1)[-1]


def test_stale_partial_download_is_discarded_not_trusted(
    models: Models, file_server: FileServer, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / (store.CAFFEMODEL_NAME + store.PART_SUFFIX)
    stale.write_bytes(b"left over by a killed process")
    resolved = resolve_weights("auto", cache_dir=cache, url=file_server.url, progress=False)
    assert file_server.requests == [None]  # downloaded from the start
    _assert_npz_equals(resolved.npz_path, models.arrays)
    assert sorted(p.name for p in cache.iterdir()) == [".lock", NPZ_NAME]


def test_written_npz_honours_umask_not_private_tempfile_mode(tmp_path: Path) -> None:
    from layergrad_server.weights.convert import write_npz_atomic

    old = os.umask(0o022)
    try:
        path = write_npz_atomic({"a": np.zeros(3, np.float32)}, tmp_path / "a.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_server_on_converted_caffemodels_gives_the_gradients_of_the_same_weights_as_npz(
    tmp_path: Path,
) -> None:
    with np.load(random_weights_npz(3)) as loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    sources = {
        "npz": tmp_path / "vgg16.npz",
        "current": tmp_path / "current.caffemodel",
        "v1": tmp_path / "v1.caffemodel",
    }
    np.savez(sources["npz"], **arrays)
    sources["current"].write_bytes(_net(arrays, v1=False).SerializeToString())
    sources["v1"].write_bytes(_net(arrays, v1=True).SerializeToString())
    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(
        image, "PNG"
    )

    served = {}
    for name, path in sources.items():
        env = {store.CACHE_DIR_ENV: str(tmp_path / "cache")}
        with ServerProcess(["--weights", str(path)], tmp_path / f"{name}.log", env=env) as server:
            server.wait_serving()
            with layergrad.Client(server.address, timeout=300) as client:
                info = client.model_info()
                result = client.gradients(
                    [image.getvalue()],
                    layergrad.ClassScore("fc8", [7]),
                    pattern="grad",
                    input=True,
                    parameters=["conv1_1/W", "fc8/b"],
                )
        served[name] = (info.weights.parameters_sha256, result)
    reference_digest, reference = served["npz"]
    for name in ("current", "v1"):
        digest, result = served[name]
        assert digest == reference_digest, name
        np.testing.assert_array_equal(result.input, reference.input)
        for param in ("conv1_1/W", "fc8/b"):
            np.testing.assert_array_equal(result.parameters[param], reference.parameters[param])
    assert np.abs(reference.input).max() > 0
